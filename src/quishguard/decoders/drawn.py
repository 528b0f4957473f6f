"""Decode QR codes that are drawn rather than attached (worker-process tasks "grid", "svg", "split").

- "grid": a module grid rebuilt from an HTML table, a div grid or block
  characters (`grids.Grid`, as a PBM bitmap), scaled up with a quiet zone
  of four modules (ISO/IEC 18004 requires four) and decoded;
- "svg": an SVG document or inline `<svg>` element rendered by MuPDF.
  MuPDF runs no script and loads no external resource: `<image>` elements
  that point anywhere but a `data:` URI are ignored with a warning
  (checked with PyMuPDF 1.26), and its XML parser resolves no external
  entities;
- "split": images laid out as tiles of one picture (`grids.find_split_layouts`),
  pasted together row by row and decoded as one image, because no backend
  decodes a part of a code.
"""

from __future__ import annotations

import io
import logging

import pymupdf
from PIL import Image, ImageOps

from ..model import DecodeTask, PartialFacts, QrCode, ScanLimits, ScanProblem
from .grids import unpack_split
from .images import PILLOW_ERRORS, first_frame_gray
from .qr import decode_qr

log = logging.getLogger(__name__)

# Pixels per module when a rebuilt grid is drawn; every backend reads 4 px modules.
MODULE_PIXELS = 4
QUIET_ZONE_MODULES = 4

# Max side of an SVG render in pixels: enough for a version-40 code (177 modules)
# at 5 px per module, and far below any pixel limit.
SVG_RENDER_SIDE = 1000

pymupdf.TOOLS.mupdf_display_errors(False)


def decode_grid(task: DecodeTask, limits: ScanLimits) -> PartialFacts:
    """Scale up the module grid in `task.data` (PBM) and decode it."""
    facts = PartialFacts()
    try:
        with Image.open(io.BytesIO(task.data)) as bitmap:
            grid = bitmap.convert("L")
    except PILLOW_ERRORS as error:
        facts.problems.append(ScanProblem(task.location, "incomplete", f"invalid module grid: {type(error).__name__}"))
        return facts

    width, height = grid.size
    image = grid.resize((width * MODULE_PIXELS, height * MODULE_PIXELS), Image.Resampling.NEAREST)
    image = ImageOps.expand(image, border=QUIET_ZONE_MODULES * MODULE_PIXELS, fill=255)
    _decode_into(image, task, facts)
    return facts


def decode_svg(task: DecodeTask, limits: ScanLimits) -> PartialFacts:
    """Render the SVG in `task.data` with MuPDF and decode the render."""
    facts = PartialFacts()
    try:
        with pymupdf.open(stream=task.data, filetype="svg") as document:
            page = document[0]
            side = max(page.rect.width, page.rect.height, 1.0)
            zoom = min(SVG_RENDER_SIDE / side, 50.0)
            pixmap = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), colorspace=pymupdf.csGRAY, alpha=False)
    except (RuntimeError, ValueError, IndexError) as error:
        log.info("unreadable SVG at %s: %s", task.location, type(error).__name__)
        facts.problems.append(ScanProblem(task.location, "incomplete", f"could not render the SVG: {type(error).__name__}"))
        return facts

    if pixmap.width * pixmap.height > limits.max_image_pixels:
        facts.problems.append(ScanProblem(task.location, "limit", "SVG render exceeds max_image_pixels; not decoded"))
        return facts
    image = Image.frombytes("L", (pixmap.width, pixmap.height), pixmap.samples)
    _decode_into(ImageOps.expand(image, border=20, fill=255), task, facts)
    return facts


def decode_split(task: DecodeTask, limits: ScanLimits) -> PartialFacts:
    """Paste the tiles in `task.data` together by rows and decode the whole."""
    facts = PartialFacts()
    try:
        rows = [[first_frame_gray(data, limits) for data in row] for row in unpack_split(task.data)]
    except (ValueError, *PILLOW_ERRORS) as error:
        facts.problems.append(ScanProblem(task.location, "incomplete", f"could not read the tiles: {type(error).__name__}"))
        return facts

    widths = [sum(tile.width for tile in row) for row in rows]
    heights = [max(tile.height for tile in row) for row in rows]
    if max(widths) * sum(heights) > limits.max_image_pixels:
        facts.problems.append(ScanProblem(task.location, "limit", "stitched image exceeds max_image_pixels"))
        return facts

    canvas = Image.new("L", (max(widths), sum(heights)), 255)
    top = 0
    for row, height in zip(rows, heights):
        left = 0
        for tile in row:
            canvas.paste(tile, (left, top))
            left += tile.width
        top += height
    _decode_into(ImageOps.expand(canvas, border=20, fill=255), task, facts)
    return facts


def _decode_into(image: Image.Image, task: DecodeTask, facts: PartialFacts) -> None:
    facts.image_count = 1
    result = decode_qr(image)
    for payload in result.payloads:
        facts.qr_codes.append(QrCode(payload, task.location, task.hidden_as, result.backend or ""))
    if result.errors and not result.payloads:
        facts.problems.append(ScanProblem(task.location, "incomplete", "QR backends failed: " + ", ".join(result.errors)))
