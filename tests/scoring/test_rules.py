"""Each rule fires on the facts it is meant for, with its score, and stays quiet on near misses."""

from __future__ import annotations

import base64
import re
from dataclasses import replace
from urllib.parse import quote

import pytest

from quishguard.model import AuthCheck, AuthFacts, MicrosoftFacts, SenderFacts
from quishguard.scoring.rules import COMBOS, RULES, RULES_BY_NAME
from quishguard.scoring.verdict import evaluate

from .factories import (
    RECIPIENT,
    anomaly,
    config,
    envelope,
    facts,
    html,
    html_part,
    image_only,
    link,
    org_config,
    pdf,
    problem,
    qr,
    sender,
)

B64_RECIPIENT = base64.b64encode(RECIPIENT.encode()).decode()
HARVEST_URL = "https://login.example.test/auth"
EPC_PAYLOAD = "BCD\n002\n1\nSCT\nBANKDEFFXXX\nExample GmbH\nDE02100100100006820101\nEUR129.00\n\n\nINV-2024-0042"
TICKET_PAYLOAD = "TKT-2024-000417-SEAT-14B"
PIX_PAYLOAD = "00020126580014br.gov.bcb.pix0136123e4567-e12b-12d1-a456-4266554400005204000053039865802BR6304ABCD"


def bing_link(target: str) -> str:
    encoded = base64.urlsafe_b64encode(target.encode()).decode().rstrip("=")
    return f"https://www.bing.com/ck/a?!&&p=5f2a&ptn=3&u=a1{encoded}&ntb=1"


MIME_ANOMALY_CASES = [
    ("parser-mismatch", "MIME_PARSER_MISMATCH"),
    ("duplicate-boundary", "MIME_DUPLICATE_BOUNDARY"),
    ("double-content-type", "MIME_DOUBLE_CONTENT_TYPE"),
    ("unclosed-multipart", "MIME_UNCLOSED_MULTIPART"),
    ("broken-encoding", "MIME_BROKEN_ENCODING"),
    ("header-nesting", "MIME_HEADER_NESTING"),
    ("long-header-line", "MIME_LONG_HEADER_LINE"),
]

# (case id, rule, facts, envelope, config, fires)
DEFAULT = config()
ORG = org_config()
PEOPLE = org_config(org={"domains": ["example.com"], "people": ["Ann Smith"]})


def with_auth(base: SenderFacts, dmarc: str, policy: str | None, **fields) -> SenderFacts:
    """Return `base` with DNS results: the DMARC result and policy, and `fields` of AuthFacts."""
    checks = (AuthCheck("spf", "fail" if dmarc == "fail" else "pass"), AuthCheck("dmarc", dmarc))
    return replace(base, auth=AuthFacts(checks=checks, dmarc=dmarc, dmarc_policy=policy, **fields))


def named(display_name: str, address: str) -> SenderFacts:
    return replace(sender(address), display_name=display_name)
