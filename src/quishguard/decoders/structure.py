"""Walk the MIME tree of one message: headers, parts, bodies, links and decode tasks.

This is the cheap first stage and runs in a thread of the main process, so
it imports neither PyMuPDF nor OpenCV. It parses with the standard library
(`email.policy.compat32`, which records defects instead of raising). Headers
follow RFC 5322 and the MIME tree RFC 2045/2046. Encoded words and
parameters follow RFC 2047 and RFC 2231, Content-Disposition RFC 2183,
`cid:` references RFC 2392 and `message/global` RFC 6532.

Part locations use IMAP section numbers (RFC 3501, section 6.4.5) so they
stay unique: `message > part 1.2 (text/html)`, and the parts of an attached
message are numbered from 1 again under `attached message (part N)`.
Filenames only ever appear quoted inside a location, never as a path.

Images and PDFs are recognised by their leading bytes (`sniff`) and handed
back as `DecodeTask`s for the worker processes; HTML is analysed here
because it is cheap and yields the `cid:` references that tell inline
images from attachments.
"""

from __future__ import annotations

import codecs
import email
import email.errors
import email.header
import email.message
import email.parser
import email.policy
import logging
import re
from dataclasses import dataclass, field, replace

from ..model import DecodeTask, Link, MessageFacts, PartInfo, QrCode, ScanLimits, ScanProblem
from .boundaries import ScannedPart, compare_parts, scan_message
from .generators import generator_payload
from .grids import find_text_grids, pack_split
from .html import analyse_html, count_visible_chars, decode_data_uri, normalise_content_id
from .passwords import find_password_candidates
from .sniff import image_format, is_pdf, is_zip, looks_like_markup
from .urls import find_urls

log = logging.getLogger(__name__)

# Each text body kept for the rules is cut to this many characters.
MAX_TEXT_BODY_CHARS = 200_000
MAX_FILENAME_CHARS = 120

HTML_EXTENSIONS = (".htm", ".html", ".shtml", ".xhtml")
SVG_EXTENSIONS = (".svg", ".svgz")
_MESSAGE_EXTENSIONS = (".eml",)
OFFICE_EXTENSIONS = (".docx", ".docm", ".xlsx", ".xlsm", ".pptx", ".pptm", ".odt", ".ods", ".odp")
_INLINE_TYPES = frozenset({"text/plain", "text/html", "text/enriched", "text/rfc822-headers"})

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_FOLD = re.compile(r"\r?\n(?=[ \t])")


@dataclass
class _Leaf:
    """A leaf of the MIME tree with its decoded payload."""

    part: email.message.Message
    location: str
    content_type: str
    filename: str | None
    disposition: str | None
    content_id: str | None
    data: bytes
    nested: bool
    analysed: bool = True

    @property
    def lower_filename(self) -> str:
        return (self.filename or "").lower()


@dataclass
class _Walk:
    """State of one walk over the MIME tree; the counters enforce `ScanLimits`."""

    limits: ScanLimits
    problems: list[ScanProblem]
    leaves: list[_Leaf] = field(default_factory=list)
    entities: int = 0
    decoded_bytes: int = 0
    parts_exceeded: bool = False
    bytes_exceeded: bool = False


def analyse_structure(raw: bytes, limits: ScanLimits) -> tuple[MessageFacts, list[DecodeTask]]:
    """Parse `raw` and return what it contains plus the image and PDF tasks for the workers.

    Never raises on malformed mail: a part or step that fails becomes a
    `ScanProblem` of kind "incomplete", and a breached limit one of kind "limit".
    """
    facts = MessageFacts()
    tasks: list[DecodeTask] = []
    try:
        _analyse(raw, limits, facts, tasks)
    except Exception as error:  # noqa: BLE001 - the message still gets a verdict, marked incomplete
        log.exception("MIME analysis failed with %s", type(error).__name__)
        facts.problems.append(
            ScanProblem("message", "incomplete", f"MIME analysis failed: {type(error).__name__}")
        )
    return facts, tasks


