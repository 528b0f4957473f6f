"""Small message factories for tests; every address and URL uses reserved names."""

from __future__ import annotations

import io
from email.message import EmailMessage
from email.utils import format_datetime
from datetime import datetime, timezone

import segno


def qr_png(payload: str, scale: int = 6) -> bytes:
    buffer = io.BytesIO()
    segno.make(payload, micro=False).save(buffer, kind="png", scale=scale, border=4)
    return buffer.getvalue()


def make_message(*, subject: str = "Quarterly report", sender: str = "alice@example.net",
                 to: str = "bob@example.com", text: str | None = "Hello Bob,\n\nthe report is attached.\n",
                 html: str | None = None, images: list[tuple[str, bytes]] = (),
                 attachments: list[tuple[str, str, bytes]] = (), headers: dict[str, str] | None = None
                 ) -> bytes:
    """Build a message; `images` are inline (name, png bytes), `attachments` (name, mime type, bytes)."""
    message = EmailMessage()
    for name, value in (headers or {}).items():
        message[name] = value
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = format_datetime(datetime(2026, 11, 2, 9, 30, tzinfo=timezone.utc))
    message["Message-ID"] = f"<{abs(hash((subject, sender, to))) % 10**12}@example.net>"
    if text is not None:
        message.set_content(text)
    if html is not None:
        if text is None:
            message.set_content(html, subtype="html")
        else:
            message.add_alternative(html, subtype="html")
    for name, data in images:
        message.add_attachment(data, maintype="image", subtype="png", filename=name,
                               disposition="inline", cid=f"<{name}>")
    for name, mime_type, data in attachments:
        maintype, _, subtype = mime_type.partition("/")
        message.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return message.as_bytes(policy=message.policy.clone(linesep="\r\n"))
