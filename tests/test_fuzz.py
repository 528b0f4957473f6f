"""Property-based fuzzing of the MIME walk, the boundary scanner and each decoder: no input makes them raise.

Each target draws inputs from a grammar of hostile MIME, markup and header
values, or mutates small valid images and PDFs, and checks that the stage
returns its usual result type. CI runs a small, derandomised number of
examples per target; set QUISHGUARD_FUZZ_EXAMPLES (for example 5000) for a
longer random run. Every crash found becomes a regression case in the
`test_*_regressions` tables below.
"""

from __future__ import annotations

import io
import os

import pymupdf
import pytest
import segno
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quishguard.decoders import decode_image_task, decode_pdf_task
from quishguard.decoders.boundaries import compare_parts, scan_message
from quishguard.decoders.html import analyse_html
from quishguard.decoders.sender import judge_sender
from quishguard.decoders.structure import analyse_structure
from quishguard.model import DecodeTask, Envelope, MessageFacts, OrgPolicy, PartialFacts, ScanLimits, SenderFacts

EXAMPLES = int(os.environ.get("QUISHGUARD_FUZZ_EXAMPLES", "0"))
settings.register_profile(
    "quishguard",
    max_examples=EXAMPLES or 40,
    # CI runs with a fixed seed, so that a failure reproduces. A long local run explores.
    derandomize=not EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
FUZZ = settings.get_profile("quishguard")
# Image and PDF decoding run the QR cascade, which takes longer per example.
SLOW_FUZZ = settings(FUZZ, max_examples=EXAMPLES or 15)

LIMITS = ScanLimits(max_parts=50, max_mime_depth=6, max_decoded_bytes=1_000_000, max_pdf_pages=2,
                    max_image_pixels=2_000_000)
ANOMALY_KINDS = {"parser-mismatch", "duplicate-boundary", "double-content-type", "unclosed-multipart",
                 "broken-encoding", "header-nesting", "long-header-line"}
PROBLEM_KINDS = {"limit", "incomplete"}

TOKENS = ["a", "b", "--a", "--b", "--a--", "--b--", "=", "==", "=ZZ", "=3D", "(", ")", '"', ";", "\\", "*",
          "'", "%", "\r\n", "\n", "\r", "\t", " ", ":", "<", ">", "@", "\x00", "\xff", "é", "begin 644 x",
          "end", "aGk=", "PGI+", "<html>", "<a href='https://example.com/x'>", "data:image/png;base64,"]
CONTENT_TYPES = ["multipart/mixed", "multipart/alternative", "multipart/digest", "multipart/related",
                 "message/rfc822", "message/global", "message/delivery-status", "text/plain", "text/html",
                 "image/png", "application/pdf", "application/octet-stream", "x/y/z", "", "text/html (c)"]
ENCODINGS = ["7bit", "8bit", "base64", "quoted-printable", "x-uuencode", "binary", "bogus"]
BOUNDARIES = ["a", "b", "a b", "", '"', "--", "=_Part_1", "a" * 80]

noise = st.lists(st.sampled_from(TOKENS) | st.text(max_size=8), max_size=12).map("".join)


@st.composite
def content_type_header(draw) -> str:
    params = []
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["boundary", "boundary*0", "boundary*1", "boundary*", "charset", "name",
                                     "x-note"]))
        value = draw(st.sampled_from(BOUNDARIES) | noise)
        quoted = draw(st.booleans())
        params.append(f'{name}="{value}"' if quoted else f"{name}={value}")
    return "Content-Type: " + "; ".join([draw(st.sampled_from(CONTENT_TYPES)), *params])


@st.composite
def entity(draw, depth: int = 0) -> str:
    """Return one MIME entity from a grammar of headers, delimiter lines and encoded bodies."""
    headers = [draw(content_type_header()) for _ in range(draw(st.integers(0, 2)))]
    if draw(st.booleans()):
        headers.append("Content-Transfer-Encoding: " + draw(st.sampled_from(ENCODINGS)))
    if draw(st.booleans()):
        headers.append("Content-Disposition: " + draw(st.sampled_from(["attachment", "inline"]))
                       + "; filename=" + draw(st.sampled_from(["a.eml", "a.html", "a.png", '"x'])))
    if draw(st.booleans()):
        headers.append(draw(noise))

    pieces = []
    for _ in range(draw(st.integers(0, 4))):
        choice = draw(st.integers(0, 3))
        if choice == 0 and depth < 3:
            pieces.append(draw(entity(depth + 1)))
        elif choice == 1:
            boundary = draw(st.sampled_from(BOUNDARIES))
            pieces.append(f"--{boundary}" + draw(st.sampled_from(["", "--", "  "])))
        else:
            pieces.append(draw(noise))
    separator = draw(st.sampled_from(["\r\n", "\n"]))
    return separator.join(headers) + separator + separator + separator.join(pieces)


