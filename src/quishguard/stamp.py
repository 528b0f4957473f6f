"""Verdict headers and the header edits made to a relayed message.

The message is edited as bytes so the body is relayed exactly as received:
the header block is split at the first empty line, header fields with our
prefix are removed (so a sender cannot forge a verdict), the Subject gets the
tag prefix for the tag action, and our headers are prepended. Values follow
RFC 5322 (lines folded under 78 characters) and RFC 2047 (non-ASCII text as
encoded-words); CR, LF and other control characters are removed first.
"""

from __future__ import annotations

import re
from email.header import Header

from .model import Verdict

# RFC 5322 section 2.1.1: lines SHOULD be at most 78 characters.
MAX_LINE = 78
QR_HEADER_MAX_CHARS = 200

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SCHEME = re.compile(r"\b(h)tt(ps?)(?=:)", re.IGNORECASE)


def clean_value(text: str) -> str:
    """Remove CR, LF and every other control character, and trim."""
    return _CONTROL.sub("", text).strip()


def defang(url: str) -> str:
    """Turn `http`/`https` schemes into `hxxp`/`hxxps` so the value is not a live link."""
    return _SCHEME.sub(lambda m: f"{m.group(1)}xx{m.group(2)}", url)


def _field(name: str, value: str) -> bytes:
    """Format one header field, RFC 2047-encoding non-ASCII values."""
    value = clean_value(value)
    if value.isascii():
        return f"{name}: {value}\r\n".encode("ascii")
    encoded = Header(value, "utf-8", header_name=name, maxlinelen=MAX_LINE).encode(linesep="\r\n")
    return f"{name}: {encoded}\r\n".encode("ascii")


def _folded_list(name: str, items: list[str]) -> bytes:
    """Format `items` separated by ", ", folding between items to keep lines under 78 characters."""
    lines: list[str] = []
    current = f"{name}:"
    for index, item in enumerate(items):
        piece = item + ("," if index < len(items) - 1 else "")
        if len(current) + 1 + len(piece) > MAX_LINE and current.strip() != f"{name}:":
            lines.append(current)
            current = " " + piece
        else:
            current = f"{current} {piece}"
    lines.append(current)
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def verdict_headers(verdict: Verdict, prefix: str) -> list[bytes]:
    """Return the verdict header fields, each ending in CRLF."""
    fields = [
        _field(f"{prefix}Score", f"{verdict.score:.1f}"),
        _field(f"{prefix}Action", verdict.action.label),
    ]
    findings = [f"{clean_value(f.rule)}={f.score:.1f}" for f in verdict.findings]
    fields.append(_folded_list(f"{prefix}Findings", findings) if findings
                  else _field(f"{prefix}Findings", "none"))
    for code in verdict.qr_codes:
        payload = defang(clean_value(code.payload))[:QR_HEADER_MAX_CHARS]
        fields.append(_field(f"{prefix}QR", payload))
    return fields


def split_message(raw: bytes) -> tuple[bytes, bytes]:
    """Split `raw` into the header block (with its final line end) and the rest.

    A message without an empty line is all headers, per RFC 5322.
    """
    match = re.search(rb"\r?\n\r?\n", raw)
    if match is None:
        return raw, b""
    end = match.start() + (2 if raw[match.start()] == 0x0D else 1)
    return raw[:end], raw[end:]


def _header_fields(block: bytes) -> list[bytes]:
    """Split a header block into fields, each with its folded continuation lines."""
    fields: list[bytes] = []
    for line in block.splitlines(keepends=True):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def _field_name(field: bytes) -> bytes:
    return field.split(b":", 1)[0].strip().lower()


def edit_message(raw: bytes, *, prefix: str, added: list[bytes], subject_tag: str | None = None) -> bytes:
    """Return `raw` with our prefixed headers removed, `added` prepended, and
    the Subject prefixed with `subject_tag` when given. The body is not touched."""
    block, body = split_message(raw)
    lowered_prefix = prefix.lower().encode("ascii")
    fields = [f for f in _header_fields(block) if not _field_name(f).startswith(lowered_prefix)]

    if subject_tag:
        fields = _tag_subject(fields, subject_tag)

    return b"".join(added) + b"".join(fields) + body


def _tag_subject(fields: list[bytes], tag: str) -> list[bytes]:
    tag = clean_value(tag) + (" " if tag.endswith(" ") else "")
    if tag.isascii():
        tag_bytes = tag.encode("ascii")
    else:
        tag_bytes = Header(tag.rstrip(), "utf-8").encode().encode("ascii") + b" "

    for index, field in enumerate(fields):
        if _field_name(field) == b"subject":
            name, _, value = field.partition(b":")
            fields[index] = name + b": " + tag_bytes + value.lstrip(b" \t")
            return fields
    fields.append(b"Subject: " + tag_bytes.rstrip() + b"\r\n")
    return fields


def stamp_message(raw: bytes, verdict: Verdict, *, prefix: str, subject_tag: str | None,
                  extra: list[bytes] | None = None) -> bytes:
    """Return `raw` with the verdict headers of `verdict` and `extra` fields added."""
    added = verdict_headers(verdict, prefix) + (extra or [])
    return edit_message(raw, prefix=prefix, added=added, subject_tag=subject_tag)
