"""Decoders: pure functions from message bytes to facts.

They know nothing of SMTP, rules or storage. Two kinds of work:

- `structure.analyse_structure` walks the MIME tree, reads headers,
  bodies and HTML, and returns `MessageFacts` plus `DecodeTask`s. It is
  cheap and runs in a thread of the main process, so this package imports
  no image or PDF library at import time.
- `TASKS` maps each `DecodeTask.kind` to the function that runs it in a
  worker process: "image" (Pillow and the QR cascade), "pdf" (PyMuPDF
  and the QR cascade), "grid", "svg" and "split" (codes drawn without an
  image, `drawn`) and "archive" (ZIP and Office files, `archives`). The entries import their modules on first call,
  once per worker; `preload` does that up front.

`sender.judge_sender` reads the envelope and headers for the sender checks.
"""

from __future__ import annotations

from typing import Callable

from ..model import DecodeTask, PartialFacts, ScanLimits

TaskDecoder = Callable[[DecodeTask, ScanLimits], PartialFacts]

_progress: list[Callable[[], None]] = []


def set_progress_callback(callback: Callable[[], None] | None) -> None:
    """Set the function `report_progress` calls; a worker process sets one per task."""
    _progress.clear()
    if callback is not None:
        _progress.append(callback)


def report_progress() -> None:
    """Tell the worker pool that a long task (a PDF, an archive) moved on to its next image.

    The pool gives each image its own `ScanLimits.image_seconds`, counted
    from the task's start or its last progress report.
    """
    for callback in _progress:
        callback()


def decode_image_task(task: DecodeTask, limits: ScanLimits) -> PartialFacts:
    """Decode one image and its QR codes (see `images.decode_image`)."""
    from .images import decode_image

    return decode_image(task, limits)


def decode_pdf_task(task: DecodeTask, limits: ScanLimits) -> PartialFacts:
    """Inspect one PDF: pages, links, text, JavaScript and QR codes (see `pdf.decode_pdf`)."""
    from .pdf import decode_pdf

    return decode_pdf(task, limits)


def decode_drawn_task(task: DecodeTask, limits: ScanLimits) -> PartialFacts:
    """Decode a rebuilt module grid, an SVG or a split image (see `drawn`)."""
    from . import drawn

    decoders = {"grid": drawn.decode_grid, "svg": drawn.decode_svg, "split": drawn.decode_split}
    return decoders[task.kind](task, limits)


def decode_archive_task(task: DecodeTask, limits: ScanLimits) -> PartialFacts:
    """Decode the images and PDFs inside a ZIP or Office file (see `archives.decode_archive`)."""
    from .archives import decode_archive

    return decode_archive(task, limits)


TASKS: dict[str, TaskDecoder] = {
    "image": decode_image_task,
    "pdf": decode_pdf_task,
    "grid": decode_drawn_task,
    "svg": decode_drawn_task,
    "split": decode_drawn_task,
    "archive": decode_archive_task,
}


def preload() -> None:
    """Import the heavy decoder modules now, for a worker process's initializer."""
    from . import archives, drawn, images, pdf  # noqa: F401


__all__ = ["TASKS", "TaskDecoder", "report_progress", "set_progress_callback", "decode_archive_task", "decode_drawn_task", "decode_image_task",
           "decode_pdf_task", "preload"]
