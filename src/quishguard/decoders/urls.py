"""Find URLs in plain text (message bodies, PDF text, QR payloads).

This is a scanner for evidence, not a validator. It takes `http://`,
`https://` and `ftp://` URLs and bare `www.` host names as written. It trims
punctuation that usually ends a sentence rather than a URL, the ambiguity
for which RFC 3986, appendix C, recommends delimiting URLs in text.
"""

from __future__ import annotations

import re

# Stop at whitespace, quotes, angle brackets and control characters: RFC 3986
# excludes all of them from URLs, and plain-text mail uses <...> to delimit URLs.
_URL = re.compile(r"""(?:\b(?:https?|ftp)://|\bwww\.)[^\s<>"'`\x00-\x1f\x7f]+""", re.IGNORECASE)
_TRAILING = ".,;:!?'\"*"

MAX_URL_CHARS = 2048


def find_urls(text: str, limit: int | None = None) -> list[str]:
    """Return the distinct URLs in `text` in order of first appearance, at most `limit`."""
    found: list[str] = []
    seen: set[str] = set()
    for match in _URL.finditer(text):
        url = _trim(match.group(0))[:MAX_URL_CHARS]
        if url in seen or url.lower() in ("http://", "https://", "ftp://", "www."):
            continue
        seen.add(url)
        found.append(url)
        if limit is not None and len(found) >= limit:
            break
    return found


def _trim(url: str) -> str:
    # Drop closing brackets only when unbalanced, so that
    # https://example.com/wiki/Foo_(bar) keeps its own ")".
    while url:
        last = url[-1]
        if last in _TRAILING:
            url = url[:-1]
            continue
        pairs = {")": "(", "]": "[", "}": "{"}
        if last in pairs and url.count(last) > url.count(pairs[last]):
            url = url[:-1]
            continue
        break
    return url
