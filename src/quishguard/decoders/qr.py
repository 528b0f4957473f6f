"""Decode QR codes (ISO/IEC 18004) in one grayscale image with a cascade of decoders.

No single open-source decoder reads every QR code that phishing mail
carries (low contrast, tiny modules, noise, inverted colours). So the image
goes through several, cheapest and most reliable first, and the cascade
stops at the first decoder that returns a payload:

1. zxing-cpp on the image as it is;
2. zxing-cpp on a min-max contrast-stretched copy, for washed-out codes;
3. pyzbar (ZBar) on the image and on an inverted copy, for light-on-dark codes;
4. OpenCV's WeChat QR detector (traditional detector, no CNN model files)
   on a copy shrunk to at most `SHRUNK_MAX_SIDE` pixels;
5. OpenCV's `QRCodeDetector` on the same shrunk copy.

Recall measured on 285 generated hard codes (distorted, low-contrast,
noisy): zxing-cpp 87.7 %, pyzbar 80.4 %, QRCodeDetector 72.6 %, WeChat
97.9 %; zxing-cpp, then zxing-cpp stretched, then WeChat shrunk: 98.2 %,
with no false payloads.

This module imports OpenCV and is meant for the worker processes only.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import cv2
import numpy as np
import zxingcpp
from PIL import Image, ImageOps
from pyzbar import pyzbar

log = logging.getLogger(__name__)

# The WeChat detector's cost grows faster than the pixel count, so it gets a
# copy at most this wide or high. On a 3000x2000 photo without a code it took
# 13.5 s at 1600 px, 2.6 s at 1200 px and 0.8 s at 1000 px (2-CPU VM,
# opencv-contrib 5.1). The adversarial benchmark kept 100 % recall at 1000 px
# (docs/qr-benchmark.md). The worker pool's per-part kill
# (`ScanLimits.image_seconds`) still bounds a slower image.
SHRUNK_MAX_SIDE = 1000

_QR_FORMATS = (
    zxingcpp.BarcodeFormat.QRCode,
    zxingcpp.BarcodeFormat.MicroQRCode,
    zxingcpp.BarcodeFormat.RMQRCode,
)
_WHITESPACE_CONTROL = re.compile(r"[\t\n\v\f\r]+")
_OTHER_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")

# OpenCV reports its failures as cv2.error; the others raise the builtins.
_BACKEND_ERRORS = (cv2.error, ValueError, RuntimeError, TypeError, OSError)


@dataclass
class QrResult:
    """Distinct payloads found in one image, the backend that found them, and backend failures."""

    payloads: list[str] = field(default_factory=list)
    backend: str | None = None
    errors: list[str] = field(default_factory=list)
    timed_out: bool = False


# Backends for PDF page renders. A render of vector content is crisp, so the
# fast readers suffice. `wechat` is left out because it cost about 0.35 s of
# the 0.45 s an empty A4 page took at 150 dpi (pymupdf 1.28, opencv-contrib
# 5.1, one core). Raster images in a PDF are decoded separately with the
# full cascade.
RENDER_BACKENDS = ("zxing", "zxing-stretched", "pyzbar", "opencv")


def decode_qr(image: Image.Image, deadline: float | None = None,
              backends: tuple[str, ...] | None = None) -> QrResult:
    """Run the cascade on `image` and return the payloads of the first backend that finds any.

    No further backend starts after `deadline` (time.monotonic()); the
    result then says so in `timed_out`. A backend already running is not
    interrupted: the worker pool enforces the hard limit from outside.
    `backends` limits the cascade to the named backends, in cascade order.
    """
    gray = image if image.mode == "L" else image.convert("L")
    shrunk: list[np.ndarray] = []

    def shrunk_copy() -> np.ndarray:
        if not shrunk:
            shrunk.append(np.asarray(_shrink(gray, SHRUNK_MAX_SIDE)))
        return shrunk[0]

    cascade: tuple[tuple[str, Callable[[], list[str | bytes]]], ...] = (
        ("zxing", lambda: _read_zxing(gray)),
        ("zxing-stretched", lambda: _read_zxing_stretched(gray)),
        ("pyzbar", lambda: _read_pyzbar(gray)),
        ("wechat", lambda: _read_wechat(shrunk_copy())),
        ("opencv", lambda: _read_opencv(shrunk_copy())),
    )

    if backends is not None:
        cascade = tuple((name, backend) for name, backend in cascade if name in backends)

    result = QrResult()
    for name, backend in cascade:
        if deadline is not None and time.monotonic() > deadline:
            result.timed_out = True
            return result
        try:
            raw_payloads = backend()
        except _BACKEND_ERRORS as error:
            log.warning("QR backend %s failed with %s", name, type(error).__name__)
            result.errors.append(f"{name}: {type(error).__name__}")
            continue

        payloads = _distinct(clean_payload(payload) for payload in raw_payloads)
        if payloads:
            result.payloads = payloads
            result.backend = name
            return result
    return result


def clean_payload(payload: str | bytes) -> str:
    """Turn a raw payload into text: UTF-8 with replacement, control characters removed.

    Line breaks and tabs become one space, so multi-line payloads (vCards,
    Wi-Fi configs) keep their word boundaries.
    """
    text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
    text = _WHITESPACE_CONTROL.sub(" ", text)
    return _OTHER_CONTROL.sub("", text).strip()


def _distinct(payloads: object) -> list[str]:
    seen: list[str] = []
    for payload in payloads:  # type: ignore[attr-defined]
        if payload and payload not in seen:
            seen.append(payload)
    return seen


def _read_zxing(gray: Image.Image) -> list[str | bytes]:
    return [barcode.bytes for barcode in zxingcpp.read_barcodes(gray, formats=_QR_FORMATS) if barcode.valid]


def _read_zxing_stretched(gray: Image.Image) -> list[str | bytes]:
    low, high = gray.getextrema()
    if (low, high) == (0, 255) or low == high:
        # A stretch would leave the image unchanged (or it is blank).
        return []
    return _read_zxing(ImageOps.autocontrast(gray))


def _read_pyzbar(gray: Image.Image) -> list[str | bytes]:
    symbols = [pyzbar.ZBarSymbol.QRCODE]
    found = [symbol.data for symbol in pyzbar.decode(gray, symbols=symbols)]
    if found:
        return found
    # ZBar only reads dark modules on a light background.
    return [symbol.data for symbol in pyzbar.decode(ImageOps.invert(gray), symbols=symbols)]


def _read_wechat(array: np.ndarray) -> list[str | bytes]:
    texts, _points = _wechat_detector().detectAndDecode(array)
    return list(texts)


def _read_opencv(array: np.ndarray) -> list[str | bytes]:
    found, texts, _points, _straight = cv2.QRCodeDetector().detectAndDecodeMulti(array)
    if not found:
        return []
    return list(texts)


_wechat: list[cv2.wechat_qrcode_WeChatQRCode] = []


def _wechat_detector() -> cv2.wechat_qrcode_WeChatQRCode:
    # Built once per worker process: construction allocates the detector's buffers.
    if not _wechat:
        _wechat.append(cv2.wechat_qrcode_WeChatQRCode())
    return _wechat[0]


def _shrink(gray: Image.Image, max_side: int) -> Image.Image:
    width, height = gray.size
    if max(width, height) <= max_side:
        return gray
    scale = max_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return gray.resize(size, Image.Resampling.LANCZOS)
