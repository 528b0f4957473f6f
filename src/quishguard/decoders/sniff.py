"""Recognise images and PDFs by their leading bytes, never by the declared type.

Senders control Content-Type and filenames, and mail clients render by
content, so a PNG declared as `application/octet-stream` is still an image.
The signatures are the ones each format's specification puts at offset 0
(PNG: ISO/IEC 15948; GIF87a/89a; JFIF/EXIF SOI marker; BMP; RIFF WebP;
TIFF 6.0; ICO) and `%PDF-` (ISO 32000-1, section 7.5.2).
"""

from __future__ import annotations

# Readers such as Acrobat and MuPDF accept a PDF header after leading junk,
# and attackers use that to dodge checks at offset 0. The PDF Reference 1.7
# (appendix H) says Acrobat looks for the header in the first 1024 bytes.
PDF_HEADER_WINDOW = 1024

_BMP_DIB_HEADER_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})


def image_format(data: bytes) -> str | None:
    """Return the image format name for `data` ("png", "jpeg", ...) or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    if _is_bmp(data):
        return "bmp"
    if _is_ico(data):
        return "ico"
    return None


def is_pdf(data: bytes) -> bool:
    return b"%PDF-" in data[:PDF_HEADER_WINDOW]


def is_zip(data: bytes) -> bool:
    """Tell whether `data` starts with a ZIP local file header (APPNOTE.TXT, section 4.3.7).

    Office Open XML (ECMA-376) and OpenDocument files are ZIP archives too.
    """
    return data.startswith(b"PK\x03\x04")


def looks_like_markup(data: bytes) -> bool:
    """Tell whether `data` starts like an HTML or SVG document (after a BOM and whitespace)."""
    head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype html", b"<html", b"<svg")):
        return True
    return head.startswith(b"<?xml") and b"<svg" in head


def _is_bmp(data: bytes) -> bool:
    # "BM" alone matches too much text, so also require a known DIB header size.
    if len(data) < 18 or not data.startswith(b"BM"):
        return False
    return int.from_bytes(data[14:18], "little") in _BMP_DIB_HEADER_SIZES


def _is_ico(data: bytes) -> bool:
    # ICONDIR: reserved 0, type 1 (icon), then a non-zero image count.
    if len(data) < 6 or not data.startswith(b"\x00\x00\x01\x00"):
        return False
    return int.from_bytes(data[4:6], "little") > 0
