"""MIME built to hide parts: every hidden part is inspected, and the two readers report what they disagree on."""

from __future__ import annotations

import base64

import pytest
from decoder_inputs import QR_URL, attached_message, leaf, message, multipart, pdf_with_image, qr_png
from hostile_mime import HIDDEN_URL, TECHNIQUES, hostile_message, payloads

from quishguard.config import build_config
from quishguard.decoders.boundaries import MAX_COMMENT_DEPTH, compare_parts, scan_message
from quishguard.decoders.structure import analyse_structure
from quishguard.model import Envelope, ScanLimits
from quishguard.pipeline import Scanner
from quishguard.scoring.verdict import evaluate

LIMITS = ScanLimits()
CASES = [
    pytest.param(technique.name, payload.name, id=f"{technique.name}-{payload.name}")
    for technique in TECHNIQUES
    for payload in payloads()
    if payload.name in technique.payload_names
]


def hidden_part_found(raw: bytes, payload_name: str) -> bool:
    facts, tasks = analyse_structure(raw, LIMITS)
    payload = next(item for item in payloads() if item.name == payload_name)
    if payload_name == "html":
        return any(link.url == HIDDEN_URL for link in facts.links)
    if payload_name == "qr-image":
        return any(task.kind == "image" and task.data == payload.data for task in tasks)
    return any(task.kind == "pdf" and payload.data in task.data for task in tasks)


@pytest.mark.parametrize(("technique", "payload"), CASES)
def test_hostile_hidden_part_inspected(technique, payload):
    raw = hostile_message(technique, payload)

    assert hidden_part_found(raw, payload)


@pytest.mark.parametrize("technique", TECHNIQUES, ids=lambda technique: technique.name)
def test_hostile_anomalies_reported(technique):
    raw = hostile_message(technique.name, "html")
    facts, _tasks = analyse_structure(raw, LIMITS)
    kinds = {anomaly.kind for anomaly in facts.mime_anomalies}

    assert technique.anomalies <= kinds


@pytest.mark.parametrize(
    ("technique", "rules"),
    [
        ("duplicate-boundary", {"MIME_DUPLICATE_BOUNDARY", "MIME_PARSER_MISMATCH"}),
        ("rfc2231-split-boundary", {"MIME_DUPLICATE_BOUNDARY", "MIME_PARSER_MISMATCH"}),
        ("double-content-type", {"MIME_DOUBLE_CONTENT_TYPE", "MIME_PARSER_MISMATCH"}),
        ("missing-close-delimiter", {"MIME_UNCLOSED_MULTIPART"}),
        ("padded-base64", {"MIME_BROKEN_ENCODING"}),
        ("base64-attached-message", {"MIME_PARSER_MISMATCH"}),
    ],
)
def test_hostile_verdict_names_rules(technique, rules):
    facts, _tasks = analyse_structure(hostile_message(technique, "html"), LIMITS)
    verdict = evaluate(facts, Envelope("billing@example.com", ("user@example.org",)), build_config({}))
    fired = {finding.rule for finding in verdict.findings}

    assert rules <= fired
    assert not verdict.scan_incomplete


def test_hostile_extra_part_location_marked():
    facts, _tasks = analyse_structure(hostile_message("duplicate-boundary", "html"), LIMITS)
    hidden = [link for link in facts.links if link.url == HIDDEN_URL]

    assert hidden
    assert hidden[0].location.endswith("[boundary scan]")
    assert any(part.location == hidden[0].location for part in facts.parts)


