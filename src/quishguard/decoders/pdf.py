"""Inspect one PDF (worker-process task "pdf"): render pages for QR codes, collect links and text.

PDF structure follows ISO 32000-1 (PDF 1.7), read through PyMuPDF (MuPDF),
which repairs damaged files where it can. A file MuPDF cannot open becomes
a `ScanProblem` of kind "incomplete". Encrypted files are opened with the
empty user password, as a viewer does without asking, and then with the
passwords the message text quotes (`DecodeTask.passwords`).

Pages are rendered in grayscale at `ScanLimits.pdf_dpi` and handed to the
QR cascade, and each page's embedded images are decoded at their stored
resolution too. Link annotations give URI links and `/Launch` targets. A code on a page without embedded images must be drawn from
vector paths, which is reported as hidden_as "pdf-vector"; otherwise
"pdf-image". Only the first `ScanLimits.max_pdf_pages` pages are read.
JavaScript is found by searching every object's dictionary for `/JS` and
`/JavaScript` (section 12.6.4.16), which covers the document's name tree,
OpenAction, additional actions and annotation actions.
"""

from __future__ import annotations

import logging
import math
import re
import time

import pymupdf
from PIL import Image

from . import report_progress
from ..model import DecodeTask, Link, PartialFacts, PdfFacts, QrCode, ScanLimits, ScanProblem
from .html import count_visible_chars
from .qr import RENDER_BACKENDS, decode_qr
from .urls import find_urls

log = logging.getLogger(__name__)

# MuPDF prints repair warnings to stderr by default; they are expected for
# hostile input and would flood the service's log.
pymupdf.TOOLS.mupdf_display_errors(False)

# PDF user space unit: 1/72 inch (ISO 32000-1, section 8.3.2.3).
POINTS_PER_INCH = 72

# Below this resolution a page render cannot show a QR code's modules, so a
# page that fits `max_image_pixels` only at a lower one is not rendered.
MIN_DPI = 9

# Embedded images decoded per page, besides the page render.
MAX_IMAGES_PER_PAGE = 10
# A QR code version 1 has 21 modules per side, so a smaller image holds none.
MIN_QR_SIDE = 21

# Objects searched for JavaScript; a real document has far fewer.
MAX_OBJECTS_SEARCHED = 200_000

_JAVASCRIPT = re.compile(r"/(?:JavaScript|JS)\b")

# PyMuPDF raises FileDataError (a RuntimeError) for damaged files and
# RuntimeError or ValueError from MuPDF for damaged objects. Its low-level
# calls raise FzErrorBase subclasses, which are plain Exceptions, such as
# FzErrorFormat for a malformed page tree and FzErrorSystem when an
# allocation fails under the worker's memory limit (PyMuPDF 1.28).
_MUPDF_ERRORS = (RuntimeError, ValueError, pymupdf.mupdf.FzErrorBase)


def decode_pdf(task: DecodeTask, limits: ScanLimits) -> PartialFacts:
    """Inspect the PDF in `task.data` and return its QR codes, links, facts and problems."""
    facts = PartialFacts()
    try:
        document = pymupdf.open(stream=task.data, filetype="pdf")
    except _MUPDF_ERRORS as error:
        log.info("unreadable PDF at %s: %s", task.location, type(error).__name__)
        facts.problems.append(
            ScanProblem(task.location, "incomplete", f"could not open the PDF: {type(error).__name__}")
        )
        return facts

    with document:
        _inspect(document, task, limits, facts)
    return facts


