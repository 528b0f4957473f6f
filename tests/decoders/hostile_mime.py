"""A generator of MIME messages built to hide one part from a filter's parser.

Each technique takes the hidden part (content type and payload) and wraps
it in a message where a decoy part is what a careless parser sees. The
hidden payload is always base64- or otherwise encoded, so a reader that
misses the part cannot find its URL in the raw text by accident.
`hostile_message(technique, payload)` builds one message; `TECHNIQUES`
lists each technique with the anomaly kinds it must raise. Every address
and URL uses reserved names.
"""

from __future__ import annotations

import base64
import functools
import quopri
from dataclasses import dataclass
from typing import Callable

from decoder_inputs import QR_URL, pdf_with_image, qr_png

HIDDEN_URL = "https://hidden.example.test/login?session=7"
HIDDEN_HTML = f'<html><body><p>Sign in</p><a href="{HIDDEN_URL}">Open</a></body></html>'.encode()
DECOY_TEXT = b"Hello,\r\n\r\nthe minutes of Monday's meeting are below.\r\n"

HEADERS = (
    "From: Billing <billing@example.com>\r\n"
    "To: user@example.org\r\n"
    "Subject: Minutes\r\n"
    "Message-ID: <hostile@example.com>\r\n"
    "MIME-Version: 1.0\r\n"
)


@dataclass(frozen=True)
class Payload:
    """The hidden part: what it contains and how a test recognises it was inspected."""

    name: str
    content_type: str
    data: bytes


@functools.cache
def payloads() -> tuple[Payload, ...]:
    """Return the hidden payloads; cached, because every PDF written gets a new ID."""
    return (
        Payload("html", "text/html", HIDDEN_HTML),
        Payload("qr-image", "image/png", qr_png(QR_URL)),
        Payload("pdf", "application/pdf", pdf_with_image(qr_png(QR_URL))),
    )


def base64_part(content_type: str, data: bytes, *, extra_headers: str = "") -> str:
    """Return one MIME entity with a base64 body wrapped at 76 characters."""
    encoded = base64.encodebytes(data).decode("ascii").replace("\n", "\r\n")
    return (f"Content-Type: {content_type}\r\n{extra_headers}"
            f"Content-Transfer-Encoding: base64\r\n\r\n{encoded}")


def decoy_part() -> str:
    return "Content-Type: text/plain; charset=utf-8\r\n\r\n" + DECOY_TEXT.decode()


def _message(content_type_lines: str, body: str) -> bytes:
    return (HEADERS + content_type_lines + "\r\n" + body).encode("utf-8", "surrogateescape")


def duplicate_boundary(payload: Payload) -> bytes:
    """Two `boundary` parameters: the first splits off the decoy, the second the hidden part."""
    body = (
        "--decoy\r\n" + decoy_part() + "\r\n"
        "--hidden\r\n" + base64_part(payload.content_type, payload.data) + "\r\n"
        "--hidden--\r\n"
        "--decoy--\r\n"
    )
    return _message('Content-Type: multipart/mixed; boundary="decoy"; boundary="hidden"\r\n', body)


def rfc2231_split_boundary(payload: Payload) -> bytes:
    """A plain `boundary` next to an RFC 2231 continued one (boundary*0, boundary*1) that differs."""
    body = (
        "--decoy\r\n" + decoy_part() + "\r\n"
        "--hid-den\r\n" + base64_part(payload.content_type, payload.data) + "\r\n"
        "--hid-den--\r\n"
        "--decoy--\r\n"
    )
    return _message('Content-Type: multipart/mixed; boundary="decoy";\r\n'
                    ' boundary*0="hid-"; boundary*1="den"\r\n', body)


def double_content_type(payload: Payload) -> bytes:
    """Two Content-Type headers: text/plain first, the multipart that carries the hidden part last."""
    body = (
        "--outer\r\n" + decoy_part() + "\r\n"
        "--outer\r\n" + base64_part(payload.content_type, payload.data) + "\r\n"
        "--outer--\r\n"
    )
    return _message('Content-Type: text/plain; charset=utf-8\r\n'
                    'Content-Type: multipart/mixed; boundary="outer"\r\n', body)


def missing_close_delimiter(payload: Payload) -> bytes:
    """The hidden part is last and the multipart never closes."""
    body = (
        "--open\r\n" + decoy_part() + "\r\n"
        "--open\r\n" + base64_part(payload.content_type, payload.data)
    )
    return _message('Content-Type: multipart/mixed; boundary="open"\r\n', body)


def boundary_in_part_headers(payload: Payload) -> bytes:
    """A delimiter line inside the decoy's header section starts the hidden part."""
    body = (
        "--inline\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "X-Note: see below\r\n"
        "--inline\r\n" + base64_part(payload.content_type, payload.data) + "\r\n"
        "--inline--\r\n"
    )
    return _message('Content-Type: multipart/mixed; x-note="boundary=decoy"; boundary="inline"\r\n', body)