BENIGN = {
    "plain text": message("Content-Type: text/plain; charset=utf-8\r\n\r\nHello Bob,\r\nsee you.\r\n"),
    "html alternative": message(multipart(
        "alternative", leaf("text/plain", "Hello"), leaf("text/html", "<p>Hello <a href='https://example.com'>x</a>"))),
    "inline image": message(multipart(
        "related", leaf("text/html", '<img src="cid:qr@example.com">'),
        leaf("image/png", qr_png(), disposition="inline", content_id="qr@example.com"))),
    "pdf attachment": message(multipart(
        "mixed", leaf("text/plain", "Invoice attached"),
        leaf("application/pdf", pdf_with_image(qr_png()), filename="invoice.pdf", disposition="attachment"))),
    "attached message": message(multipart(
        "mixed", leaf("text/plain", "Forwarded"),
        attached_message(message(multipart("alternative", leaf("text/plain", "a"), leaf("text/html", "<b>a</b>")))))),
    "rfc 2231 filename": message(
        'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n'
        "--b\r\nContent-Type: application/octet-stream\r\n"
        "Content-Disposition: attachment; filename*=utf-8''R%C3%A9sum%C3%A9.txt\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(b"text").decode() + "\r\n--b--\r\n"),
    "rfc 2231 boundary alone": message(
        "Content-Type: multipart/mixed; boundary*0=\"split-\"; boundary*1=\"one\"\r\n\r\n"
        "--split-one\r\nContent-Type: text/plain\r\n\r\nhi\r\n--split-one--\r\n"),
    "quoted-printable text": message(
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
        "Gr=C3=BC=C3=9Fe, a long line that is soft =\r\nwrapped  \r\nend\r\n"),
    "bare line feeds": message(multipart("mixed", leaf("text/plain", "a"), leaf("text/html", "<b>b</b>"))
                               ).replace(b"\r\n", b"\n"),
    "delimiter with padding": message(
        'Content-Type: multipart/mixed; boundary="p"\r\n\r\npreamble\r\n--p  \r\nContent-Type: text/plain\r\n\r\n'
        "one\r\n--p\t\r\nContent-Type: text/plain\r\n\r\ntwo\r\n--p-- \r\nepilogue\r\n"),
    "digest": message(
        'Content-Type: multipart/digest; boundary="d"\r\n\r\n--d\r\n\r\n'
        "Subject: one\r\n\r\nfirst\r\n--d\r\n\r\nSubject: two\r\n\r\nsecond\r\n--d--\r\n"),
    "delivery report": message(
        'Content-Type: multipart/report; report-type=delivery-status; boundary="r"\r\n\r\n'
        "--r\r\nContent-Type: text/plain\r\n\r\nNot delivered.\r\n"
        "--r\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.com\r\n\r\n"
        "Final-Recipient: rfc822; a@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n--r--\r\n"),
}


@pytest.mark.parametrize("raw", BENIGN.values(), ids=BENIGN.keys())
def test_benign_mime_no_anomaly(raw):
    facts, _tasks = analyse_structure(raw, LIMITS)

    assert facts.mime_anomalies == []
    assert not any("[boundary scan]" in part.location for part in facts.parts)


def test_scan_prefers_rfc2231_boundary():
    raw = hostile_message("rfc2231-split-boundary", "html")
    scan = scan_message(raw, LIMITS)

    assert [part.content_type for part in scan.parts] == ["text/html"]
    assert scan.complete


def test_scan_reads_last_content_type():
    raw = hostile_message("double-content-type", "html")
    scan = scan_message(raw, LIMITS)

    assert [part.content_type for part in scan.parts] == ["text/plain", "text/html"]


def test_scan_decodes_across_padding():
    raw = hostile_message("padded-base64", "html")
    scan = scan_message(raw, LIMITS)
    html = [part for part in scan.parts if part.content_type == "text/html"]

    assert html[0].data.startswith(b"<p>Hello</p>")
    assert HIDDEN_URL.encode() in html[0].data
    assert html[0].broken_encoding


def test_scan_ignores_boundary_in_quotes():
    raw = hostile_message("boundary-in-part-headers", "html")
    scan = scan_message(raw, LIMITS)

    assert not any(anomaly.kind == "duplicate-boundary" for anomaly in scan.anomalies)
    assert [part.content_type for part in scan.parts] == ["text/plain", "text/html"]


def test_scan_unterminated_quote_boundary():
    raw = message('Content-Type: multipart/mixed; boundary="open\r\n\r\n'
                  "--open\r\nContent-Type: text/plain\r\n\r\none\r\n--open--\r\n")
    scan = scan_message(raw, LIMITS)

    assert [part.data for part in scan.parts] == [b"one"]


@pytest.mark.parametrize(
    ("limits", "raw"),
    [
        (ScanLimits(max_mime_depth=2), hostile_message("nested-messages", "html")),
        (ScanLimits(max_parts=3), message(multipart("mixed", *[leaf("text/plain", str(n)) for n in range(5)]))),
        (ScanLimits(max_decoded_bytes=2048),
         message(multipart("mixed", leaf("application/octet-stream", b"x" * 4096)))),
    ],
    ids=["depth", "parts", "decoded bytes"],
)
def test_scan_limit_marks_incomplete(limits, raw):
    scan = scan_message(raw, limits)

    assert not scan.complete


def test_scan_limit_skips_comparison():
    raw = hostile_message("duplicate-boundary", "html")
    facts, _tasks = analyse_structure(raw, ScanLimits(max_parts=1))

    assert not any(anomaly.kind == "parser-mismatch" for anomaly in facts.mime_anomalies)
    assert any(problem.kind == "limit" for problem in facts.problems)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\r\n",
        b"Content-Type: multipart/mixed; boundary=\r\n\r\n--\r\n",
        b"Content-Type: multipart/mixed; boundary*0*=x''%ZZ; boundary*1*=%\r\n\r\n",
        b"Content-Type: multipart/mixed; boundary*=unknown-charset''%C3%A9\r\n\r\n--\xc3\xa9\r\n\r\nx",
        b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!!",
        b"Content-Type: text/plain\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\nbegin 644 a\r\n\xff\xff\r\n",
        b"Content-Type: \xff/\xfe; boundary=\"\xff\"\r\n\r\n--\xff\r\n\r\nx\r\n",
        b"From \r\n:\r\n \r\n\t\r\n" * 10,
        b"Content-Type: multipart/mixed; boundary=a\r\n\r\n" + b"--a\r\n" * 10_000,
    ],
    ids=["empty", "blank line", "empty boundary", "bad percent", "unknown charset", "base64 message",
         "bad uuencode", "8-bit header", "odd header lines", "many delimiters"],
)
def test_scan_never_raises(raw):
    scan = scan_message(raw, LIMITS)

    assert isinstance(scan.parts, tuple)


