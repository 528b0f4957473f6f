"""Builders for decoder test inputs: QR images, raw MIME messages and PDFs."""

from __future__ import annotations

import base64
import io

import pymupdf
import segno
from PIL import Image

QR_URL = "https://qr.example.com/login?id=42"


def qr_png(payload: str = QR_URL, scale: int = 6, dark: str = "black", light: str | None = "white") -> bytes:
    buffer = io.BytesIO()
    segno.make(payload, micro=False).save(buffer, kind="png", scale=scale, dark=dark, light=light)
    return buffer.getvalue()


def qr_image(payload: str = QR_URL, scale: int = 6) -> Image.Image:
    return Image.open(io.BytesIO(qr_png(payload, scale))).convert("L")


def encode_image(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def leaf(
    content_type: str,
    body: bytes | str,
    *,
    filename: str | None = None,
    disposition: str | None = None,
    content_id: str | None = None,
    charset: str | None = None,
) -> str:
    """Return one MIME leaf entity, base64-encoded."""
    data = body.encode("utf-8") if isinstance(body, str) else body
    type_line = f"Content-Type: {content_type}"
    if charset:
        type_line += f'; charset="{charset}"'
    if filename and not disposition:
        type_line += f'; name="{filename}"'
    lines = [type_line, "Content-Transfer-Encoding: base64"]
    if disposition:
        value = disposition + (f'; filename="{filename}"' if filename else "")
        lines.append(f"Content-Disposition: {value}")
    if content_id:
        lines.append(f"Content-ID: <{content_id}>")
    encoded = base64.encodebytes(data).decode("ascii")
    return "\r\n".join(lines) + "\r\n\r\n" + encoded


def multipart(subtype: str, *children: str, boundary: str | None = None) -> str:
    boundary = boundary or f"b-{subtype}-{len(children)}-{abs(hash(children)) % 10**8}"
    body = "".join(f"--{boundary}\r\n{child}\r\n" for child in children)
    return f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n\r\n{body}--{boundary}--\r\n'


def attached_message(inner: bytes) -> str:
    return "Content-Type: message/rfc822\r\n\r\n" + inner.decode("utf-8")


def message(root: str, subject: str = "Invoice", sender: str = "Billing <billing@example.com>") -> bytes:
    headers = (
        f"From: {sender}\r\n"
        "To: user@example.org\r\n"
        f"Subject: {subject}\r\n"
        "Message-ID: <m1@example.com>\r\n"
        "MIME-Version: 1.0\r\n"
    )
    return (headers + root).encode("utf-8")


def pdf_with_image(png: bytes, pages: int = 1, text: str = "") -> bytes:
    document = pymupdf.open()
    for _ in range(pages):
        page = document.new_page()
        page.insert_image(pymupdf.Rect(72, 72, 272, 272), stream=png)
        if text:
            page.insert_text((72, 320), text)
    return document.tobytes()


def pdf_with_vector_qr(payload: str = QR_URL, module_points: float = 4.0) -> bytes:
    """Return a one-page PDF whose QR code is drawn as filled rectangles, one per dark module."""
    document = pymupdf.open()
    page = document.new_page()
    matrix = segno.make(payload, micro=False).matrix
    origin = 100.0
    for row_index, row in enumerate(matrix):
        for column_index, dark in enumerate(row):
            if not dark:
                continue
            left = origin + column_index * module_points
            top = origin + row_index * module_points
            rect = pymupdf.Rect(left, top, left + module_points, top + module_points)
            page.draw_rect(rect, color=None, fill=(0, 0, 0), width=0)
    return document.tobytes()
