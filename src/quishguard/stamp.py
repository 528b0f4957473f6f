"""Verdict headers and the header edits made to a relayed message.

The message is edited as bytes, so the body is relayed exactly as received.
The header block is split at the first empty line and header fields with our
prefix are removed, so a sender cannot forge a verdict. For the tag action
the Subject gets the tag prefix. Then our headers are prepended. Values follow
RFC 5322 (lines folded under 78 characters) and RFC 2047 (non-ASCII text as
encoded-words); CR, LF and other control characters are removed first.

Relayed mail also gets our Authentication-Results field (RFC 8601) with the
hop's SPF, DKIM, DMARC and ARC results, after incoming fields that claim our
authserv-id are removed (RFC 8601, section 5). With `[stamp] secret` set it
gets the `Stamp` field: an HMAC-SHA256 over Message-ID, Date, From, the
envelope recipients, the action and a timestamp, which `quishguard audit`
checks on delivered copies.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import re
import time
from dataclasses import dataclass
from email.header import Header

from .config import Config
from .model import Action, AuthFacts, Verdict

# RFC 5322 section 2.1.1: lines SHOULD be at most 78 characters.
MAX_LINE = 78
QR_HEADER_MAX_CHARS = 200

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SCHEME = re.compile(r"\b(h)tt(ps?)(?=:)", re.IGNORECASE)
_COMMENT = re.compile(r"\([^()]*\)")


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


def edit_message(raw: bytes, *, prefix: str, added: list[bytes], subject_tag: str | None = None,
                 remove_authserv_id: str | None = None) -> bytes:
    """Return `raw` with our prefixed headers removed, `added` prepended, and
    the Subject prefixed with `subject_tag` when given. With `remove_authserv_id`,
    Authentication-Results fields that claim that authserv-id are removed too.
    The body is not touched."""
    block, body = split_message(raw)
    lowered_prefix = prefix.lower().encode("ascii")
    fields = [f for f in _header_fields(block) if not _field_name(f).startswith(lowered_prefix)]
    if remove_authserv_id:
        fields = [f for f in fields if not (_field_name(f) == b"authentication-results"
                                            and _authserv_of(f) == remove_authserv_id.lower())]

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


# --- Authentication-Results (RFC 8601) and the path stamp -----------------

def authserv_id(config: Config) -> str:
    """Return the authserv-id of our Authentication-Results header: `[auth] authserv_id`, else the host name."""
    return config["auth.authserv_id"] or config.hostname


def _authserv_of(field: bytes) -> str:
    value = field.split(b":", 1)[1].decode("utf-8", "replace") if b":" in field else ""
    value = _COMMENT.sub(" ", value.split(";", 1)[0])
    words = value.split()
    return words[0].lower() if words else ""


def is_forged_auth_results(name: str, value: str, our_authserv_id: str) -> bool:
    """Tell whether an incoming header is an Authentication-Results field that claims our authserv-id.

    RFC 8601, section 5: a border MTA removes such fields, because only we
    may write results under our id and the copy arrived from elsewhere.
    """
    if name.strip().lower() != "authentication-results":
        return False
    return _authserv_of(f"{name}:{value}".encode("utf-8", "replace")) == our_authserv_id.lower()


def _result_property(value: str) -> str:
    # RFC 8601 property values are tokens or quoted strings; local-parts
    # with special characters need quotes.
    if value and re.fullmatch(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.@]+", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def auth_results_field(our_authserv_id: str, auth: AuthFacts | None) -> bytes | None:
    """Format our Authentication-Results field (RFC 8601, section 2.2), or None without DNS results."""
    if auth is None:
        return None
    items = []
    for check in auth.checks:
        text = f"{check.method}={check.result}"
        if check.reason:
            reason = clean_value(check.reason).replace("\\", "").replace("(", "[").replace(")", "]")
            text += f" ({reason[:120]})"
        for name, value in check.properties:
            if value:
                text += f" {name}={_result_property(clean_value(value))}"
        items.append(text)
    if not items:
        items.append("none")
    return _folded_parameters("Authentication-Results", [f"{our_authserv_id};"] + [
        item + (";" if index < len(items) - 1 else "") for index, item in enumerate(items)])


def _folded_parameters(name: str, words: list[str]) -> bytes:
    """Format `words` (already punctuated) as one field, folding at spaces to keep lines under 78 characters."""
    tokens = " ".join(words).split(" ")
    lines: list[str] = []
    current = f"{name}:"
    for token in tokens:
        if len(current) + 1 + len(token) > MAX_LINE and current.strip() != f"{name}:":
            lines.append(current)
            current = "\t" + token
        else:
            current = f"{current} {token}"
    lines.append(current)
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


STAMP_VERSION = "1"
# Recipients listed one by one in the stamp; beyond this, one digest of all.
MAX_STAMP_RECIPIENTS = 50
_RECIPIENT_HASH_CHARS = 12


def _first_value(fields: list[bytes], name: bytes) -> str | None:
    for field in fields:
        if _field_name(field) == name:
            value = field.split(b":", 1)[1]
            return re.sub(r"\r?\n", "", value.decode("utf-8", "replace")).strip()
    return None


def _canonical_date(value: str | None) -> str:
    # Downstream systems refold or re-encode a Date, but not the moment it names.
    if not value:
        return ""
    try:
        return str(int(email.utils.parsedate_to_datetime(value).timestamp()))
    except (TypeError, ValueError, IndexError, OverflowError):
        return " ".join(value.split())


def _canonical_from(value: str | None) -> str:
    # Only the addresses: display names get re-encoded (RFC 2047) on export.
    if not value:
        return ""
    try:
        pairs = email.utils.getaddresses([value])
    except RecursionError:
        # Comments nested a few hundred levels deep exhaust the recursive
        # parser; stamping and verifying both fall back to the folded value.
        return " ".join(value.split()).lower()
    addresses = [address.lower() for _name, address in pairs if address]
    return ",".join(addresses)


def recipient_tag(secret: bytes, recipient: str) -> str:
    """Return the keyed hash that stands for `recipient` in a stamp, so Bcc recipients stay hidden."""
    digest = hmac.new(secret, b"rcpt\0" + recipient.strip().strip("<>").lower().encode("utf-8"), "sha256")
    return digest.hexdigest()[:_RECIPIENT_HASH_CHARS]


def _recipient_tags(secret: bytes, recipients: list[str] | tuple[str, ...]) -> list[str]:
    tags = sorted({recipient_tag(secret, recipient) for recipient in recipients})
    if len(tags) <= MAX_STAMP_RECIPIENTS:
        return tags
    return ["all-" + hashlib.sha256(",".join(tags).encode("ascii")).hexdigest()[:_RECIPIENT_HASH_CHARS]]


def _stamp_mac(secret: bytes, fields: list[bytes], timestamp: str, action: str, tags: list[str]) -> str:
    signed = "\n".join([
        f"v={STAMP_VERSION}",
        "".join((_first_value(fields, b"message-id") or "").split()),
        _canonical_date(_first_value(fields, b"date")),
        _canonical_from(_first_value(fields, b"from")),
        ",".join(tags),
        action,
        timestamp,
    ])
    digest = hmac.new(secret, signed.encode("utf-8"), "sha256").digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def stamp_field(raw: bytes, recipients: list[str] | tuple[str, ...], action: str, secret: bytes, prefix: str,
                now: float | None = None) -> bytes:
    """Return the `Stamp` field: a timestamp and an HMAC-SHA256 over Message-ID, Date, From,
    the envelope recipients (as keyed hashes), the action and the timestamp. Not over the body,
    because downstream systems rewrite bodies and a delivered copy must still verify.
    """
    fields = _header_fields(split_message(raw)[0])
    timestamp = str(int(time.time() if now is None else now))
    tags = _recipient_tags(secret, recipients)
    mac = _stamp_mac(secret, fields, timestamp, action, tags)
    words = [f"v={STAMP_VERSION};", f"t={timestamp};", f"a={action};", "r=" + ", ".join(tags) + ";",
             f"h={mac}"]
    return _folded_parameters(f"{prefix}Stamp", words)


@dataclass(frozen=True)
class StampCheck:
    """Outcome of checking a delivered copy's stamp: `status` is valid, missing or invalid."""

    status: str
    reason: str = ""
    action: str = ""
    timestamp: int | None = None


