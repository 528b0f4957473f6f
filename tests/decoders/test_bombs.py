"""Bombs: each costs bounded time and memory, ends in a finding and a verdict, and never crashes a stage.

Time bounds are generous multiples of what the steps take on a 2-core CI
machine, so a test fails only when a limit stopped working.
"""

from __future__ import annotations

import resource
import struct
import time
import zlib

import pymupdf
import pytest
from decoder_inputs import QR_URL, leaf, message, multipart, qr_png

from quishguard.config import build_config
from quishguard.decoders import decode_image_task, decode_pdf_task
from quishguard.decoders.sender import judge_sender
from quishguard.decoders.structure import analyse_structure
from quishguard.errors import ConfigError
from quishguard.model import DecodeTask, Envelope, OrgPolicy, ScanLimits
from quishguard.pipeline import Scanner, envelope_from_headers
from quishguard.workers import WorkerPool
from tests.smtp_client import RawClient

LIMITS = ScanLimits()
# NOTE: the QR cascade takes about 1 s per blank A4 page at 150 dpi on a
# 2-core machine, so the default of 20 pages alone can exceed the 15 s scan
# budget. These tests read 2 pages to bound the time the page cap allows.
PDF_LIMITS = ScanLimits(max_pdf_pages=2)
ENVELOPE = Envelope("alice@example.net", ("bob@example.com",))
MiB = 1024 * 1024

# Comments nested this deep make email.utils.getaddresses raise RecursionError.
DEEP = 5000


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int, *, complete: bool = True) -> bytes:
    """Return an 8-bit grayscale PNG of zeros; its pixel data is compressed row by row, never held whole.

    With `complete` false only the header and an empty IDAT are written,
    which is all that decoders read before they decide on the size.
    """
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    compressor = zlib.compressobj(9)
    pixels = b""
    if complete:
        row = b"\0" * (width + 1)
        pixels = b"".join(compressor.compress(row) for _ in range(height))
    pixels += compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", pixels) + png_chunk(b"IEND", b"")


def pdf_pages(count: int, width: float = 595, height: float = 842) -> bytes:
    document = pymupdf.open()
    for _ in range(count):
        document.new_page(width=width, height=height)
    return document.tobytes()


def nested_multipart(depth: int) -> bytes:
    opening = "".join(f'Content-Type: multipart/mixed; boundary="n{level}"\r\n\r\n--n{level}\r\n'
                      for level in range(depth))
    return message(opening + "Content-Type: text/plain\r\n\r\ndeep\r\n")


