"""The rule table and the checks that turn message facts into named rule hits.

Rules are named like rspamd symbols: UPPER_SNAKE with a family prefix (QR_,
URL_, PDF_, HTML_, CAPTCHA_, REDIRECT_, SENDER_, MIME_, SCAN_, COMBO_).
`RULES` is the one place a rule is declared with its default score;
`config.load_config` validates `[rules.NAME]` against it.

A check is a plain function `(facts, envelope, config)` that yields
`(rule name, evidence)` pairs. One check may yield several rules, and the
same rule several times, which `verdict.evaluate` merges into one finding.
`CHECKS` lists the checks in the order they run. `COMBOS` are composite
rules over the rules that fired, applied after the checks, because a
combination of signals is stronger evidence than the sum of its parts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from ..config import Config
from ..model import Envelope, HtmlFacts, MessageFacts, QrCode, SenderFacts
from .names import match_person, match_service, people
from .urls import (find_embedded_recipients, find_open_redirect, find_storage_page, ip_host, payload_kind, qr_url,
                   shortener_host)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rule:
    """A named rule: its default score, a one-line description and its family."""

    name: str
    score: float
    description: str
    family: str


@dataclass(frozen=True)
class Combo:
    """A composite rule that fires when, for each set in `requires`, one of its rules fired."""

    name: str
    requires: tuple[frozenset[str], ...]


RULES: tuple[Rule, ...] = (
    Rule("QR_URL", 3.0, "A QR code decodes to a web URL.", "QR"),
    Rule("QR_NON_URL", 0.1, "A QR code holds no URL (payment, ticket, contact, Wi-Fi, text).", "QR"),
    Rule("QR_IN_PDF", 2.5, "A QR code with a URL is drawn inside a PDF.", "QR"),
    Rule("QR_IMAGE_ONLY_BODY", 2.0, "A QR code with a URL in a body that is images with hardly any text.", "QR"),
    Rule("QR_UNUSUAL_CARRIER", 2.0,
         "A QR code with a URL is drawn with HTML or text, split, in SVG, a data: URI, "
         "CSS, an archive, an Office file or a nested message.", "QR"),
    Rule("QR_URL_SHORTENER", 1.5, "A QR code URL goes through a public URL shortener that hides its target.", "QR"),
    # A QR code that opens a bare IP address is a phone-browser lure;
    # legitimate printed codes name a domain.
    Rule("QR_URL_IP_HOST", 3.0, "A QR code URL names an IP address instead of a domain.", "QR"),
    Rule("QR_RECIPIENT_EMBEDDED", 3.0, "A QR code URL embeds a recipient address (plain, percent-encoded or base64).",
         "QR"),
    Rule("URL_RECIPIENT_EMBEDDED", 2.0,
         "A link embeds a recipient address in base64, or plainly in its path or fragment.", "URL"),
    Rule("URL_STORAGE_HTML", 2.0,
         "A link or QR URL opens an HTML page on public cloud object storage or an IPFS gateway.", "URL"),
    Rule("URL_OPEN_REDIRECT", 4.0, "A link or QR URL goes through a known open redirector to another site.", "URL"),
    Rule("HTML_ATTACHMENT", 2.0, "The message carries an HTML or SVG file as an attachment.", "HTML"),
    Rule("HTML_ATTACHMENT_SCRIPT", 2.0, "An HTML attachment contains script, which runs when the file is opened.",
         "HTML"),
    Rule("HTML_FORM_OFFSITE", 3.0, "An HTML attachment has a form that submits to another site.", "HTML"),
    Rule("HTML_JS_ATOB", 2.0, "HTML script decodes base64 with atob(), typical of hidden redirects.", "HTML"),
    Rule("CAPTCHA_GATE", 2.5, "HTML carries CAPTCHA markers (Turnstile, reCAPTCHA, hCaptcha) that hide a lure "
         "from scanners.", "CAPTCHA"),
    Rule("CAPTCHA_IN_ATTACHMENT", 2.5, "The CAPTCHA gate sits in an HTML attachment.", "CAPTCHA"),
    # Mail clients run neither scripts nor meta refresh, so a legitimate
    # sender gains nothing from them. They act only when the HTML is opened
    # in a browser, as saved attachments are. A script redirect weighs more
    # because it takes deliberate code, while a refresh tag can be left over
    # from a web page template.
    Rule("REDIRECT_META_REFRESH", 3.0, "HTML redirects with a meta refresh.", "REDIRECT"),
    Rule("REDIRECT_JS_LOCATION", 4.0, "HTML script sets window.location or an equivalent.", "REDIRECT"),
    Rule("PDF_ENCRYPTED", 1.0, "A PDF is encrypted, so its content could not be inspected.", "PDF"),
    Rule("PDF_JAVASCRIPT", 2.0, "A PDF contains JavaScript.", "PDF"),
    Rule("PDF_LAUNCH_ACTION", 3.0, "A PDF link starts a /Launch action, which opens a file or runs a program.",
         "PDF"),
    Rule("SENDER_DIRECT_SEND", 4.0,
         "From claims an organisation domain, but the mail came from outside without aligned "
         "authentication (DMARC pass from the hop, a trusted hop or a trusted ARC sealer).",
         "SENDER"),
    # Alone this stays far below tag: many legitimate messages are sent to
    # oneself (notes, calendar and form copies), but a lure sent "from" the
    # reader's own address is a common way around sender-reputation filters.
    # Kept at 0.1: on the test corpus 0.5 still lifted a legitimate message
    # with two small findings (3.5 points) to tag. The rule is evidence, and
    # COMBO_SELF_ADDRESSED_LURE carries the weight when a lure is present.
    Rule("SENDER_FROM_IS_RECIPIENT", 0.1, "The From address is the recipient's own address.", "SENDER"),
    Rule("SENDER_DISPLAY_NAME_PERSON", 3.0,
         "The From display name is a person of the organisation ([org] people), but the sender is "
         "outside the organisation or fails authentication.", "SENDER"),
    Rule("SENDER_DISPLAY_NAME_SERVICE", 2.0,
         "The From display name poses as an internal service (voicemail, fax, scanner, HR, payroll, "
         "IT), but the sender is outside the organisation or fails authentication.", "SENDER"),
    Rule("SENDER_DMARC_FAIL_NONE", 2.0,
         "DMARC fails for an organisation domain whose policy is p=none, so receivers still deliver it.",
         "SENDER"),
    Rule("SENDER_REPLY_TO_EXTERNAL", 2.0,
         "Reply-To points outside the organisation on a message that looks internal.", "SENDER"),
    Rule("SENDER_FIRST_SEEN_PERSON", 2.0,
         "The first message from an outside address that uses an organisation person's display name.",
         "SENDER"),
    Rule("SENDER_M365_SPOOF", 3.0,
         "Microsoft 365, as the previous hop, marked the message as spoofed (CAT:SPOOF or failed "
         "compauth).", "SENDER"),
    Rule("SENDER_AUTH_TEMPERROR", 0.1,
         "SPF, DKIM, DMARC or ARC could not be checked because a DNS lookup failed.", "SENDER"),
    # Mail software writes consistent MIME, so two readers that split one
    # message differently point to a message built to hide a part from
    # filters. The part is inspected either way; the score is for the intent.
    Rule("MIME_PARSER_MISMATCH", 3.0,
         "The email package and the strict boundary scanner found different MIME parts.", "MIME"),
    Rule("MIME_DUPLICATE_BOUNDARY", 3.0,
         "A multipart header names two different boundaries (repeated or RFC 2231 split parameters).", "MIME"),
    Rule("MIME_DOUBLE_CONTENT_TYPE", 2.0, "A MIME entity has more than one Content-Type header.", "MIME"),
    # Low: truncated and sloppy bulk mail also ends without a close delimiter.
    Rule("MIME_UNCLOSED_MULTIPART", 0.5, "A multipart body ends without its close delimiter.", "MIME"),
    Rule("MIME_BROKEN_ENCODING", 1.0,
         "A base64, quoted-printable or uuencoded part is invalid, so decoders may read different bytes.",
         "MIME"),
    Rule("MIME_HEADER_NESTING", 3.0,
         "An address header nests comments deeply enough to crash recursive header parsers.", "MIME"),
    # Low: some bulk mailers write unfolded header lines; RFC 5322 allows 998 octets.
    Rule("MIME_LONG_HEADER_LINE", 0.5, "A header line is longer than the 998 octets RFC 5322 allows.", "MIME"),
    Rule("MIME_LIMIT", 1.0, "A configured scan limit (depth, parts, bytes, pixels, pages) cut the inspection short.",
         "MIME"),
    Rule("SCAN_INCOMPLETE", 0.5, "A part could not be inspected (time budget, decoder error).", "SCAN"),
    Rule("SCAN_RULE_FAILED", 0.5, "A rule check crashed, so the verdict may miss evidence.", "SCAN"),
    Rule("COMBO_QR_DIRECT_SEND", 3.0, "A QR code URL in a Direct Send spoof.", "COMBO"),
    Rule("COMBO_CAPTCHA_REDIRECT", 3.0, "A CAPTCHA gate together with a redirect.", "COMBO"),
    Rule("COMBO_HTML_ATTACHMENT_ACTIVE", 3.0,
         "An HTML attachment together with a redirect, CAPTCHA, atob() or off-site form.", "COMBO"),
    Rule("COMBO_DIRECT_SEND_LURE", 2.0,
         "A Direct Send spoof with an HTML attachment, a CAPTCHA gate, an open redirect or an "
         "embedded recipient.", "COMBO"),
    Rule("COMBO_IMPERSONATION_LURE", 2.0,
         "A display name that poses as a person or service of the organisation, with a QR code URL, "
         "an HTML attachment or a CAPTCHA gate.", "COMBO"),
    Rule("COMBO_SELF_ADDRESSED_LURE", 2.0,
         "Mail from the recipient's own address with a QR code URL, an HTML attachment or a CAPTCHA "
         "gate.", "COMBO"),
)

RULES_BY_NAME: dict[str, Rule] = {rule.name: rule for rule in RULES}

_REDIRECTS = frozenset({"REDIRECT_META_REFRESH", "REDIRECT_JS_LOCATION", "HTML_JS_ATOB", "URL_OPEN_REDIRECT"})

# Evidence that an organisation From address was forged.
_ORG_SPOOFS = frozenset({"SENDER_DIRECT_SEND", "SENDER_M365_SPOOF"})
# Payloads that take the reader off the mail: a QR code URL, a local HTML
# file, or a CAPTCHA gate that hides the page from scanners.
_LURES = frozenset({"QR_URL", "HTML_ATTACHMENT", "CAPTCHA_GATE"})

COMBOS: tuple[Combo, ...] = (
    Combo("COMBO_QR_DIRECT_SEND", (frozenset({"QR_URL"}), _ORG_SPOOFS)),
    Combo("COMBO_CAPTCHA_REDIRECT", (frozenset({"CAPTCHA_GATE"}), _REDIRECTS)),
    Combo("COMBO_HTML_ATTACHMENT_ACTIVE", (
        frozenset({"HTML_ATTACHMENT"}),
        frozenset({"REDIRECT_META_REFRESH", "REDIRECT_JS_LOCATION", "HTML_JS_ATOB", "CAPTCHA_GATE",
                   "HTML_FORM_OFFSITE"}),
    )),
    Combo("COMBO_DIRECT_SEND_LURE", (
        _ORG_SPOOFS,
        frozenset({"HTML_ATTACHMENT", "CAPTCHA_GATE", "URL_OPEN_REDIRECT", "URL_RECIPIENT_EMBEDDED"}),
    )),
    Combo("COMBO_IMPERSONATION_LURE", (
        frozenset({"SENDER_DISPLAY_NAME_PERSON", "SENDER_DISPLAY_NAME_SERVICE"}), _LURES)),
    Combo("COMBO_SELF_ADDRESSED_LURE", (frozenset({"SENDER_FROM_IS_RECIPIENT"}), _LURES)),
)

Hit = tuple[str, str]
Check = Callable[[MessageFacts, Envelope, Config], Iterable[Hit]]

_EVIDENCE_CHARS = 200


def clip(text: str, limit: int = _EVIDENCE_CHARS) -> str:
    """Return `text` on one line with control characters escaped, cut to `limit` characters.

    Evidence ends up in log lines and mail headers, so it must not carry
    line breaks or other control characters from the message.
    """
    cleaned = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    if len(cleaned) > limit:
        return cleaned[: limit - 1] + "…"
    return cleaned


# Fewer visible characters than this, next to an image, make an "image-only"
# body: the lure text is in the picture so that text filters see nothing.
IMAGE_ONLY_TEXT_CHARS = 200

# Places where a QR code is drawn to dodge image scanners or hidden inside
# another container. Inline images, image attachments and PDFs are the
# ordinary carriers and have their own rules.
_UNUSUAL_CARRIERS = frozenset({
    "data-uri", "css-background", "svg", "html-grid", "text-blocks", "split", "archive", "office",
    "nested-message", "generator-url",
})


def _qr_evidence(code: QrCode, text: str) -> str:
    return f"{code.location} [{code.hidden_as}]: {clip(text)}"


def check_qr_codes(facts: MessageFacts, envelope: Envelope, config: Config) -> Iterator[Hit]:
    """QR payloads: URL or not, and where a URL code was hidden.

    The location rules weigh only URL payloads, so that payment codes in PDF
    invoices and ticket codes in image mails stay clean.
    """
    image_only = facts.body_text_chars < IMAGE_ONLY_TEXT_CHARS and facts.image_count > 0

    for code in facts.qr_codes:
        url = qr_url(code.payload)
        if url is None:
            yield "QR_NON_URL", _qr_evidence(code, f"{payload_kind(code.payload)}: {code.payload}")
            continue

        yield "QR_URL", _qr_evidence(code, url)

        if code.in_pdf:
            yield "QR_IN_PDF", _qr_evidence(code, url)
        elif image_only:
            yield "QR_IMAGE_ONLY_BODY", f"{_qr_evidence(code, url)}; {facts.body_text_chars} text characters"

        if code.hidden_as in _UNUSUAL_CARRIERS:
            yield "QR_UNUSUAL_CARRIER", _qr_evidence(code, url)
        if shortener_host(url):
            yield "QR_URL_SHORTENER", _qr_evidence(code, url)
        if ip_host(url):
            yield "QR_URL_IP_HOST", _qr_evidence(code, url)

        # Any embedding counts here, even a plain ?email=: unlike newsletter
        # links, QR codes in legitimate mail rarely carry the reader's address.
        for embedding in find_embedded_recipients(url, envelope.rcpt_tos):
            yield "QR_RECIPIENT_EMBEDDED", (
                f"{code.location}: {embedding.address} {embedding.encoding} in the {embedding.component}"
            )


def check_link_recipients(facts: MessageFacts, envelope: Envelope, config: Config) -> Iterator[Hit]:
    """Links that carry a recipient address, as credential-harvest pages use to prefill the login."""
    for link in facts.links:
        # mailto: links name addresses by design, often the reader's own.
        if not link.url.lower().startswith(("http://", "https://")):
            continue
        for embedding in find_embedded_recipients(link.url, envelope.rcpt_tos):
            # Narrowed: newsletters put the reader's address plainly in the
            # query of unsubscribe and tracking links, so a plain or
            # percent-encoded address in the query does not count. Phishing
            # kits prefer the fragment (never sent to the server) or base64.
            if embedding.component == "query" and embedding.encoding != "base64":
                continue
            yield "URL_RECIPIENT_EMBEDDED", (
                f"{link.location} [{link.source}]: {embedding.address} {embedding.encoding} "
                f"in the {embedding.component} of {clip(link.url)}"
            )


def _candidate_urls(facts: MessageFacts) -> list[tuple[str, str]]:
    """Return (URL, where) for every link and every QR code URL."""
    candidates = [(link.url, f"{link.location} [{link.source}]") for link in facts.links]
    for code in facts.qr_codes:
        url = qr_url(code.payload)
        if url:
            candidates.append((url, f"{code.location} [QR code]"))
    return candidates


def check_open_redirects(facts: MessageFacts, envelope: Envelope, config: Config) -> Iterator[Hit]:
    """Links and QR URLs that go through a known open redirector."""
    extra = config["scan.open_redirectors"]
    for url, where in _candidate_urls(facts):
        match = find_open_redirect(url, extra)
        if match is None:
            continue
        target = f" to {clip(match.target, 120)}" if match.target else ""
        yield "URL_OPEN_REDIRECT", f"{where}: {match.service}{target}"


def check_storage_pages(facts: MessageFacts, envelope: Envelope, config: Config) -> Iterator[Hit]:
    """Links and QR URLs to HTML pages on public object storage or IPFS.

    Anyone can upload a page there and get a URL on a reputable domain, so
    credential-harvest pages are often hosted this way.
    """
    for url, where in _candidate_urls(facts):
        service = find_storage_page(url)
        if service:
            yield "URL_STORAGE_HTML", f"{where}: {service}: {clip(url)}"


_HTML_EXTENSIONS = (".htm", ".html", ".shtml", ".xhtml")


def _is_html_file(html: HtmlFacts) -> bool:
    # Narrowed to named files: the decoder marks the HTML body of a forwarded
    # or bounced message (message/rfc822) as an attachment too, but such a
    # body has no file name and is shown inline. A lure is a file the reader
    # opens in a browser, where its script runs.
    return html.is_attachment and bool(html.filename)


def _is_html_attachment_part(content_type: str, filename: str | None) -> bool:
    if not filename:
        return False
    return content_type.lower() in ("text/html", "application/xhtml+xml") or filename.lower().endswith(
        _HTML_EXTENSIONS
    )


def check_html(facts: MessageFacts, envelope: Envelope, config: Config) -> Iterator[Hit]:
    """HTML parts and attachments: redirects, atob(), CAPTCHA gates and off-site forms."""
    attachments = set()
    for html in facts.html:
        where = html.location
        if _is_html_file(html):
            attachments.add(html.location)
            yield "HTML_ATTACHMENT", where
            if html.has_script:
                yield "HTML_ATTACHMENT_SCRIPT", where

        for target in html.meta_refresh:
            yield "REDIRECT_META_REFRESH", f"{where}: {clip(target)}"
        for target in html.js_redirects:
            yield "REDIRECT_JS_LOCATION", f"{where}: {clip(target)}"
        if html.uses_atob:
            yield "HTML_JS_ATOB", where

        if html.captcha_markers:
            markers = ", ".join(html.captcha_markers)
            yield "CAPTCHA_GATE", f"{where}: {clip(markers)}"
            if _is_html_file(html):
                yield "CAPTCHA_IN_ATTACHMENT", where

        # Narrowed to attachments, because newsletters carry search and
        # survey forms that post to the sender's site. A form in a local HTML
        # file that posts elsewhere is how attachment phishing collects passwords.
        if _is_html_file(html):
            for action in html.offsite_forms:
                yield "HTML_FORM_OFFSITE", f"{where}: form posts to {clip(action)}"

    # An HTML attachment the analyser did not report (for example cut by a
    # limit) still counts, found by its content type or file name.
    for part in facts.parts:
        if part.is_attachment and part.location not in attachments and _is_html_attachment_part(
            part.content_type, part.filename
        ):
            yield "HTML_ATTACHMENT", part.location


def check_pdfs(facts: MessageFacts, envelope: Envelope, config: Config) -> Iterator[Hit]:
    """PDF properties that hide content from the scanner or run code."""
    for pdf in facts.pdfs:
        where = pdf.location
        if pdf.encrypted:
            yield "PDF_ENCRYPTED", where
        if pdf.has_javascript:
            yield "PDF_JAVASCRIPT", where
    for link in facts.links:
        if link.source == "pdf-launch":
            yield "PDF_LAUNCH_ACTION", f"{link.location}: {clip(link.url)}"


# Sources of `SenderFacts.original_ip` that mean the first hop outside the
# trusted networks was found; other sources carry no outside address.
_OUTSIDE_IP_SOURCES = frozenset({"received", "client", "xforward"})


def _in_org(domain: str, org_domains: Iterable[str]) -> bool:
    return any(domain == org or domain.endswith("." + org) for org in org_domains)


def _authenticated(sender: SenderFacts) -> str:
    """Return which aligned authentication vouches for the From domain, or ""."""
    if sender.trusted_dmarc_pass:
        return "trusted Authentication-Results dmarc=pass"
    if sender.auth is not None and sender.auth.dmarc == "pass":
        return "dmarc=pass"
    if sender.auth is not None and sender.auth.arc_dmarc_pass:
        return "trusted ARC sealer dmarc=pass"
    microsoft = sender.microsoft
    if microsoft is not None and microsoft.counted and microsoft.auth_as == "internal":
        return "Microsoft 365 AuthAs=Internal"
    return ""


def _failing(sender: SenderFacts) -> str:
    """Return why the sender fails authentication, or "" when it passes or was not checked."""
    if _authenticated(sender):
        return ""
    auth = sender.auth
    if auth is not None and auth.dmarc == "fail":
        return f"dmarc=fail (p={auth.dmarc_policy})"
    spf = auth.result("spf") if auth is not None else None
    if spf is not None and spf.result in ("fail", "softfail"):
        return f"spf={spf.result}"
    if sender.microsoft is not None and sender.microsoft.spoof:
        return f"Microsoft 365: {sender.microsoft.spoof}"
    return ""


def _auth_summary(sender: SenderFacts) -> str:
    """Return our DNS results (or why there are none) and any ignored Microsoft headers, for evidence."""
    parts = []
    if sender.auth is None:
        parts.append("no DNS checks")
    else:
        for check in sender.auth.checks:
            if check.method == "dmarc" and sender.auth.dmarc_policy:
                parts.append(f"dmarc={check.result} (p={sender.auth.dmarc_policy})")
            else:
                parts.append(f"{check.method}={check.result}")
    if sender.microsoft is not None and not sender.microsoft.counted:
        parts.append(sender.microsoft.note)
    return ", ".join(parts)


def _from_outside(sender: SenderFacts) -> bool:
    return sender.original_ip is not None and sender.ip_source in _OUTSIDE_IP_SOURCES


def check_sender(facts: MessageFacts, envelope: Envelope, config: Config) -> Iterator[Hit]:
    """The Direct Send pattern: an organisation From address sent from outside.

    Microsoft 365 Direct Send and open relays let anyone deliver mail with
    the organisation's own From address. Genuine internal mail either stays
    inside the trusted networks or carries aligned authentication: DMARC
    pass from our own checks, from a trusted hop or from a trusted ARC
    sealer, or Microsoft's AuthAs=Internal from a Microsoft connector.
    """
    sender = facts.sender
    org_domains = config["org.domains"]
    if sender is None or not sender.from_domain or not org_domains:
        return

    domain = sender.from_domain.lower().rstrip(".")
    if not _in_org(domain, org_domains):
        return
    if not _from_outside(sender) or _authenticated(sender):
        return

    yield "SENDER_DIRECT_SEND", (
        f"From {clip(sender.from_address or domain, 120)} via {sender.original_ip} "
        f"({sender.ip_source}), no aligned authentication: {clip(_auth_summary(sender), 300)}"
    )


def check_sender_authentication(facts: MessageFacts, envelope: Envelope, config: Config) -> Iterator[Hit]:
    """DNS failures during the checks, DMARC p=none failures on our domains, and Microsoft's spoof verdict."""
    sender = facts.sender
    if sender is None:
        return

    if sender.auth is not None:
        for temperror in sender.auth.temperrors:
            yield "SENDER_AUTH_TEMPERROR", clip(temperror)

    domain = (sender.from_domain or "").lower().rstrip(".")
    auth = sender.auth
    if auth is not None and auth.dmarc == "fail" and auth.dmarc_policy == "none" and domain \
            and _in_org(domain, config["org.domains"]) and not auth.arc_dmarc_pass:
        yield "SENDER_DMARC_FAIL_NONE", f"From {clip(sender.from_address or domain, 120)}: {_auth_summary(sender)}"

    if sender.microsoft is not None and sender.microsoft.spoof:
        yield "SENDER_M365_SPOOF", f"{sender.microsoft.spoof}; {sender.microsoft.note}"


