"""A second, strict reader of the MIME tree, so that a part hidden from one parser is still inspected.

Attackers shape MIME so that a filter's parser and the recipient's mail
client split one message differently: two `boundary=` parameters, an RFC
2231 continued boundary next to a plain one, two Content-Type headers,
base64 with padding in the middle. `structure` parses with the `email`
package; this module reads the same bytes without it and lists the leaf
parts it finds. `compare_parts` then names the parts only this reader
found, so that `structure` inspects them too, and reports any difference
between the two lists as a "parser-mismatch" `MimeAnomaly`.

Where the standards leave a choice, this reader takes the other one than
the `email` package (`compat32` reads the first Content-Type and
Content-Transfer-Encoding header and the first plain `boundary` parameter),
so that the two readers together cover both readings:

- the last Content-Type and Content-Transfer-Encoding header counts;
- an RFC 2231 `boundary*` parameter (RFC 2231, sections 3 and 4) wins over
  a plain `boundary`, and of several plain ones the last counts;
- comments in Content-Type are removed (RFC 2045, section 5.1, allows them);
- base64 is decoded chunk by chunk across `=` padding in the middle of the
  data, where the `email` package stops at the first padding;
- a message/* part with a base64 or quoted-printable body is decoded
  before its content is read as a message.

Multipart bodies are split on delimiter lines only: "--" boundary, "--"
for the close delimiter, optional transport padding, line end (RFC 2046,
section 5.1.1). The line end before a delimiter belongs to the delimiter.
Header lines longer than 998 octets (RFC 5322, section 2.1.1) and address
comments nested deeper than `MAX_COMMENT_DEPTH` are reported as anomalies.

The reader is pure and bounded: it uses an explicit stack instead of
recursion, and stops at `ScanLimits.max_mime_depth`, `max_parts` and
`max_decoded_bytes`, marking the scan incomplete. `scan_message` returns an
incomplete scan instead of raising when the reader fails on some input.
"""

from __future__ import annotations

import binascii
import hashlib
import logging
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

from ..model import MimeAnomaly, ScanLimits
from .sniff import image_format, is_pdf

log = logging.getLogger(__name__)

# RFC 5322, section 2.1.1: a line must not exceed 998 characters without CRLF.
MAX_HEADER_LINE_OCTETS = 998

# RFC 5322 allows comments nested without limit, but mail software writes a
# few levels at most. Python's address parsers (email.utils.getaddresses,
# email.headerregistry) recurse per level and raise RecursionError at 500
# levels on CPython 3.11 (measured).
MAX_COMMENT_DEPTH = 32

# Detail text is cut to this many characters; rules clip it again.
_DETAIL_CHARS = 160

_ADDRESS_HEADERS = frozenset({
    "from", "sender", "reply-to", "to", "cc", "bcc", "resent-from", "resent-sender", "resent-to",
    "resent-cc", "resent-bcc", "return-path", "disposition-notification-to",
})

# A header field line as the `email` package's feed parser accepts it: a
# field name (possibly empty) and a colon, a continuation, or an mbox
# "From " line. Any other line ends the header section.
_HEADER_LINE = re.compile(rb"^(?:From |[\x21-\x39\x3b-\x7e]*:|[\t ])")
_BASE64_OUTSIDE_ALPHABET = re.compile(rb"[^A-Za-z0-9+/=]")
_BASE64_CHUNK = re.compile(rb"([A-Za-z0-9+/]+)(=*)")
_WHITESPACE = b" \t\r\n\v\f"
_QP_BAD_ESCAPE = re.compile(rb"=(?![0-9A-Fa-f]{2}|[ \t]*\r?\n|[ \t]*\Z)")
_TRAILING_SPACE = re.compile(rb"[ \t\r]+(?=\n)")
_UUENCODE_NAMES = frozenset({"x-uuencode", "uuencode", "uue", "x-uue"})
_RFC2231_CONTINUATION = re.compile(r"^([^*]+)\*(\d+)?(\*)?$")


