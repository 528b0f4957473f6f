from __future__ import annotations

import base64
import sys

import pytest
from decoder_inputs import (
    QR_URL,
    attached_message,
    leaf,
    message,
    multipart,
    pdf_with_image,
    qr_png,
)

from quishguard.decoders.structure import analyse_structure, decode_header_value
from quishguard.model import ScanLimits

LIMITS = ScanLimits()
HTML_BODY = '<html><body><p>Scan the code below</p><img src="cid:qr1@example.com"></body></html>'


def analyse(raw: bytes, limits: ScanLimits = LIMITS):
    return analyse_structure(raw, limits)


def test_structure_headers_decoded_in_order():
    raw = (
        b"Received: from a.example.com\r\n"
        b"Subject: =?utf-8?q?Rechnung_f=C3=BCr?= you\r\n"
        b"From: =?iso-8859-1?q?J=F6rg?= <jorg@example.com>\r\n"
        b"Message-ID: <abc@example.com>\r\n"
        b"X-Long: first\r\n\tsecond\r\n"
        b"\r\nbody\r\n"
    )
    facts, _tasks = analyse(raw)

    assert [name for name, _value in facts.headers] == ["Received", "Subject", "From", "Message-ID", "X-Long"]
    assert facts.subject == "Rechnung für you"
    assert facts.from_header == "Jörg <jorg@example.com>"
    assert facts.message_id == "<abc@example.com>"
    assert facts.headers[4] == ("X-Long", "first\tsecond")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("plain value", "plain value"),
        ("=?utf-8?b?SGFsbG8=?=", "Hallo"),
        ("=?utf-8?b?not-base64!!?=", "=?utf-8?b?not-base64!!?="),
        ("=?x-unknown-charset?q?abc?=", "abc"),
        ("caf\udcc3\udca9", "café"),
    ],
)
def test_decode_header_value_cases(raw, expected):
    assert decode_header_value(raw) == expected


def test_structure_inline_cid_image_task():
    html = leaf("text/html", HTML_BODY)
    image = leaf("image/png", qr_png(), content_id="qr1@example.com", filename="image001.png")
    facts, tasks = analyse(message(multipart("related", html, image)))

    assert len(tasks) == 1
    assert tasks[0].kind == "image"
    assert tasks[0].hidden_as == "inline-image"
    assert tasks[0].location == 'message > part 2 (image/png, "image001.png")'
    assert facts.parts[1].is_attachment is False


def test_structure_inline_disposition_image_task():
    text = leaf("text/plain", "see image")
    image = leaf("image/jpeg", qr_png(), filename="qr.jpg", disposition="inline")
    _facts, tasks = analyse(message(multipart("mixed", text, image)))

    assert [task.hidden_as for task in tasks] == ["inline-image"]


def test_structure_attachment_sniffed_by_magic():
    text = leaf("text/plain", "see attachment")
    disguised = leaf("application/octet-stream", qr_png(), filename="scan.dat", disposition="attachment")
    facts, tasks = analyse(message(multipart("mixed", text, disguised)))

    assert [(task.kind, task.hidden_as, task.filename) for task in tasks] == [("image", "attachment", "scan.dat")]
    assert facts.parts[1].is_attachment is True
    assert facts.parts[1].size == len(qr_png())


def test_structure_declared_image_without_magic_skipped():
    fake = leaf("image/png", b"this is not an image at all", filename="fake.png", disposition="attachment")
    facts, tasks = analyse(message(multipart("mixed", leaf("text/plain", "hi"), fake)))

    assert tasks == []
    assert facts.parts[1].content_type == "image/png"


def test_structure_pdf_task_with_leading_junk():
    pdf = b"junk before the header\n" + pdf_with_image(qr_png())
    attachment = leaf("application/octet-stream", pdf, filename="invoice.pdf", disposition="attachment")
    _facts, tasks = analyse(message(multipart("mixed", leaf("text/plain", "invoice"), attachment)))

    assert [(task.kind, task.hidden_as) for task in tasks] == [("pdf", "attachment")]
    assert tasks[0].location == 'message > part 2 (application/octet-stream, "invoice.pdf")'