def verify_stamp(raw: bytes, secret: bytes, prefix: str, recipients: list[str] | tuple[str, ...] = ()
                 ) -> StampCheck:
    """Check the topmost `Stamp` field of a delivered copy; `recipients` (for example its
    Delivered-To) must then be among the stamped envelope recipients."""
    fields = _header_fields(split_message(raw)[0])
    value = _first_value(fields, f"{prefix}stamp".lower().encode("ascii"))
    if value is None:
        return StampCheck("missing", f"no {prefix}Stamp header")

    tags_of: dict[str, str] = {}
    for item in value.split(";"):
        name, equals, tag_value = item.partition("=")
        if equals:
            tags_of[name.strip().lower()] = "".join(tag_value.split())
    if tags_of.get("v") != STAMP_VERSION or not {"t", "a", "r", "h"} <= tags_of.keys():
        return StampCheck("invalid", "stamp tags missing or of an unknown version")
    if not tags_of["t"].isdigit():
        return StampCheck("invalid", "stamp timestamp is not a number")

    tags = [tag for tag in tags_of["r"].split(",") if tag]
    expected = _stamp_mac(secret, fields, tags_of["t"], tags_of["a"], tags)
    if not hmac.compare_digest(expected, tags_of["h"]):
        return StampCheck("invalid", "HMAC does not match the Message-ID, Date, From and stamp fields",
                          tags_of["a"], int(tags_of["t"]))

    known = [recipient_tag(secret, recipient) for recipient in recipients]
    listed = not any(tag.startswith("all-") for tag in tags)
    if known and listed and not set(known) & set(tags):
        return StampCheck("invalid", "stamp was made for other envelope recipients", tags_of["a"],
                          int(tags_of["t"]))
    return StampCheck("valid", "", tags_of["a"], int(tags_of["t"]))