@dataclass(frozen=True)
class ScannedPart:
    """A leaf found by the boundary scan, with its payload decoded from the transfer encoding.

    `location` follows IMAP section numbers like the `email` walk does
    ("part 1.2", "attached message (part 2) > part 1"). `nested` is true
    inside an attached message. `broken_encoding` is true when the transfer
    encoding was invalid, so another decoder may read other bytes.
    """

    location: str
    content_type: str
    charset: str | None
    filename: str | None
    disposition: str | None
    content_id: str | None
    data: bytes
    nested: bool
    broken_encoding: bool = False


@dataclass(frozen=True)
class BoundaryScan:
    """The leaves and anomalies the boundary scan found; `complete` is false when a limit cut it short."""

    parts: tuple[ScannedPart, ...]
    anomalies: tuple[MimeAnomaly, ...]
    complete: bool


@dataclass(frozen=True)
class Comparison:
    """The parts only the boundary scan found (to inspect), and the anomaly when the lists differ."""

    extra: tuple[ScannedPart, ...]
    anomalies: tuple[MimeAnomaly, ...]


@dataclass(frozen=True)
class _Entity:
    """One MIME entity waiting on the stack: its raw bytes and where it sits."""

    data: bytes
    prefix: str
    section: str
    depth: int
    nested: bool
    default_type: str


@dataclass
class _Scan:
    limits: ScanLimits
    parts: list[ScannedPart] = field(default_factory=list)
    anomalies: list[MimeAnomaly] = field(default_factory=list)
    entities: int = 0
    decoded_bytes: int = 0
    complete: bool = True


@dataclass
class _Headers:
    """The header section of one entity, unfolded; names are lowercased."""

    fields: list[tuple[str, str]]
    longest_line: int

    def values(self, name: str) -> list[str]:
        return [value for field_name, value in self.fields if field_name == name]

    def last(self, name: str) -> str | None:
        values = self.values(name)
        return values[-1] if values else None


def scan_message(raw: bytes, limits: ScanLimits) -> BoundaryScan:
    """Read `raw` with the boundary scanner and return its leaves and anomalies; never raises."""
    scan = _Scan(limits)
    try:
        _run(scan, raw)
    except Exception as error:  # noqa: BLE001 - a reader bug must not cost the message its verdict
        log.exception("event=boundary_scan_failed error=%s", type(error).__name__)
        return BoundaryScan((), tuple(scan.anomalies), complete=False)
    return BoundaryScan(tuple(scan.parts), tuple(scan.anomalies), scan.complete)


def compare_parts(scan: BoundaryScan, seen: Iterable[tuple[str, str, bytes]]) -> Comparison:
    """Compare the scan's leaves with `seen`, the (location, content type, data) leaves of the `email` walk.

    Two leaves are the same part when content type and payload match;
    payloads are compared with line ends and trailing blanks normalised,
    because the readers may differ there without hiding anything. Empty
    payloads are left out, and so are the walk's leaves that are text of a
    delivery-status report, which the `email` package splits into blocks.
    A part whose transfer encoding is broken may decode differently in each
    reader: that difference is reported as "broken-encoding", not as a
    mismatch. An image or PDF whose bytes the walk already has is not
    returned again, so it is decoded once.
    """
    seen = [(location, content_type, data) for location, content_type, data in seen if _counts(data)]
    unmatched_walk = Counter(_part_key(content_type, data) for _location, content_type, data in seen)
    seen_data = {_digest(data) for _location, _content_type, data in seen}
    reports = [_normalise(part.data) for part in scan.parts if part.content_type == "message/delivery-status"]

    extra: list[ScannedPart] = []
    unmatched_scan: list[ScannedPart] = []
    for part in scan.parts:
        if not _counts(part.data) or part.content_type == "message/delivery-status":
            continue
        key = _part_key(part.content_type, part.data)
        if unmatched_walk[key] > 0:
            unmatched_walk[key] -= 1
            continue
        unmatched_scan.append(part)
        if (image_format(part.data) is not None or is_pdf(part.data)) and _digest(part.data) in seen_data:
            continue
        extra.append(part)

    only_walk = []
    for location, content_type, data in seen:
        key = _part_key(content_type, data)
        if unmatched_walk[key] <= 0:
            continue
        unmatched_walk[key] -= 1
        if not any(_normalise(data) in report for report in reports):
            only_walk.append((location, content_type))

    only_scan = []
    for part in unmatched_scan:
        same_type = next((item for item in only_walk if item[1] == part.content_type), None)
        if part.broken_encoding and same_type is not None:
            only_walk.remove(same_type)
            continue
        only_scan.append(f"{part.location} ({part.content_type})")

    if not only_scan and not only_walk:
        return Comparison(tuple(extra), ())
    walk_count = len(seen)
    scan_count = sum(1 for part in scan.parts if _counts(part.data))
    detail = f"the email package found {_parts(walk_count)}, the boundary scan {_parts(scan_count)}"
    if only_scan:
        detail += "; only the boundary scan found " + ", ".join(only_scan[:3])
    if only_walk:
        detail += "; only the email package found " + ", ".join(location for location, _type in only_walk[:3])
    return Comparison(tuple(extra), (MimeAnomaly("message", "parser-mismatch", _cut(detail)),))