def decode_header_value(value: str) -> str:
    """Unfold a raw header value and decode its RFC 2047 encoded words to text.

    Raw 8-bit bytes (which the parser keeps as surrogate escapes) are read as
    UTF-8, the charset RFC 6532 allows and most such senders use.
    """
    if _has_surrogates(value):
        value = value.encode("ascii", "surrogateescape").decode("utf-8", "replace")
    value = _FOLD.sub("", value).strip()
    if "=?" not in value:
        return value

    try:
        chunks = email.header.decode_header(value)
    except (email.errors.HeaderParseError, ValueError):
        return value

    pieces: list[str] = []
    for chunk, charset in chunks:
        if isinstance(chunk, str):
            pieces.append(chunk)
        elif charset is None:
            pieces.append(chunk.decode("raw-unicode-escape", "replace"))
        else:
            pieces.append(chunk.decode(_codec(charset), "replace"))
    return "".join(pieces)


def _analyse(raw: bytes, limits: ScanLimits, facts: MessageFacts, tasks: list[DecodeTask]) -> None:
    parsed = True
    try:
        message = email.message_from_bytes(raw, policy=email.policy.compat32)
    except RecursionError:
        facts.problems.append(ScanProblem("message", "limit", "MIME nesting too deep to parse"))
        return
    except TypeError:
        # CPython 3.11's decode_params fails on `name*` next to `name*0`; the
        # boundary scan then finds the parts alone.
        log.info("event=mime_parse_failed reader=email error=TypeError")
        message = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw)
        parsed = False

    _read_headers(message, facts)

    walk = _Walk(limits, facts.problems)
    if parsed:
        _walk_entity(walk, message, "message", "", depth=0, nested=False)
    _add_boundary_scan(walk, raw, facts)

    cid_references: set[str] = set()
    embedded_tasks: dict[int, list[DecodeTask]] = {}
    splits: list[_SplitLayout] = []
    for index, leaf in enumerate(walk.leaves):
        if leaf.analysed:
            embedded_tasks[index] = _read_text_leaf(leaf, limits, facts, cid_references, splits)

    for index, leaf in enumerate(walk.leaves):
        facts.parts.append(_part_info(leaf, cid_references))
        if not leaf.analysed:
            continue
        task = _leaf_task(leaf, cid_references)
        if task is not None:
            tasks.append(task)
        tasks.extend(embedded_tasks.get(index, ()))

    tasks.extend(_split_tasks(splits, walk.leaves))
    _cap_tasks(tasks, limits, facts.problems)
    passwords = find_password_candidates([facts.subject, *facts.text_bodies])
    if passwords:
        tasks[:] = [replace(task, passwords=passwords) if task.kind == "pdf" else task for task in tasks]
    facts.links = _dedupe_links(facts.links, limits, facts.problems)


def _read_headers(message: email.message.Message, facts: MessageFacts) -> None:
    for name, value in message.raw_items():
        facts.headers.append((name, decode_header_value(str(value))))

    def first(name: str) -> str:
        for header_name, value in facts.headers:
            if header_name.lower() == name:
                return value
        return ""

    facts.subject = first("subject")
    facts.from_header = first("from")
    facts.message_id = first("message-id")


def _walk_entity(
    walk: _Walk,
    entity: email.message.Message,
    prefix: str,
    section: str,
    *,
    depth: int,
    nested: bool,
) -> None:
    """Visit one MIME entity; `section` is its IMAP section number, "" for a message's top."""
    limits = walk.limits
    if walk.parts_exceeded:
        return

    walk.entities += 1
    if walk.entities > limits.max_parts:
        walk.parts_exceeded = True
        walk.problems.append(
            ScanProblem(prefix, "limit", f"more than max_parts={limits.max_parts} MIME parts; the rest was skipped")
        )
        return

    here = f"{prefix} > part {section}" if section else prefix
    if depth > limits.max_mime_depth:
        walk.problems.append(
            ScanProblem(here, "limit", f"MIME nesting deeper than max_mime_depth={limits.max_mime_depth}; skipped")
        )
        return

    if not _parameters_readable(entity):
        return

    content_type = entity.get_content_type()
    payload = entity.get_payload()

    if content_type == "message/rfc822" and isinstance(payload, list) and payload:
        inner_prefix = f"{prefix} > attached message (part {section or '1'})"
        _walk_entity(walk, payload[0], inner_prefix, "", depth=depth + 1, nested=True)
        return

    if content_type.startswith("multipart/") and not entity.is_multipart():
        repaired = _repair_multipart(entity)
        body = entity.get_payload()
        # A truncated message without any part headers lost nothing to inspect.
        if repaired is None and isinstance(body, str) and "content-type:" in body.lower():
            walk.problems.append(ScanProblem(
                here, "incomplete",
                f"{content_type} without its boundary in the body; its parts were not inspected"))
        elif repaired is not None:
            entity, payload = repaired, repaired.get_payload()

    if entity.is_multipart() and isinstance(payload, list):
        for number, child in enumerate(payload, start=1):
            child_section = f"{section}.{number}" if section else str(number)
            _walk_entity(walk, child, prefix, child_section, depth=depth + 1, nested=nested)
        return

    leaf = _decode_leaf(walk, entity, prefix, section or "1", nested)
    if leaf is None:
        return

    if leaf.analysed and _is_attached_message(leaf):
        _walk_attached_bytes(walk, leaf, prefix, section or "1", depth)
        return
    walk.leaves.append(leaf)


