"""The per-part time limit: a part that overruns `image_seconds` is killed from outside the worker,
reported, and the message's later parts are still decoded."""

from __future__ import annotations

import io
import time

import numpy as np
from decoder_inputs import QR_URL, leaf, message, multipart, qr_png
from PIL import Image

from quishguard.model import ScanLimits
from quishguard.workers import WorkerPool


def noisy_photo() -> bytes:
    # OpenCV's WeChat detector spends seconds on per-pixel noise and cannot be interrupted.
    pixels = np.random.default_rng(7).normal(128, 40, (1067, 1600)).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").save(buffer, "PNG")
    return buffer.getvalue()


async def test_part_limit_kills_and_continues():
    raw = message(multipart(
        "mixed",
        leaf("text/plain", "two attachments"),
        leaf("image/png", noisy_photo(), filename="photo.png"),
        leaf("image/png", qr_png(), filename="qr.png"),
    ))
    # Half the limit (the cascade's own stop) covers ZBar and zxing-cpp on
    # this image, so the worker is inside the WeChat detector when killed.
    limits = ScanLimits(image_seconds=2.0)
    pool = WorkerPool(1)
    await pool.start()
    try:
        started = time.monotonic()
        job = await pool.scan(raw, limits, time.monotonic() + 60)
        elapsed = time.monotonic() - started
    finally:
        await pool.close()

    reasons = {problem.location: problem.reason for problem in job.problems}
    photo = next(location for location in reasons if "photo.png" in location)
    assert "image_seconds=2.0" in reasons[photo]
    assert [code.payload for code in job.facts.qr_codes] == [QR_URL]
    assert job.complete is False
    assert pool.restarts == 1
    assert elapsed < 30
