"""The inspection pipeline shared by the SMTP proxy, the milter and `scan`.

One call takes the raw message and its envelope and returns a verdict:
decode the message in a worker process under the scan budget, judge the
sender from the headers, run the rules, then apply the fail mode when the
scan could not finish. The pipeline never touches sockets and never raises
for a bad message: every fault becomes a finding.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .decoders.sender import judge_sender
from .model import (Action, Envelope, MessageFacts, OrgPolicy, ScanLimits, ScanProblem,
                    Verdict)
from .scoring.verdict import evaluate
from .workers import WorkerPool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScanResult:
    verdict: Verdict
    facts: MessageFacts
    seconds: float


def scan_limits(config: Config) -> ScanLimits:
    return ScanLimits(
        max_mime_depth=config["scan.max_mime_depth"],
        max_parts=config["scan.max_parts"],
        max_decoded_bytes=config["scan.max_decoded_bytes"],
        max_images=config["scan.max_images"],
        max_image_pixels=config["scan.max_image_pixels"],
        max_pdf_pages=config["scan.max_pdf_pages"],
        pdf_dpi=config["scan.pdf_dpi"],
        max_urls=config["scan.max_urls"],
    )


def org_policy(config: Config) -> OrgPolicy:
    return OrgPolicy(
        domains=config["org.domains"],
        trusted_networks=config["org.trusted_networks"],
        authserv_ids=config["org.authserv_ids"],
    )


def envelope_from_headers(facts: MessageFacts) -> Envelope:
    """Build the envelope `scan` uses: sender from Return-Path, recipients from
    Delivered-To or X-Original-To, else To and Cc."""
    from email.utils import getaddresses

    def values(name: str) -> list[str]:
        return [v for k, v in facts.headers if k.lower() == name]

    sender = ""
    for value in values("return-path"):
        sender = value.strip().strip("<>").strip()
        break

    recipients: list[str] = []
    for names in (("delivered-to", "x-original-to"), ("to", "cc")):
        found = [v for name in names for v in values(name)]
        recipients = [addr for _, addr in getaddresses(found) if "@" in addr]
        if recipients:
            break
    return Envelope(mail_from=sender, rcpt_tos=tuple(dict.fromkeys(a.lower() for a in recipients)))


class Scanner:
    """Runs the pipeline on a worker pool that it starts and stops."""

    def __init__(self, config: Config, pool: WorkerPool | None = None) -> None:
        self.config = config
        self.limits = scan_limits(config)
        self.org = org_policy(config)
        self.pool = pool or WorkerPool(config.workers)
        self._own_pool = pool is None

    async def start(self) -> None:
        if self._own_pool:
            await self.pool.start()

    async def close(self) -> None:
        if self._own_pool:
            await self.pool.close()

    async def scan(self, raw: bytes, envelope: Envelope | None, *, message_ref: str = "-") -> ScanResult:
        """Inspect `raw` and return its verdict; `envelope` None means take it from the headers."""
        started = time.monotonic()
        deadline = started + self.config["scan.budget_seconds"]

        job = await self.pool.scan(raw, self.limits, deadline)
        facts = job.facts
        facts.problems.extend(job.problems)

        if envelope is None:
            envelope = envelope_from_headers(facts)
        try:
            facts.sender = judge_sender(facts.headers, envelope, self.org)
        except Exception as error:  # noqa: BLE001 - a sender parsing bug must not lose the verdict
            log.exception("msg=%s event=sender_check_failed", message_ref)
            facts.problems.append(ScanProblem("message headers", "incomplete",
                                              f"sender check failed: {type(error).__name__}"))

        verdict = evaluate(facts, envelope, self.config)
        if verdict.scan_incomplete and self.config["scan.fail_mode"] == "tempfail":
            verdict = dataclasses.replace(verdict, action=Action.TEMPFAIL)

        seconds = time.monotonic() - started
        return ScanResult(verdict, facts, seconds)


def scan_paths(paths: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expand files and folders (every `*.eml` below) into files; return (files, errors)."""
    files: list[Path] = []
    errors: list[tuple[Path, str]] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*.eml") if p.is_file()))
        elif path.is_file():
            files.append(path)
        elif path.exists():
            errors.append((path, "not a regular file or folder"))
        else:
            errors.append((path, "no such file or folder"))
    return files, errors


async def scan_files(files: list[Path], config: Config, concurrency: int | None = None):
    """Yield (path, ScanResult or error text) for each file, scanning several at once."""
    scanner = Scanner(config)
    await scanner.start()
    try:
        limit = asyncio.Semaphore(concurrency or config.workers)

        async def one(path: Path):
            async with limit:
                try:
                    raw = await asyncio.to_thread(path.read_bytes)
                except OSError as error:
                    return path, f"cannot read {path}: {error.strerror}"
                return path, await scanner.scan(raw, None, message_ref=path.name)

        pending = [asyncio.ensure_future(one(p)) for p in files]
        for future in pending:
            yield await future
    finally:
        await scanner.close()
