from __future__ import annotations

import io
import struct
import zlib

import cv2
import pytest
from decoder_inputs import QR_URL, encode_image, qr_image, qr_png
from PIL import Image, ImageOps

from quishguard.decoders import TASKS, qr
from quishguard.decoders.images import decode_image
from quishguard.decoders.qr import clean_payload, decode_qr
from quishguard.model import DecodeTask, ScanLimits

LIMITS = ScanLimits()
LOCATION = 'message > part 2 (image/png, "qr.png")'


def task_for(data: bytes, hidden_as: str = "attachment") -> DecodeTask:
    return DecodeTask("image", data, LOCATION, hidden_as, "qr.png")


def test_images_registry_decodes_png():
    facts = TASKS["image"](task_for(qr_png()), LIMITS)

    assert [(code.payload, code.backend) for code in facts.qr_codes] == [(QR_URL, "zxing")]
    assert facts.qr_codes[0].location == LOCATION
    assert facts.qr_codes[0].hidden_as == "attachment"
    assert facts.image_count == 1
    assert facts.problems == []


@pytest.mark.parametrize(
    ("image_format", "mode", "options"),
    [
        ("JPEG", "L", {"quality": 80}),
        ("GIF", "P", {}),
        ("BMP", "RGB", {}),
        ("WEBP", "RGB", {"quality": 90}),
        ("TIFF", "L", {}),
        ("ICO", "RGBA", {"sizes": [(256, 256)]}),
    ],
)
def test_images_formats_decoded(image_format, mode, options):
    image = qr_image(scale=6).resize((256, 256), Image.Resampling.NEAREST).convert(mode)
    facts = decode_image(task_for(encode_image(image, image_format, **options)), LIMITS)

    assert [code.payload for code in facts.qr_codes] == [QR_URL]