mime_messages = (entity().map(lambda text: text.encode("utf-8", "surrogatepass"))
                 | st.binary(max_size=2000))


@FUZZ
@given(mime_messages)
def test_fuzz_structure_never_raises(raw):
    facts, tasks = analyse_structure(raw, LIMITS)

    assert isinstance(facts, MessageFacts)
    assert {problem.kind for problem in facts.problems} <= PROBLEM_KINDS
    assert not any("MIME analysis failed" in problem.reason for problem in facts.problems)
    assert {anomaly.kind for anomaly in facts.mime_anomalies} <= ANOMALY_KINDS
    assert all(task.kind in ("image", "pdf", "archive", "drawn") or task.kind for task in tasks)


@FUZZ
@given(mime_messages)
def test_fuzz_boundary_scan_never_raises(raw):
    scan = scan_message(raw, LIMITS)
    comparison = compare_parts(scan, [("message > part 1", part.content_type, part.data[:10])
                                      for part in scan.parts])

    assert len(scan.parts) <= LIMITS.max_parts
    assert sum(len(part.data) for part in scan.parts) <= LIMITS.max_decoded_bytes
    assert {anomaly.kind for anomaly in scan.anomalies} <= ANOMALY_KINDS
    assert len(comparison.extra) <= len(scan.parts)


MARKUP_TOKENS = ["<", ">", "</", "<script>", "</script>", "<meta http-equiv='refresh' content='0;url=",
                 "<form action='https://example.net/p'>", "<img src='data:image/png;base64,iVBORw0KGgo='>",
                 "<svg>", "<style>background:url(", "window.location=", "atob('", "'", '"', "&#x", ";",
                 "<a href='", "cid:", "\x00", "<!--", "-->", "<![CDATA[", "<div class='g-recaptcha'>",
                 "<table>" * 3, "<td bgcolor=#000>", "</td>"]


@FUZZ
@given(st.lists(st.sampled_from(MARKUP_TOKENS) | st.text(max_size=10), max_size=40).map("".join),
       st.booleans(), st.booleans())
def test_fuzz_html_never_raises(markup, is_attachment, is_svg):
    analysis = analyse_html(markup, "message > part 1 (text/html)", is_attachment=is_attachment,
                            filename="a.html" if is_attachment else None, is_svg=is_svg, max_embedded_images=5)

    assert analysis.facts.location == "message > part 1 (text/html)"


def small_png() -> bytes:
    buffer = io.BytesIO()
    segno.make("https://example.com/q", micro=False).save(buffer, kind="png", scale=2)
    return buffer.getvalue()


def small_pdf() -> bytes:
    document = pymupdf.open()
    page = document.new_page(width=120, height=120)
    page.insert_image(pymupdf.Rect(10, 10, 110, 110), stream=small_png())
    page.insert_link({"kind": pymupdf.LINK_URI, "from": pymupdf.Rect(0, 0, 20, 20), "uri": "https://example.com/p"})
    return document.tobytes()