def _run(scan: _Scan, raw: bytes) -> None:
    stack = [_Entity(raw, "", "", depth=0, nested=False, default_type="text/plain")]
    while stack and scan.complete:
        entity = stack.pop()
        children = _read_entity(scan, entity)
        # The stack is last in, first out; reversed children keep document order.
        stack.extend(reversed(children))


def _read_entity(scan: _Scan, entity: _Entity) -> list[_Entity]:
    """Read one entity: record a leaf, or return the children to read next."""
    limits = scan.limits
    scan.entities += 1
    if scan.entities > limits.max_parts:
        scan.complete = False
        return []

    where = _where(entity)
    if entity.depth > limits.max_mime_depth:
        scan.complete = False
        return []

    headers, body = _split_header(entity.data)
    _check_headers(scan, headers, where)
    content_type, params = _content_type(scan, headers, entity.default_type, where)
    encoding = _encoding(headers)

    if content_type.startswith("multipart/"):
        boundary = _boundary(scan, params, where)
        if boundary:
            children = _split_multipart(scan, entity, body, boundary, content_type, where)
            if children is not None:
                return children
    elif content_type.startswith("message/") and content_type != "message/delivery-status":
        inner = _decode(scan, body, encoding, where)
        if inner is None:
            return []
        return [_attached(entity, inner)]

    anomalies_before = len(scan.anomalies)
    data = _decode(scan, body, encoding, where)
    if data is None:
        return []
    broken = any(anomaly.kind == "broken-encoding" for anomaly in scan.anomalies[anomalies_before:])
    filename = _filename(headers, params)
    if filename is not None and filename.lower().endswith(".eml") and image_format(data) is None:
        return [_attached(entity, data)]

    scan.parts.append(ScannedPart(
        location=f"{entity.prefix + ' > ' if entity.prefix else ''}part {entity.section or '1'}",
        content_type=content_type,
        charset=_param(params, "charset"),
        filename=filename,
        disposition=_disposition(headers),
        content_id=headers.last("content-id"),
        data=data,
        nested=entity.nested,
        broken_encoding=broken,
    ))
    return []


def _attached(entity: _Entity, data: bytes) -> _Entity:
    section = entity.section or "1"
    prefix = f"{entity.prefix + ' > ' if entity.prefix else ''}attached message (part {section})"
    return _Entity(data, prefix, "", entity.depth + 1, nested=True, default_type="text/plain")


def _where(entity: _Entity) -> str:
    base = f"message > {entity.prefix}" if entity.prefix else "message"
    return f"{base} > part {entity.section}" if entity.section else base


