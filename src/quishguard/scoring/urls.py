"""URL helpers for the rules: QR payload kinds, open redirectors, embedded recipients.

Pure functions over strings; nothing here fetches a URL or resolves a name.
URLs are split with `urllib.parse` (RFC 3986); base64 follows RFC 4648 and
accepts both the standard and the URL-safe alphabet.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import itertools
import re
from dataclasses import dataclass
from typing import Callable, Iterable
from urllib.parse import parse_qsl, unquote, urlsplit

# A host without a scheme ("example.test/login") counts as a URL when it
# starts with "www." or has a path, because phone cameras open it as one.
# Narrowed: a bare "word.word" is left out, since ticket and order codes
# such as "EVT-2024.SEAT" look like host names.
_BARE_HOST_URL = re.compile(
    r"^(?:www\.[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,24}(?:[/:?#]\S*)?"
    r"|[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,24}/\S*)$",
    re.I,
)
_SCHEME_URL = re.compile(r"^https?://\S+$", re.I)
# A host name, optionally followed by a path, for redirectors whose syntax
# puts a host without a scheme there (Translate's `u=`, the AMP viewer's path).
_HOST_THEN_PATH = re.compile(r"^[a-z0-9-]+(?:\.[a-z0-9-]+)+(?:[/:?#]\S*)?$", re.I)


def qr_url(payload: str) -> str | None:
    """Return the web URL a QR payload opens, or None for any other payload.

    A payload that starts with a URL counts even when text follows it,
    because the QR decoder turns line breaks into spaces.
    """
    text = payload.strip()
    if text[:6].upper() == "URLTO:":
        # An older URL form that some generators still write.
        text = text[6:].strip()

    first_word = text.split(maxsplit=1)[0] if text else ""
    if _SCHEME_URL.match(first_word):
        return first_word

    if _BARE_HOST_URL.match(text):
        return "http://" + text

    return None


# Prefixes of payload formats that are not web links, checked in order.
# The EPC and Swiss QR-bill formats start with a header line. The QR decoder
# turns line breaks into spaces, so the header is matched with a space.
_PAYLOAD_KINDS: tuple[tuple[str, str], ...] = (
    ("BCD ", "EPC payment (SEPA credit transfer)"),
    ("SPC ", "Swiss QR-bill payment"),
    ("bitcoin:", "cryptocurrency payment"),
    ("ethereum:", "cryptocurrency payment"),
    ("litecoin:", "cryptocurrency payment"),
    ("lightning:", "cryptocurrency payment"),
    ("WIFI:", "Wi-Fi credentials"),
    ("BEGIN:VCARD", "contact card (vCard)"),
    ("MECARD:", "contact card (MeCard)"),
    ("BEGIN:VEVENT", "calendar event"),
    ("BEGIN:VCALENDAR", "calendar event"),
    ("mailto:", "e-mail address"),
    ("MATMSG:", "e-mail message"),
    ("tel:", "telephone number"),
    ("sms:", "text message"),
    ("smsto:", "text message"),
    ("geo:", "geographic location"),
    ("otpauth:", "one-time password secret"),
)


def payload_kind(payload: str) -> str:
    """Name the kind of a QR payload that `qr_url` did not take as a URL."""
    text = payload.replace("\r\n", " ").replace("\n", " ")
    # EMVCo merchant-presented QR codes start with the payload format
    # indicator "000201"; Brazil's PIX is one, naming its key domain.
    if text.startswith("000201"):
        return "PIX payment (EMV)" if "br.gov.bcb.pix" in text.lower() else "EMV payment"
    for prefix, kind in _PAYLOAD_KINDS:
        if text[: len(prefix)].upper() == prefix.upper():
            return kind
    return "text"


def safe_split(url: str):
    """Split `url`, returning None when it is malformed (for example a bad IPv6 literal)."""
    try:
        parts = urlsplit(url.strip())
        parts.hostname  # noqa: B018 - raises ValueError on a malformed netloc
    except ValueError:
        return None
    return parts


def _as_web_url(value: str) -> str | None:
    """Return `value` as an http(s) URL when it is one, accepting the `//host` form."""
    text = value.strip()
    if text.startswith("//"):
        text = "https:" + text
    if _SCHEME_URL.match(text):
        return text
    return None


def _host_of(url: str) -> str:
    parts = safe_split(url)
    return (parts.hostname or "") if parts else ""


def _query_values(query: str, names: Iterable[str]) -> list[str]:
    wanted = set(names)
    return [value for key, value in parse_qsl(query, keep_blank_values=True) if key in wanted]


def _target_param(*names: str, bare_host: bool = False) -> Callable[[str, str], str | None]:
    """Build an extractor that takes the target from query parameter `names`.

    With `bare_host`, a value without a scheme ("example.test/page") is also
    accepted, as Google Translate's `u=` takes one.
    """

    def extract(path: str, query: str) -> str | None:
        for value in _query_values(query, names):
            url = _as_web_url(value)
            if url:
                return url
            if bare_host and _HOST_THEN_PATH.match(value.strip()):
                return "http://" + value.strip()
        return None

    return extract


def _bing_target(path: str, query: str) -> str | None:
    # Bing's click tracker carries the target in `u` as "a1" followed by
    # URL-safe base64 of the URL.
    for value in _query_values(query, ("u",)):
        if not value.startswith("a1"):
            continue
        decoded = _b64decode(value[2:])
        if decoded:
            url = _as_web_url(decoded.decode("latin-1"))
            if url:
                return url
    return None


def _google_amp_target(path: str, query: str) -> str | None:
    # The AMP viewer serves "/amp/s/HOST/PATH" as https://HOST/PATH and
    # "/amp/HOST/PATH" as http.
    rest = path[len("/amp/"):]
    scheme = "http://"
    if rest.startswith("s/"):
        rest = rest[2:]
        scheme = "https://"
    if _HOST_THEN_PATH.match(rest):
        return scheme + rest
    return None


def _yahoo_target(path: str, query: str) -> str | None:
    # The search click tracker keeps the target between "/RU=" and "/RK=" in the path.
    match = re.search(r"/RU=([^/]+)/RK=", path)
    if not match:
        return None
    return _as_web_url(unquote(match.group(1)))


def _stored_target(path: str, query: str) -> str | None:
    # For services that store the target themselves there is no parameter to
    # check, so the match on host and path is the whole test.
    return ""


@dataclass(frozen=True)
class Redirector:
    """A known open redirector: a service that forwards to a target named in the link.

    `host` matches the whole host name; `own_hosts` matches targets that stay
    inside the service, which are not counted.
    """

    service: str
    host: re.Pattern[str]
    path_prefix: str
    target: Callable[[str, str], str | None]
    own_hosts: re.Pattern[str]


_GOOGLE_HOST = re.compile(r"^(?:www\.)?google\.(?:com|co\.[a-z]{2}|com\.[a-z]{2}|[a-z]{2})$")
# Targets on Google's own domains are left out: such a redirect adds
# nothing over linking the Google page directly.
_GOOGLE_OWN = re.compile(
    r"(?:^|\.)(?:google\.(?:com|co\.[a-z]{2}|com\.[a-z]{2}|[a-z]{2})|googleusercontent\.com"
    r"|gstatic\.com|youtube\.com|googleapis\.com|goo\.gl)$"
)
_NOTHING = re.compile(r"(?!)")

# Security gateways' link rewriters (Microsoft Safe Links, Proofpoint
# URL Defense, Mimecast) are deliberately absent: the recipient's own
# gateway adds them to benign mail, and they only forward after a check.
# General URL shorteners (t.co, lnkd.in, bit.ly) are absent too, because
# legitimate mail uses them widely. The two listed services that store the
# target (LinkedIn smart links, Firebase Dynamic Links) are, by our
# estimate, rare in legitimate mail and common in phishing.
KNOWN_REDIRECTORS: tuple[Redirector, ...] = (
    Redirector("Google search redirect", _GOOGLE_HOST, "/url", _target_param("q", "url"), _GOOGLE_OWN),
    Redirector("Google AMP viewer", _GOOGLE_HOST, "/amp/", _google_amp_target, _GOOGLE_OWN),
    Redirector("Google Translate proxy", re.compile(r"^translate\.google\.[a-z.]+$"), "/translate",
               _target_param("u", bare_host=True), _GOOGLE_OWN),
    # translate.goog hosts proxy the site named in the host label, so the
    # host alone identifies the redirect.
    Redirector("Google Translate proxy", re.compile(r"^[a-z0-9-]+\.translate\.goog$"), "/",
               _stored_target, _NOTHING),
    Redirector("Google Ads click", re.compile(r"^(?:adclick\.g|ad)\.doubleclick\.net$"), "/",
               _target_param("adurl"), _GOOGLE_OWN),
    Redirector("Google Ads click", re.compile(r"^(?:www\.)?googleadservices\.com$"), "/pagead/aclk",
               _target_param("adurl"), _GOOGLE_OWN),
    Redirector("Google Ads click", re.compile(r"^adservice\.google\.[a-z.]+$"), "/ddm/clk",
               _target_param("adurl"), _GOOGLE_OWN),
    Redirector("Bing click tracker", re.compile(r"^(?:www\.)?bing\.com$"), "/ck/a", _bing_target,
               re.compile(r"(?:^|\.)(?:bing\.com|microsoft\.com)$")),
    Redirector("Facebook link shim", re.compile(r"^(?:l|lm)\.facebook\.com$"), "/l.php",
               _target_param("u"), re.compile(r"(?:^|\.)facebook\.com$")),
    Redirector("Instagram link shim", re.compile(r"^l\.instagram\.com$"), "/", _target_param("u"),
               re.compile(r"(?:^|\.)instagram\.com$")),
    Redirector("YouTube redirect", re.compile(r"^(?:www\.|m\.)?youtube\.com$"), "/redirect",
               _target_param("q"), _GOOGLE_OWN),
    Redirector("LinkedIn redirect", re.compile(r"^(?:[a-z]{2,3}\.|www\.)?linkedin\.com$"), "/redir/",
               _target_param("url"), re.compile(r"(?:^|\.)linkedin\.com$")),
    # LinkedIn "smart links" (/slink) store the target at LinkedIn, so the
    # required `code` parameter is all the link carries.
    Redirector("LinkedIn smart link", re.compile(r"^(?:[a-z]{2,3}\.|www\.)?linkedin\.com$"), "/slink",
               lambda path, query: "" if _query_values(query, ("code",)) else None, _NOTHING),
    # Firebase Dynamic Links give anyone a subdomain of page.link that
    # forwards to a target of their choice, in the long form (`link=`) or
    # stored behind a short code, so both count, unlike plain shorteners.
    Redirector("Firebase Dynamic Link", re.compile(r"^[a-z0-9-]+\.page\.link$"), "/",
               lambda path, query: _target_param("link")(path, query) or ("" if len(path) > 1 else None),
               _NOTHING),
    Redirector("DuckDuckGo redirect", re.compile(r"^(?:www\.)?duckduckgo\.com$"), "/l/",
               _target_param("uddg"), re.compile(r"(?:^|\.)duckduckgo\.com$")),
    Redirector("VK away page", re.compile(r"^(?:away\.)?vk\.com$"), "/away.php", _target_param("to"),
               re.compile(r"(?:^|\.)vk\.com$")),
    Redirector("Yahoo search redirect", re.compile(r"^r\.search\.yahoo\.com$"), "/", _yahoo_target,
               re.compile(r"(?:^|\.)yahoo\.com$")),
    Redirector("Slack redirect", re.compile(r"^slack-redir\.net$"), "/link", _target_param("url"), _NOTHING),
    Redirector("Tumblr redirect", re.compile(r"^t\.umblr\.com$"), "/redirect", _target_param("z"),
               re.compile(r"(?:^|\.)tumblr\.com$")),
)


@dataclass(frozen=True)
class RedirectMatch:
    """An open-redirector link: the service and the target it forwards to ("" when stored)."""

    service: str
    target: str


def _split_for_redirect(url: str):
    parts = safe_split(url)
    if parts is None:
        return None

    # Some lures percent-encode the "?" ("/pcs/click%3Fadurl=...") so that the
    # whole query looks like part of the path; servers decode it anyway.
    if not parts.query and "%3f" in parts.path.lower():
        parts = safe_split(f"{parts.scheme}://{parts.netloc}{unquote(parts.path)}")
    return parts


def _configured_target(path: str, query: str, prefix_path: str) -> str | None:
    # A configured redirector counts only when some parameter, or the rest of
    # the path, carries a web URL: a plain page on the same host is no redirect.
    for _, value in parse_qsl(query, keep_blank_values=True):
        url = _as_web_url(value)
        if url:
            return url
    return _as_web_url(unquote(path[len(prefix_path):].lstrip("/")))


def find_open_redirect(url: str, extra_patterns: Iterable[str] = ()) -> RedirectMatch | None:
    """Match `url` against the built-in redirectors and `host/path-prefix` patterns.

    Returns None when the URL is not a redirect or the target stays inside
    the redirector's own service.
    """
    parts = _split_for_redirect(url)
    if parts is None or parts.scheme.lower() not in ("http", "https"):
        return None

    host = (parts.hostname or "").rstrip(".").lower()
    path = parts.path or "/"

    for redirector in KNOWN_REDIRECTORS:
        if not redirector.host.match(host) or not path.startswith(redirector.path_prefix):
            continue
        target = redirector.target(path, parts.query)
        if target is None:
            continue
        if target and redirector.own_hosts.search(_host_of(target).lower()):
            continue
        return RedirectMatch(redirector.service, target)

    for pattern in extra_patterns:
        pattern_host, _, pattern_path = pattern.partition("/")
        pattern_path = "/" + pattern_path
        if host != pattern_host or not path.startswith(pattern_path):
            continue
        target = _configured_target(path, parts.query, pattern_path)
        if target:
            return RedirectMatch(f"configured redirector {pattern}", target)

    return None


# Base64 tokens shorter than 8 characters decode to at most 6 bytes, too
# short to hold an address. The caps bound the work on hostile URLs.
_BASE64_TOKEN = re.compile(r"[A-Za-z0-9+/_-]{8,}={0,2}")
_MAX_TOKENS = 64
_MAX_TOKEN_CHARS = 8192
# Shorter fragments of a very short address could match unrelated base64 by chance.
_MIN_FRAGMENT_CHARS = 8


def _b64decode(token: str) -> bytes | None:
    text = token.replace("-", "+").replace("_", "/").rstrip("=")
    if len(text) % 4 == 1:
        text = text[:-1]
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _base64_fragments(address: str) -> list[str]:
    """Return the base64 text of `address` at the three byte alignments, both alphabets.

    Inside a longer encoded string the address starts at any byte offset
    modulo 3; each fragment keeps only the characters that depend on the
    address bytes alone, so it can be searched for in the encoded text.
    """
    fragments = []
    for variant in {address, address.lower()}:
        data = variant.encode("utf-8")
        for offset, start in ((0, 0), (1, 2), (2, 3)):
            encoded = base64.b64encode(b"\0" * offset + data).decode("ascii")
            end = (offset + len(data)) * 8 // 6
            fragment = encoded[start:end]
            if len(fragment) < _MIN_FRAGMENT_CHARS:
                continue
            fragments.append(fragment)
            fragments.append(fragment.replace("+", "-").replace("/", "_"))
    return fragments


def _unquote_repeatedly(text: str) -> str:
    # Redirect chains percent-encode a URL once per hop. Three rounds is an
    # estimate of the longest chain worth undoing, and it bounds the work.
    for _ in range(3):
        decoded = unquote(text)
        if decoded == text:
            break
        text = decoded
    return text


@dataclass(frozen=True)
class Embedding:
    """A recipient address found in a URL: how it is encoded and in which URL component."""

    address: str
    encoding: str
    component: str


def _search_component(text: str, component: str, address: str) -> Embedding | None:
    lowered = address.lower()
    if lowered in text.lower():
        return Embedding(address, "plain", component)

    decoded = _unquote_repeatedly(text)
    if lowered in decoded.lower():
        return Embedding(address, "percent-encoded", component)

    if any(fragment in text or fragment in decoded for fragment in _base64_fragments(address)):
        return Embedding(address, "base64", component)

    for match in itertools.islice(_BASE64_TOKEN.finditer(decoded), _MAX_TOKENS):
        token = match.group(0)[:_MAX_TOKEN_CHARS]
        # A token may start with a few characters that are not part of the
        # encoding (Bing's "a1" prefix, a path separator eaten by the regex).
        for skip in range(4):
            raw = _b64decode(token[skip:])
            if raw and lowered in raw.decode("latin-1").lower():
                return Embedding(address, "base64", component)

    return None


def find_embedded_recipients(url: str, addresses: Iterable[str]) -> list[Embedding]:
    """Find each address of `addresses` embedded in `url` plainly, percent-encoded or in base64."""
    parts = safe_split(url)
    if parts is None:
        return []

    components = (("path", parts.path), ("query", parts.query), ("fragment", parts.fragment))
    found = []
    for address in addresses:
        if "@" not in address:
            continue
        for component, text in components:
            if not text:
                continue
            embedding = _search_component(text, component, address)
            if embedding:
                found.append(embedding)
    return found


# Public object storage and IPFS gateways: anyone can publish a page there.
_STORAGE_HOSTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?:^|\.)s3(?:[.-][a-z0-9-]+)?\.amazonaws\.com$"), "Amazon S3"),
    (re.compile(r"(?:^|\.)digitaloceanspaces\.com$"), "DigitalOcean Spaces"),
    (re.compile(r"^(?:storage|firebasestorage)\.googleapis\.com$"), "Google Cloud Storage"),
    (re.compile(r"\.(?:blob|web)\.core\.windows\.net$"), "Azure Storage"),
    (re.compile(r"\.r2\.dev$"), "Cloudflare R2"),
    (re.compile(r"(?:^|\.)(?:ipfs\.io|dweb\.link|cloudflare-ipfs\.com|ipfs\.w3s\.link|nftstorage\.link"
                r"|ipfs\.[a-z0-9.-]+)$"), "IPFS gateway"),
)
_PAGE_SUFFIXES = (".html", ".htm", ".xhtml", ".shtml", ".svg")


def find_storage_page(url: str) -> str | None:
    """Name the storage service when `url` opens an HTML page on public object storage or IPFS.

    Narrowed to pages: newsletters load images from the same services, so
    only HTML, XHTML and SVG files (and IPFS content paths, which carry no
    file type) count.
    """
    parts = safe_split(url)
    if parts is None or parts.scheme.lower() not in ("http", "https"):
        return None

    host = (parts.hostname or "").rstrip(".").lower()
    path = parts.path.lower()
    for pattern, service in _STORAGE_HOSTS:
        if not pattern.search(host):
            continue
        if service == "IPFS gateway" and ("/ipfs/" in path or ".ipfs." in host):
            return service
        if path.endswith(_PAGE_SUFFIXES):
            return service
    return None


# Public URL shorteners: the QR code hides the real target behind them. Kept
# short on purpose; QR-code services' own short domains (qrco.de) are left
# out, because legitimate printed codes use them widely.
_SHORTENER_HOSTS = frozenset({
    "bit.ly", "tinyurl.com", "t.ly", "is.gd", "cutt.ly", "rb.gy", "shorturl.at", "t.co", "ow.ly", "s.id",
    "rebrand.ly", "tiny.cc", "v.gd", "bl.ink", "short.io", "shorturl.gg", "urlz.fr", "l.ead.me",
})


def shortener_host(url: str) -> str | None:
    """Return the host when `url` goes through a public URL shortener, else None."""
    host = _host_of(url).rstrip(".").lower().removeprefix("www.")
    return host if host in _SHORTENER_HOSTS else None


def ip_host(url: str) -> str | None:
    """Return the host when `url` names an IP address instead of a domain, else None.

    Decimal and hexadecimal forms of IPv4 (http://3232235777/) count too,
    because browsers accept them.
    """
    host = _host_of(url).rstrip(".").lower()
    if not host:
        return None
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if re.fullmatch(r"\d{8,10}|0x[0-9a-f]{1,8}", host):
        return host
    return None