def peak_rss_growth(action) -> tuple[object, int]:
    """Run `action`; return its result and how far it raised this process's peak RSS, in bytes."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = action()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return result, (after - before) * 1024


def test_image_over_pixel_cap_not_decoded():
    bomb = png_bomb(9000, 9000)
    task = DecodeTask("image", bomb, "message > part 2 (image/png)", "attachment")

    started = time.monotonic()
    facts, growth = peak_rss_growth(lambda: decode_image_task(task, LIMITS))
    elapsed = time.monotonic() - started

    assert len(bomb) < MiB
    assert [problem.kind for problem in facts.problems] == ["limit"]
    assert "max_image_pixels" in facts.problems[0].reason
    assert elapsed < 2
    # Decoding 81 million 8-bit pixels would take 81 MB.
    assert growth < 40 * MiB


def test_image_pillow_bomb_error_is_limit():
    # Past our cap of 10**12, Pillow's own check (twice Image.MAX_IMAGE_PIXELS) raises.
    bomb = png_bomb(30_000, 30_000, complete=False)
    task = DecodeTask("image", bomb, "message > part 2 (image/png)", "attachment")

    facts = decode_image_task(task, ScanLimits(max_image_pixels=10**12))

    assert [problem.kind for problem in facts.problems] == ["limit"]
    assert "too large" in facts.problems[0].reason


def test_pdf_thousands_of_pages_bounded():
    task = DecodeTask("pdf", pdf_pages(5000), "message > part 2 (application/pdf)", "attachment")

    started = time.monotonic()
    facts = decode_pdf_task(task, PDF_LIMITS)
    elapsed = time.monotonic() - started

    assert facts.pdfs[0].page_count == 5000
    assert facts.pdfs[0].pages_rendered == PDF_LIMITS.max_pdf_pages
    assert any("5000 pages" in problem.reason for problem in facts.problems)
    assert elapsed < 15


def test_pdf_huge_page_rendered_smaller():
    # 14400 points (200 inches) is the largest page size PDF 1.7 allows.
    task = DecodeTask("pdf", pdf_pages(1, 14_400, 14_400), "message > part 2 (application/pdf)", "attachment")

    started = time.monotonic()
    facts, growth = peak_rss_growth(lambda: decode_pdf_task(task, LIMITS))
    elapsed = time.monotonic() - started

    assert facts.pdfs[0].pages_rendered == 1
    assert any(problem.kind == "limit" and "dpi" in problem.reason for problem in facts.problems)
    assert elapsed < 20
    # At pdf_dpi=150 the page would be 30000x30000 pixels, 900 MB in gray.
    assert growth < 200 * MiB


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (nested_multipart(3000), "nesting"),
        (message(multipart("mixed", *[leaf("text/plain", str(n)) for n in range(20_000)])), "max_parts"),
    ],
    ids=["deep nesting", "many parts"],
)
def test_structure_bomb_bounded(raw, reason):
    started = time.monotonic()
    facts, _tasks = analyse_structure(raw, LIMITS)
    elapsed = time.monotonic() - started

    assert any(problem.kind == "limit" and reason in problem.reason for problem in facts.problems)
    assert elapsed < 10


def test_sender_deep_comments_no_crash():
    headers = [("From", "(" * DEEP + "x" + ")" * DEEP + " <ceo@example.com>"),
               ("Reply-To", "(" * DEEP + "reply@example.net")]

    sender = judge_sender(headers, ENVELOPE, OrgPolicy(domains=("example.com",)))

    assert sender.from_address is None
    assert sender.reply_to == ()


def test_envelope_deep_recipient_no_crash():
    facts, _tasks = analyse_structure(message("Content-Type: text/plain\r\n\r\nx\r\n").replace(
        b"To: user@example.org", b"To: " + b"(" * DEEP + b"user@example.org"), LIMITS)

    envelope = envelope_from_headers(facts)

    assert envelope.rcpt_tos == ()


# Built when a test runs, not at collection: some take a second to write.
BOMB_MESSAGES = {
    "image over pixel cap": (lambda: message(multipart(
        "mixed", leaf("text/plain", "See the plan"), leaf("image/png", png_bomb(9000, 9000), filename="plan.png"))),
        "MIME_LIMIT"),
    "pdf pages": (lambda: message(multipart(
        "mixed", leaf("text/plain", "Scan"), leaf("application/pdf", pdf_pages(3000), filename="scan.pdf"))),
        "MIME_LIMIT"),
    "deep nesting": (lambda: nested_multipart(3000), "MIME_LIMIT"),
    "many parts": (lambda: message(multipart("mixed", *[leaf("text/plain", str(n)) for n in range(5000)])),
                   "MIME_LIMIT"),
    "deep address comments": (lambda: message("Content-Type: text/plain\r\n\r\nHello\r\n",
                                              sender="(" * DEEP + "Billing" + ")" * DEEP + " <billing@example.com>"),
                              "MIME_HEADER_NESTING"),
    "long header line": (lambda: message("Content-Type: text/plain\r\n\r\nHello\r\n", subject="x" * 2 * MiB),
                         "MIME_LONG_HEADER_LINE"),
}


@pytest.mark.parametrize(("build", "rule"), BOMB_MESSAGES.values(), ids=BOMB_MESSAGES.keys())
async def test_bomb_message_gets_verdict(pool, build, rule):
    scanner = Scanner(build_config({"scan": {"max_pdf_pages": PDF_LIMITS.max_pdf_pages}}), pool)

    result = await scanner.scan(build(), ENVELOPE)
    fired = {finding.rule for finding in result.verdict.findings}

    assert rule in fired
    assert "SCAN_INCOMPLETE" not in fired
    assert result.seconds < build_config({})["scan.budget_seconds"]


def worker_address_limit(pid: int) -> str:
    with open(f"/proc/{pid}/limits", encoding="ascii") as limits:
        line = next(line for line in limits if line.startswith("Max address space"))
    return line.split()[3]


async def test_worker_memory_limit_contains_bomb():
    # A 14400-point page rendered at 150 dpi needs a 900 MB pixmap. The cap
    # on pixels is lifted, so only the memory limit stops it.
    limits = ScanLimits(max_image_pixels=2_000_000_000)
    bomb = message(multipart("mixed", leaf("application/pdf", pdf_pages(1, 14_400, 14_400), filename="a.pdf")))
    follow_up = message(multipart("mixed", leaf("image/png", qr_png(), filename="code.png")))
    pool = WorkerPool(1, memory_mb=1024)
    await pool.start()
    try:
        address_limit = worker_address_limit(pool.pids()[0])
        bombed = await pool.scan(bomb, limits, time.monotonic() + 60)
        after = await pool.scan(follow_up, LIMITS, time.monotonic() + 60)
    finally:
        await pool.close()
    problems = bombed.facts.problems + bombed.problems

    assert address_limit == str(1024 * MiB)
    # MuPDF's failed allocation becomes an unread page, and the worker lives on.
    assert any(problem.kind == "incomplete" and problem.location.endswith("page 1") for problem in problems)
    assert bombed.complete
    assert [code.payload for code in after.facts.qr_codes] == [QR_URL]
    assert after.complete


def test_worker_memory_option_default():
    assert build_config({})["scan.worker_memory_mb"] == 2048


@pytest.mark.parametrize("value", [0, 1024, 8192])
def test_worker_memory_option_accepted(value):
    assert build_config({"scan": {"worker_memory_mb": value}})["scan.worker_memory_mb"] == value


@pytest.mark.parametrize("value", [-1, 512, 1.5, True, "2G"])
def test_worker_memory_option_rejected(value):
    with pytest.raises(ConfigError, match="scan.worker_memory_mb"):
        build_config({"scan": {"worker_memory_mb": value}})


def test_worker_pool_negative_memory_rejected():
    with pytest.raises(ValueError, match="memory"):
        WorkerPool(1, memory_mb=-1)


async def test_scanner_passes_memory_limit():
    scanner = Scanner(build_config({"scan": {"workers": 1, "worker_memory_mb": 3072}}))

    assert scanner.pool.memory_mb == 3072


async def test_oversized_message_rejected_at_size(start_hop, next_hop):
    hop = await start_hop(smtp={"max_message_size": 4096})
    client = await RawClient.connect(hop.port)
    try:
        ehlo = await client.command("EHLO client.test")
        refused = await client.command("MAIL FROM:<alice@example.net> SIZE=100000")
        accepted = await client.command("MAIL FROM:<alice@example.net> SIZE=1000")
    finally:
        await client.close()

    assert "SIZE 4096" in ehlo[1]
    assert refused[0] == 552
    assert accepted[0] == 250
    assert next_hop.messages == []


async def test_oversized_message_rejected_at_data(start_hop, next_hop):
    hop = await start_hop(smtp={"max_message_size": 4096})
    big = message("Content-Type: text/plain\r\n\r\n" + "line of text\r\n" * 1000)
    small = message("Content-Type: text/plain\r\n\r\nshort\r\n")
    client = await RawClient.connect(hop.port)
    try:
        await client.command("EHLO client.test")
        await client.command("MAIL FROM:<alice@example.net>")
        await client.command("RCPT TO:<bob@example.com>")
        too_big = await client.data(big)
        await client.command("MAIL FROM:<alice@example.net>")
        await client.command("RCPT TO:<bob@example.com>")
        fits = await client.data(small)
    finally:
        await client.close()

    assert too_big[0] == 552
    assert fits[0] == 250
    assert len(next_hop.messages) == 1
    assert b"short" in next_hop.messages[0].data