def _split_header(data: bytes) -> tuple[_Headers, bytes]:
    """Split an entity into its unfolded header fields and its body.

    The header section ends at the first empty line, or, as in the `email`
    package, at the first line that is neither a field nor a continuation.
    """
    fields: list[tuple[str, str]] = []
    longest = 0
    position = 0
    size = len(data)
    while position < size:
        end = data.find(b"\n", position)
        next_position = size if end < 0 else end + 1
        line = data[position:next_position]
        content = line.rstrip(b"\r\n")
        if not content:
            return _Headers(fields, longest), data[next_position:]
        if not _HEADER_LINE.match(content):
            return _Headers(fields, longest), data[position:]

        longest = max(longest, len(content))
        if content[:1] in (b" ", b"\t"):
            if fields:
                name, value = fields[-1]
                fields[-1] = (name, value + " " + _text(content).strip())
        elif not content.startswith(b"From "):
            name, _, value = content.partition(b":")
            fields.append((_text(name).strip().lower(), _text(value).strip()))
        position = next_position
    return _Headers(fields, longest), b""


def _check_headers(scan: _Scan, headers: _Headers, where: str) -> None:
    if headers.longest_line > MAX_HEADER_LINE_OCTETS:
        scan.anomalies.append(MimeAnomaly(
            where, "long-header-line",
            f"a header line of {headers.longest_line} octets, over the RFC 5322 limit of {MAX_HEADER_LINE_OCTETS}"))

    for name, value in headers.fields:
        if name not in _ADDRESS_HEADERS:
            continue
        depth = _comment_depth(value)
        if depth > MAX_COMMENT_DEPTH:
            scan.anomalies.append(MimeAnomaly(
                where, "header-nesting",
                f"{name} header nests comments {depth} levels deep, over {MAX_COMMENT_DEPTH}"))


def _comment_depth(value: str) -> int:
    """Return the deepest nesting of parenthesised comments in a header value (RFC 5322, section 3.2.2)."""
    if value.count("(") <= MAX_COMMENT_DEPTH:
        return 0
    depth = deepest = 0
    quoted = escaped = False
    for character in value:
        if escaped:
            escaped = False
        elif character == "\\":
            escaped = True
        elif character == '"' and depth == 0:
            quoted = not quoted
        elif quoted:
            continue
        elif character == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif character == ")" and depth > 0:
            depth -= 1
    return deepest


def _content_type(scan: _Scan, headers: _Headers, default_type: str,
                  where: str) -> tuple[str, list[tuple[str, str]]]:
    values = headers.values("content-type")
    if not values:
        return default_type, []
    if len(values) > 1:
        types = ", ".join(_strip_comments(value).split(";", 1)[0].strip()[:40] for value in values[:3])
        scan.anomalies.append(MimeAnomaly(
            where, "double-content-type",
            _cut(f"{len(values)} Content-Type headers ({types}); the readers may pick different ones")))

    pieces = _split_params(_strip_comments(values[-1]))
    content_type = "".join(pieces[0].split()).lower() if pieces else ""
    major, slash, minor = content_type.partition("/")
    if not (slash and major and minor) or "/" in minor:
        content_type = default_type
    return content_type, _parse_params(pieces[1:])


def _encoding(headers: _Headers) -> str:
    value = headers.last("content-transfer-encoding")
    return _strip_comments(value or "").strip().lower()


def _boundary(scan: _Scan, params: list[tuple[str, str]], where: str) -> str | None:
    """Return the boundary this reader uses; report parameters that disagree about it."""
    plain = [value for name, value in params if name == "boundary"]
    continued = _rfc2231_value(params, "boundary")
    candidates = list(dict.fromkeys(plain + ([continued] if continued is not None else [])))
    if len(candidates) > 1:
        shown = ", ".join(repr(candidate[:70]) for candidate in candidates[:3])
        scan.anomalies.append(MimeAnomaly(
            where, "duplicate-boundary", _cut(f"{len(candidates)} different boundary parameters: {shown}")))

    chosen = continued
    if chosen is None and plain:
        chosen = plain[-1]
    # RFC 2046, section 5.1.1: a boundary never ends with a space.
    return chosen.rstrip() if chosen else None