@pytest.mark.parametrize(
    ("header", "kind"),
    [
        ("From: " + "(" * (MAX_COMMENT_DEPTH + 1) + "x" + ")" * (MAX_COMMENT_DEPTH + 1) + " <a@example.com>",
         "header-nesting"),
        ("Subject: " + "x" * 1000, "long-header-line"),
    ],
    ids=["nested comments", "long line"],
)
def test_scan_header_anomaly_reported(header, kind):
    raw = f"{header}\r\nContent-Type: text/plain\r\n\r\nbody\r\n".encode()
    scan = scan_message(raw, LIMITS)

    assert [anomaly.kind for anomaly in scan.anomalies] == [kind]


@pytest.mark.parametrize(
    "header",
    ['From: "Ann (Sales)" <ann@example.com> (work)', "Subject: " + "x" * (998 - len("Subject: "))],
    ids=["shallow comments", "line at limit"],
)
def test_scan_header_within_limits_quiet(header):
    raw = f"{header}\r\nContent-Type: text/plain\r\n\r\nbody\r\n".encode()

    assert scan_message(raw, LIMITS).anomalies == ()


def test_compare_image_seen_not_returned():
    png = qr_png()
    raw = message(multipart("mixed", leaf("image/png", png, filename="a.png")))
    scan = scan_message(raw, LIMITS)
    comparison = compare_parts(scan, [("message > part 1", "application/octet-stream", png)])

    assert comparison.extra == ()
    assert [anomaly.kind for anomaly in comparison.anomalies] == ["parser-mismatch"]


async def test_hostile_qr_found_by_scanner(pool):
    raw = hostile_message("duplicate-boundary", "qr-image")
    scanner = Scanner(build_config({}), pool)
    result = await scanner.scan(raw, Envelope("billing@example.com", ("user@example.org",)))
    fired = {finding.rule for finding in result.verdict.findings}

    assert [code.payload for code in result.verdict.qr_codes] == [QR_URL]
    assert {"QR_URL", "MIME_DUPLICATE_BOUNDARY", "MIME_PARSER_MISMATCH"} <= fired