@st.composite
def mutated(draw, seed: bytes) -> bytes:
    """Return `seed` with a few byte ranges overwritten, deleted or duplicated."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        start = draw(st.integers(0, len(data) - 1))
        length = draw(st.integers(1, 64))
        action = draw(st.integers(0, 2))
        if action == 0:
            data[start:start + length] = draw(st.binary(min_size=1, max_size=length))
        elif action == 1:
            del data[start:start + length]
        else:
            data[start:start] = data[start:start + length]
    return bytes(data)


IMAGE_SEED = small_png()
PDF_SEED = small_pdf()


@SLOW_FUZZ
@given(mutated(IMAGE_SEED) | st.binary(max_size=300).map(lambda data: b"\x89PNG\r\n\x1a\n" + data)
       | st.binary(max_size=300).map(lambda data: b"GIF89a" + data))
def test_fuzz_image_task_never_raises(data):
    facts = decode_image_task(DecodeTask("image", data, "message > part 2 (image/png)", "attachment"), LIMITS)

    assert isinstance(facts, PartialFacts)
    assert {problem.kind for problem in facts.problems} <= PROBLEM_KINDS


@SLOW_FUZZ
@given(mutated(PDF_SEED) | st.binary(max_size=300).map(lambda data: b"%PDF-1.7\n" + data))
def test_fuzz_pdf_task_never_raises(data):
    facts = decode_pdf_task(DecodeTask("pdf", data, "message > part 2 (application/pdf)", "attachment"), LIMITS)

    assert isinstance(facts, PartialFacts)
    assert {problem.kind for problem in facts.problems} <= PROBLEM_KINDS


HEADER_NAMES = ["From", "Reply-To", "Received", "Authentication-Results", "To", "X-Other"]
HEADER_TOKENS = ["(", ")", "<", ">", "@", '"', ",", ";", "=?utf-8?q?", "?=", "from", "by", "[", "]",
                 "192.0.2.1", "ipv6:", "2001:db8::1", "dmarc=pass", "example.com", "\\", " ", "\r\n\t"]


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(HEADER_NAMES),
                          st.lists(st.sampled_from(HEADER_TOKENS) | st.text(max_size=6), max_size=30).map("".join)),
                max_size=8),
       st.sampled_from([None, "198.51.100.7", "127.0.0.1", "not an ip"]))
def test_fuzz_sender_never_raises(headers, client_ip):
    envelope = Envelope("alice@example.net", ("bob@example.com",), client_ip=client_ip)
    org = OrgPolicy(domains=("example.com",), authserv_ids=("mx.example.com",))

    assert isinstance(judge_sender(headers, envelope, org), SenderFacts)


# Inputs the fuzz targets found that once crashed a stage, kept as fixed cases.
STRUCTURE_REGRESSIONS = {
    "address comments nested deep": b"From: " + b"(" * 3000 + b"a@example.com\r\n\r\nbody\r\n",
    "rfc 2231 boundary with 8-bit bytes": (b"Content-Type: multipart/mixed; boundary*0*=utf-8''%C3; "
                                           b"boundary*1=\xff\r\n\r\n--\xff\r\n\r\nx\r\n"),
    "percent escape in 8-bit parameter": (b"Content-Type: text/plain; name*=utf-8''\xe9%41\r\n\r\nx\r\n"),
    # CPython 3.11's email.utils.decode_params raises TypeError when `name*` and `name*0` meet.
    "rfc 2231 boundary star and star zero": b"Content-Type: multipart/mixed; boundary*0=a; boundary*=a\r\n\r\n",
    "rfc 2231 filename star and star zero": (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
                                             b"Content-Disposition: attachment; filename*=a; filename*0=b\r\n\r\n"
                                             b"x\r\n--b--\r\n"),
    "rfc 2231 charset star and star zero": (b"Content-Type: text/plain; charset*=a; charset*0=b\r\n\r\nx\r\n"),
    "rfc 2231 mix with 8-bit body": b"Content-Type: text/plain; boundary*0=a; boundary*=a\r\n\r\n\xc2\x80",
    "8-bit charset on a part only the scan finds": (b"Content-Type: multipart/mixed\r\nContent-Type: multipart/"
                                                    b"alternative; charset=\xc2\x80; boundary=a\r\na\r\n\r\n"),
    "rfc 2231 mix in attached eml": (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
                                     b"Content-Disposition: attachment; filename=f.eml\r\n\r\n"
                                     b"Content-Type: multipart/mixed; boundary*=c; boundary*0=c\r\n\r\n"
                                     b"--c\r\n\r\nhi\r\n--c--\r\n--b--\r\n"),
}


@pytest.mark.parametrize("raw", STRUCTURE_REGRESSIONS.values(), ids=STRUCTURE_REGRESSIONS.keys())
def test_structure_regressions(raw):
    facts, _tasks = analyse_structure(raw, LIMITS)
    scan = scan_message(raw, LIMITS)

    assert not any("MIME analysis failed" in problem.reason for problem in facts.problems)
    assert scan.complete


def test_unparsable_parameters_scanned_alone():
    raw = (b"Content-Type: multipart/mixed; boundary*0=a; boundary*=a\r\n\r\n--a\r\n"
           b"Content-Type: text/html\r\n\r\n<a href='https://example.com/hidden'>x</a>\r\n--a--\r\n")

    facts, _tasks = analyse_structure(raw, LIMITS)

    assert [link.url for link in facts.links] == ["https://example.com/hidden"]
    assert [anomaly.kind for anomaly in facts.mime_anomalies] == ["parser-mismatch"]


def test_sender_regressions():
    headers = [("From", "(" * 3000 + "a@example.com"), ("Reply-To", "<" * 3000)]

    sender = judge_sender(headers, Envelope("a@example.net", ("b@example.com",)), OrgPolicy())

    assert sender.from_address is None


def test_pdf_regressions():
    # A page tree without /Kids makes MuPDF raise FzErrorFormat, which is no RuntimeError.
    broken_tree = PDF_SEED.replace(b"/Kids[", b"/ids[", 1)
    task = DecodeTask("pdf", broken_tree, "message > part 2 (application/pdf)", "attachment")

    facts = decode_pdf_task(task, LIMITS)

    assert broken_tree != PDF_SEED
    assert [problem.kind for problem in facts.problems] == ["incomplete"]
    assert "page 1" in facts.problems[0].location