def _split_multipart(scan: _Scan, entity: _Entity, body: bytes, boundary: str, content_type: str,
                     where: str) -> list[_Entity] | None:
    """Split a multipart body on its delimiter lines; None when no delimiter line is found."""
    delimiter = re.compile(rb"^--" + re.escape(boundary.encode("utf-8", "surrogateescape"))
                           + rb"(--)?[ \t]*\r?$", re.MULTILINE)
    default_type = "message/rfc822" if content_type == "multipart/digest" else "text/plain"

    bodies: list[bytes] = []
    start: int | None = None
    closed = False
    for match in delimiter.finditer(body):
        if start is not None:
            # The line end before a delimiter belongs to the delimiter.
            bodies.append(_strip_line_end(body[start:match.start()]))
        if match.group(1):
            closed = True
            break
        start = match.end() + 1
    else:
        if start is not None:
            bodies.append(body[start:])

    if not bodies and not closed:
        return None
    if not closed:
        scan.anomalies.append(MimeAnomaly(
            where, "unclosed-multipart", f"{content_type} has no close delimiter; its last part runs to the end"))

    children = []
    for number, child in enumerate(bodies, start=1):
        section = f"{entity.section}.{number}" if entity.section else str(number)
        children.append(_Entity(child, entity.prefix, section, entity.depth + 1, entity.nested, default_type))
    return children


def _strip_line_end(data: bytes) -> bytes:
    if data.endswith(b"\r\n"):
        return data[:-2]
    return data[:-1] if data.endswith(b"\n") else data


def _decode(scan: _Scan, body: bytes, encoding: str, where: str) -> bytes | None:
    """Decode a body from its transfer encoding; None when the decoded-bytes limit is reached."""
    if encoding == "base64":
        data, problem = _decode_base64(body)
    elif encoding == "quoted-printable":
        data, problem = _decode_quoted_printable(body)
    elif encoding in _UUENCODE_NAMES:
        data, problem = _decode_uuencode(body)
    else:
        data, problem = body, None
    if problem:
        scan.anomalies.append(MimeAnomaly(where, "broken-encoding", f"{encoding}: {problem}"))

    scan.decoded_bytes += len(data)
    if scan.decoded_bytes > scan.limits.max_decoded_bytes:
        scan.complete = False
        return None
    return data


def _decode_base64(body: bytes) -> tuple[bytes, str | None]:
    """Decode base64 (RFC 2045, section 6.8) leniently; return the data and what was broken, if anything."""
    compact = body.translate(None, _WHITESPACE)
    problems = []
    if _BASE64_OUTSIDE_ALPHABET.search(compact):
        problems.append("characters outside the base64 alphabet")
        compact = _BASE64_OUTSIDE_ALPHABET.sub(b"", compact)

    chunks = _BASE64_CHUNK.findall(compact)
    if len(chunks) > 1:
        problems.append("padding inside the data")
    pieces = []
    for chunk, _padding in chunks:
        if len(chunk) % 4 == 1:
            problems.append("a length that no padding can complete")
            chunk = chunk[:-1]
        elif len(chunk) % 4 and not _padding:
            problems.append("missing padding")
        pieces.append(binascii.a2b_base64(chunk + b"=" * (-len(chunk) % 4)))
    return b"".join(pieces), "; ".join(dict.fromkeys(problems)) or None


def _decode_quoted_printable(body: bytes) -> tuple[bytes, str | None]:
    """Decode quoted-printable (RFC 2045, section 6.7); an invalid escape is kept as written."""
    problem = "an '=' not followed by two hex digits or a line end" if _QP_BAD_ESCAPE.search(body) else None
    return binascii.a2b_qp(body.replace(b"\r\n", b"\n")), problem


def _decode_uuencode(body: bytes) -> tuple[bytes, str | None]:
    """Decode uuencoded data between its "begin" and "end" lines, as the `email` package does."""
    lines = iter(body.splitlines())
    for line in lines:
        if line.startswith(b"begin"):
            break
    else:
        return body, "no begin line"

    pieces = []
    broken = False
    for line in lines:
        if line.strip() == b"end":
            return b"".join(pieces), "invalid lines" if broken else None
        try:
            pieces.append(binascii.a2b_uu(line))
        except binascii.Error:
            # Some encoders pad lines with garbage; the length character says how much is data.
            length = ((line[0] - 32) & 63) * 4 // 3 + 2 if line else 0
            try:
                pieces.append(binascii.a2b_uu(line[:length]))
            except binascii.Error:
                broken = True
    return b"".join(pieces), "no end line"


