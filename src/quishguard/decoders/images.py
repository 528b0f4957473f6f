"""Decode one image part and find the QR codes in it (worker-process task "image").

Pillow reads the header first, so the pixel count is checked against
`ScanLimits.max_image_pixels` before any pixel data is decompressed; Pillow's
own `DecompressionBombError` (raised at twice its `MAX_IMAGE_PIXELS`) is
caught as the same limit. Animated images (GIF, APNG, WebP) and multi-page
TIFFs are decoded up to `MAX_FRAMES` frames. Transparent pixels are
composited onto white, as a mail client shows them, and also onto black
when the result on white has little contrast (light colours on
transparency, as shown in dark mode).
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Iterator

from PIL import Image, ImageFile

from ..model import DecodeTask, PartialFacts, QrCode, ScanLimits, ScanProblem
from .qr import decode_qr

log = logging.getLogger(__name__)

# NOTE: a code shown only after the eighth frame of an animation is missed.
# Each later GIF frame would cost a full decode, because frames are deltas.
MAX_FRAMES = 8

# A QR code version 1 has 21 modules per side, so anything smaller (spacer
# GIFs, tracking pixels) cannot hold one and is not searched.
MIN_QR_SIDE = 21

# A transparent image whose gray levels on white span less than this is
# also composited onto black (levels 0-255).
LOW_CONTRAST_RANGE = 128

# Pillow raises these for unreadable, truncated or unsupported data.
PILLOW_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError)


def decode_image(task: DecodeTask, limits: ScanLimits) -> PartialFacts:
    """Decode the image in `task.data` and return its QR codes and any problem."""
    facts = PartialFacts()
    try:
        with _truncated_images_allowed(), Image.open(io.BytesIO(task.data)) as image:
            _decode_frames(image, task, limits, facts)
    except Image.DecompressionBombError as error:
        facts.problems.append(ScanProblem(task.location, "limit", f"image too large to decode: {error}"))
    except PILLOW_ERRORS as error:
        log.info("unreadable image at %s: %s", task.location, type(error).__name__)
        facts.problems.append(
            ScanProblem(task.location, "incomplete", f"could not decode the image: {type(error).__name__}")
        )
    return facts


def first_frame_gray(data: bytes, limits: ScanLimits) -> Image.Image:
    """Open `data` and return its first frame in grayscale, composited on white.

    Raises one of `PILLOW_ERRORS`, or ValueError when the image exceeds `max_image_pixels`.
    """
    with _truncated_images_allowed(), Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        if width * height > limits.max_image_pixels:
            raise ValueError(f"image is {width}x{height} pixels, more than max_image_pixels")
        image.load()
        return _renderings(image)[0]


def _decode_frames(image: Image.Image, task: DecodeTask, limits: ScanLimits, facts: PartialFacts) -> None:
    width, height = image.size
    if width * height > limits.max_image_pixels:
        facts.problems.append(
            ScanProblem(
                task.location,
                "limit",
                f"image is {width}x{height} pixels, more than max_image_pixels={limits.max_image_pixels}; not decoded",
            )
        )
        return

    facts.image_count = 1
    payloads: dict[str, str] = {}
    backend_errors: list[str] = []
    # Half the hard limit, so the cascade stops itself before the pool kills the worker.
    deadline = time.monotonic() + limits.image_seconds / 2
    timed_out = False
    for frame in _frames(image, limits, task, facts.problems):
        if min(frame.size) < MIN_QR_SIDE:
            continue
        if time.monotonic() > deadline:
            timed_out = True
            break
        for variant in _renderings(frame):
            result = decode_qr(variant, deadline)
            timed_out = timed_out or result.timed_out
            backend_errors.extend(result.errors)
            for payload in result.payloads:
                payloads.setdefault(payload, result.backend or "")
            if result.payloads:
                break

    for payload, backend in payloads.items():
        facts.qr_codes.append(QrCode(payload, task.location, task.hidden_as, backend))
    if timed_out and not payloads:
        facts.problems.append(ScanProblem(
            task.location, "incomplete", f"QR decoding stopped after image_seconds/2={limits.image_seconds / 2:g} s"))
    if backend_errors and not payloads:
        facts.problems.append(
            ScanProblem(task.location, "incomplete", "QR backends failed: " + ", ".join(sorted(set(backend_errors))))
        )


def _frames(
    image: Image.Image, limits: ScanLimits, task: DecodeTask, problems: list[ScanProblem]
) -> Iterator[Image.Image]:
    for index in range(MAX_FRAMES):
        try:
            image.seek(index)
        except EOFError:
            return

        # TIFF pages may differ in size from the first one.
        width, height = image.size
        if width * height > limits.max_image_pixels:
            problems.append(
                ScanProblem(
                    f"{task.location} > frame {index + 1}",
                    "limit",
                    f"frame is {width}x{height} pixels, more than max_image_pixels={limits.max_image_pixels}",
                )
            )
            return
        image.load()
        yield image


def _renderings(frame: Image.Image) -> list[Image.Image]:
    """Return grayscale copies of `frame` to search: on white, and on black when that shows more."""
    has_alpha = frame.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in frame.info
    if not has_alpha:
        return [frame.convert("L")]

    rgba = frame.convert("RGBA")
    on_white = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("L")
    low, high = on_white.getextrema()
    if high - low >= LOW_CONTRAST_RANGE:
        return [on_white]

    # Light content on transparency all but vanishes on white; a dark-mode
    # client shows it on black.
    on_black = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("L")
    return [on_white, on_black]


@contextlib.contextmanager
def _truncated_images_allowed() -> Iterator[None]:
    """Decode truncated files as far as they go, as mail clients display them.

    The flag is global to Pillow, so it is restored afterwards; worker
    processes decode one image at a time.
    """
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