def test_structure_nested_message_parts():
    inner = message(
        multipart(
            "mixed",
            leaf("text/html", '<a href="https://inner.example.com/x">open</a>'),
            leaf("image/png", qr_png(), filename="qr.png", disposition="attachment"),
        ),
        subject="Fwd",
    )
    outer = message(multipart("mixed", leaf("text/plain", "forwarded"), attached_message(inner)))
    facts, tasks = analyse(outer)

    assert [task.hidden_as for task in tasks] == ["nested-message"]
    assert tasks[0].location == 'message > attached message (part 2) > part 2 (image/png, "qr.png")'
    html = facts.html[0]
    assert html.location == "message > attached message (part 2) > part 1 (text/html)"
    assert html.is_attachment is True
    assert [link.url for link in facts.links] == ["https://inner.example.com/x"]
    assert facts.body_text_chars == len("forwarded")


def test_structure_eml_attachment_walked():
    inner = message(leaf("image/png", qr_png(), filename="qr.png", disposition="attachment"))
    outer = message(
        multipart(
            "mixed",
            leaf("text/plain", "see"),
            leaf("application/octet-stream", inner, filename="original.eml", disposition="attachment"),
        )
    )
    _facts, tasks = analyse(outer)

    assert [task.hidden_as for task in tasks] == ["nested-message"]
    assert "attached message (part 2)" in tasks[0].location


@pytest.mark.parametrize(
    ("markup", "hidden_as"),
    [
        ('<img src="data:image/png;base64,{b64}">', "data-uri"),
        ('<img srcset="data:image/png;base64,{b64} 2x, https://example.com/a.png 1x">', "data-uri"),
        ("<div style=\"background-image:url('data:image/png;base64,{b64}')\">x</div>", "css-background"),
        ("<style>.q {{ background: url(data:image/png;base64,{b64}) }}</style><p class=q>x</p>", "css-background"),
        ('<table background="data:image/png;base64,{b64}"><tr><td>x</td></tr></table>', "css-background"),
    ],
)
def test_structure_html_data_uri_tasks(markup, hidden_as):
    b64 = base64.b64encode(qr_png()).decode("ascii")
    raw = message(leaf("text/html", markup.format(b64=b64)))
    _facts, tasks = analyse(raw)

    assert [(task.kind, task.hidden_as) for task in tasks] == [("image", hidden_as)]
    assert tasks[0].data == qr_png()
    assert tasks[0].location.startswith("message > part 1 (text/html) > ")


def test_structure_html_attachment_inspected():
    page = '<form action="https://collect.example.net/p"><input name=pw></form>'
    raw = message(
        multipart(
            "mixed",
            leaf("text/plain", "Hello"),
            leaf("application/octet-stream", page, filename="Invoice.HTM", disposition="attachment"),
        )
    )
    facts, _tasks = analyse(raw)

    assert len(facts.html) == 1
    assert facts.html[0].is_attachment is True
    assert facts.html[0].offsite_forms == ("https://collect.example.net/p",)
    assert facts.body_text_chars == len("Hello")
    assert facts.text_bodies == ["Hello"]


def test_structure_svg_attachment_inspected():
    b64 = base64.b64encode(qr_png()).decode("ascii")
    svg = (
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink">'
        f'<image xlink:href="data:image/png;base64,{b64}" width="200" height="200"/>'
        '<script>window.location.href = "https://svg.example.net/x";</script></svg>'
    )
    raw = message(multipart("mixed", leaf("text/plain", "fax"), leaf("image/svg+xml", svg, filename="fax.svg")))
    facts, tasks = analyse(raw)

    assert facts.html[0].is_attachment is True
    assert facts.html[0].js_redirects == ("https://svg.example.net/x",)
    assert [(task.kind, task.hidden_as) for task in tasks] == [("svg", "svg"), ("image", "svg")]