def _inspect(document: pymupdf.Document, task: DecodeTask, limits: ScanLimits, facts: PartialFacts) -> None:
    # `needs_pass` is set only when the empty password does not open the
    # file; an empty-password file shows only in its metadata.
    encrypted = bool(document.needs_pass) or bool((document.metadata or {}).get("encryption"))
    if document.needs_pass and not _authenticate(document, task.passwords):
        facts.pdfs.append(
            PdfFacts(task.location, task.filename, page_count=document.page_count, pages_rendered=0, encrypted=True)
        )
        facts.problems.append(
            ScanProblem(
                task.location,
                "incomplete",
                f"PDF is encrypted and none of {len(task.passwords) + 1} candidate passwords opened it",
            )
        )
        return

    has_javascript = _has_javascript(document, task, facts.problems)
    page_count = document.page_count
    pages_to_read = min(page_count, limits.max_pdf_pages)
    if page_count > pages_to_read:
        facts.problems.append(
            ScanProblem(
                task.location,
                "limit",
                f"PDF has {page_count} pages; read the first {pages_to_read} (max_pdf_pages={limits.max_pdf_pages})",
            )
        )

    text_chars = 0
    pages_rendered = 0
    for index in range(pages_to_read):
        location = f"{task.location} > page {index + 1}"
        # Opening the file, each page render and each page's embedded
        # images get their own image_seconds in the worker pool.
        report_progress()
        try:
            page = document[index]
            text_chars += _read_page_text(page, location, limits, facts)
            _render_page(page, location, limits, facts)
            report_progress()
            _decode_embedded_images(document, page, location, limits, facts)
        except _MUPDF_ERRORS as error:
            log.info("unreadable PDF page at %s: %s", location, type(error).__name__)
            facts.problems.append(
                ScanProblem(location, "incomplete", f"could not read the page: {type(error).__name__}")
            )
            continue
        pages_rendered += 1

    facts.pdfs.append(
        PdfFacts(
            location=task.location,
            filename=task.filename,
            page_count=page_count,
            pages_rendered=pages_rendered,
            encrypted=encrypted,
            has_javascript=has_javascript,
            text_chars=text_chars,
        )
    )


def _authenticate(document: pymupdf.Document, passwords: tuple[str, ...]) -> bool:
    """Try the empty password, then the candidates the message quotes; tell whether one opened it."""
    for password in ("", *passwords):
        if document.authenticate(password):
            return True
    return False


def _read_page_text(page: pymupdf.Page, location: str, limits: ScanLimits, facts: PartialFacts) -> int:
    """Add the page's link annotations and text URLs to `facts`; return its visible text length."""
    for link in page.get_links():
        uri = link.get("uri")
        if uri:
            facts.links.append(Link(uri, location, "pdf-link"))
        elif _is_launch(page, link):
            # A /Launch action (section 12.6.4.5) opens a file or runs a program.
            target = str(link.get("file") or "(launch action without a file name)")
            facts.links.append(Link(target[:2048], location, "pdf-launch"))

    text = page.get_text("text")
    for url in find_urls(text, limits.max_urls):
        facts.links.append(Link(url, location, "pdf-text"))
    return count_visible_chars(text)


def _is_launch(page: pymupdf.Page, link: dict) -> bool:
    # MuPDF reports a /Launch of a file as a remote go-to (LINK_GOTOR), so
    # the action's /S name is read from the annotation itself.
    if link.get("kind") == pymupdf.LINK_LAUNCH:
        return True
    xref = link.get("xref")
    if not xref:
        return False
    try:
        return page.parent.xref_get_key(xref, "A/S") == ("name", "/Launch")
    except _MUPDF_ERRORS:
        return False


