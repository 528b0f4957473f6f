"""Data types shared by the front ends, the decoders and the rules.

Data flows one way: a front end (SMTP proxy, milter, `scan`) builds an
`Envelope`, the decoders turn the raw message into `MessageFacts`, the rules
turn facts into `Finding`s, and `Verdict` maps the score to an `Action`.
Every type here is a frozen dataclass or a plain list of them, so results
pickle cheaply between the worker processes and the event loop.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field


class Action(enum.IntEnum):
    """The action the hop takes on a message, ordered from mildest to strongest."""

    ACCEPT = 0
    TAG = 1
    QUARANTINE = 2
    REJECT = 3
    TEMPFAIL = 4

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Action:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            allowed = ", ".join(a.label for a in cls)
            raise ValueError(f"unknown action {text!r}; allowed: {allowed}") from None


@dataclass(frozen=True)
class ScanLimits:
    """Resource limits for the decoders, copied from `[scan]` so workers need no Config."""

    max_mime_depth: int = 10
    max_parts: int = 200
    max_decoded_bytes: int = 100 * 1024 * 1024
    max_images: int = 50
    max_image_pixels: int = 40_000_000
    max_pdf_pages: int = 20
    pdf_dpi: int = 150
    max_urls: int = 500
    image_seconds: float = 2.0
    qr_generators: tuple[str, ...] = ()


@dataclass(frozen=True)
class OrgPolicy:
    """The organisation's identity from `[org]`, for the sender checks."""

    domains: tuple[str, ...] = ()
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    authserv_ids: tuple[str, ...] = ()
    arc_trusted_sealers: tuple[str, ...] = ()
    microsoft_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass(frozen=True)
class DecodeTask:
    """CPU-heavy work for a decoder worker process: one image or one PDF.

    `kind` names an entry of `decoders.TASKS`; `hidden_as` is passed on to
    every QR code found (see `QrCode`). `passwords` are candidates quoted in
    the message text, tried on an encrypted PDF after the empty password.
    """

    kind: str
    data: bytes
    location: str
    hidden_as: str
    filename: str | None = None
    passwords: tuple[str, ...] = ()


@dataclass(frozen=True)
class Envelope:
    """The SMTP envelope and connection facts of one message.

    `client_ip` is the address that connected to us. `original_ip` is the
    first hop outside the trusted networks, taken from XFORWARD when a trusted
    MTA sent it, else from the `Received` walk (filled by the pipeline).
    """

    mail_from: str
    rcpt_tos: tuple[str, ...]
    client_ip: str | None = None
    helo: str | None = None
    xforward_addr: str | None = None
    xforward_helo: str | None = None
    queue_id: str | None = None


@dataclass(frozen=True)
class PartInfo:
    """One leaf of the MIME tree."""

    location: str
    content_type: str
    filename: str | None
    size: int
    is_attachment: bool


@dataclass(frozen=True)
class QrCode:
    """A decoded QR code and where it was found.

    `hidden_as` is one of: inline-image, attachment, data-uri, css-background,
    pdf-image, pdf-vector, svg, html-grid, text-blocks, split, archive, office,
    nested-message, generator-url.
    """

    payload: str
    location: str
    hidden_as: str
    backend: str

    @property
    def in_pdf(self) -> bool:
        return self.hidden_as in ("pdf-image", "pdf-vector")


@dataclass(frozen=True)
class Link:
    """A URL found in the message. `source` says how it was found:
    html-href, html-saferedirecturl, html-text, html-form, html-meta-refresh,
    html-script, text, pdf-link, pdf-launch, pdf-text."""

    url: str
    location: str
    source: str
    text: str = ""


@dataclass(frozen=True)
class HtmlFacts:
    """Findings of the HTML analyser in one HTML part or HTML attachment."""

    location: str
    is_attachment: bool
    filename: str | None
    meta_refresh: tuple[str, ...] = ()
    js_redirects: tuple[str, ...] = ()
    uses_atob: bool = False
    captcha_markers: tuple[str, ...] = ()
    offsite_forms: tuple[str, ...] = ()
    has_script: bool = False
    visible_text_chars: int = 0
    image_count: int = 0


@dataclass(frozen=True)
class PdfFacts:
    """Findings of the PDF analyser in one PDF part."""

    location: str
    filename: str | None
    page_count: int
    pages_rendered: int
    encrypted: bool = False
    has_javascript: bool = False
    text_chars: int = 0


@dataclass(frozen=True)
class ScanProblem:
    """A part or step that could not be inspected fully.

    `kind` is `incomplete` (time budget, crash, decoder error: the part was
    not inspected) or `limit` (a configured limit cut the inspection short:
    depth, part count, decoded bytes, pixels, pages).
    """

    location: str
    kind: str
    reason: str


