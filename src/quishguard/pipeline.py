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
from dataclasses import dataclass, field
from pathlib import Path

from .config import Config
from .decoders.auth import evaluate_auth, microsoft_evidence
from .decoders.sender import get_addresses, judge_sender
from .dns_resolver import DnsResolver
from .model import (Action, Envelope, MessageFacts, OrgPolicy, ScanLimits, ScanProblem, SenderFacts,
                    Verdict)
from .scoring.names import match_person, people
from .scoring.verdict import evaluate
from .senders_seen import SendersSeen, SendersSeenError
from .workers import WorkerPool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScanResult:
    """A verdict with its facts; `stage_seconds` maps decode, sender and rules to seconds."""

    verdict: Verdict
    facts: MessageFacts
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)


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
        image_seconds=config["scan.image_seconds"],
        qr_generators=config["scan.qr_generators"],
    )


def org_policy(config: Config) -> OrgPolicy:
    return OrgPolicy(
        domains=config["org.domains"],
        trusted_networks=config["org.trusted_networks"],
        authserv_ids=config["org.authserv_ids"],
        arc_trusted_sealers=config["auth.arc_trusted_sealers"],
        microsoft_networks=config["auth.microsoft_networks"],
    )


def envelope_from_headers(facts: MessageFacts) -> Envelope:
    """Build the envelope `scan` uses: sender from Return-Path, recipients from
    Delivered-To or X-Original-To, else To and Cc."""
    def values(name: str) -> list[str]:
        return [v for k, v in facts.headers if k.lower() == name]

    sender = ""
    for value in values("return-path"):
        sender = value.strip().strip("<>").strip()
        break

    recipients: list[str] = []
    for names in (("delivered-to", "x-original-to"), ("to", "cc")):
        found = [v for name in names for v in values(name)]
        recipients = [addr for _, addr in get_addresses(found) if "@" in addr]
        if recipients:
            break
    return Envelope(mail_from=sender, rcpt_tos=tuple(dict.fromkeys(a.lower() for a in recipients)))


class Scanner:
    """Runs the pipeline on a worker pool that it starts and stops."""

    def __init__(self, config: Config, pool: WorkerPool | None = None, *, resolver: DnsResolver | None = None,
                 senders_seen: SendersSeen | None = None) -> None:
        self.config = config
        self.limits = scan_limits(config)
        self.org = org_policy(config)
        self.pool = pool or WorkerPool(config.workers, memory_mb=config["scan.worker_memory_mb"])
        self._own_pool = pool is None
        # Without a resolver no DNS lookup is made (`scan` without --dns);
        # without a sender history nothing is written (`scan`).
        self.resolver = resolver
        self.senders_seen = senders_seen

    @classmethod
    def for_hop(cls, config: Config, pool: WorkerPool | None = None) -> Scanner:
        """Return the scanner a mail hop (`serve`, milter) runs: with DNS checks and, when
        `[org] remember_senders` is on, the sender history in the data folder."""
        seen = SendersSeen(config.data_dir) if config["org.remember_senders"] else None
        resolver = DnsResolver.from_config(config) if config["dns.enabled"] else None
        return cls(config, pool, resolver=resolver, senders_seen=seen)

    async def start(self) -> None:
        if self._own_pool:
            await self.pool.start()

    async def close(self) -> None:
        if self._own_pool:
            await self.pool.close()
        if self.senders_seen is not None:
            self.senders_seen.close()

    async def scan(self, raw: bytes, envelope: Envelope | None, *, message_ref: str = "-") -> ScanResult:
        """Inspect `raw` and return its verdict; `envelope` None means take it from the headers."""
        started = time.monotonic()
        deadline = started + self.config["scan.budget_seconds"]

        job = await self.pool.scan(raw, self.limits, deadline)
        decoded = time.monotonic()
        facts = job.facts
        facts.problems.extend(job.problems)

        if envelope is None:
            envelope = envelope_from_headers(facts)
        try:
            facts.sender = await self._judge_sender(raw, facts, envelope)
        except Exception as error:  # noqa: BLE001 - a sender parsing bug must not lose the verdict
            log.exception("msg=%s event=sender_check_failed", message_ref)
            facts.problems.append(ScanProblem("message headers", "incomplete",
                                              f"sender check failed: {type(error).__name__}"))

        judged = time.monotonic()
        verdict = evaluate(facts, envelope, self.config)
        if verdict.scan_incomplete and self.config["scan.fail_mode"] == "tempfail":
            verdict = dataclasses.replace(verdict, action=Action.TEMPFAIL)
        await self._remember_sender(facts, verdict, message_ref)

        finished = time.monotonic()
        stages = {"decode": decoded - started, "sender": judged - decoded, "rules": finished - judged}
        return ScanResult(verdict, facts, finished - started, stages)


    async def _judge_sender(self, raw: bytes, facts: MessageFacts, envelope: Envelope) -> SenderFacts:
        """Judge the sender from the headers, then add DNS results and sender history when configured."""
        sender = judge_sender(facts.headers, envelope, self.org)
        microsoft = microsoft_evidence(facts.headers, sender, self.org)
        sender = dataclasses.replace(sender, microsoft=microsoft)

        if self.resolver is not None:
            # dnspython and dkimpy block, so the checks run in a thread; the
            # resolver's budget bounds how long this waits.
            try:
                auth = await asyncio.to_thread(evaluate_auth, raw, sender, envelope, self.org,
                                               self.resolver.lookup())
            except Exception as error:  # noqa: BLE001 - keep the header-based sender facts
                log.exception("event=auth_check_failed message_id=%r", facts.message_id)
                facts.problems.append(ScanProblem("message headers", "incomplete",
                                                  f"authentication check failed: {type(error).__name__}"))
            else:
                sender = dataclasses.replace(sender, auth=auth)

        if self.senders_seen is not None and self._outside_person(sender):
            seen = await asyncio.to_thread(self.senders_seen.contains, sender.from_address or "")
            sender = dataclasses.replace(sender, first_seen=not seen)
        return sender

    def _outside_person(self, sender: SenderFacts) -> bool:
        """Tell whether an address outside the organisation uses a person's display name."""
        domain = (sender.from_domain or "").rstrip(".")
        org_domains = self.org.domains
        if not sender.from_address or not org_domains:
            return False
        if any(domain == org or domain.endswith("." + org) for org in org_domains):
            return False
        return bool(match_person(sender.display_name, people(self.config)))

    async def _remember_sender(self, facts: MessageFacts, verdict: Verdict, message_ref: str) -> None:
        """Record a first-seen sender once its message is delivered, so only a quarantined impostor stays new."""
        sender = facts.sender
        if self.senders_seen is None or sender is None or sender.first_seen is not True:
            return
        if verdict.action not in (Action.ACCEPT, Action.TAG):
            return
        try:
            await asyncio.to_thread(self.senders_seen.add, sender.from_address or "")
        except SendersSeenError as error:
            log.error("msg=%s event=sender_history_failed error=%s", message_ref, error)


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


async def scan_files(files: list[Path], config: Config, concurrency: int | None = None, *,
                     resolver: DnsResolver | None = None):
    """Yield (path, ScanResult or error text) for each file, scanning several at once.

    DNS checks run only when `resolver` is given; no sender history is kept.
    """
    scanner = Scanner(config, resolver=resolver)
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