def padded_base64(payload: Payload) -> bytes:
    """Base64 with padding in the middle: a decoder that stops at the first `=` reads only the decoy.

    The hidden bytes follow the decoy's, so only payloads found past a
    prefix (HTML, PDF) make sense here.
    """
    decoy = base64.b64encode(b"<p>Hello</p>\r\n\r\n")
    body_text = (decoy + base64.b64encode(payload.data)).decode("ascii")
    lines = "\r\n".join(body_text[i:i + 76] for i in range(0, len(body_text), 76))
    body = (
        "--pad\r\n" + decoy_part() + "\r\n"
        f"--pad\r\nContent-Type: {payload.content_type}\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + lines + "\r\n--pad--\r\n"
    )
    return _message('Content-Type: multipart/mixed; boundary="pad"\r\n', body)


def invalid_quoted_printable(payload: Payload) -> bytes:
    """Quoted-printable with an invalid escape after the payload, which must still be decoded."""
    encoded = quopri.encodestring(payload.data).replace(b"\n", b"\r\n").decode("latin-1")
    body = (
        "--qp\r\n" + decoy_part() + "\r\n"
        f"--qp\r\nContent-Type: {payload.content_type}\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
        + encoded + "=ZZ\r\n--qp--\r\n"
    )
    return _message('Content-Type: multipart/mixed; boundary="qp"\r\n', body)


def nested_messages(payload: Payload, depth: int = 3) -> bytes:
    """The hidden part inside message/rfc822 parts nested `depth` levels deep."""
    inner = _message('Content-Type: multipart/mixed; boundary="level0"\r\n',
                     "--level0\r\n" + base64_part(payload.content_type, payload.data) + "\r\n--level0--\r\n")
    for level in range(1, depth + 1):
        body = (
            f"--level{level}\r\n" + decoy_part() + "\r\n"
            f"--level{level}\r\nContent-Type: message/rfc822\r\n\r\n" + inner.decode("utf-8", "surrogateescape")
            + f"\r\n--level{level}--\r\n"
        )
        inner = _message(f'Content-Type: multipart/mixed; boundary="level{level}"\r\n', body)
    return inner


def base64_attached_message(payload: Payload) -> bytes:
    """A message/rfc822 part with a base64 body, which RFC 2046 forbids and some clients still decode."""
    inner = _message('Content-Type: multipart/mixed; boundary="in"\r\n',
                     "--in\r\n" + base64_part(payload.content_type, payload.data) + "\r\n--in--\r\n")
    body = (
        "--wrap\r\n" + decoy_part() + "\r\n"
        "--wrap\r\n" + base64_part("message/rfc822", inner) + "\r\n--wrap--\r\n"
    )
    return _message('Content-Type: multipart/mixed; boundary="wrap"\r\n', body)


def differing_alternatives(payload: Payload) -> bytes:
    """multipart/alternative whose text part is harmless and whose other alternative is the hidden one."""
    body = (
        "--alt\r\n" + decoy_part() + "\r\n"
        "--alt\r\n" + base64_part(payload.content_type, payload.data) + "\r\n"
        "--alt--\r\n"
    )
    return _message('Content-Type: multipart/alternative; boundary="alt"\r\n', body)


@dataclass(frozen=True)
class Technique:
    """A way to hide a part, and the anomaly kinds the two readers must report for it."""

    name: str
    build: Callable[[Payload], bytes]
    anomalies: frozenset[str]
    payload_names: tuple[str, ...] = ("html", "qr-image", "pdf")


TECHNIQUES = [
    Technique("duplicate-boundary", duplicate_boundary, frozenset({"duplicate-boundary", "parser-mismatch"})),
    Technique("rfc2231-split-boundary", rfc2231_split_boundary,
              frozenset({"duplicate-boundary", "parser-mismatch"})),
    Technique("double-content-type", double_content_type, frozenset({"double-content-type", "parser-mismatch"})),
    Technique("missing-close-delimiter", missing_close_delimiter, frozenset({"unclosed-multipart"})),
    Technique("boundary-in-part-headers", boundary_in_part_headers, frozenset()),
    Technique("padded-base64", padded_base64, frozenset({"broken-encoding"}), ("html", "pdf")),
    # Quoted-printable suits text; binary payloads would change with their line ends.
    Technique("invalid-quoted-printable", invalid_quoted_printable, frozenset({"broken-encoding"}), ("html",)),
    Technique("nested-messages", nested_messages, frozenset()),
    Technique("base64-attached-message", base64_attached_message, frozenset({"parser-mismatch"})),
    Technique("differing-alternatives", differing_alternatives, frozenset()),
]


def hostile_message(technique: str, payload: str) -> bytes:
    """Build the message of `technique` (a `TECHNIQUES` name) hiding `payload` (a `payloads()` name)."""
    chosen = next(item for item in TECHNIQUES if item.name == technique)
    return chosen.build(next(item for item in payloads() if item.name == payload))