def _render_page(page: pymupdf.Page, location: str, limits: ScanLimits, facts: PartialFacts) -> None:
    dpi = _render_dpi(page.rect.width, page.rect.height, limits)
    if dpi < MIN_DPI:
        facts.problems.append(
            ScanProblem(
                location,
                "limit",
                f"page of {page.rect.width:.0f}x{page.rect.height:.0f} points needs less than {MIN_DPI} dpi "
                f"to stay under max_image_pixels={limits.max_image_pixels}; not rendered",
            )
        )
        return
    if dpi < limits.pdf_dpi:
        facts.problems.append(
            ScanProblem(
                location,
                "limit",
                f"page rendered at {dpi} dpi instead of pdf_dpi={limits.pdf_dpi} "
                f"to stay under max_image_pixels={limits.max_image_pixels}",
            )
        )

    pixmap = page.get_pixmap(dpi=dpi, colorspace=pymupdf.csGRAY, alpha=False)
    image = Image.frombytes("L", (pixmap.width, pixmap.height), pixmap.samples)
    # Half the per-image limit, so the cascade stops itself before the pool kills the worker.
    result = decode_qr(image, time.monotonic() + limits.image_seconds / 2, backends=RENDER_BACKENDS)
    if result.errors and not result.payloads:
        facts.problems.append(ScanProblem(location, "incomplete", "QR backends failed: " + ", ".join(result.errors)))

    hidden_as = "pdf-image" if page.get_images() else "pdf-vector"
    for payload in result.payloads:
        facts.qr_codes.append(QrCode(payload, location, hidden_as, result.backend or ""))


def _decode_embedded_images(
    document: pymupdf.Document, page: pymupdf.Page, location: str, limits: ScanLimits, facts: PartialFacts
) -> None:
    """Decode the page's embedded images at their own resolution, as stored.

    A render scales the image to `pdf_dpi`, which can blur a small code that
    is drawn shrunk on the page; the stored image keeps every module.
    """
    found = {code.payload for code in facts.qr_codes if code.location == location}
    for number, entry in enumerate(page.get_images(full=True)[:MAX_IMAGES_PER_PAGE], start=1):
        xref, width, height = entry[0], entry[2], entry[3]
        if min(width, height) < MIN_QR_SIDE or width * height > limits.max_image_pixels:
            continue
        try:
            pixmap = pymupdf.Pixmap(document, xref)
            if pixmap.n - pixmap.alpha != 1:
                pixmap = pymupdf.Pixmap(pymupdf.csGRAY, pixmap)
            image = Image.frombytes("L", (pixmap.width, pixmap.height), pixmap.samples)
        except (*_MUPDF_ERRORS, pymupdf.mupdf.FzErrorBase) as error:
            log.info("unreadable PDF image at %s: %s", location, type(error).__name__)
            continue
        result = decode_qr(image)
        for payload in result.payloads:
            if payload not in found:
                found.add(payload)
                facts.qr_codes.append(QrCode(payload, f"{location} > image {number}", "pdf-image", result.backend or ""))


def _render_dpi(width_points: float, height_points: float, limits: ScanLimits) -> int:
    """Return the highest dpi up to `pdf_dpi` at which the page fits in `max_image_pixels`."""
    area_square_inches = max(width_points, 1.0) * max(height_points, 1.0) / POINTS_PER_INCH**2
    dpi = min(limits.pdf_dpi, math.floor(math.sqrt(limits.max_image_pixels / area_square_inches)))

    # MuPDF rounds the pixmap size up, so step down until the rounded size fits.
    while dpi > 0 and _pixel_count(width_points, height_points, dpi) > limits.max_image_pixels:
        dpi -= 1
    return dpi


def _pixel_count(width_points: float, height_points: float, dpi: int) -> int:
    scale = dpi / POINTS_PER_INCH
    return (math.ceil(width_points * scale) + 1) * (math.ceil(height_points * scale) + 1)


def _has_javascript(document: pymupdf.Document, task: DecodeTask, problems: list[ScanProblem]) -> bool:
    object_count = document.xref_length()
    if object_count > MAX_OBJECTS_SEARCHED:
        problems.append(
            ScanProblem(
                task.location,
                "limit",
                f"PDF has {object_count} objects; searched the first {MAX_OBJECTS_SEARCHED} for JavaScript",
            )
        )

    for xref in range(1, min(object_count, MAX_OBJECTS_SEARCHED)):
        try:
            source = document.xref_object(xref, compressed=True)
        except _MUPDF_ERRORS:
            continue
        # MuPDF prints names in canonical form, so "#xx" escapes such as
        # /J#61vaScript cannot hide the key from this search.
        if _JAVASCRIPT.search(source):
            return True
    return False