def _repair_multipart(entity: email.message.Message) -> email.message.Message | None:
    """Re-parse a multipart entity whose boundary parameter has an unclosed quote.

    `boundary="----=_Part_1` (no closing quote) makes the standard library
    keep the quote in the boundary, find no delimiter and read the whole
    body as one leaf, while mail clients drop the quote and show the parts.
    Returns None when the body has no delimiter line for the repaired value either.
    """
    boundary = entity.get_boundary()
    body = entity.get_payload()
    if not boundary or not isinstance(body, str):
        return None

    repaired = boundary.strip().strip('"').strip()
    if not repaired or repaired == boundary or f"--{repaired}" not in body:
        return None
    header = f'Content-Type: {entity.get_content_type()}; boundary="{repaired}"\n\n'
    try:
        return email.message_from_string(header + body, policy=email.policy.compat32)
    except RecursionError:
        return None


def _decode_leaf(
    walk: _Walk, part: email.message.Message, prefix: str, section: str, nested: bool
) -> _Leaf | None:
    content_type = part.get_content_type()
    filename = _filename(part)
    label = content_type if filename is None else f'{content_type}, "{filename}"'
    location = f"{prefix} > part {section} ({label})"

    try:
        data = part.get_payload(decode=True) or b""
    except (ValueError, LookupError, UnicodeError) as error:
        walk.problems.append(
            ScanProblem(location, "incomplete", f"could not decode the part: {type(error).__name__}")
        )
        return None

    leaf = _Leaf(
        part=part,
        location=location,
        content_type=content_type,
        filename=filename,
        disposition=part.get_content_disposition(),
        content_id=_content_id(part),
        data=data,
        nested=nested,
    )

    walk.decoded_bytes += len(data)
    if walk.decoded_bytes > walk.limits.max_decoded_bytes:
        if not walk.bytes_exceeded:
            walk.problems.append(
                ScanProblem(
                    location,
                    "limit",
                    f"decoded parts exceed max_decoded_bytes={walk.limits.max_decoded_bytes}; "
                    "this and later parts were not inspected",
                )
            )
        walk.bytes_exceeded = True
    if walk.bytes_exceeded:
        leaf.analysed = False
        leaf.data = b""
    return leaf


def _parameters_readable(entity: email.message.Message) -> bool:
    """Tell whether the `email` package can read this entity's MIME parameters.

    CPython 3.11's `email.utils.decode_params` raises TypeError when an RFC
    2231 `name*` meets `name*0`, in every call that reads a parameter. Such
    an entity is left to the boundary scan, which reports the difference.
    """
    try:
        entity.get_params()
        entity.get_params(header="content-disposition")
    except TypeError:
        return False
    return True


def _add_boundary_scan(walk: _Walk, raw: bytes, facts: MessageFacts) -> None:
    """Read `raw` again with the strict boundary scanner; add its anomalies and the leaves only it found.

    The part lists are compared only when neither reader hit a limit,
    because a limit cuts the two readers at different places.
    """
    scan = scan_message(raw, walk.limits)
    facts.mime_anomalies.extend(scan.anomalies)
    walk_complete = not any(problem.kind == "limit" for problem in walk.problems)
    if not (scan.complete and walk_complete):
        return

    seen = [(leaf.location, leaf.content_type, leaf.data) for leaf in walk.leaves if leaf.analysed]
    comparison = compare_parts(scan, seen)
    facts.mime_anomalies.extend(comparison.anomalies)
    walk.leaves.extend(_scanned_leaf(part) for part in comparison.extra)