def test_structure_text_links_and_bodies():
    raw = message(leaf("text/plain", "Pay at https://pay.example.com/inv?id=1. Or (see www.example.org/help)."))
    facts, _tasks = analyse(raw)

    assert [(link.url, link.source) for link in facts.links] == [
        ("https://pay.example.com/inv?id=1", "text"),
        ("www.example.org/help", "text"),
    ]
    assert facts.text_bodies == ["Pay at https://pay.example.com/inv?id=1. Or (see www.example.org/help)."]
    assert facts.body_text_chars == len("Payathttps://pay.example.com/inv?id=1.Or(seewww.example.org/help).")


def test_structure_filename_never_raw_path():
    hostile = leaf("application/octet-stream", b"data", filename="../../etc/passwd\x07.png", disposition="attachment")
    facts, _tasks = analyse(message(multipart("mixed", leaf("text/plain", "x"), hostile)))

    assert facts.parts[1].filename == "../../etc/passwd.png"
    assert facts.parts[1].location == 'message > part 2 (application/octet-stream, "../../etc/passwd.png")'


def test_structure_depth_limit_recorded():
    entity = leaf("image/png", qr_png(), filename="deep.png", disposition="attachment")
    for _ in range(8):
        entity = multipart("mixed", entity)
    facts, tasks = analyse(message(entity), ScanLimits(max_mime_depth=4))

    assert tasks == []
    assert any(p.kind == "limit" and "max_mime_depth=4" in p.reason for p in facts.problems)


def test_structure_extreme_nesting_no_crash():
    depth = sys.getrecursionlimit() + 100
    body = "".join(f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n' for i in range(depth))
    facts, tasks = analyse(message(body + "Content-Type: text/plain\r\n\r\nhi\r\n"))

    assert tasks == []
    assert any(p.kind in ("limit", "incomplete") for p in facts.problems)


def test_structure_part_limit_recorded():
    images = [leaf("image/png", qr_png(), filename=f"{n}.png", disposition="attachment") for n in range(10)]
    facts, tasks = analyse(message(multipart("mixed", *images)), ScanLimits(max_parts=5))

    assert len(tasks) == 4
    assert any(p.kind == "limit" and "max_parts=5" in p.reason for p in facts.problems)


def test_structure_decoded_bytes_limit_recorded():
    png = qr_png()
    images = [leaf("image/png", png, filename=f"{n}.png", disposition="attachment") for n in range(3)]
    limits = ScanLimits(max_decoded_bytes=len(png) * 2 + 10)
    facts, tasks = analyse(message(multipart("mixed", *images)), limits)

    assert len(tasks) == 2
    assert [p.kind for p in facts.problems] == ["limit"]
    assert "max_decoded_bytes" in facts.problems[0].reason
    assert facts.problems[0].location.startswith("message > part 3")


def test_structure_image_limit_recorded():
    images = [leaf("image/png", qr_png(), filename=f"{n}.png", disposition="attachment") for n in range(4)]
    facts, tasks = analyse(message(multipart("mixed", *images)), ScanLimits(max_images=2))

    assert len(tasks) == 2
    assert any(p.kind == "limit" and "max_images=2" in p.reason for p in facts.problems)


def test_structure_url_limit_recorded():
    text = " ".join(f"https://example.com/{n}" for n in range(20))
    facts, _tasks = analyse(message(leaf("text/plain", text)), ScanLimits(max_urls=5))

    assert len(facts.links) == 5
    assert any(p.kind == "limit" and "max_urls=5" in p.reason for p in facts.problems)


def test_structure_duplicate_links_kept_once():
    text = "https://example.com/a https://example.com/a"
    html = '<a href="https://example.com/a">a</a><a href="https://example.com/a">a</a>'
    raw = message(multipart("alternative", leaf("text/plain", text), leaf("text/html", html)))
    facts, _tasks = analyse(raw)

    assert [link.source for link in facts.links] == ["text", "html-href"]


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00\xff\xfe garbage \x00" * 50,
        b"Content-Type: multipart/mixed\r\n\r\nno boundary parameter\r\n",
        b'Content-Type: multipart/mixed; boundary="x"\r\n\r\n--x\r\nContent-Type: text/plain\r\n\r\nnever closed',
        b"Content-Type: text/plain; charset=x-no-such-charset\r\n\r\ncaf\xe9 https://example.com/c\r\n",
        b"Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64@@@\r\n",
        b"Subject: =?utf-8?b?broken\r\nFrom: <<<@@@>>>\r\n\r\nbody",
        b"Content-Type: message/rfc822\r\n\r\n",
        b"Subject: caf\xc3\xa9 \xff\r\n\r\nbody",
    ],
)
def test_structure_malformed_mail_no_raise(raw):
    facts, tasks = analyse(raw)

    assert isinstance(facts.parts, list)
    assert isinstance(tasks, list)


