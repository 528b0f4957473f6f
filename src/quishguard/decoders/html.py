"""Read one HTML (or SVG) document for links, redirects, CAPTCHA gates and embedded images.

The markup is parsed with BeautifulSoup over the lxml HTML parser, which
accepts the broken markup that mail carries. Nothing is executed and nothing
is fetched. Scripts are only searched as text for the redirect and decoding
idioms phishing kits use. `data:` URIs (RFC 2397) are decoded so that the
structure stage can queue their images for the QR decoder.

What is collected:
- links: `<a href>` and `<area href>` with their visible text, Gmail's
  `data-saferedirecturl` rewrites, URLs written in the visible text, off-site
  `<form action>`, `<meta http-equiv="refresh">` targets (HTML Living
  Standard, "shared declarative refresh steps") and literal URLs assigned
  to `location` in inline scripts, `on*` attributes and `javascript:` hrefs;
- CAPTCHA gates: the script URLs and widget class names of Cloudflare
  Turnstile, hCaptcha and reCAPTCHA, and "verify you are human" style text;
- visible text: the text a mail client shows, without `<head>`, scripts,
  styles and elements hidden by the `hidden` attribute, `display:none` or
  `visibility:hidden`;
- embedded images: `data:` URIs in `<img src>`, `srcset`, the `background`
  attribute, CSS `url(...)` and SVG `<image href>`, and the `cid:` URLs
  (RFC 2392) that reference inline MIME parts; remote image URLs, only as
  text, for QR-generator calls;
- QR codes drawn without an image (tables, div grids, block characters,
  `grids`), inline `<svg>` elements and images laid out as tiles of one
  picture (`find_split_layouts`), for the worker to render and decode.

BeautifulSoup does not dominate the cost: over 559 real phishing and benign
messages, the whole structure stage (this parse included) took 2.5 s in
total and at most 0.1 s per message, against 47 s for the image and PDF
tasks (2-core VM, Python 3.11, bs4 4.15, lxml 6.2).
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import urllib.parse
from dataclasses import dataclass, field

from bs4 import BeautifulSoup
from bs4.element import CData, NavigableString, PageElement, Tag

from ..model import HtmlFacts, Link, ScanProblem
from .grids import Grid, find_html_grids, find_split_layouts
from .urls import MAX_URL_CHARS, find_urls

log = logging.getLogger(__name__)

# Larger documents are cut: BeautifulSoup builds a Python object per node,
# so its parse time and memory grow with the markup. Real mail bodies stay
# far below this; a larger one is a stress attempt or a web page.
MAX_HTML_CHARS = 2_000_000

MAX_LINK_TEXT_CHARS = 200

# Remote image URLs kept per document (read for QR-generator calls, never
# fetched) and inline <svg> elements rendered per document.
MAX_REMOTE_IMAGES = 200
MAX_INLINE_SVGS = 10

# URLs written in the visible text (not linked) taken per document; a reader
# copies them into a browser, so they are links too.
MAX_TEXT_URLS = 200
MAX_REDIRECT_CHARS = 200

# Distinct values kept per document in each HtmlFacts tuple; one is enough
# evidence, and hostile markup can repeat a pattern thousands of times.
MAX_VALUES_PER_FACT = 20

_HIDDEN_STYLE = re.compile(r"display\s*:\s*none|visibility\s*:\s*hidden", re.IGNORECASE)
_INVISIBLE_TAGS = ("head", "script", "style", "template")

# Markup and script URLs of the CAPTCHA services phishing pages put in front
# of their credential forms. Matched in the lowercased markup.
_CAPTCHA_MARKUP = (
    "challenges.cloudflare.com/turnstile",
    "cf-turnstile",
    "hcaptcha.com/1/api.js",
    "h-captcha",
    "google.com/recaptcha",
    "recaptcha.net/recaptcha",
    "g-recaptcha",
    "grecaptcha",
)

# Phrases of the gate pages themselves, matched in the visible text and in
# the markup (scripts often write the text), with typographic apostrophes
# folded to "'".
_CAPTCHA_PHRASES = (
    "verify you are human",
    "i'm not a robot",
    "i am not a robot",
    "human verification",
    "complete the security check",
)

# JavaScript idioms that navigate the page: `location = x`,
# `location.href = x`, `location["href"] = x`, `location.replace(x)` and
# `location.assign(x)`, with or without `window.`/`document.`/`top.` in
# front. `(?![=>])` keeps comparisons and arrow functions out.
_JS_REDIRECT = re.compile(
    r"""\blocation\s*(?:\.\s*href\s*|\[\s*['"]href['"]\s*\]\s*)?=(?![=>])\s*"""
    r"""|\blocation\s*\.\s*(?:replace|assign)\s*\(\s*""",
)
_JS_ATOB = re.compile(r"\batob\s*\(")
_JS_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|.)", re.DOTALL)
_JS_EXPRESSION_END = re.compile(r"[;\n)}]")

_META_REFRESH = re.compile(r"^\s*[\d.]*\s*[;,]?\s*(?:url\s*=\s*)?(.*)$", re.IGNORECASE | re.DOTALL)
_CSS_URL_START = re.compile(r"url\(", re.IGNORECASE)
_DATA_URI = re.compile(r"^\s*data:([^,]*),(.*)$", re.IGNORECASE | re.DOTALL)
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class EmbeddedImage:
    """Bytes of a `data:` URI found where an image is expected, and how it was embedded."""

    data: bytes
    hidden_as: str


@dataclass
class HtmlAnalysis:
    """The result of `analyse_html`: the facts, plus what the structure stage needs next."""

    facts: HtmlFacts
    links: list[Link] = field(default_factory=list)
    visible_text: str = ""
    embedded_images: list[EmbeddedImage] = field(default_factory=list)
    cid_references: set[str] = field(default_factory=set)
    problems: list[ScanProblem] = field(default_factory=list)
    remote_images: list[str] = field(default_factory=list)
    grids: list[Grid] = field(default_factory=list)
    inline_svgs: list[str] = field(default_factory=list)
    split_layouts: list[list[list[str]]] = field(default_factory=list)


def analyse_html(
    markup: str,
    location: str,
    *,
    is_attachment: bool,
    filename: str | None = None,
    is_svg: bool = False,
    max_embedded_images: int | None = None,
) -> HtmlAnalysis:
    """Analyse one HTML or SVG document already decoded to text.

    `location` names the MIME part in every `Link` and `ScanProblem`.
    `is_svg` marks images embedded in an SVG document as hidden_as "svg".
    At most `max_embedded_images` `data:` URIs are decoded.
    """
    problems: list[ScanProblem] = []
    if len(markup) > MAX_HTML_CHARS:
        problems.append(
            ScanProblem(
                location,
                "limit",
                f"HTML part has {len(markup)} characters; analysed the first {MAX_HTML_CHARS}",
            )
        )
        markup = markup[:MAX_HTML_CHARS]

    soup = BeautifulSoup(markup, "lxml")
    links: list[Link] = []

    _collect_anchors(soup, location, links)
    _collect_safe_redirects(soup, location, links)
    offsite_forms = _collect_forms(soup, location, links)
    meta_refresh = _collect_meta_refresh(soup, location, links)

    scripts = _script_texts(soup)
    js_redirects = _collect_js_redirects(scripts, location, links)
    uses_atob = any(_JS_ATOB.search(script) for script in scripts)
    has_script = soup.find("script") is not None

    image_hidden_as = "svg" if is_svg else "data-uri"
    css_hidden_as = "svg" if is_svg else "css-background"
    embedded_images, cid_references, remote_images = _collect_images(
        soup, image_hidden_as, css_hidden_as, max_embedded_images
    )
    image_count = len(soup.find_all("img"))

    visible_text = _visible_text(soup)
    for url in find_urls(visible_text, MAX_TEXT_URLS):
        links.append(Link(url, location, "html-text"))
    captcha_markers = _find_captcha_markers(markup, visible_text)

    facts = HtmlFacts(
        location=location,
        is_attachment=is_attachment,
        filename=filename,
        meta_refresh=_distinct(meta_refresh),
        js_redirects=_distinct(js_redirects),
        uses_atob=uses_atob,
        captcha_markers=captcha_markers,
        offsite_forms=_distinct(offsite_forms),
        has_script=has_script,
        visible_text_chars=count_visible_chars(visible_text),
        image_count=image_count,
    )
    return HtmlAnalysis(
        facts=facts,
        links=links,
        visible_text=visible_text,
        embedded_images=embedded_images,
        cid_references=cid_references,
        problems=problems,
        remote_images=remote_images[:MAX_REMOTE_IMAGES],
        grids=find_html_grids(soup),
        inline_svgs=[] if is_svg else _inline_svgs(soup),
        split_layouts=find_split_layouts(soup),
    )


def _inline_svgs(soup: BeautifulSoup) -> list[str]:
    """Return the markup of each top-level `<svg>` element, for rendering as an image."""
    svgs = []
    for svg in soup.find_all("svg", limit=MAX_INLINE_SVGS * 4):
        if svg.find_parent("svg") is not None:
            continue
        if not svg.get("xmlns"):
            # A standalone SVG document needs the namespace that HTML implies.
            svg["xmlns"] = "http://www.w3.org/2000/svg"
        svgs.append(str(svg)[:MAX_HTML_CHARS])
        if len(svgs) >= MAX_INLINE_SVGS:
            break
    return svgs


def count_visible_chars(text: str) -> int:
    """Count the characters of `text` that are not whitespace."""
    return len(_WHITESPACE.sub("", text))


def decode_data_uri(uri: str) -> bytes | None:
    """Decode a `data:` URI (RFC 2397) to bytes, or return None if it is not one or is malformed."""
    match = _DATA_URI.match(uri)
    if match is None:
        return None

    media_type, payload = match.groups()
    if not media_type.strip().lower().endswith(";base64"):
        return urllib.parse.unquote_to_bytes(payload)

    # Mail and web producers wrap base64 lines and sometimes percent-encode
    # it, and browsers accept both, so normalise before decoding.
    payload = _WHITESPACE.sub("", urllib.parse.unquote(payload))
    payload += "=" * (-len(payload) % 4)
    try:
        return base64.b64decode(payload, altchars=None, validate=False)
    except (binascii.Error, ValueError):
        return None


def _collect_anchors(soup: BeautifulSoup, location: str, links: list[Link]) -> None:
    for anchor in soup.find_all(("a", "area")):
        href = _attribute(anchor, "href") or _attribute(anchor, "xlink:href")
        if not href or href.startswith("#"):
            continue
        if href.lower().startswith(("javascript:", "cid:")):
            continue
        text = _WHITESPACE.sub(" ", anchor.get_text(" ", strip=True))[:MAX_LINK_TEXT_CHARS]
        links.append(Link(href[:MAX_URL_CHARS], location, "html-href", text))


def _collect_safe_redirects(soup: BeautifulSoup, location: str, links: list[Link]) -> None:
    # Gmail's web view rewrites each link through google.com/url?q=... and
    # keeps the rewritten URL in this attribute; HTML copied from that view
    # (forwards, phishing kits built from a received lure) carries it along.
    for tag in soup.find_all(attrs={"data-saferedirecturl": True}):
        value = _attribute(tag, "data-saferedirecturl")
        if value and value.lower().startswith(("http://", "https://")):
            links.append(Link(value[:MAX_URL_CHARS], location, "html-saferedirecturl"))


def _collect_forms(soup: BeautifulSoup, location: str, links: list[Link]) -> list[str]:
    # A mail message has no origin of its own, so every absolute http(s)
    # action posts to another site.
    offsite: list[str] = []
    for form in soup.find_all("form"):
        action = _attribute(form, "action")
        if not action or not action.lower().startswith(("http://", "https://", "//")):
            continue
        offsite.append(action[:MAX_URL_CHARS])
        links.append(Link(action[:MAX_URL_CHARS], location, "html-form"))
    return offsite


def _collect_meta_refresh(soup: BeautifulSoup, location: str, links: list[Link]) -> list[str]:
    targets: list[str] = []
    for meta in soup.find_all("meta"):
        if (_attribute(meta, "http-equiv") or "").lower() != "refresh":
            continue
        content = _attribute(meta, "content") or ""
        match = _META_REFRESH.match(content)
        target = match.group(1).strip().strip("'\"").strip() if match else ""
        if not target:
            continue
        targets.append(target[:MAX_URL_CHARS])
        links.append(Link(target[:MAX_URL_CHARS], location, "html-meta-refresh"))
    return targets


def _script_texts(soup: BeautifulSoup) -> list[str]:
    """Collect inline scripts, `on*` attribute values and `javascript:` URLs as text."""
    texts: list[str] = []
    for script in soup.find_all("script"):
        text = script.string if script.string is not None else script.get_text()
        if text.strip():
            texts.append(text)

    for tag in soup.find_all(True):
        for name, value in tag.attrs.items():
            if not isinstance(value, str):
                continue
            if name.lower().startswith("on"):
                texts.append(value)
            elif value.lstrip().lower().startswith("javascript:"):
                texts.append(value.lstrip()[len("javascript:"):])
    return texts


def _collect_js_redirects(scripts: list[str], location: str, links: list[Link]) -> list[str]:
    redirects: list[str] = []
    for script in scripts:
        for match in _JS_REDIRECT.finditer(script):
            target, literal = _js_target(script, match.end())
            if not target:
                continue
            redirects.append(target)
            if literal and target.lower().startswith(("http://", "https://")):
                links.append(Link(target[:MAX_URL_CHARS], location, "html-script"))
    return redirects


def _js_target(script: str, start: int) -> tuple[str, bool]:
    """Read the value assigned at `start`: a string literal's text, else the expression as written."""
    quote = script[start:start + 1]
    if quote in ("'", '"', "`"):
        end = start + 1
        while end < len(script) and end - start <= MAX_URL_CHARS:
            char = script[end]
            if char == "\\":
                end += 2
                continue
            if char == quote:
                body = script[start + 1:end]
                if quote == "`" and "${" in body:
                    return body[:MAX_REDIRECT_CHARS], False
                return _unescape_js(body)[:MAX_URL_CHARS], True
            end += 1

    match = _JS_EXPRESSION_END.search(script, start, start + MAX_REDIRECT_CHARS)
    end = match.start() if match else start + MAX_REDIRECT_CHARS
    return script[start:end].strip(), False


def _unescape_js(text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        escape = match.group(1)
        if escape[0] in "xu" and len(escape) > 1:
            return chr(int(escape[1:], 16))
        return {"n": "\n", "t": "\t", "r": "\r"}.get(escape, escape)

    return _JS_ESCAPE.sub(replace, text)


def _collect_images(
    soup: BeautifulSoup, image_hidden_as: str, css_hidden_as: str, max_images: int | None
) -> tuple[list[EmbeddedImage], set[str], list[str]]:
    images: list[EmbeddedImage] = []
    cids: set[str] = set()
    remote: list[str] = []

    def take(url: str, hidden_as: str) -> None:
        url = url.strip()
        lowered = url[:5].lower()
        if lowered.startswith(("http", "//")):
            remote.append(url[:MAX_URL_CHARS])
        elif lowered.startswith("cid:"):
            cids.add(normalise_content_id(urllib.parse.unquote(url[4:])))
        elif lowered == "data:" and (max_images is None or len(images) < max_images):
            data = decode_data_uri(url)
            if data:
                images.append(EmbeddedImage(data, hidden_as))

    for tag in soup.find_all(("img", "input", "image", "feimage", "source")):
        for name in ("src", "href", "xlink:href"):
            value = _attribute(tag, name)
            if value:
                take(value, image_hidden_as)
        srcset = _attribute(tag, "srcset")
        if srcset:
            for url in _srcset_urls(srcset):
                take(url, image_hidden_as)

    for tag in soup.find_all(background=True):
        take(_attribute(tag, "background") or "", css_hidden_as)
    for tag in soup.find_all(style=True):
        for url in _css_urls(_attribute(tag, "style") or ""):
            take(url, css_hidden_as)
    for style in soup.find_all("style"):
        for url in _css_urls(style.get_text()):
            take(url, css_hidden_as)

    return images, cids, remote


def _css_urls(css: str) -> list[str]:
    """Return the arguments of CSS `url(...)` functions, unquoted.

    A scan with str.find rather than a lazy regex: an unclosed `url(`
    repeated many times would make a regex rescan to the end each time.
    """
    urls: list[str] = []
    position = 0
    while True:
        match = _CSS_URL_START.search(css, position)
        if match is None:
            return urls
        end = css.find(")", match.end())
        if end < 0:
            # No later `url(` can be closed either.
            return urls
        urls.append(css[match.end():end].strip().strip("'\""))
        position = end + 1


def normalise_content_id(content_id: str) -> str:
    """Normalise a Content-ID or `cid:` URL body for matching: no angle brackets, lowercase."""
    return content_id.strip().strip("<>").strip().lower()


def _srcset_urls(srcset: str) -> list[str]:
    """Split a `srcset` value into URLs, following the HTML Living Standard's parsing steps.

    URLs end at whitespace, not at commas, because a `data:` URL contains one.
    """
    urls: list[str] = []
    position = 0
    length = len(srcset)
    while position < length:
        while position < length and (srcset[position].isspace() or srcset[position] == ","):
            position += 1
        start = position
        while position < length and not srcset[position].isspace():
            position += 1
        url = srcset[start:position]
        if not url:
            break
        if url.endswith(","):
            urls.append(url.rstrip(","))
            continue
        urls.append(url)
        comma = srcset.find(",", position)
        position = length if comma < 0 else comma + 1
    return urls


def _visible_text(soup: BeautifulSoup) -> str:
    """Join the text a mail client shows, skipping invisible and hidden subtrees.

    The walk uses an explicit stack, in document order, so deeply nested
    markup costs linear time and no recursion.
    """
    pieces: list[str] = []
    stack: list[PageElement] = list(reversed(soup.contents))
    while stack:
        node = stack.pop()
        if isinstance(node, Tag):
            if node.name in _INVISIBLE_TAGS or _is_hidden(node):
                continue
            stack.extend(reversed(node.contents))
        elif type(node) in (NavigableString, CData):
            # Comments, doctypes and processing instructions are not shown.
            pieces.append(str(node))
    return _WHITESPACE.sub(" ", " ".join(pieces)).strip()


def _is_hidden(tag: Tag) -> bool:
    return tag.has_attr("hidden") or bool(_HIDDEN_STYLE.search(_attribute(tag, "style") or ""))


def _find_captcha_markers(markup: str, visible_text: str) -> tuple[str, ...]:
    lowered_markup = _fold_apostrophes(markup.lower())
    lowered_text = _fold_apostrophes(visible_text.lower())
    markers = [marker for marker in _CAPTCHA_MARKUP if marker in lowered_markup]
    for phrase in _CAPTCHA_PHRASES:
        if phrase in lowered_text or phrase in lowered_markup:
            markers.append(phrase)
    return tuple(markers)


def _distinct(values: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))[:MAX_VALUES_PER_FACT]


def _fold_apostrophes(text: str) -> str:
    return text.replace("\u2019", "'").replace("\u2018", "'")


def _attribute(tag: Tag, name: str) -> str | None:
    """Return an attribute as one string: bs4 returns multi-valued ones such as `class` as lists."""
    value = tag.get(name)
    if value is None:
        return None
    if isinstance(value, list):
        return " ".join(value)
    return value.strip()
