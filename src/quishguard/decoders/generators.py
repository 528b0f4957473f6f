"""Read the payload of a QR code that a mail loads from a QR-generator service, without fetching it.

Lures avoid attaching a code at all: the HTML shows
`<img src="https://api.qrserver.com/v1/create-qr-code/?data=https://phish.example/">`,
and the recipient's mail client asks the service to draw it. The payload is
in the image URL's query, so it is read from there. Nothing is fetched.

Each generator is written `host/path-prefix?parameter`, for example
`api.qrserver.com/v1/create-qr-code?data`. The host matches exactly (a
leading `www.` is ignored), the path by prefix and case-insensitively,
and the named query parameter (RFC 3986 query, form-decoded) is the payload.
Further `&key=value` pairs must be present too, as `cht=qr` for chart
services that draw other charts from the same parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

# The default for `[scan] qr_generators`: public services whose image URL
# carries the QR payload in one query parameter.
DEFAULT_QR_GENERATORS: tuple[str, ...] = (
    "api.qrserver.com/v1/create-qr-code?data",
    "chart.googleapis.com/chart?chl&cht=qr",
    "image-charts.com/chart?chl&cht=qr",
    "quickchart.io/qr?text",
    "qrcode.tec-it.com/api/qrcode?data",
)

MAX_PAYLOAD_CHARS = 4296  # max characters in one QR code (version 40, alphanumeric mode)


@dataclass(frozen=True)
class Generator:
    """One `host/path-prefix?parameter` entry of `[scan] qr_generators`."""

    host: str
    path_prefix: str
    parameter: str
    required: tuple[tuple[str, str], ...] = ()


def parse_generator(entry: str) -> Generator:
    """Split a `host/path-prefix?parameter` entry; raise ValueError naming the entry when malformed."""
    location, _, query = entry.strip().partition("?")
    host, _, path = location.partition("/")
    parameter, *pairs = query.split("&")
    required = tuple(pair.partition("=")[::2] for pair in pairs)
    if not host or not parameter or any(not key or not value for key, value in required):
        raise ValueError(f"QR generator {entry!r} must look like host/path?parameter[&key=value], "
                         "for example api.qrserver.com/v1/create-qr-code?data")
    return Generator(host.lower().removeprefix("www."), "/" + path.lower(), parameter, required)


def generator_payload(url: str, entries: tuple[str, ...]) -> str | None:
    """Return the QR payload a generator image URL carries, or None when `url` is no generator call."""
    try:
        parts = urlsplit(url.strip())
        host = (parts.hostname or "").rstrip(".").lower().removeprefix("www.")
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https", ""):
        return None

    path = (parts.path or "/").lower()
    for entry in entries:
        try:
            generator = parse_generator(entry)
        except ValueError:
            continue
        if host != generator.host or not path.startswith(generator.path_prefix):
            continue
        query = parse_qsl(parts.query, keep_blank_values=False)
        if any((key, value) not in query for key, value in generator.required):
            continue
        for key, value in query:
            if key == generator.parameter and value.strip():
                return value.strip()[:MAX_PAYLOAD_CHARS]
    return None