def test_structure_unknown_charset_read_as_utf8():
    raw = b"Content-Type: text/plain; charset=x-no-such-charset\r\n\r\ncaf\xc3\xa9 https://example.com/c\r\n"
    facts, _tasks = analyse(raw)

    assert facts.text_bodies == ["café https://example.com/c\r\n"]
    assert [link.url for link in facts.links] == ["https://example.com/c"]


def test_structure_single_part_html_body():
    facts, tasks = analyse(message(leaf("text/html", "<p>Hello <b>you</b></p><script>x()</script>")))

    assert tasks == []
    assert facts.parts[0].location == "message > part 1 (text/html)"
    assert facts.html[0].is_attachment is False
    assert facts.body_text_chars == len("Helloyou")
    assert facts.text_bodies == ["Hello you"]
    assert facts.image_count == 0


def test_structure_qr_payload_untouched_by_structure():
    _facts, tasks = analyse(message(leaf("image/png", qr_png(QR_URL), disposition="attachment")))

    assert tasks[0].data == qr_png(QR_URL)


def test_structure_pdf_task_gets_quoted_passwords():
    pdf = leaf("application/pdf", pdf_with_image(qr_png()), filename="boleto.pdf", disposition="attachment")
    image = leaf("image/png", qr_png(), filename="qr.png", disposition="attachment")
    raw = message(multipart("mixed", leaf("text/plain", "Segue o boleto. Senha PDF: 123"), pdf, image))
    _facts, tasks = analyse(raw)

    assert [(task.kind, task.passwords) for task in tasks] == [("pdf", ("123",)), ("image", ())]


UNCLOSED_QUOTE_MESSAGE = (
    b"From: a@example.com\r\nTo: user@example.org\r\nSubject: doc\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed;\r\n\tboundary="----=_Part_7\r\n\r\n'
    b"------=_Part_7\r\nContent-Type: text/plain\r\n\r\nsee file\r\n"
    b'------=_Part_7\r\nContent-Type: text/htm\r\nContent-Disposition: inline; filename="Email.htm\r\n\r\n'
    b"<script>window.location='https://lure.example.test/x'</script>\r\n------=_Part_7--\r\n"
)


def test_structure_unclosed_boundary_quote_repaired():
    facts, _tasks = analyse(UNCLOSED_QUOTE_MESSAGE)

    assert [part.content_type for part in facts.parts] == ["text/plain", "text/htm"]
    assert facts.parts[1].filename == "Email.htm"
    assert facts.parts[1].is_attachment is True
    assert facts.html[0].js_redirects == ("https://lure.example.test/x",)
    assert facts.problems == []


def test_structure_missing_boundary_recorded():
    raw = UNCLOSED_QUOTE_MESSAGE.replace(b"------=_Part_7", b"------=_Other_1")
    facts, _tasks = analyse(raw)

    assert [problem.kind for problem in facts.problems] == ["incomplete"]
    assert "without its boundary" in facts.problems[0].reason


def test_structure_truncated_multipart_no_problem():
    raw = UNCLOSED_QUOTE_MESSAGE.split(b"------=_Part_7\r\n")[0]
    facts, _tasks = analyse(raw)

    assert facts.problems == []