def _filename(headers: _Headers, params: list[tuple[str, str]]) -> str | None:
    disposition = headers.last("content-disposition")
    if disposition is not None:
        disposition_params = _parse_params(_split_params(_strip_comments(disposition))[1:])
        name = _param(disposition_params, "filename")
        if name:
            return name
    return _param(params, "name")


def _disposition(headers: _Headers) -> str | None:
    value = headers.last("content-disposition")
    if value is None:
        return None
    return _strip_comments(value).split(";", 1)[0].strip().lower() or None


def _param(params: list[tuple[str, str]], name: str) -> str | None:
    continued = _rfc2231_value(params, name)
    if continued is not None:
        return continued
    plain = [value for param_name, value in params if param_name == name]
    return plain[-1] if plain else None


def _rfc2231_value(params: list[tuple[str, str]], name: str) -> str | None:
    """Join the RFC 2231 form of parameter `name` (`name*`, `name*0`, `name*1*`, ...), or None."""
    segments: dict[int, tuple[str, bool]] = {}
    for param_name, value in params:
        match = _RFC2231_CONTINUATION.match(param_name)
        if match is None or match.group(1) != name or (match.group(2) is None and match.group(3) is None):
            continue
        index = int(match.group(2)) if match.group(2) is not None else 0
        segments.setdefault(index, (value, match.group(3) is not None))
    if not segments:
        return None

    raw = b""
    charset = "utf-8"
    for position, index in enumerate(sorted(segments)):
        value, encoded = segments[index]
        if encoded and position == 0 and value.count("'") >= 2:
            charset, _language, value = value.split("'", 2)
        value_bytes = value.encode("utf-8", "surrogateescape")
        raw += unquote_to_bytes(value_bytes) if encoded else value_bytes
    try:
        return raw.decode(charset or "utf-8", "replace")
    except (LookupError, ValueError):
        return raw.decode("utf-8", "replace")


def _split_params(value: str) -> list[str]:
    """Split a header value on semicolons outside quoted strings."""
    pieces: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for character in value:
        if escaped:
            escaped = False
        elif character == "\\" and quoted:
            escaped = True
        elif character == '"':
            quoted = not quoted
        elif character == ";" and not quoted:
            pieces.append("".join(current))
            current = []
            continue
        current.append(character)
    pieces.append("".join(current))
    return pieces


def _parse_params(pieces: list[str]) -> list[tuple[str, str]]:
    params = []
    for piece in pieces:
        name, equals, value = piece.partition("=")
        if not equals:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        elif value.startswith('"'):
            # An unterminated quoted string runs to the end of the field.
            value = value[1:].strip()
        params.append((name.strip().lower(), value))
    return params


def _strip_comments(value: str) -> str:
    """Remove parenthesised comments outside quoted strings, nested or not."""
    if "(" not in value:
        return value
    kept: list[str] = []
    depth = 0
    quoted = escaped = False
    for character in value:
        if escaped:
            escaped = False
            if depth == 0:
                kept.append(character)
            continue
        if character == "\\" and (quoted or depth):
            escaped = True
        elif character == '"' and depth == 0:
            quoted = not quoted
        elif character == "(" and not quoted:
            depth += 1
            continue
        elif character == ")" and depth > 0 and not quoted:
            depth -= 1
            continue
        if depth == 0:
            kept.append(character)
    return "".join(kept)


def _parts(count: int) -> str:
    return f"{count} part" if count == 1 else f"{count} parts"


def _counts(data: bytes) -> bool:
    return bool(data.strip())


def _normalise(data: bytes) -> bytes:
    return _TRAILING_SPACE.sub(b"", data.replace(b"\r\n", b"\n")).rstrip()


def _part_key(content_type: str, data: bytes) -> tuple[str, bytes]:
    return content_type, hashlib.sha256(_normalise(data)).digest()


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _text(data: bytes) -> str:
    # As the email package does, so that 8-bit bytes round-trip into the boundary.
    return data.decode("ascii", "surrogateescape")


def _cut(text: str) -> str:
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 1] + "…"