CASES = [
    # QR payloads.
    ("qr https url", "QR_URL", facts(qr_codes=[qr(HARVEST_URL)]), None, DEFAULT, True),
    ("qr bare host with path", "QR_URL", facts(qr_codes=[qr("login.example.test/x")]), None, DEFAULT, True),
    ("qr epc payment", "QR_URL", facts(qr_codes=[qr(EPC_PAYLOAD)]), None, DEFAULT, False),
    ("qr ticket code", "QR_URL", facts(qr_codes=[qr(TICKET_PAYLOAD)]), None, DEFAULT, False),
    ("qr dotted ticket code", "QR_URL", facts(qr_codes=[qr("EVT-2024.SEAT")]), None, DEFAULT, False),
    ("non-url epc", "QR_NON_URL", facts(qr_codes=[qr(EPC_PAYLOAD)]), None, DEFAULT, True),
    # The QR decoder turns line breaks into spaces.
    ("non-url epc flattened", "QR_NON_URL", facts(qr_codes=[qr(EPC_PAYLOAD.replace("\n", " "))]), None, DEFAULT,
     True),
    ("qr epc flattened", "QR_URL", facts(qr_codes=[qr(EPC_PAYLOAD.replace("\n", " "))]), None, DEFAULT, False),
    ("non-url bitcoin", "QR_NON_URL", facts(qr_codes=[qr("bitcoin:bc1qexample?amount=0.01")]), None, DEFAULT, True),
    ("non-url wifi", "QR_NON_URL", facts(qr_codes=[qr("WIFI:T:WPA;S:Guest;P:secret;;")]), None, DEFAULT, True),
    ("non-url vcard", "QR_NON_URL", facts(qr_codes=[qr("BEGIN:VCARD\nVERSION:3.0\nFN:Ann\nEND:VCARD")]), None,
     DEFAULT, True),
    ("non-url mecard", "QR_NON_URL", facts(qr_codes=[qr("MECARD:N:Doe,Ann;TEL:+15550100;;")]), None, DEFAULT, True),
    ("non-url ticket", "QR_NON_URL", facts(qr_codes=[qr(TICKET_PAYLOAD)]), None, DEFAULT, True),
    ("non-url not for url", "QR_NON_URL", facts(qr_codes=[qr(HARVEST_URL)]), None, DEFAULT, False),
    ("non-url pix", "QR_NON_URL", facts(qr_codes=[qr(PIX_PAYLOAD)]), None, DEFAULT, True),
    ("qr pix not url", "QR_URL", facts(qr_codes=[qr(PIX_PAYLOAD)]), None, DEFAULT, False),
    ("qr swiss bill not url", "QR_URL", facts(qr_codes=[qr("SPC\n0200\n1\nCH4431999123000889012")]), None, DEFAULT,
     False),
    ("qr otpauth not url", "QR_URL", facts(qr_codes=[qr("otpauth://totp/Example:ann?secret=JBSWY3DPEHPK3PXP")]),
     None, DEFAULT, False),
    # URL content.
    ("qr shortener", "QR_URL_SHORTENER", facts(qr_codes=[qr("https://bit.ly/3xAbCd")]), None, DEFAULT, True),
    ("qr shortener lookalike", "QR_URL_SHORTENER", facts(qr_codes=[qr("https://bit.ly.example.test/x")]), None,
     DEFAULT, False),
    ("qr ip host", "QR_URL_IP_HOST", facts(qr_codes=[qr("http://192.0.2.15/login")]), None, DEFAULT, True),
    ("qr decimal ip host", "QR_URL_IP_HOST", facts(qr_codes=[qr("http://3221225999/login")]), None, DEFAULT, True),
    ("qr domain host", "QR_URL_IP_HOST", facts(qr_codes=[qr(HARVEST_URL)]), None, DEFAULT, False),
    ("qr redirector unwrapped", "URL_OPEN_REDIRECT",
     facts(qr_codes=[qr("https://www.google.com/url?q=https://login.example.test/")]), None, DEFAULT, True),
    ("pdf launch action", "PDF_LAUNCH_ACTION", facts(links=[link("cmd.exe", "pdf-launch")]), None, DEFAULT, True),
    ("pdf uri link not launch", "PDF_LAUNCH_ACTION", facts(links=[link(HARVEST_URL, "pdf-link")]), None, DEFAULT,
     False),
    # Where a URL code sits.
    ("pdf url code", "QR_IN_PDF", facts(qr_codes=[qr(HARVEST_URL, "pdf-image", "2")]), None, DEFAULT, True),
    ("pdf vector url code", "QR_IN_PDF", facts(qr_codes=[qr(HARVEST_URL, "pdf-vector", "2")]), None, DEFAULT, True),
    ("pdf payment code", "QR_IN_PDF", facts(qr_codes=[qr(EPC_PAYLOAD, "pdf-image", "2")]), None, DEFAULT, False),
    ("pdf rule inline image", "QR_IN_PDF", facts(qr_codes=[qr(HARVEST_URL)]), None, DEFAULT, False),
    ("image-only url code", "QR_IMAGE_ONLY_BODY", image_only(qr(HARVEST_URL)), None, DEFAULT, True),
    ("image-only ticket code", "QR_IMAGE_ONLY_BODY", image_only(qr(TICKET_PAYLOAD)), None, DEFAULT, False),
    ("image-only long text", "QR_IMAGE_ONLY_BODY",
     facts(body_text_chars=1500, image_count=1, qr_codes=[qr(HARVEST_URL)]), None, DEFAULT, False),
    ("image-only pdf code", "QR_IMAGE_ONLY_BODY", image_only(qr(HARVEST_URL, "pdf-image", "2")), None, DEFAULT,
     False),
    ("carrier html grid", "QR_UNUSUAL_CARRIER", facts(qr_codes=[qr(HARVEST_URL, "html-grid")]), None, DEFAULT, True),
    ("carrier split image", "QR_UNUSUAL_CARRIER", facts(qr_codes=[qr(HARVEST_URL, "split")]), None, DEFAULT, True),
    ("carrier grid ticket", "QR_UNUSUAL_CARRIER", facts(qr_codes=[qr(TICKET_PAYLOAD, "html-grid")]), None, DEFAULT,
     False),
    ("carrier inline image", "QR_UNUSUAL_CARRIER", facts(qr_codes=[qr(HARVEST_URL)]), None, DEFAULT, False),
    # Recipient addresses in QR URLs.
    ("qr recipient base64 fragment", "QR_RECIPIENT_EMBEDDED",
     facts(qr_codes=[qr(f"{HARVEST_URL}#{B64_RECIPIENT}")]), None, DEFAULT, True),
    ("qr recipient plain query", "QR_RECIPIENT_EMBEDDED",
     facts(qr_codes=[qr(f"{HARVEST_URL}?email={RECIPIENT}")]), None, DEFAULT, True),
    ("qr recipient percent encoded", "QR_RECIPIENT_EMBEDDED",
     facts(qr_codes=[qr(f"{HARVEST_URL}?e={quote(RECIPIENT, safe='')}")]), None, DEFAULT, True),
    ("qr recipient base64 offset", "QR_RECIPIENT_EMBEDDED",
     facts(qr_codes=[qr(HARVEST_URL + "?d=" + base64.b64encode(b"id=7&u=" + RECIPIENT.encode()).decode())]),
     None, DEFAULT, True),
    ("qr recipient url-safe base64", "QR_RECIPIENT_EMBEDDED",
     facts(qr_codes=[qr(HARVEST_URL + "/" + base64.urlsafe_b64encode(b"?>" + RECIPIENT.encode()).decode())]),
     None, DEFAULT, True),
    ("qr recipient other address", "QR_RECIPIENT_EMBEDDED",
     facts(qr_codes=[qr(f"{HARVEST_URL}#{B64_RECIPIENT}")]), envelope("carol@example.com"), DEFAULT, False),
    ("qr recipient none embedded", "QR_RECIPIENT_EMBEDDED", facts(qr_codes=[qr(HARVEST_URL)]), None, DEFAULT, False),
    # Recipient addresses in links.
    ("link recipient base64 fragment", "URL_RECIPIENT_EMBEDDED",
     facts(links=[link(f"{HARVEST_URL}#{B64_RECIPIENT}")]), None, DEFAULT, True),
    ("link recipient plain fragment", "URL_RECIPIENT_EMBEDDED",
     facts(links=[link(f"{HARVEST_URL}#{RECIPIENT}")]), None, DEFAULT, True),
    ("link recipient base64 query", "URL_RECIPIENT_EMBEDDED",
     facts(links=[link(f"{HARVEST_URL}?token={B64_RECIPIENT}")]), None, DEFAULT, True),
    ("link recipient uppercase address", "URL_RECIPIENT_EMBEDDED",
     facts(links=[link(f"{HARVEST_URL}#" + base64.b64encode(b"Bob@Example.COM").decode())]), None, DEFAULT,
     True),
    ("link recipient plain query", "URL_RECIPIENT_EMBEDDED",
     facts(links=[link(f"https://news.example.net/unsubscribe?email={RECIPIENT}")]), None, DEFAULT, False),
    ("link recipient percent query", "URL_RECIPIENT_EMBEDDED",
     facts(links=[link(f"https://news.example.net/prefs?e={quote(RECIPIENT, safe='')}")]), None, DEFAULT, False),
    ("link recipient mailto", "URL_RECIPIENT_EMBEDDED", facts(links=[link(f"mailto:{RECIPIENT}")]), None, DEFAULT,
     False),
    ("link recipient other address", "URL_RECIPIENT_EMBEDDED",
     facts(links=[link(f"{HARVEST_URL}#{B64_RECIPIENT}")]), envelope("carol@example.com"), DEFAULT, False),
    # Open redirectors.
    ("redirect google url", "URL_OPEN_REDIRECT",
     facts(links=[link(f"https://www.google.com/url?q={HARVEST_URL}&sa=D")]), None, DEFAULT, True),
    ("redirect google amp", "URL_OPEN_REDIRECT",
     facts(links=[link("https://google.co.jp/amp/s/login.example.test/auth")]), None, DEFAULT, True),
    ("redirect bing click", "URL_OPEN_REDIRECT", facts(links=[link(bing_link(HARVEST_URL))]), None, DEFAULT, True),
    ("redirect facebook shim", "URL_OPEN_REDIRECT",
     facts(links=[link(f"https://l.facebook.com/l.php?u={quote(HARVEST_URL, safe='')}&h=AT0")]), None, DEFAULT,
     True),
    ("redirect youtube", "URL_OPEN_REDIRECT",
     facts(links=[link(f"https://www.youtube.com/redirect?q={HARVEST_URL}")]), None, DEFAULT, True),
    ("redirect encoded query mark", "URL_OPEN_REDIRECT",
     facts(links=[link("https://adclick.g.doubleclick.net/pcs/click%3Fx%26adurl=//login.example.test/a")]),
     None, DEFAULT, True),
    ("redirect in qr code", "URL_OPEN_REDIRECT",
     facts(qr_codes=[qr(f"https://www.google.com/url?q={HARVEST_URL}")]), None, DEFAULT, True),
    ("redirect configured pattern", "URL_OPEN_REDIRECT",
     facts(links=[link(f"https://go.example.net/out?target={HARVEST_URL}")]), None,
     config(scan={"open_redirectors": ["go.example.net/out"]}), True),
    ("redirect configured without url", "URL_OPEN_REDIRECT",
     facts(links=[link("https://go.example.net/out/about")]), None,
     config(scan={"open_redirectors": ["go.example.net/out"]}), False),
    ("redirect firebase short link", "URL_OPEN_REDIRECT", facts(links=[link("https://lure.page.link/AbCd")]),
     None, DEFAULT, True),
    ("redirect linkedin smart link", "URL_OPEN_REDIRECT",
     facts(links=[link("https://www.linkedin.com/slink?code=eAbCdEf")]), None, DEFAULT, True),
    ("redirect google own site", "URL_OPEN_REDIRECT",
     facts(links=[link("https://www.google.com/url?q=https://docs.google.com/document/d/1")]), None, DEFAULT,
     False),
    ("redirect google without target", "URL_OPEN_REDIRECT",
     facts(links=[link("https://www.google.com/url?sa=D&usg=AOv")]), None, DEFAULT, False),
    ("redirect google search page", "URL_OPEN_REDIRECT",
     facts(links=[link("https://www.google.com/search?q=https://example.test")]), None, DEFAULT, False),
    ("redirect url shortener", "URL_OPEN_REDIRECT", facts(links=[link("https://t.co/AbCdEf")]), None, DEFAULT,
     False),
    ("redirect gateway rewriter", "URL_OPEN_REDIRECT",
     facts(links=[link("https://urldefense.proofpoint.com/v2/url?u=https-3A__example.test&d=DwI")]), None,
     DEFAULT, False),
    # Pages on public storage.
    ("storage page s3", "URL_STORAGE_HTML",
     facts(links=[link("https://files.s3.eu-west-1.amazonaws.com/secure/login.html")]), None, DEFAULT, True),
    ("storage page in qr", "URL_STORAGE_HTML",
     facts(qr_codes=[qr("https://x1.fra1.digitaloceanspaces.com/p.xhtml")]), None, DEFAULT, True),
    ("storage ipfs gateway", "URL_STORAGE_HTML", facts(links=[link("https://ipfs.io/ipfs/QmExampleCid/")]), None,
     DEFAULT, True),
    ("storage image not page", "URL_STORAGE_HTML",
     facts(links=[link("https://files.s3.amazonaws.com/banner.png")]), None, DEFAULT, False),
    ("storage ordinary site page", "URL_STORAGE_HTML", facts(links=[link("https://www.example.org/about.html")]),
     None, DEFAULT, False),
    # HTML parts and attachments.
    ("html attachment analysed", "HTML_ATTACHMENT", facts(html=[html("2", attachment=True)]), None, DEFAULT, True),
    ("html attachment by part", "HTML_ATTACHMENT", facts(parts=[html_part()]), None, DEFAULT, True),
    ("html body part", "HTML_ATTACHMENT", facts(html=[html("1.2")]), None, DEFAULT, False),
    ("html forwarded message body", "HTML_ATTACHMENT", facts(html=[html("2 > 1", attachment=True, filename=None)]),
     None, DEFAULT, False),
    ("html unnamed attachment part", "HTML_ATTACHMENT", facts(parts=[html_part(filename=None)]), None, DEFAULT,
     False),
    ("script in html attachment", "HTML_ATTACHMENT_SCRIPT",
     facts(html=[html("2", attachment=True, has_script=True)]), None, DEFAULT, True),
    ("script in html body", "HTML_ATTACHMENT_SCRIPT", facts(html=[html("1.2", has_script=True)]), None, DEFAULT,
     False),
    ("html attachment without script", "HTML_ATTACHMENT_SCRIPT", facts(html=[html("2", attachment=True)]), None,
     DEFAULT, False),
    ("html pdf attachment part", "HTML_ATTACHMENT",
     facts(parts=[html_part(filename="invoice.pdf", content_type="application/pdf")]), None, DEFAULT, False),
    ("form offsite attachment", "HTML_FORM_OFFSITE",
     facts(html=[html("2", attachment=True, offsite_forms=("https://collect.example.test/p",))]), None, DEFAULT,
     True),
    ("form offsite body", "HTML_FORM_OFFSITE",
     facts(html=[html("1.2", offsite_forms=("https://survey.example.net/s",))]), None, DEFAULT, False),
    ("atob in script", "HTML_JS_ATOB", facts(html=[html(uses_atob=True, has_script=True)]), None, DEFAULT, True),
    ("script without atob", "HTML_JS_ATOB", facts(html=[html(has_script=True)]), None, DEFAULT, False),
    ("captcha in body", "CAPTCHA_GATE", facts(html=[html(captcha_markers=("cf-turnstile",))]), None, DEFAULT, True),
    ("captcha absent", "CAPTCHA_GATE", facts(html=[html(has_script=True)]), None, DEFAULT, False),
    ("captcha in attachment", "CAPTCHA_IN_ATTACHMENT",
     facts(html=[html("2", attachment=True, captcha_markers=("cf-turnstile",))]), None, DEFAULT, True),
    ("captcha body not attachment", "CAPTCHA_IN_ATTACHMENT",
     facts(html=[html(captcha_markers=("cf-turnstile",))]), None, DEFAULT, False),
    ("meta refresh present", "REDIRECT_META_REFRESH",
     facts(html=[html(meta_refresh=("https://login.example.test",))]), None, DEFAULT, True),
    ("meta refresh absent", "REDIRECT_META_REFRESH", facts(html=[html()]), None, DEFAULT, False),
    ("js location present", "REDIRECT_JS_LOCATION",
     facts(html=[html(js_redirects=("https://login.example.test",), has_script=True)]), None, DEFAULT, True),
    ("js location absent", "REDIRECT_JS_LOCATION", facts(html=[html(has_script=True)]), None, DEFAULT, False),
    # PDFs.
    ("pdf encrypted", "PDF_ENCRYPTED", facts(pdfs=[pdf(encrypted=True)]), None, DEFAULT, True),
    ("pdf not encrypted", "PDF_ENCRYPTED", facts(pdfs=[pdf()]), None, DEFAULT, False),
    ("pdf javascript", "PDF_JAVASCRIPT", facts(pdfs=[pdf(has_javascript=True)]), None, DEFAULT, True),
    ("pdf without javascript", "PDF_JAVASCRIPT", facts(pdfs=[pdf()]), None, DEFAULT, False),
    # Direct Send.
    ("direct send outside hop", "SENDER_DIRECT_SEND", facts(sender=sender()), None, ORG, True),
    ("direct send org subdomain", "SENDER_DIRECT_SEND", facts(sender=sender("hr@mail.example.com")), None, ORG,
     True),
    ("direct send via xforward", "SENDER_DIRECT_SEND", facts(sender=sender(ip_source="xforward")), None, ORG, True),
    ("direct send dmarc pass", "SENDER_DIRECT_SEND", facts(sender=sender(dmarc_pass=True)), None, ORG, False),
    ("direct send trusted hops", "SENDER_DIRECT_SEND",
     facts(sender=sender(original_ip=None, ip_source="none")), None, ORG, False),
    ("direct send foreign domain", "SENDER_DIRECT_SEND", facts(sender=sender("news@example.net")), None, ORG, False),
    ("direct send lookalike domain", "SENDER_DIRECT_SEND", facts(sender=sender("it@badexample.com")), None, ORG,
     False),
    ("direct send no org", "SENDER_DIRECT_SEND", facts(sender=sender()), None, DEFAULT, False),
    ("direct send dns dmarc fail", "SENDER_DIRECT_SEND", facts(sender=with_auth(sender(), "fail", "reject")), None,
     ORG, True),
    ("direct send dns dmarc pass", "SENDER_DIRECT_SEND", facts(sender=with_auth(sender(), "pass", "reject")), None,
     ORG, False),
    ("direct send trusted arc", "SENDER_DIRECT_SEND",
     facts(sender=with_auth(sender(), "fail", "reject", arc_dmarc_pass=True)), None, ORG, False),
    ("direct send microsoft internal", "SENDER_DIRECT_SEND",
     facts(sender=replace(sender(), microsoft=MicrosoftFacts(counted=True, auth_as="internal"))), None, ORG, False),
    # Sender identity and authentication.
    ("from is recipient", "SENDER_FROM_IS_RECIPIENT", facts(sender=sender(RECIPIENT)), None, DEFAULT, True),
    ("from is recipient authenticated", "SENDER_FROM_IS_RECIPIENT",
     facts(sender=with_auth(sender(RECIPIENT), "pass", "reject")), None, DEFAULT, False),
    ("from other than recipient", "SENDER_FROM_IS_RECIPIENT", facts(sender=sender("ann@example.net")), None,
     DEFAULT, False),
    ("person name outside", "SENDER_DISPLAY_NAME_PERSON", facts(sender=named("Smith, Ann", "ann@mail.example.net")),
     None, PEOPLE, True),
    ("person name authenticated inside", "SENDER_DISPLAY_NAME_PERSON",
     facts(sender=with_auth(named("Ann Smith", "ann@example.com"), "pass", "reject")), None, PEOPLE, False),
    ("person name other person", "SENDER_DISPLAY_NAME_PERSON",
     facts(sender=named("Annette Smithers", "ann@mail.example.net")), None, PEOPLE, False),
    ("service name outside", "SENDER_DISPLAY_NAME_SERVICE",
     facts(sender=named("Voicemail Service", "vm@calls.example.net")), None, ORG, True),
    ("service name failing dmarc", "SENDER_DISPLAY_NAME_SERVICE",
     facts(sender=with_auth(named("IT Helpdesk", "it@example.net"), "fail", "quarantine")), None, DEFAULT, True),
    ("service name authenticated inside", "SENDER_DISPLAY_NAME_SERVICE",
     facts(sender=with_auth(named("Payroll", "payroll@example.com"), "pass", "reject")), None, ORG, False),
    ("service name without org", "SENDER_DISPLAY_NAME_SERVICE",
     facts(sender=named("Voicemail Service", "vm@calls.example.net")), None, DEFAULT, False),
    ("dmarc fail p none org", "SENDER_DMARC_FAIL_NONE", facts(sender=with_auth(sender(), "fail", "none")), None,
     ORG, True),
    ("dmarc fail p reject org", "SENDER_DMARC_FAIL_NONE", facts(sender=with_auth(sender(), "fail", "reject")), None,
     ORG, False),
    ("reply-to outside internal", "SENDER_REPLY_TO_EXTERNAL",
     facts(sender=replace(sender(), reply_to=("payments@example.net",))), None, ORG, True),
    ("reply-to inside internal", "SENDER_REPLY_TO_EXTERNAL",
     facts(sender=replace(sender(), reply_to=("finance@example.com",))), None, ORG, False),
    ("reply-to outside external", "SENDER_REPLY_TO_EXTERNAL",
     facts(sender=replace(sender("news@example.net"), reply_to=("help@example.org",))), None, ORG, False),
    ("first seen person", "SENDER_FIRST_SEEN_PERSON",
     facts(sender=replace(named("Ann Smith", "ann@mail.example.net"), first_seen=True)), None, PEOPLE, True),
    ("seen before person", "SENDER_FIRST_SEEN_PERSON",
     facts(sender=replace(named("Ann Smith", "ann@mail.example.net"), first_seen=False)), None, PEOPLE, False),
    ("microsoft spoof counted", "SENDER_M365_SPOOF",
     facts(sender=replace(sender(), microsoft=MicrosoftFacts(counted=True, category="spoof", spoof="CAT:SPOOF"))),
     None, ORG, True),
    ("microsoft spoof ignored", "SENDER_M365_SPOOF",
     facts(sender=replace(sender(), microsoft=MicrosoftFacts(counted=False, note="ignored"))), None, ORG, False),
    ("auth temperror", "SENDER_AUTH_TEMPERROR",
     facts(sender=with_auth(sender(), "temperror", None, temperrors=("dmarc: TXT timed out",))), None, ORG, True),
    ("auth no temperror", "SENDER_AUTH_TEMPERROR", facts(sender=with_auth(sender(), "fail", "reject")), None, ORG,
     False),
    # Scan problems.
    ("limit problem", "MIME_LIMIT", facts(problems=[problem("limit", reason="MIME depth over 10")]), None, DEFAULT,
     True),
    ("limit not incomplete", "MIME_LIMIT", facts(problems=[problem("incomplete")]), None, DEFAULT, False),
    ("incomplete problem", "SCAN_INCOMPLETE", facts(problems=[problem("incomplete")]), None, DEFAULT, True),
    ("incomplete not limit", "SCAN_INCOMPLETE", facts(problems=[problem("limit")]), None, DEFAULT, False),
    # MIME anomalies from the two MIME readers; each is quiet on the others.
    *[(f"anomaly {kind}", rule, facts(mime_anomalies=[anomaly(kind)]), None, DEFAULT, True)
      for kind, rule in MIME_ANOMALY_CASES],
    *[(f"anomaly {kind} quiet", rule, facts(mime_anomalies=[anomaly(other)]), None, DEFAULT, False)
      for (kind, rule), (other, _rule) in zip(MIME_ANOMALY_CASES, MIME_ANOMALY_CASES[1:] + MIME_ANOMALY_CASES[:1])],
    ("anomaly limit not mismatch", "MIME_PARSER_MISMATCH", facts(problems=[problem("limit")]), None, DEFAULT,
     False),
    # Combinations.
    ("combo qr direct send", "COMBO_QR_DIRECT_SEND",
     facts(sender=sender(), qr_codes=[qr(HARVEST_URL)]), None, ORG, True),
    ("combo direct send ticket", "COMBO_QR_DIRECT_SEND",
     facts(sender=sender(), qr_codes=[qr(TICKET_PAYLOAD)]), None, ORG, False),
    ("combo captcha js redirect", "COMBO_CAPTCHA_REDIRECT",
     facts(html=[html(captcha_markers=("g-recaptcha",), js_redirects=("https://login.example.test",))]), None,
     DEFAULT, True),
    ("combo captcha alone", "COMBO_CAPTCHA_REDIRECT",
     facts(html=[html(captcha_markers=("g-recaptcha",))]), None, DEFAULT, False),
    ("combo attachment meta refresh", "COMBO_HTML_ATTACHMENT_ACTIVE",
     facts(html=[html("2", attachment=True, meta_refresh=("https://login.example.test",))]), None, DEFAULT, True),
    ("combo attachment plain", "COMBO_HTML_ATTACHMENT_ACTIVE", facts(html=[html("2", attachment=True)]), None,
     DEFAULT, False),
    ("combo direct send attachment", "COMBO_DIRECT_SEND_LURE",
     facts(sender=sender(), html=[html("2", attachment=True)]), None, ORG, True),
    ("combo direct send plain", "COMBO_DIRECT_SEND_LURE", facts(sender=sender()), None, ORG, False),
    ("combo impersonation qr", "COMBO_IMPERSONATION_LURE",
     facts(sender=named("Ann Smith", "ann@mail.example.net"), qr_codes=[qr(HARVEST_URL)]), None, PEOPLE, True),
    ("combo impersonation plain", "COMBO_IMPERSONATION_LURE",
     facts(sender=named("Ann Smith", "ann@mail.example.net")), None, PEOPLE, False),
    ("combo self-addressed qr", "COMBO_SELF_ADDRESSED_LURE",
     facts(sender=sender(RECIPIENT), qr_codes=[qr(HARVEST_URL)]), None, DEFAULT, True),
    ("combo self-addressed plain", "COMBO_SELF_ADDRESSED_LURE", facts(sender=sender(RECIPIENT)), None, DEFAULT,
     False),
]


