"""Look inside ZIP archives and Office files for QR codes (worker-process task "archive").

ZIP follows PKWARE's APPNOTE.TXT, read with the standard `zipfile`.
Office Open XML (ECMA-376: .docx, .xlsx, .pptx) and OpenDocument files are
ZIP archives whose pictures sit under `word/media/`, `xl/media/`,
`ppt/media/` or `Pictures/`; every member is sniffed by content, so those
are found like any image. Images, PDFs and nested archives are decoded;
a `.eml` member is not parsed (see the NOTE below).

Hostile archives are bounded: members read per archive, bytes inflated per
member and per archive, the compression ratio of each member, and nesting
depth. Encrypted members are reported, not guessed.
"""

from __future__ import annotations

import io
import logging
import zipfile
from dataclasses import replace

from . import report_progress
from ..model import DecodeTask, PartialFacts, ScanLimits, ScanProblem
from .images import decode_image
from .pdf import decode_pdf
from .sniff import image_format, is_pdf, is_zip

log = logging.getLogger(__name__)

MAX_MEMBERS = 200
MAX_MEMBER_BYTES = 20 * 1024 * 1024
MAX_ARCHIVE_BYTES = 50 * 1024 * 1024
# Deflate reaches about 1000:1 on uniform data; real images and PDFs stay
# far below 100:1, so a higher ratio is a decompression bomb.
MAX_RATIO = 100
MAX_DEPTH = 3

_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError)


def decode_archive(task: DecodeTask, limits: ScanLimits) -> PartialFacts:
    """Decode the images and PDFs inside the ZIP archive in `task.data`."""
    facts = PartialFacts()
    _decode_zip(task.data, task, limits, facts, depth=1, budget=[MAX_ARCHIVE_BYTES])
    return facts


def _decode_zip(data: bytes, task: DecodeTask, limits: ScanLimits, facts: PartialFacts, depth: int,
                budget: list[int]) -> None:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
    except _ZIP_ERRORS as error:
        facts.problems.append(ScanProblem(task.location, "incomplete", f"could not open the archive: {type(error).__name__}"))
        return

    if len(members) > MAX_MEMBERS:
        facts.problems.append(ScanProblem(task.location, "limit",
                                          f"archive has {len(members)} members; read the first {MAX_MEMBERS}"))
    for member in members[:MAX_MEMBERS]:
        if member.is_dir():
            continue
        # Member names are attacker-chosen: they only appear quoted in a location.
        location = f'{task.location} > member "{member.filename[:120]}"'
        content = _read_member(archive, member, location, facts, budget)
        if content is None:
            continue

        report_progress()
        inner = replace(task, data=content, location=location, filename=member.filename[:120])
        if image_format(content) is not None:
            partial = decode_image(replace(inner, kind="image"), limits)
        elif is_pdf(content):
            partial = decode_pdf(replace(inner, kind="pdf"), limits)
        elif is_zip(content):
            if depth >= MAX_DEPTH:
                facts.problems.append(ScanProblem(location, "limit", f"archive nested deeper than {MAX_DEPTH}"))
            else:
                _decode_zip(content, inner, limits, facts, depth + 1, budget)
            continue
        else:
            # NOTE: .eml and HTML members are not parsed; only images, PDFs
            # and nested archives are decoded.
            continue
        _merge(facts, partial)


def _read_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, location: str, facts: PartialFacts,
                 budget: list[int]) -> bytes | None:
    if member.flag_bits & 0x1:
        facts.problems.append(ScanProblem(location, "incomplete", "archive member is encrypted"))
        return None
    if member.file_size > MAX_MEMBER_BYTES or member.file_size > budget[0]:
        facts.problems.append(ScanProblem(location, "limit", f"archive member of {member.file_size} bytes not read"))
        return None
    if member.compress_size and member.file_size / member.compress_size > MAX_RATIO:
        facts.problems.append(ScanProblem(location, "limit",
                                          f"archive member compressed more than {MAX_RATIO}:1; not read"))
        return None

    try:
        with archive.open(member) as stream:
            # The declared size may lie, so the read itself is bounded too.
            content = stream.read(min(MAX_MEMBER_BYTES, budget[0]) + 1)
    except _ZIP_ERRORS as error:
        facts.problems.append(ScanProblem(location, "incomplete", f"could not read the member: {type(error).__name__}"))
        return None
    if len(content) > min(MAX_MEMBER_BYTES, budget[0]):
        facts.problems.append(ScanProblem(location, "limit", "archive member larger than declared; not read"))
        return None
    budget[0] -= len(content)
    return content


def _merge(facts: PartialFacts, partial: PartialFacts) -> None:
    facts.qr_codes.extend(partial.qr_codes)
    facts.links.extend(partial.links)
    facts.pdfs.extend(partial.pdfs)
    facts.problems.extend(partial.problems)
    facts.image_count += partial.image_count