def check_sender_identity(facts: MessageFacts, envelope: Envelope, config: Config) -> Iterator[Hit]:
    """Names and addresses that pose as the organisation or the reader.

    - From equal to a recipient: skipped when authentication aligns, since
      a user may mail themselves through the organisation's own servers.
    - A display name of a person or an internal service, from outside the
      organisation or failing authentication.
    - Reply-To outside the organisation on a message that looks internal.
    - The first message from an outside address using a person's name.
    """
    sender = facts.sender
    if sender is None or not sender.from_address:
        return
    address = sender.from_address.lower()
    org_domains = config["org.domains"]
    domain = (sender.from_domain or "").lower().rstrip(".")
    internal_domain = bool(org_domains) and _in_org(domain, org_domains)
    # Without [org] domains nothing can be called outside, so only failing
    # authentication makes a name an impersonation.
    external = bool(org_domains) and not internal_domain
    failing = _failing(sender)
    unauthenticated_org = internal_domain and _from_outside(sender) and not _authenticated(sender)

    recipients = {recipient.lower() for recipient in envelope.rcpt_tos}
    if address in recipients and not _authenticated(sender):
        yield "SENDER_FROM_IS_RECIPIENT", f"From {clip(sender.from_address, 120)} is a recipient"

    impersonation_reason = "outside the organisation" if external else failing or (
        "organisation domain from outside without authentication" if unauthenticated_org else "")
    person = match_person(sender.display_name, people(config))
    if person and impersonation_reason:
        yield "SENDER_DISPLAY_NAME_PERSON", (
            f"display name {clip(sender.display_name, 80)!r} matches {person!r}, "
            f"sender {clip(sender.from_address, 120)} {impersonation_reason}")
    service = match_service(sender.display_name)
    if service and impersonation_reason:
        yield "SENDER_DISPLAY_NAME_SERVICE", (
            f"display name {clip(sender.display_name, 80)!r} poses as {service}, "
            f"sender {clip(sender.from_address, 120)} {impersonation_reason}")

    looks_internal = internal_domain or person or service
    outside_reply = [reply for reply in sender.reply_to
                     if org_domains and not _in_org(reply.rpartition("@")[2], org_domains)]
    if looks_internal and outside_reply:
        yield "SENDER_REPLY_TO_EXTERNAL", (
            f"From {clip(sender.from_address, 120)}, Reply-To {clip(', '.join(outside_reply), 120)}")

    if person and external and sender.first_seen:
        yield "SENDER_FIRST_SEEN_PERSON", (
            f"first message from {clip(sender.from_address, 120)} with display name {person!r}")