@pytest.mark.parametrize(
    ("rule", "message", "rcpts", "settings", "fires"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_rule_fires_or_not(rule, message, rcpts, settings, fires):
    verdict = evaluate(message, rcpts or envelope(), settings)
    scores = {finding.rule: finding.score for finding in verdict.findings}

    if not fires:
        assert rule not in scores
        return
    assert rule in scores
    assert scores[rule] == RULES_BY_NAME[rule].score


def test_every_rule_has_both_cases():
    fired = {case[1] for case in CASES if case[5]}
    quiet = {case[1] for case in CASES if not case[5]}
    # The rule-failure finding is tested with a crashing check in test_verdict.
    declared = {rule.name for rule in RULES} - {"SCAN_RULE_FAILED"}

    assert declared - fired == set()
    assert declared - quiet == set()


def test_rule_names_carry_family_prefix():
    for rule in RULES:
        assert re.fullmatch(r"[A-Z]+(?:_[A-Z0-9]+)+", rule.name), rule.name
        assert rule.name.startswith(rule.family + "_"), rule.name
        assert rule.description.endswith("."), rule.name


def test_rule_names_are_unique():
    names = [rule.name for rule in RULES]

    assert len(names) == len(set(names))


def test_combos_use_declared_rules():
    for combo in COMBOS:
        assert combo.name in RULES_BY_NAME
        for choices in combo.requires:
            assert choices <= set(RULES_BY_NAME), combo.name


def test_non_url_codes_score_low():
    payloads = [EPC_PAYLOAD, TICKET_PAYLOAD, "bitcoin:bc1qexample", "WIFI:S:Guest;;", "MECARD:N:Doe;;"]
    message = facts(body_text_chars=20, image_count=1,
                    qr_codes=[qr(p, "pdf-image" if i % 2 else "inline-image") for i, p in enumerate(payloads)])

    verdict = evaluate(message, envelope(), DEFAULT)

    assert [f.rule for f in verdict.findings] == ["QR_NON_URL"]
    assert verdict.score <= 0.1


def test_evidence_names_part_and_payload():
    message = facts(qr_codes=[qr(f"{HARVEST_URL}#{B64_RECIPIENT}", "pdf-image", "3")])

    verdict = evaluate(message, envelope(), DEFAULT)
    evidence = {finding.rule: finding.detail for finding in verdict.findings}

    assert evidence["QR_URL"].startswith("3 [pdf-image]: https://login.example.test/auth")
    assert evidence["QR_IN_PDF"].startswith("3 [pdf-image]")
    assert evidence["QR_RECIPIENT_EMBEDDED"] == f"3: {RECIPIENT} base64 in the fragment"


def test_evidence_has_no_line_breaks():
    message = facts(qr_codes=[qr(EPC_PAYLOAD)])

    verdict = evaluate(message, envelope(), DEFAULT)

    assert "\n" not in verdict.findings[0].detail
    assert "\\n" in verdict.findings[0].detail


def test_redirect_evidence_names_target():
    message = facts(links=[link(bing_link(HARVEST_URL), location="1.2")])

    verdict = evaluate(message, envelope(), DEFAULT)

    assert verdict.findings[0].detail == f"1.2 [html-href]: Bing click tracker to {HARVEST_URL}"


def test_every_finding_has_evidence():
    message = facts(
        sender=sender(),
        qr_codes=[qr(f"{HARVEST_URL}#{B64_RECIPIENT}", "pdf-image")],
        links=[link(f"https://www.google.com/url?q={HARVEST_URL}")],
        html=[html("2", attachment=True, captcha_markers=("cf-turnstile",), uses_atob=True,
                   meta_refresh=("https://x.example.test",), offsite_forms=("https://y.example.test",))],
        pdfs=[pdf(encrypted=True, has_javascript=True)],
        problems=[problem("limit"), problem("incomplete")],
    )

    verdict = evaluate(message, envelope(), ORG)

    assert len(verdict.findings) > 15
    for finding in verdict.findings:
        assert finding.detail, finding.rule


SPOOF = with_auth(sender(), "fail", "reject")
AUTHENTICATED_INTERNAL = with_auth(sender("it@example.com"), "pass", "reject")
INTRANET_QR = "https://intranet.example.com/canteen/menu"


@pytest.mark.parametrize(
    ("message", "minimum", "maximum"),
    [
        pytest.param(facts(sender=SPOOF, qr_codes=[qr(HARVEST_URL)]), 8.0, None, id="spoof qr code"),
        pytest.param(facts(sender=SPOOF, html=[html(captcha_markers=("cf-turnstile",))]), 8.0, None,
                     id="spoof captcha gate"),
        pytest.param(facts(sender=SPOOF, html=[html("2", attachment=True)]), 8.0, None, id="spoof html attachment"),
        pytest.param(facts(sender=sender(), qr_codes=[qr(HARVEST_URL)]), 8.0, None, id="spoof qr without dns"),
        pytest.param(facts(sender=AUTHENTICATED_INTERNAL, qr_codes=[qr(INTRANET_QR)]), None, 4.0,
                     id="internal intranet qr"),
    ],
)
def test_org_spoof_combination_scores(message, minimum, maximum):
    verdict = evaluate(message, envelope(), ORG)

    if minimum is not None:
        assert verdict.score >= minimum, verdict.findings
    if maximum is not None:
        assert verdict.score < maximum, verdict.findings