def _scanned_leaf(part: ScannedPart) -> _Leaf:
    """Wrap a part only the boundary scan found, so it is inspected like any other leaf."""
    headers = email.message.Message()
    headers["Content-Type"] = part.content_type
    # A charset with 8-bit bytes names no codec; such text is read as UTF-8.
    if part.charset and part.charset.isascii() and part.charset.isprintable():
        headers.set_param("charset", part.charset)
    filename = _CONTROL.sub("", decode_header_value(part.filename)).strip()[:MAX_FILENAME_CHARS] or None \
        if part.filename else None
    label = part.content_type if filename is None else f'{part.content_type}, "{filename}"'
    content_id = decode_header_value(part.content_id) if part.content_id else ""
    return _Leaf(
        part=headers,
        location=f"message > {part.location} ({label}) [boundary scan]",
        content_type=part.content_type,
        filename=filename,
        disposition=part.disposition,
        content_id=normalise_content_id(content_id) or None,
        data=part.data,
        nested=part.nested,
    )


def _is_attached_message(leaf: _Leaf) -> bool:
    # message/global (RFC 6532) is not parsed by the standard library, and
    # forwarded messages often arrive as an octet-stream ".eml".
    if leaf.content_type == "message/global":
        return True
    return leaf.lower_filename.endswith(_MESSAGE_EXTENSIONS) and image_format(leaf.data) is None


def _walk_attached_bytes(walk: _Walk, leaf: _Leaf, prefix: str, section: str, depth: int) -> None:
    inner_prefix = f"{prefix} > attached message (part {section})"
    try:
        inner = email.message_from_bytes(leaf.data, policy=email.policy.compat32)
    except RecursionError:
        walk.problems.append(ScanProblem(inner_prefix, "limit", "MIME nesting too deep to parse"))
        return
    except TypeError:
        # See `_analyse`: the boundary scan reads this message's parts instead.
        return
    _walk_entity(walk, inner, inner_prefix, "", depth=depth + 1, nested=True)


@dataclass(frozen=True)
class _SplitLayout:
    """Images an HTML part lays out as tiles of one picture, resolved once every part is known."""

    location: str
    rows: list[list[str]]
    nested: bool


def _read_text_leaf(
    leaf: _Leaf, limits: ScanLimits, facts: MessageFacts, cid_references: set[str], splits: list[_SplitLayout]
) -> list[DecodeTask]:
    """Analyse a text or HTML leaf into `facts`; return the tasks for images and codes drawn in it."""
    if image_format(leaf.data) is not None or is_pdf(leaf.data) or is_zip(leaf.data):
        return []

    is_attachment = _is_attachment(leaf, cid_references=set())
    is_svg = leaf.content_type == "image/svg+xml" or leaf.lower_filename.endswith(SVG_EXTENSIONS)
    is_html = (
        leaf.content_type in ("text/html", "application/xhtml+xml")
        or leaf.lower_filename.endswith(HTML_EXTENSIONS)
        or is_svg
        or (leaf.content_type == "application/octet-stream" and looks_like_markup(leaf.data))
    )

    if is_html:
        tasks = _read_html_leaf(leaf, limits, facts, cid_references, is_attachment, is_svg, splits)
        if is_svg:
            tasks.insert(0, DecodeTask("svg", leaf.data, leaf.location, _hidden_as(leaf, "svg"), leaf.filename))
        return tasks

    tasks = []
    if leaf.content_type.startswith("text/"):
        text = _decode_text(leaf)
        for url in find_urls(text, limits.max_urls + 1):
            facts.links.append(Link(url, leaf.location, "text"))
        if leaf.content_type == "text/plain" and not is_attachment:
            facts.body_text_chars += count_visible_chars(text)
            facts.text_bodies.append(text[:MAX_TEXT_BODY_CHARS])
        for number, grid in enumerate(find_text_grids(text), start=1):
            tasks.append(DecodeTask("grid", grid.to_pbm(), f"{leaf.location} > text blocks {number}",
                                    _hidden_as(leaf, grid.hidden_as)))
    return tasks


