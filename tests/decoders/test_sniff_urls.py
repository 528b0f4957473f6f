from __future__ import annotations

import pytest
from decoder_inputs import encode_image, qr_image, qr_png

from quishguard.decoders.passwords import find_password_candidates
from quishguard.decoders.sniff import image_format, is_pdf, looks_like_markup
from quishguard.decoders.urls import find_urls


@pytest.mark.parametrize(
    ("pillow_format", "expected"),
    [("PNG", "png"), ("JPEG", "jpeg"), ("GIF", "gif"), ("BMP", "bmp"), ("WEBP", "webp"), ("TIFF", "tiff"), ("ICO", "ico")],
)
def test_image_format_by_magic(pillow_format, expected):
    assert image_format(encode_image(qr_image(), pillow_format)) == expected


@pytest.mark.parametrize(
    "data",
    [b"", b"BM but plain text here", b"\x00\x00\x01\x00\x00\x00", b"RIFF\x00\x00\x00\x00WAVE", b"%PDF-1.4", b"<html>"],
)
def test_image_format_rejects_non_images(data):
    assert image_format(data) is None


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"%PDF-1.7\n", True),
        (b"x" * 500 + b"%PDF-1.4", True),
        (b"x" * 2000 + b"%PDF-1.4", False),
        (qr_png(), False),
    ],
)
def test_is_pdf_header_window(data, expected):
    assert is_pdf(data) is expected


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\xef\xbb\xbf  <!DOCTYPE html><html>", True),
        (b"<HTML><body>", True),
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg">', True),
        (b"<?xml version='1.0'?><invoice/>", False),
        (b"plain text", False),
    ],
)
def test_looks_like_markup_cases(data, expected):
    assert looks_like_markup(data) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Go to https://example.com/a.", ["https://example.com/a"]),
        ("<https://example.com/b>, then", ["https://example.com/b"]),
        ("(see https://example.com/wiki/Foo_(bar))", ["https://example.com/wiki/Foo_(bar)"]),
        ("www.example.org/x and HTTP://EXAMPLE.NET", ["www.example.org/x", "HTTP://EXAMPLE.NET"]),
        ('href="https://example.com/q?a=1&b=2"', ["https://example.com/q?a=1&b=2"]),
        ("https://example.com/a https://example.com/a", ["https://example.com/a"]),
        ("no links, only http:// and mail@example.com", []),
    ],
)
def test_find_urls_cases(text, expected):
    assert find_urls(text) == expected


def test_find_urls_limit():
    assert len(find_urls(" ".join(f"https://example.com/{n}" for n in range(10)), limit=3)) == 3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Senha PDF: 123\r\nProtocolo: 70128541695", ("123",)),
        ("Senha de acesso: 1234 - Autorização: X", ("1234",)),
        ("The password for the attachment is 4821.", ("4821",)),
        ('Passwort = "Abc-9"', ("Abc-9",)),
        ("Your code: 99 and PIN: 1010", ("99", "1010")),
        ("Nothing to see here", ()),
    ],
)
def test_find_password_candidates_cases(text, expected):
    assert find_password_candidates([text]) == expected