_MIME_ANOMALY_RULES = {
    "parser-mismatch": "MIME_PARSER_MISMATCH",
    "duplicate-boundary": "MIME_DUPLICATE_BOUNDARY",
    "double-content-type": "MIME_DOUBLE_CONTENT_TYPE",
    "unclosed-multipart": "MIME_UNCLOSED_MULTIPART",
    "broken-encoding": "MIME_BROKEN_ENCODING",
    "header-nesting": "MIME_HEADER_NESTING",
    "long-header-line": "MIME_LONG_HEADER_LINE",
}


def check_mime_anomalies(facts: MessageFacts, envelope: Envelope, config: Config) -> Iterator[Hit]:
    """MIME and header constructs that mail readers interpret differently, from the two MIME readers."""
    for anomaly in facts.mime_anomalies:
        rule = _MIME_ANOMALY_RULES.get(anomaly.kind)
        if rule is None:
            logger.warning("unknown MIME anomaly kind %r at %s, ignored", anomaly.kind, anomaly.location)
            continue
        yield rule, f"{anomaly.location}: {clip(anomaly.detail)}"


def check_scan_problems(facts: MessageFacts, envelope: Envelope, config: Config) -> Iterator[Hit]:
    """Report the parts the decoders could not inspect fully."""
    for problem in facts.problems:
        evidence = f"{problem.location}: {clip(problem.reason)}"
        if problem.kind == "limit":
            yield "MIME_LIMIT", evidence
        elif problem.kind == "incomplete":
            yield "SCAN_INCOMPLETE", evidence
        else:
            logger.warning("unknown scan problem kind %r at %s, reported as incomplete",
                           problem.kind, problem.location)
            yield "SCAN_INCOMPLETE", evidence


CHECKS: tuple[Check, ...] = (
    check_qr_codes,
    check_link_recipients,
    check_open_redirects,
    check_storage_pages,
    check_html,
    check_pdfs,
    check_sender,
    check_sender_authentication,
    check_sender_identity,
    check_mime_anomalies,
    check_scan_problems,
)