@dataclass(frozen=True)
class MimeAnomaly:
    """A MIME or header construct that mail readers may interpret differently, hiding content from filters.

    `kind` is one of: parser-mismatch (the two MIME readers found different
    parts), duplicate-boundary, double-content-type, unclosed-multipart,
    broken-encoding, header-nesting (address comments nested deeply enough
    to exhaust a recursive parser), long-header-line.
    """

    location: str
    kind: str
    detail: str


@dataclass(frozen=True)
class AuthCheck:
    """One authentication method's result as Authentication-Results writes it (RFC 8601, section 2.2).

    `method` is spf, dkim, dmarc or arc; `result` one of the RFC 8601 result
    words (pass, fail, softfail, neutral, none, policy, temperror, permerror);
    `properties` are (ptype.property, value) pairs such as ("header.d", "example.com").
    """

    method: str
    result: str
    properties: tuple[tuple[str, str], ...] = ()
    reason: str = ""


@dataclass(frozen=True)
class AuthFacts:
    """Our own SPF, DKIM, DMARC and ARC results for one message, from DNS lookups at the hop.

    `dmarc_policy` is the p= (or sp=) of the From domain's record;
    `arc_dmarc_pass` means a valid ARC chain sealed last by a trusted sealer
    reports DMARC pass from before the forwarding.
    """

    checks: tuple[AuthCheck, ...] = ()
    dmarc: str = "none"
    dmarc_policy: str | None = None
    arc_dmarc_pass: bool = False
    temperrors: tuple[str, ...] = ()

    def result(self, method: str) -> AuthCheck | None:
        return next((check for check in self.checks if check.method == method), None)


@dataclass(frozen=True)
class MicrosoftFacts:
    """Microsoft 365 verdict headers, and whether they count.

    They count only when the previous hop is inside `[auth]
    microsoft_networks`; otherwise any sender could have written them, and
    `note` says why they were ignored. Values are lowercased.
    """

    counted: bool
    auth_as: str | None = None
    cross_tenant_auth_as: str | None = None
    spam_verdict: str | None = None
    category: str | None = None
    compauth: str | None = None
    compauth_reason: str | None = None
    spoof: str = ""
    note: str = ""


@dataclass(frozen=True)
class SenderFacts:
    """Evidence about the sender, from the headers and the envelope.

    DNS results are added when the hop made lookups.
    `auth` is None when no DNS lookups were made (`scan` without `--dns`).
    `first_seen` is None when no sender history is kept (`scan`).
    """

    from_address: str | None
    from_domain: str | None
    original_ip: str | None
    ip_source: str
    trusted_dmarc_pass: bool = False
    trusted_auth_results: tuple[str, ...] = ()
    display_name: str = ""
    reply_to: tuple[str, ...] = ()
    auth: AuthFacts | None = None
    microsoft: MicrosoftFacts | None = None
    first_seen: bool | None = None


@dataclass
class MessageFacts:
    """Everything the decoders learnt about one message."""

    subject: str = ""
    from_header: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    text_bodies: list[str] = field(default_factory=list)
    message_id: str = ""
    parts: list[PartInfo] = field(default_factory=list)
    body_text_chars: int = 0
    image_count: int = 0
    qr_codes: list[QrCode] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)
    html: list[HtmlFacts] = field(default_factory=list)
    pdfs: list[PdfFacts] = field(default_factory=list)
    problems: list[ScanProblem] = field(default_factory=list)
    mime_anomalies: list[MimeAnomaly] = field(default_factory=list)
    sender: SenderFacts | None = None

    def merge(self, other: PartialFacts) -> None:
        self.qr_codes.extend(other.qr_codes)
        self.links.extend(other.links)
        self.html.extend(other.html)
        self.pdfs.extend(other.pdfs)
        self.problems.extend(other.problems)
        self.image_count += other.image_count


@dataclass
class PartialFacts:
    """The result of one decoder task (an image, a PDF, an HTML part)."""

    qr_codes: list[QrCode] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)
    html: list[HtmlFacts] = field(default_factory=list)
    pdfs: list[PdfFacts] = field(default_factory=list)
    problems: list[ScanProblem] = field(default_factory=list)
    image_count: int = 0


@dataclass(frozen=True)
class Finding:
    """One named rule result with its score and evidence."""

    rule: str
    score: float
    detail: str


@dataclass(frozen=True)
class Verdict:
    """The outcome of scanning one message."""

    score: float
    action: Action
    findings: tuple[Finding, ...]
    qr_codes: tuple[QrCode, ...]
    urls: tuple[str, ...]
    scan_incomplete: bool = False

    @property
    def top_rule(self) -> str | None:
        return self.findings[0].rule if self.findings else None
