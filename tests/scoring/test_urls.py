"""URL helpers: QR payload kinds, open redirectors, embedded recipients and storage pages."""

from __future__ import annotations

import base64
from urllib.parse import quote

import pytest

from quishguard.scoring.urls import (
    KNOWN_REDIRECTORS,
    find_embedded_recipients,
    find_open_redirect,
    find_storage_page,
    payload_kind,
    qr_url,
)

TARGET = "https://login.example.test/auth"
ADDRESS = "bob@example.com"


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ("https://login.example.test/a", "https://login.example.test/a"),
        ("  HTTP://LOGIN.EXAMPLE.TEST/A  ", "HTTP://LOGIN.EXAMPLE.TEST/A"),
        ("https://login.example.test/a scan me", "https://login.example.test/a"),
        ("URLTO:https://login.example.test/a", "https://login.example.test/a"),
        ("www.example.test", "http://www.example.test"),
        ("login.example.test/path", "http://login.example.test/path"),
        ("example.test", None),
        ("EVT-2024.SEAT", None),
        ("BCD 002 1 SCT", None),
        ("bitcoin:bc1qexample", None),
        ("BEGIN:VCARD VERSION:3.0 URL:https://example.test END:VCARD", None),
        ("", None),
    ],
)
def test_qr_url_detects_web_links(payload, expected):
    assert qr_url(payload) == expected


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ("BCD\n002\n1\nSCT", "EPC payment (SEPA credit transfer)"),
        ("BCD 002 1 SCT", "EPC payment (SEPA credit transfer)"),
        ("SPC\r\n0200\r\n1", "Swiss QR-bill payment"),
        ("bitcoin:bc1qexample?amount=1", "cryptocurrency payment"),
        ("WIFI:T:WPA;S:Guest;;", "Wi-Fi credentials"),
        ("BEGIN:VCARD VERSION:3.0", "contact card (vCard)"),
        ("MECARD:N:Doe,Ann;;", "contact card (MeCard)"),
        ("BEGIN:VEVENT SUMMARY:Meeting", "calendar event"),
        ("tel:+15550100", "telephone number"),
        ("BCDE", "text"),
        ("TKT-2024-000417", "text"),
    ],
)
def test_payload_kind_names_format(payload, expected):
    assert payload_kind(payload) == expected


def _bing(target: str) -> str:
    encoded = base64.urlsafe_b64encode(target.encode()).decode().rstrip("=")
    return f"https://www.bing.com/ck/a?!&&p=1&u=a1{encoded}&ntb=1"


# One link per built-in redirector, with the target it must report ("" when the service stores it).
REDIRECT_CASES = [
    ("Google search redirect", f"https://www.google.com/url?q={TARGET}&sa=D", TARGET),
    ("Google search redirect", f"https://google.co.uk/url?url={quote(TARGET, safe='')}", TARGET),
    ("Google AMP viewer", "https://www.google.com/amp/s/login.example.test/auth", TARGET),
    ("Google AMP viewer", "https://google.com/amp/login.example.test/auth", "http://login.example.test/auth"),
    ("Google Translate proxy", "https://translate.google.com/translate?sl=auto&tl=en&u=login.example.test/auth",
     "http://login.example.test/auth"),
    ("Google Translate proxy", "https://login-example-test.translate.goog/auth", ""),
    ("Google Ads click", f"https://adclick.g.doubleclick.net/pcs/click?xai=1&adurl={TARGET}", TARGET),
    ("Google Ads click", f"https://www.googleadservices.com/pagead/aclk?sa=L&adurl={TARGET}", TARGET),
    ("Google Ads click", f"https://adservice.google.com/ddm/clk/1;2?adurl={TARGET}", TARGET),
    ("Bing click tracker", _bing(TARGET), TARGET),
    ("Facebook link shim", f"https://l.facebook.com/l.php?u={quote(TARGET, safe='')}&h=AT1", TARGET),
    ("Instagram link shim", f"https://l.instagram.com/?u={quote(TARGET, safe='')}&e=AT1", TARGET),
    ("YouTube redirect", f"https://www.youtube.com/redirect?event=video&q={TARGET}", TARGET),
    ("LinkedIn redirect", f"https://www.linkedin.com/redir/redirect?url={quote(TARGET, safe='')}", TARGET),
    ("LinkedIn smart link", "https://www.linkedin.com/slink?code=eAbC123", ""),
    ("Firebase Dynamic Link", f"https://lure.page.link/?link={TARGET}&apn=x", TARGET),
    ("Firebase Dynamic Link", "https://lure.page.link/AbCd", ""),
    ("DuckDuckGo redirect", f"https://duckduckgo.com/l/?uddg={quote(TARGET, safe='')}", TARGET),
    ("VK away page", f"https://vk.com/away.php?to={quote(TARGET, safe='')}", TARGET),
    ("Yahoo search redirect", f"https://r.search.yahoo.com/_ylt=A/RV=2/RU={quote(TARGET, safe='')}/RK=2/RS=x",
     TARGET),
    ("Slack redirect", f"https://slack-redir.net/link?url={quote(TARGET, safe='')}", TARGET),
    ("Tumblr redirect", f"https://t.umblr.com/redirect?z={quote(TARGET, safe='')}&t=1", TARGET),
]


@pytest.mark.parametrize(("service", "url", "target"), REDIRECT_CASES, ids=[c[1][:60] for c in REDIRECT_CASES])
def test_redirector_reports_target(service, url, target):
    match = find_open_redirect(url)

    assert match is not None
    assert match.service == service
    assert match.target == target