def test_images_animated_gif_later_frame():
    blank = Image.new("L", qr_image().size, 255)
    frames = [blank, blank.copy(), qr_image()]
    data = encode_image(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    facts = decode_image(task_for(data), LIMITS)

    assert [code.payload for code in facts.qr_codes] == [QR_URL]
    assert facts.image_count == 1


def test_images_animated_gif_frames_bounded():
    blank = Image.new("L", qr_image().size, 255)
    frames = [blank] + [Image.new("L", blank.size, value) for value in range(1, 12)] + [qr_image()]
    data = encode_image(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    facts = decode_image(task_for(data), LIMITS)

    assert facts.qr_codes == []


def test_images_multipage_tiff_second_page():
    blank = Image.new("L", qr_image().size, 255)
    data = encode_image(blank, "TIFF", save_all=True, append_images=[qr_image()])
    facts = decode_image(task_for(data), LIMITS)

    assert [code.payload for code in facts.qr_codes] == [QR_URL]


def test_images_transparent_background_black_pixels():
    gray = qr_image()
    # Dark modules opaque, light modules fully transparent with black colour
    # values, as some generators write them: flattening alpha alone would
    # turn the whole image black.
    rgba = Image.new("RGBA", gray.size, (0, 0, 0, 0))
    rgba.putalpha(ImageOps.invert(gray))
    facts = decode_image(task_for(encode_image(rgba, "PNG")), LIMITS)

    assert [code.payload for code in facts.qr_codes] == [QR_URL]


def test_images_light_code_on_transparency():
    gray = qr_image()
    # White modules where the code is light, transparent elsewhere: only
    # readable against a dark background.
    rgba = Image.new("RGBA", gray.size, (255, 255, 255, 0))
    rgba.putalpha(ImageOps.invert(gray))
    facts = decode_image(task_for(encode_image(rgba, "PNG")), LIMITS)

    assert [code.payload for code in facts.qr_codes] == [QR_URL]


def test_images_inverted_code_decoded():
    facts = decode_image(task_for(encode_image(ImageOps.invert(qr_image()), "PNG")), LIMITS)

    assert [code.payload for code in facts.qr_codes] == [QR_URL]


def test_images_two_codes_both_kept():
    first, second = qr_image("https://one.example.com/"), qr_image("https://two.example.com/")
    canvas = Image.new("L", (first.width + second.width + 40, max(first.height, second.height)), 255)
    canvas.paste(first, (0, 0))
    canvas.paste(second, (first.width + 40, 0))
    facts = decode_image(task_for(encode_image(canvas, "PNG")), LIMITS)

    assert sorted(code.payload for code in facts.qr_codes) == ["https://one.example.com/", "https://two.example.com/"]


def test_images_no_code_no_payload():
    facts = decode_image(task_for(encode_image(Image.new("RGB", (300, 200), (200, 30, 30)), "PNG")), LIMITS)

    assert facts.qr_codes == []
    assert facts.problems == []
    assert facts.image_count == 1


def test_images_pixel_limit_before_decoding():
    facts = decode_image(task_for(qr_png()), ScanLimits(max_image_pixels=100 * 100))

    assert facts.qr_codes == []
    assert facts.image_count == 0
    assert [problem.kind for problem in facts.problems] == ["limit"]
    assert "max_image_pixels=10000" in facts.problems[0].reason


def png_header_only(width: int, height: int) -> bytes:
    """Return a PNG whose header claims `width` x `height` but whose data is one empty row."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def test_images_decompression_bomb_limit():
    # 100000 x 100000 pixels is past Pillow's own bomb threshold, so
    # Image.open raises DecompressionBombError before our pixel check.
    facts = decode_image(task_for(png_header_only(100_000, 100_000)), ScanLimits(max_image_pixels=10**12))

    assert [problem.kind for problem in facts.problems] == ["limit"]
    assert facts.image_count == 0


def test_images_truncated_png_no_crash():
    data = qr_png()
    facts = decode_image(task_for(data[: len(data) // 2]), LIMITS)

    assert facts.qr_codes == []
    assert all(problem.kind == "incomplete" for problem in facts.problems)


@pytest.mark.parametrize("data", [b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"\xff\xd8\xff" + b"garbage" * 10, b""])
def test_images_garbage_is_incomplete(data):
    facts = decode_image(task_for(data), LIMITS)

    assert [problem.kind for problem in facts.problems] == ["incomplete"]
    assert facts.problems[0].location == LOCATION
    assert facts.qr_codes == []


def test_images_tiny_image_skipped(monkeypatch):
    calls = []
    monkeypatch.setattr("quishguard.decoders.images.decode_qr", lambda image: calls.append(image))
    facts = decode_image(task_for(encode_image(Image.new("L", (1, 1), 0), "GIF")), LIMITS)

    assert calls == []
    assert facts.image_count == 1


def test_qr_cascade_falls_back_in_order(monkeypatch):
    monkeypatch.setattr(qr, "_read_zxing", lambda gray: [])
    result = decode_qr(qr_image())

    assert result.payloads == [QR_URL]
    assert result.backend == "pyzbar"


def test_qr_cascade_reaches_wechat(monkeypatch):
    monkeypatch.setattr(qr, "_read_zxing", lambda gray: [])
    monkeypatch.setattr(qr, "_read_pyzbar", lambda gray: [])
    result = decode_qr(qr_image())

    assert result.backend == "wechat"
    assert result.payloads == [QR_URL]


def test_qr_cascade_reaches_opencv(monkeypatch):
    for name in ("_read_zxing", "_read_pyzbar", "_read_wechat"):
        monkeypatch.setattr(qr, name, lambda gray: [])
    result = decode_qr(qr_image())

    assert result.backend == "opencv"
    assert result.payloads == [QR_URL]


def test_qr_low_contrast_needs_stretch():
    faint = qr_image().point(lambda value: 120 if value < 128 else 136)
    result = decode_qr(faint)

    assert result.payloads == [QR_URL]
    assert result.backend == "zxing-stretched"


def test_qr_backend_error_reported(monkeypatch):
    def broken(array):
        raise cv2.error("broken")

    for name in ("_read_zxing", "_read_pyzbar", "_read_opencv"):
        monkeypatch.setattr(qr, name, lambda gray: [])
    monkeypatch.setattr(qr, "_read_wechat", broken)
    facts = decode_image(task_for(qr_png()), LIMITS)

    assert facts.qr_codes == []
    assert [problem.kind for problem in facts.problems] == ["incomplete"]
    assert "wechat: error" in facts.problems[0].reason


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"https://example.com/a", "https://example.com/a"),
        (b"BEGIN:VCARD\r\nURL:https://example.com\r\nEND:VCARD", "BEGIN:VCARD URL:https://example.com END:VCARD"),
        (b"https://exa\x00mple.com/\x1b[31m", "https://example.com/[31m"),
        (b"caf\xc3\xa9 \xff", "café \ufffd"),
        ("  text\t", "text"),
    ],
)
def test_qr_clean_payload_cases(raw, expected):
    assert clean_payload(raw) == expected


def test_images_qr_payload_decoded_from_bytes_io():
    # The registry entry must accept the bytes exactly as the structure stage queues them.
    data = io.BytesIO(qr_png()).getvalue()
    facts = TASKS["image"](task_for(data, "inline-image"), LIMITS)

    assert facts.qr_codes[0].hidden_as == "inline-image"
