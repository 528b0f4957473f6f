from __future__ import annotations

import pymupdf
import pytest
from decoder_inputs import QR_URL, pdf_with_image, pdf_with_vector_qr, qr_png

from quishguard.decoders import TASKS
from quishguard.decoders.pdf import decode_pdf
from quishguard.model import DecodeTask, ScanLimits

LIMITS = ScanLimits()
LOCATION = 'message > part 2 (application/pdf, "invoice.pdf")'


def task_for(data: bytes, passwords: tuple[str, ...] = ()) -> DecodeTask:
    return DecodeTask("pdf", data, LOCATION, "attachment", "invoice.pdf", passwords)


def encrypt(data: bytes, user_password: str) -> bytes:
    document = pymupdf.open(stream=data, filetype="pdf")
    return document.tobytes(encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw=user_password, owner_pw="owner-secret")


def test_pdf_embedded_image_qr():
    facts = TASKS["pdf"](task_for(pdf_with_image(qr_png())), LIMITS)

    assert [(code.payload, code.hidden_as) for code in facts.qr_codes] == [(QR_URL, "pdf-image")]
    assert facts.qr_codes[0].location == LOCATION + " > page 1"
    assert facts.qr_codes[0].in_pdf is True
    pdf = facts.pdfs[0]
    assert (pdf.location, pdf.filename, pdf.page_count, pdf.pages_rendered) == (LOCATION, "invoice.pdf", 1, 1)
    assert pdf.encrypted is False
    assert pdf.has_javascript is False
    assert facts.problems == []


def test_pdf_vector_qr_detected():
    facts = decode_pdf(task_for(pdf_with_vector_qr()), LIMITS)

    assert [(code.payload, code.hidden_as) for code in facts.qr_codes] == [(QR_URL, "pdf-vector")]


def test_pdf_link_annotation_and_text_urls():
    document = pymupdf.open()
    page = document.new_page()
    page.insert_text((72, 100), "Pay here: https://pay.example.com/invoice/7 today")
    page.insert_link({"kind": pymupdf.LINK_URI, "from": pymupdf.Rect(72, 200, 300, 220), "uri": "https://annot.example.net/x"})
    facts = decode_pdf(task_for(document.tobytes()), LIMITS)

    assert ("https://annot.example.net/x", "pdf-link") in [(link.url, link.source) for link in facts.links]
    assert ("https://pay.example.com/invoice/7", "pdf-text") in [(link.url, link.source) for link in facts.links]
    assert all(link.location == LOCATION + " > page 1" for link in facts.links)
    assert facts.pdfs[0].text_chars == len("Payhere:https://pay.example.com/invoice/7today")


def test_pdf_empty_password_encrypted_read():
    facts = decode_pdf(task_for(encrypt(pdf_with_image(qr_png()), "")), LIMITS)

    assert facts.pdfs[0].encrypted is True
    assert [code.payload for code in facts.qr_codes] == [QR_URL]


def test_pdf_password_protected_incomplete():
    facts = decode_pdf(task_for(encrypt(pdf_with_image(qr_png()), "s3cret")), LIMITS)

    assert facts.pdfs[0].encrypted is True
    assert facts.pdfs[0].pages_rendered == 0
    assert facts.qr_codes == []
    assert [problem.kind for problem in facts.problems] == ["incomplete"]


def test_pdf_quoted_password_opens():
    data = encrypt(pdf_with_image(qr_png()), "123")
    facts = decode_pdf(task_for(data, passwords=("wrong", "123")), LIMITS)

    assert facts.pdfs[0].encrypted is True
    assert [code.payload for code in facts.qr_codes] == [QR_URL]
    assert facts.problems == []


@pytest.mark.parametrize(
    "data",
    [b"%PDF-1.7\n garbage that is not a pdf", b"not a pdf at all", b""],
)
def test_pdf_garbage_is_incomplete(data):
    facts = decode_pdf(task_for(data), LIMITS)

    assert facts.qr_codes == []
    assert [problem.kind for problem in facts.problems] == ["incomplete"]
    assert facts.problems[0].location == LOCATION


def test_pdf_truncated_no_crash():
    data = pdf_with_image(qr_png(), pages=3)
    facts = decode_pdf(task_for(data[: len(data) // 2]), LIMITS)

    assert facts.problems or facts.pdfs


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("OpenAction", "<</S/JavaScript/JS(app.alert\\(1\\))>>"),
        ("OpenAction", "<</S/J#61vaScript/JS(app.alert\\(1\\))>>"),
        ("Names", "<</JavaScript<</Names[(a)<</S/JavaScript/JS(1)>>]>>>>"),
    ],
)
def test_pdf_javascript_detected(key, value):
    document = pymupdf.open()
    document.new_page()
    document.xref_set_key(document.pdf_catalog(), key, value)
    facts = decode_pdf(task_for(document.tobytes()), LIMITS)

    assert facts.pdfs[0].has_javascript is True


def test_pdf_page_limit_recorded():
    facts = decode_pdf(task_for(pdf_with_image(qr_png(), pages=4)), ScanLimits(max_pdf_pages=2))

    assert facts.pdfs[0].page_count == 4
    assert facts.pdfs[0].pages_rendered == 2
    assert len(facts.qr_codes) == 2
    assert [problem.kind for problem in facts.problems] == ["limit"]
    assert "max_pdf_pages=2" in facts.problems[0].reason


def test_pdf_dpi_lowered_for_pixels():
    # A4 at 150 dpi is about 1240 x 1754 pixels; allow a quarter of that.
    limits = ScanLimits(max_image_pixels=550_000)
    facts = decode_pdf(task_for(pdf_with_image(qr_png())), limits)

    assert [problem.kind for problem in facts.problems] == ["limit"]
    assert "pdf_dpi=150" in facts.problems[0].reason
    assert [code.payload for code in facts.qr_codes] == [QR_URL]


def test_pdf_huge_page_not_rendered():
    document = pymupdf.open()
    document.new_page(width=14400, height=14400)
    facts = decode_pdf(task_for(document.tobytes()), ScanLimits(max_image_pixels=1_000_000))

    assert [problem.kind for problem in facts.problems] == ["limit"]
    assert "not rendered" in facts.problems[0].reason