def stamp_secret(config: Config) -> bytes | None:
    secret = config["stamp.secret"]
    return secret.encode("utf-8") if secret else None


def relay_headers(raw: bytes, verdict: Verdict, auth: AuthFacts | None, recipients: list[str] | tuple[str, ...],
                  config: Config, now: float | None = None) -> list[bytes]:
    """Return the fields the hop adds to a relayed message: the verdict headers, our
    Authentication-Results (with DNS results only) and the Stamp (with `[stamp] secret` only)."""
    prefix = config["headers.prefix"]
    added = verdict_headers(verdict, prefix)
    results = auth_results_field(authserv_id(config), auth)
    if results is not None:
        added.append(results)
    secret = stamp_secret(config)
    if secret is not None:
        added.append(stamp_field(raw, recipients, verdict.action.label, secret, prefix, now))
    return added


def is_removed_field(field: bytes, config: Config) -> bool:
    """Tell whether the hop removes an incoming field: our prefix, or an Authentication-Results with our authserv-id."""
    name = _field_name(field)
    if name.startswith(config["headers.prefix"].lower().encode("ascii")):
        return True
    return name == b"authentication-results" and _authserv_of(field) == authserv_id(config).lower()


def relay_copy(raw: bytes, verdict: Verdict, auth: AuthFacts | None, recipients: list[str] | tuple[str, ...],
               config: Config, now: float | None = None) -> bytes:
    """Return the message as the SMTP front end relays it: `relay_headers` added, the fields
    `is_removed_field` names removed, the Subject tagged for the tag action, the body untouched."""
    added = relay_headers(raw, verdict, auth, recipients, config, now)
    tag = config["headers.subject_tag"] if verdict.action is Action.TAG else None
    return edit_message(raw, prefix=config["headers.prefix"], added=added, subject_tag=tag,
                        remove_authserv_id=authserv_id(config))