def _hidden_as(leaf: _Leaf, hidden_as: str) -> str:
    return "nested-message" if leaf.nested else hidden_as


def _read_html_leaf(
    leaf: _Leaf,
    limits: ScanLimits,
    facts: MessageFacts,
    cid_references: set[str],
    is_attachment: bool,
    is_svg: bool,
    splits: list[_SplitLayout],
) -> list[DecodeTask]:
    analysis = analyse_html(
        _decode_text(leaf),
        leaf.location,
        is_attachment=is_attachment,
        filename=leaf.filename,
        is_svg=is_svg,
        max_embedded_images=limits.max_images + 1,
    )
    facts.html.append(analysis.facts)
    facts.links.extend(analysis.links)
    facts.problems.extend(analysis.problems)
    cid_references.update(analysis.cid_references)
    if not is_attachment:
        # NOTE: the text/plain and text/html alternatives of one
        # multipart/alternative are both counted, so the total may double.
        facts.body_text_chars += analysis.facts.visible_text_chars
        facts.text_bodies.append(analysis.visible_text[:MAX_TEXT_BODY_CHARS])

    tasks: list[DecodeTask] = []
    for number, image in enumerate(analysis.embedded_images, start=1):
        hidden_as = "nested-message" if leaf.nested else image.hidden_as
        location = f"{leaf.location} > {image.hidden_as} {number}"
        if image_format(image.data) is not None:
            tasks.append(DecodeTask("image", image.data, location, hidden_as))
        elif is_pdf(image.data):
            tasks.append(DecodeTask("pdf", image.data, location, hidden_as))

    for number, grid in enumerate(analysis.grids, start=1):
        label = "html grid" if grid.hidden_as == "html-grid" else "text blocks"
        tasks.append(DecodeTask("grid", grid.to_pbm(), f"{leaf.location} > {label} {number}",
                                _hidden_as(leaf, grid.hidden_as)))
    for number, svg in enumerate(analysis.inline_svgs, start=1):
        tasks.append(DecodeTask("svg", svg.encode("utf-8"), f"{leaf.location} > inline svg {number}",
                                _hidden_as(leaf, "svg")))
    for rows in analysis.split_layouts:
        splits.append(_SplitLayout(leaf.location, rows, leaf.nested))

    for url in analysis.remote_images:
        payload = generator_payload(url, limits.qr_generators)
        if payload:
            facts.qr_codes.append(QrCode(_CONTROL.sub(" ", payload).strip(), f"{leaf.location} > generator URL",
                                         _hidden_as(leaf, "generator-url"), "generator-url"))
    return tasks


def _split_tasks(splits: list[_SplitLayout], leaves: list[_Leaf]) -> list[DecodeTask]:
    """Resolve the `data:` and `cid:` sources of each split layout into one "split" task."""
    by_content_id = {leaf.content_id: leaf.data for leaf in leaves if leaf.content_id and leaf.analysed}
    tasks = []
    for number, layout in enumerate(splits, start=1):
        rows: list[list[bytes]] = []
        for row in layout.rows:
            images = []
            for source in row:
                if source[:4].lower() == "cid:":
                    data = by_content_id.get(normalise_content_id(source[4:]))
                else:
                    data = decode_data_uri(source)
                if data and image_format(data) is not None:
                    images.append(data)
            if images:
                rows.append(images)
        if sum(len(row) for row in rows) < 2:
            continue
        hidden_as = "nested-message" if layout.nested else "split"
        tasks.append(DecodeTask("split", pack_split(rows), f"{layout.location} > split image {number}", hidden_as))
    return tasks


def _leaf_task(leaf: _Leaf, cid_references: set[str]) -> DecodeTask | None:
    if leaf.nested:
        hidden_as = "nested-message"
    elif _is_inline(leaf, cid_references):
        hidden_as = "inline-image"
    else:
        hidden_as = "attachment"

    if image_format(leaf.data) is not None:
        return DecodeTask("image", leaf.data, leaf.location, hidden_as, leaf.filename)
    if is_pdf(leaf.data):
        # A PDF is never an inline image, whatever its Content-Disposition.
        pdf_hidden_as = "nested-message" if leaf.nested else "attachment"
        return DecodeTask("pdf", leaf.data, leaf.location, pdf_hidden_as, leaf.filename)
    if is_zip(leaf.data):
        office = leaf.lower_filename.endswith(OFFICE_EXTENSIONS) or "officedocument" in leaf.content_type
        archive_hidden_as = "office" if office else "archive"
        return DecodeTask("archive", leaf.data, leaf.location, _hidden_as(leaf, archive_hidden_as), leaf.filename)
    return None


