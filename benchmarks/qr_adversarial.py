"""Generate an adversarial QR image and message set and measure quishguard's decoders on it.

Each case is built in memory from a fixed random seed, so runs are
repeatable and nothing is written or fetched. Image cases run through
`decoders.images.decode_image`; message cases (PDF, table, div grid, Unicode,
SVG, split, archive, Office, generator URL, nested message) run through the
structure stage and every worker task, in this process. Look-alikes
(checkerboards, fake finder patterns, noise, bar charts) must yield no payload.

Prints recall per category, false payloads (a payload that is not the
case's own, or any payload from a look-alike), and the median, p95 and max
milliseconds per image (images with a code) and per message.

Usage, from the repository root:

    .venv/bin/python benchmarks/qr_adversarial.py            # 10 cases per image category
    .venv/bin/python benchmarks/qr_adversarial.py --per-category 25 --seed 7
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import platform
import random
import statistics
import sys
import time
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pymupdf
import segno
from PIL import Image, ImageDraw, ImageFilter, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from quishguard.decoders import TASKS  # noqa: E402
from quishguard.decoders.generators import DEFAULT_QR_GENERATORS  # noqa: E402
from quishguard.decoders.images import decode_image  # noqa: E402
from quishguard.decoders.structure import analyse_structure  # noqa: E402
from quishguard.model import DecodeTask, ScanLimits  # noqa: E402

LIMITS = ScanLimits(qr_generators=DEFAULT_QR_GENERATORS)
HARD_LIMIT_SECONDS = LIMITS.image_seconds
# The other payload of a "two-codes" image; finding it is no false payload.
SECOND_CODE = "https://second.example.test/"


@dataclass
class Case:
    category: str
    payload: str | None
    image: bytes | None = None
    message: bytes | None = None


def payload_for(rng: random.Random) -> str:
    token = "".join(rng.choice("abcdefghijkmnpqrstuvwxyz0123456789") for _ in range(rng.randint(6, 40)))
    return f"https://{rng.choice(['login', 'secure', 'verify'])}.example-{rng.randint(1, 999)}.test/{token}"


def qr_gray(payload: str, scale: int, dark: int = 0, light: int = 255, border: int = 4) -> Image.Image:
    buffer = io.BytesIO()
    segno.make(payload, micro=False, error="h").save(buffer, kind="png", scale=scale, border=border)
    image = Image.open(buffer).convert("L")
    return image.point(lambda value: dark if value < 128 else light)


def png(image: Image.Image, image_format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def photo_background(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """Draw a smooth gradient with texture, standing in for a photograph."""
    width, height = size
    x = np.linspace(0, 1, width)[None, :]
    y = np.linspace(0, 1, height)[:, None]
    base = 90 + 80 * x + 60 * y + rng.uniform(-20, 20)
    noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, 12, (height, width))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "L")


# Image categories: each builder returns (image bytes) for one payload.
def build_clean(rng, payload):
    return png(qr_gray(payload, rng.randint(4, 10)))


def build_tiny(rng, payload):
    return png(qr_gray(payload, 2))


def build_photo(rng, payload):
    canvas = photo_background(rng, (3000, 2000))
    code = qr_gray(payload, rng.randint(4, 6))
    canvas.paste(code, (rng.randint(0, 3000 - code.width), rng.randint(0, 2000 - code.height)))
    return png(canvas, "JPEG", quality=85)


def build_scan300(rng, payload):
    page = Image.new("L", (2550, 3300), 250)
    draw = ImageDraw.Draw(page)
    for line in range(40):
        draw.rectangle((200, 300 + line * 60, 200 + rng.randint(800, 2100), 320 + line * 60), fill=rng.randint(40, 90))
    code = qr_gray(payload, 12)
    page.paste(code, (rng.randint(200, 1800), rng.randint(1500, 2600)))
    page = page.rotate(rng.uniform(-1.5, 1.5), fillcolor=250).filter(ImageFilter.GaussianBlur(0.8))
    return png(page, "JPEG", quality=75)


def build_rotation(rng, payload):
    return png(qr_gray(payload, 6).rotate(rng.uniform(10, 80), expand=True, fillcolor=255))


def build_perspective(rng, payload):
    """A code photographed at an angle: the corners of the padded image move inward by up to 15 %."""
    import cv2

    code = qr_gray(payload, 6)
    image = np.asarray(ImageOps.expand(code, border=code.width // 4, fill=255))
    height, width = image.shape
    source = np.float32([[0, 0], [width, 0], [width, height], [0, height]])
    inset = [rng.uniform(0, 0.15) for _ in range(4)]
    target = np.float32([[inset[0] * width, inset[0] * height / 2], [width - inset[1] * width, inset[1] * height / 3],
                         [width - inset[2] * width / 2, height - inset[2] * height], [inset[3] * width / 3, height]])
    matrix = cv2.getPerspectiveTransform(source, target)
    warped = cv2.warpPerspective(image, matrix, (width, height), borderValue=255, flags=cv2.INTER_LINEAR)
    return png(Image.fromarray(warped, "L"))


def build_blur(rng, payload):
    return png(qr_gray(payload, 8).filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 2.0))))


def build_jpeg30(rng, payload):
    return png(qr_gray(payload, rng.randint(3, 6)), "JPEG", quality=30)


def build_low_contrast(rng, payload):
    dark = rng.randint(150, 185)
    return png(qr_gray(payload, 6, dark=dark, light=dark + rng.randint(25, 40)))


def build_inverted(rng, payload):
    image = qr_gray(payload, 6)
    if rng.random() < 0.5:
        return png(ImageOps.invert(image))
    # Light code on a brand colour.
    colour = (rng.randint(0, 90), rng.randint(0, 60), rng.randint(90, 180))
    rgb = Image.new("RGB", image.size, colour)
    rgb.paste((240, 240, 240), mask=image.point(lambda value: 255 if value < 128 else 0))
    return png(rgb)


def build_noise(rng, payload):
    image = np.asarray(qr_gray(payload, 6), dtype=np.float32)
    noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, rng.uniform(30, 50), image.shape)
    return png(Image.fromarray(np.clip(image + noise, 0, 255).astype(np.uint8), "L"))


def build_logo(rng, payload):
    image = qr_gray(payload, 8).convert("RGB")
    side = image.width // 5
    left = (image.width - side) // 2
    ImageDraw.Draw(image).rounded_rectangle((left, left, left + side, left + side), radius=8, fill=(200, 30, 30))
    return png(image)


def build_two_codes(rng, payload):
    first, second = qr_gray(payload, 6), qr_gray(SECOND_CODE + str(rng.randint(1, 999)), 6)
    canvas = Image.new("L", (first.width + second.width + 40, max(first.height, second.height)), 255)
    canvas.paste(first, (0, 0))
    canvas.paste(second, (first.width + 40, 0))
    return png(canvas)


IMAGE_BUILDERS: dict[str, Callable[[random.Random, str], bytes]] = {
    "clean": build_clean, "tiny-2px": build_tiny, "photo-3000x2000": build_photo, "scan-300dpi": build_scan300,
    "rotation": build_rotation, "perspective": build_perspective, "blur": build_blur, "jpeg-q30": build_jpeg30,
    "low-contrast": build_low_contrast, "inverted-brand": build_inverted, "noise": build_noise,
    "logo": build_logo, "two-codes": build_two_codes,
}


# Look-alikes: images with no QR code.
def lookalike_checkerboard(rng):
    cell = rng.randint(3, 12)
    board = (np.indices((600 // cell, 600 // cell)).sum(axis=0) % 2 * 255).astype(np.uint8)
    return png(Image.fromarray(board, "L").resize((600, 600), Image.Resampling.NEAREST))


def lookalike_finders(rng):
    image = Image.new("L", (400, 400), 255)
    draw = ImageDraw.Draw(image)
    for left, top in ((20, 20), (300, 20), (20, 300)):
        draw.rectangle((left, top, left + 69, top + 69), fill=0)
        draw.rectangle((left + 10, top + 10, left + 59, top + 59), fill=255)
        draw.rectangle((left + 20, top + 20, left + 49, top + 49), fill=0)
    noise = np.random.default_rng(rng.randint(0, 2**31)).random((20, 20)) > 0.5
    image.paste(Image.fromarray((noise * 255).astype(np.uint8), "L").resize((200, 200), Image.Resampling.NEAREST),
                (110, 110))
    return png(image)


def lookalike_noise(rng):
    data = (np.random.default_rng(rng.randint(0, 2**31)).random((37, 37)) > 0.5) * 255
    return png(Image.fromarray(data.astype(np.uint8), "L").resize((370, 370), Image.Resampling.NEAREST))


def lookalike_photo(rng):
    return png(photo_background(rng, (3000, 2000)), "JPEG", quality=85)


LOOKALIKES = {"no-qr-checkerboard": lookalike_checkerboard, "no-qr-fake-finders": lookalike_finders,
              "no-qr-random-modules": lookalike_noise, "no-qr-photo-3000x2000": lookalike_photo}


# Message categories.
def mime(html: str | None = None, attachments: tuple[tuple[str, str, bytes], ...] = (), text: str = "Hello") -> bytes:
    boundary = "b-bench"
    parts = [f"Content-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n"]
    if html is not None:
        body = base64.encodebytes(html.encode("utf-8")).decode("ascii")
        parts.append(f"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n{body}")
    for content_type, name, data in attachments:
        body = base64.encodebytes(data).decode("ascii")
        parts.append(f'Content-Type: {content_type}; name="{name}"\r\nContent-Disposition: attachment; '
                     f'filename="{name}"\r\nContent-Transfer-Encoding: base64\r\n\r\n{body}')
    joined = "".join(f"--{boundary}\r\n{part}\r\n" for part in parts)
    return ("From: a@example.test\r\nTo: b@example.test\r\nSubject: bench\r\nMIME-Version: 1.0\r\n"
            f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n{joined}--{boundary}--\r\n').encode("utf-8")


def modules(payload: str) -> list[list[bool]]:
    return [[bool(dark) for dark in row] for row in segno.make(payload, micro=False).matrix]


def message_pdf(rng, payload):
    document = pymupdf.open()
    page = document.new_page()
    page.insert_text((72, 72), "Scan to confirm your mailbox")
    if rng.random() < 0.5:
        page.insert_image(pymupdf.Rect(72, 100, 72 + rng.randint(90, 200), 100 + 200), stream=png(qr_gray(payload, 6)),
                          keep_proportion=True)
    else:
        size = rng.uniform(2.5, 5.0)
        for y, row in enumerate(modules(payload)):
            for x, dark in enumerate(row):
                if dark:
                    page.draw_rect(pymupdf.Rect(100 + x * size, 120 + y * size, 100 + (x + 1) * size,
                                                120 + (y + 1) * size), color=None, fill=(0, 0, 0), width=0)
    return mime(attachments=(("application/pdf", "invoice.pdf", document.tobytes()),))


def message_table(rng, payload):
    rows = "".join("<tr>" + "".join(f'<td bgcolor="{"#1a1a1a" if dark else "#fefefe"}" width="4" height="4"></td>'
                                    for dark in row) + "</tr>" for row in modules(payload))
    return mime(f'<table cellspacing="0" cellpadding="0">{rows}</table>')


def message_div_grid(rng, payload):
    grid = modules(payload)
    boxes = "".join(f'<div style="width:4px;height:4px;background:{"#000" if dark else "#fff"}"></div>'
                    for row in grid for dark in row)
    return mime(f'<div style="display:grid;grid-template-columns:repeat({len(grid)},4px)">{boxes}</div>')


def message_unicode(rng, payload):
    buffer = io.StringIO()
    segno.make(payload, micro=False).terminal(out=buffer, compact=True)
    if rng.random() < 0.5:
        return mime(f"<pre>{buffer.getvalue()}</pre>")
    return mime(text=f"Scan:\n{buffer.getvalue()}")


def message_svg(rng, payload):
    buffer = io.BytesIO()
    segno.make(payload, micro=False).save(buffer, kind="svg", scale=rng.randint(1, 5))
    svg = buffer.getvalue()
    if rng.random() < 0.5:
        return mime(attachments=(("image/svg+xml", "fax.svg", svg),))
    return mime("<p>Scan</p>" + svg.decode("utf-8").split("?>", 1)[1])


def message_split(rng, payload):
    image = qr_gray(payload, 6)
    columns, rows = rng.choice(((2, 1), (1, 2), (2, 2), (3, 3)))
    cells = []
    for row in range(rows):
        line = []
        for column in range(columns):
            box = (column * image.width // columns, row * image.height // rows,
                   (column + 1) * image.width // columns, (row + 1) * image.height // rows)
            uri = "data:image/png;base64," + base64.b64encode(png(image.crop(box))).decode("ascii")
            line.append(f'<td><img src="{uri}"></td>')
        cells.append("<tr>" + "".join(line) + "</tr>")
    return mime(f'<table cellspacing="0" cellpadding="0">{"".join(cells)}</table>')


def message_archive(rng, payload):
    buffer = io.BytesIO()
    office = rng.random() < 0.5
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("word/media/image1.png" if office else "scan/qr.png", png(qr_gray(payload, 6)))
    name = "invoice.docx" if office else "scan.zip"
    return mime(attachments=(("application/octet-stream", name, buffer.getvalue()),))


def message_generator(rng, payload):
    from urllib.parse import quote

    return mime(f'<img src="https://api.qrserver.com/v1/create-qr-code/?size=200x200&data={quote(payload, safe="")}">')


def message_nested(rng, payload):
    inner = mime(attachments=(("image/png", "qr.png", png(qr_gray(payload, 6))),))
    return ("From: a@example.test\r\nTo: b@example.test\r\nSubject: Fwd\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/mixed; boundary="outer"\r\n\r\n--outer\r\nContent-Type: text/plain\r\n\r\nfwd\r\n'
            "--outer\r\nContent-Type: message/rfc822\r\n\r\n").encode() + inner + b"\r\n--outer--\r\n"


def message_lookalike(rng, payload):
    board = "".join("<tr>" + "".join(f'<td bgcolor="{"#000" if (x + y) % 2 else "#fff"}"></td>' for x in range(29))
                    + "</tr>" for y in range(29))
    bars = "\n".join("\u2588" * rng.randint(1, 30) for _ in range(25))
    return mime(f"<table>{board}</table><pre>{bars}</pre>")


MESSAGE_BUILDERS = {
    "pdf": message_pdf, "html-table": message_table, "div-grid": message_div_grid, "unicode": message_unicode,
    "svg": message_svg, "split": message_split, "archive-office": message_archive,
    "generator-url": message_generator, "nested-message": message_nested,
}


def build_cases(seed: int, per_category: int) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for category, builder in IMAGE_BUILDERS.items():
        for _ in range(per_category):
            payload = payload_for(rng)
            cases.append(Case(category, payload, image=builder(rng, payload)))
    for category, lookalike in LOOKALIKES.items():
        for _ in range(per_category):
            cases.append(Case(category, None, image=lookalike(rng)))
    for category, message_builder in MESSAGE_BUILDERS.items():
        for _ in range(max(3, per_category // 2)):
            payload = payload_for(rng)
            cases.append(Case(category, payload, message=message_builder(rng, payload)))
    for _ in range(max(3, per_category // 2)):
        cases.append(Case("no-qr-message", None, message=message_lookalike(rng, "")))
    return cases


def run_case(case: Case) -> tuple[list[str], float, float]:
    """Return the payloads found, the total seconds and the slowest single task's seconds."""
    started = time.perf_counter()
    if case.image is not None:
        facts = decode_image(DecodeTask("image", case.image, "bench", "attachment"), LIMITS)
        elapsed = time.perf_counter() - started
        return [code.payload for code in facts.qr_codes], elapsed, elapsed

    facts, tasks = analyse_structure(case.message or b"", LIMITS)
    payloads = [code.payload for code in facts.qr_codes]
    slowest = 0.0
    for task in tasks:
        task_started = time.perf_counter()
        payloads.extend(code.payload for code in TASKS[task.kind](task, LIMITS).qr_codes)
        slowest = max(slowest, time.perf_counter() - task_started)
    return payloads, time.perf_counter() - started, slowest


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-category", type=int, default=10, help="cases per image category (default 10)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    arguments = parser.parse_args()

    cases = build_cases(arguments.seed, arguments.per_category)
    found_per_category: dict[str, list[bool]] = defaultdict(list)
    false_payloads: list[tuple[str, str]] = []
    image_ms: list[float] = []
    message_ms: list[float] = []
    over_limit: list[str] = []
    TASKS["image"](DecodeTask("image", build_clean(random.Random(0), "warm-up"), "warm", "attachment"), LIMITS)

    for case in cases:
        payloads, seconds, slowest = run_case(case)
        if slowest > HARD_LIMIT_SECONDS:
            over_limit.append(f"{case.category} {slowest:.1f} s")
        if case.image is not None and case.payload is not None:
            image_ms.append(seconds * 1000)
        elif case.message is not None:
            message_ms.append(seconds * 1000)
        wrong = [payload for payload in payloads if payload != case.payload]
        if case.category == "two-codes":
            wrong = [payload for payload in wrong if not payload.startswith(SECOND_CODE)]
        false_payloads.extend((case.category, payload) for payload in wrong)
        if case.payload is not None:
            found_per_category[case.category].append(case.payload in payloads)

    print(f"machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, Python "
          f"{platform.python_version()}; seed {arguments.seed}, {len(cases)} cases")
    print(f"{'category':24} {'found':>9} {'recall':>8}")
    total_found = total = 0
    for category, outcomes in found_per_category.items():
        total_found += sum(outcomes)
        total += len(outcomes)
        print(f"{category:24} {sum(outcomes):>4}/{len(outcomes):<4} {100 * sum(outcomes) / len(outcomes):7.1f}%")
    print(f"{'overall':24} {total_found:>4}/{total:<4} {100 * total_found / total:7.1f}%")
    print(f"false payloads: {len(false_payloads)}" + "".join(f"\n  {category}: {payload[:80]}"
                                                              for category, payload in false_payloads))
    print(f"ms per image with a code: median {statistics.median(image_ms):.1f}, p95 {percentile(image_ms, 0.95):.1f}, "
          f"max {max(image_ms):.1f}")
    print(f"ms per message: median {statistics.median(message_ms):.1f}, p95 {percentile(message_ms, 0.95):.1f}, "
          f"max {max(message_ms):.1f}")
    print(f"tasks over the hard per-image limit ({HARD_LIMIT_SECONDS:g} s): {len(over_limit)}"
          + (f" ({', '.join(over_limit)})" if over_limit else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
