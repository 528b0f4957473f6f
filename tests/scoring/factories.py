"""Small factories for the facts the decoders produce, so rule tests read as tables."""

from __future__ import annotations

from quishguard.config import Config, build_config
from quishguard.model import (
    Envelope,
    HtmlFacts,
    Link,
    MessageFacts,
    MimeAnomaly,
    PartInfo,
    PdfFacts,
    QrCode,
    ScanProblem,
    SenderFacts,
)

RECIPIENT = "bob@example.com"


def envelope(*rcpt_tos: str) -> Envelope:
    return Envelope(mail_from="sender@example.net", rcpt_tos=rcpt_tos or (RECIPIENT,))


def config(**sections: dict) -> Config:
    return build_config(dict(sections))


def org_config(**sections: dict) -> Config:
    """Return a config with `[org] domains = ["example.com"]`, as the samples use."""
    return build_config({"org": {"domains": ["example.com"]}, **sections})


def qr(payload: str, hidden_as: str = "inline-image", location: str = "1.2") -> QrCode:
    return QrCode(payload=payload, location=location, hidden_as=hidden_as, backend="zxing-cpp")


def link(url: str, source: str = "html-href", location: str = "1.1") -> Link:
    return Link(url=url, location=location, source=source)


def html(location: str = "1.1", attachment: bool = False, **fields) -> HtmlFacts:
    """Return HTML facts; an attachment is named invoice.html unless `filename` is given."""
    fields.setdefault("filename", "invoice.html" if attachment else None)
    return HtmlFacts(location=location, is_attachment=attachment, **fields)


def html_part(location: str = "2", filename: str = "statement.htm",
              content_type: str = "text/html") -> PartInfo:
    return PartInfo(location=location, content_type=content_type, filename=filename, size=2048,
                    is_attachment=True)


def pdf(**fields) -> PdfFacts:
    values = {"location": "2", "filename": "invoice.pdf", "page_count": 1, "pages_rendered": 1}
    values.update(fields)
    return PdfFacts(**values)


def sender(from_address: str = "ceo@example.com", original_ip: str | None = "203.0.113.45",
           ip_source: str = "received", dmarc_pass: bool = False) -> SenderFacts:
    return SenderFacts(
        from_address=from_address,
        from_domain=from_address.rpartition("@")[2] if from_address else None,
        original_ip=original_ip,
        ip_source=ip_source,
        trusted_dmarc_pass=dmarc_pass,
    )


def problem(kind: str, location: str = "1.2", reason: str = "decoder timed out") -> ScanProblem:
    return ScanProblem(location=location, kind=kind, reason=reason)


def anomaly(kind: str, location: str = "message", detail: str = "two readers disagree") -> MimeAnomaly:
    return MimeAnomaly(location=location, kind=kind, detail=detail)


def facts(body_text_chars: int = 1500, image_count: int = 0, **fields) -> MessageFacts:
    """Return facts of a message with ordinary text, unless the caller says otherwise."""
    return MessageFacts(message_id="<test@example.com>", body_text_chars=body_text_chars,
                        image_count=image_count, **fields)


def image_only(*codes: QrCode) -> MessageFacts:
    """Return facts of a body that is one image and a line of text."""
    return facts(body_text_chars=20, image_count=1, qr_codes=list(codes))