def _part_info(leaf: _Leaf, cid_references: set[str]) -> PartInfo:
    return PartInfo(
        location=leaf.location,
        content_type=leaf.content_type,
        filename=leaf.filename,
        size=len(leaf.data) if leaf.analysed else 0,
        is_attachment=_is_attachment(leaf, cid_references),
    )


def _is_inline(leaf: _Leaf, cid_references: set[str]) -> bool:
    if leaf.content_id is not None and leaf.content_id in cid_references:
        return True
    return leaf.disposition == "inline"


def _is_attachment(leaf: _Leaf, cid_references: set[str]) -> bool:
    """Decide what a recipient sees as an attachment (RFC 2183, plus what clients do).

    Everything inside an attached message is an attachment. A part without
    Content-Disposition counts as one when it has a filename and no HTML
    part references it by `cid:`.
    """
    if leaf.nested or leaf.disposition == "attachment":
        return True
    if leaf.disposition == "inline":
        # Clients show only text, HTML and images in place; an "inline" part
        # of another type with a filename (text/htm, "invoice.htm") is
        # offered as a file to open.
        return leaf.filename is not None and not _renders_inline(leaf.content_type)
    if leaf.filename is None:
        return False
    return not _is_inline(leaf, cid_references)


def _renders_inline(content_type: str) -> bool:
    return content_type in _INLINE_TYPES or content_type.startswith(("image/", "message/", "multipart/"))


def _cap_tasks(tasks: list[DecodeTask], limits: ScanLimits, problems: list[ScanProblem]) -> None:
    if len(tasks) <= limits.max_images:
        return
    first_skipped = tasks[limits.max_images]
    problems.append(
        ScanProblem(
            first_skipped.location,
            "limit",
            f"{len(tasks)} images and PDFs exceed max_images={limits.max_images}; "
            "this one and later ones were not decoded",
        )
    )
    del tasks[limits.max_images:]


def _dedupe_links(links: list[Link], limits: ScanLimits, problems: list[ScanProblem]) -> list[Link]:
    kept: list[Link] = []
    seen: set[tuple[str, str, str]] = set()
    for link in links:
        key = (link.url, link.source, link.location)
        if key in seen:
            continue
        if len(kept) >= limits.max_urls:
            problems.append(
                ScanProblem(link.location, "limit", f"more than max_urls={limits.max_urls} URLs; the rest were skipped")
            )
            break
        seen.add(key)
        kept.append(link)
    return kept


def _decode_text(leaf: _Leaf) -> str:
    charset = leaf.part.get_content_charset() or "utf-8"
    return leaf.data.decode(_codec(charset), "replace")


def _codec(charset: str) -> str:
    """Map a MIME charset to a Python codec; unknown ones and US-ASCII are read as UTF-8.

    US-ASCII labels are read as UTF-8 because UTF-8 is a superset and many
    senders mislabel 8-bit text as ASCII.
    """
    try:
        name = codecs.lookup(charset.strip().strip('"')).name
    except (LookupError, ValueError):
        return "utf-8"
    return "utf-8" if name == "ascii" else name


def _filename(part: email.message.Message) -> str | None:
    try:
        name = part.get_filename()
    except (LookupError, ValueError, UnicodeError):
        return None
    if not name:
        return None

    # Many senders put RFC 2047 encoded words in parameters, which RFC 2047
    # forbids but every client decodes.
    # An unclosed quote (filename="Email.htm) stays in the value; clients drop it.
    name = _CONTROL.sub("", decode_header_value(str(name))).strip().strip('"').strip()
    return name[:MAX_FILENAME_CHARS] or None


def _content_id(part: email.message.Message) -> str | None:
    value = part.get("Content-ID")
    if value is None:
        return None
    return normalise_content_id(decode_header_value(str(value))) or None


def _has_surrogates(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