def test_every_redirector_has_case():
    services = {redirector.service for redirector in KNOWN_REDIRECTORS}

    assert services - {case[0] for case in REDIRECT_CASES} == set()


@pytest.mark.parametrize(
    "url",
    [
        "https://www.google.com/url?q=https://docs.google.com/document/d/1",
        "https://www.google.com/url?q=not-a-url",
        "https://www.google.com/url",
        "https://www.google.com/amp/s/",
        "https://www.bing.com/ck/a?!&&p=1&u=a1%%%",
        "https://www.bing.com/ck/a?!&&p=1",
        "https://l.facebook.com/l.php?u=https%3A%2F%2Fwww.facebook.com%2Fgroups",
        "https://www.linkedin.com/slink",
        "https://www.linkedin.com/in/someone",
        "https://www.youtube.com/redirect?q=https://www.youtube.com/watch",
        "https://google.evil.test/url?q=https://login.example.test",
        "https://www.google.com.evil.test/url?q=https://login.example.test",
        "ftp://www.google.com/url?q=https://login.example.test",
        "https://[::1/url?q=https://login.example.test",
        "https://t.co/AbCd",
        "https://urldefense.proofpoint.com/v2/url?u=https-3A__example.test",
        "https://eur01.safelinks.protection.outlook.com/?url=https%3A%2F%2Fexample.test",
    ],
)
def test_redirector_not_matched(url):
    assert find_open_redirect(url) is None


def test_configured_redirector_pattern():
    patterns = ["go.example.net/out"]

    assert find_open_redirect(f"https://go.example.net/out?to={TARGET}", patterns).target == TARGET
    assert find_open_redirect(f"https://go.example.net/out/{quote(TARGET, safe='')}", patterns).target == TARGET
    assert find_open_redirect(f"https://go.example.net/in?to={TARGET}", patterns) is None
    assert find_open_redirect(f"https://www.go.example.net/out?to={TARGET}", patterns) is None
    assert find_open_redirect("https://go.example.net/out?id=42", patterns) is None


def _encodings_of(address: str) -> list[tuple[str, str]]:
    """Return (URL, expected encoding) pairs that hide `address` in different ways."""
    cases = []
    for prefix in ("", "x", "xy", "xyz"):
        blob = base64.b64encode(f"{prefix}{address}&v=1".encode()).decode()
        cases.append((f"https://lure.example.test/p?d={blob}", "base64"))
        cases.append((f"https://lure.example.test/{blob}", "base64"))
    cases.append((f"https://lure.example.test/#{base64.urlsafe_b64encode(address.encode()).decode()}", "base64"))
    cases.append((f"https://lure.example.test/#{address}", "plain"))
    cases.append((f"https://lure.example.test/?e={quote(address, safe='')}", "percent-encoded"))
    cases.append((f"https://lure.example.test/?e={quote(quote(address, safe=''), safe='')}", "percent-encoded"))
    return cases


@pytest.mark.parametrize(("url", "encoding"), _encodings_of(ADDRESS))
def test_embedded_recipient_found(url, encoding):
    found = find_embedded_recipients(url, [ADDRESS])

    assert len(found) == 1
    assert found[0].address == ADDRESS
    assert found[0].encoding == encoding


@pytest.mark.parametrize(
    "url",
    [
        "https://lure.example.test/auth",
        "https://lure.example.test/#" + base64.b64encode(b"carol@example.com").decode(),
        "https://lure.example.test/?e=bob%40example.org",
        "https://[::1/#bob@example.com",
    ],
)
def test_embedded_recipient_absent(url):
    assert find_embedded_recipients(url, [ADDRESS]) == []


def test_embedded_recipient_ignores_non_address():
    assert find_embedded_recipients("https://lure.example.test/#postmaster", ["postmaster"]) == []


def test_embedded_recipient_per_component():
    blob = base64.b64encode(ADDRESS.encode()).decode()

    found = find_embedded_recipients(f"https://lure.example.test/{blob}?q={ADDRESS}#x", [ADDRESS])

    assert [(e.component, e.encoding) for e in found] == [("path", "base64"), ("query", "plain")]


@pytest.mark.parametrize(
    ("url", "service"),
    [
        ("https://bucket.s3.amazonaws.com/login.html", "Amazon S3"),
        ("https://s3.us-east-1.amazonaws.com/bucket/index.HTM", "Amazon S3"),
        ("https://x.fra1.digitaloceanspaces.com/p.xhtml", "DigitalOcean Spaces"),
        ("https://storage.googleapis.com/bucket/a.html", "Google Cloud Storage"),
        ("https://firebasestorage.googleapis.com/v0/b/x/o/a.html", "Google Cloud Storage"),
        ("https://acct.blob.core.windows.net/c/a.svg", "Azure Storage"),
        ("https://pub-1.r2.dev/a.html", "Cloudflare R2"),
        ("https://ipfs.io/ipfs/QmExample", "IPFS gateway"),
        ("https://bafyexample.ipfs.dweb.link/", "IPFS gateway"),
        ("https://bucket.s3.amazonaws.com/banner.png", None),
        ("https://ipfs.io/docs/", None),
        ("https://www.example.org/index.html", None),
        ("ftp://bucket.s3.amazonaws.com/login.html", None),
    ],
)
def test_storage_page_detection(url, service):
    assert find_storage_page(url) == service
