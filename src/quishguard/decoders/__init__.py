"""Decoders: pure functions from message bytes to facts.

They know nothing of SMTP, rules or storage. Two kinds of work:

- `structure.analyse_structure` walks the MIME tree, reads headers,
  bodies and HTML, and returns `MessageFacts` plus `DecodeTask`s. It is
  cheap and runs in a thread of the main process, so this package imports
  no image or PDF library at import time.
- `TASKS` maps each `DecodeTask.kind` to the function that runs it in a
  worker process: "image" (Pillow and the QR cascade) and "pdf" (PyMuPDF
  and the QR cascade). The entries import their modules on first call,
  once per worker; `preload` does that up front.

`sender.judge_sender` reads the envelope and headers for the sender checks.
"""

from __future__ import annotations

from typing import Callable

from ..model import DecodeTask, PartialFacts, ScanLimits

TaskDecoder = Callable[[DecodeTask, ScanLimits], PartialFacts]


def decode_image_task(task: DecodeTask, limits: ScanLimits) -> PartialFacts:
    """Decode one image and its QR codes (see `images.decode_image`)."""
    from .images import decode_image

    return decode_image(task, limits)


def decode_pdf_task(task: DecodeTask, limits: ScanLimits) -> PartialFacts:
    """Inspect one PDF: pages, links, text, JavaScript and QR codes (see `pdf.decode_pdf`)."""
    from .pdf import decode_pdf

    return decode_pdf(task, limits)


TASKS: dict[str, TaskDecoder] = {
    "image": decode_image_task,
    "pdf": decode_pdf_task,
}


def preload() -> None:
    """Import the heavy decoder modules now, for a worker process's initializer."""
    from . import images, pdf  # noqa: F401


__all__ = ["TASKS", "TaskDecoder", "decode_image_task", "decode_pdf_task", "preload"]
