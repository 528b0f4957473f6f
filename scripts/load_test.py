#!/usr/bin/env python3
"""Load benchmark: concurrent connections and a message soak through `quishguard serve`.

Starts `quishguard serve` on loopback with its local sink as the next hop,
then (1) opens `--connections` sessions at once and holds them, counting
greetings (220) and refusals by the connection limit (421), and (2) sends
`--messages` messages, `--concurrency` at a time, retrying after a 4xx as an
MTA does; every tenth carries a QR code with a phishing URL and goes to
quarantine. At the end every message that got 250 must be in the sink or in
quarantine; the difference is reported as lost. The resident memory of the
server and its decoder workers is sampled every half second.

Prints a Markdown report for docs/load.md. Talks only to 127.0.0.1.

    .venv/bin/python scripts/load_test.py --messages 5000 --connections 500
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

PHISH_URL = "https://login.example.org/verify?user=bob@example.com"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def qr_png(payload: str) -> bytes:
    import segno  # installed with the test extras

    buffer = io.BytesIO()
    segno.make(payload, micro=False).save(buffer, kind="png", scale=6, border=4)
    return buffer.getvalue()


def build_message(subject: str, image: bytes | None) -> bytes:
    message = EmailMessage()
    message["From"] = "alice@example.net"
    message["To"] = "bob@example.com"
    message["Subject"] = subject
    message["Message-ID"] = f"<{subject}@example.net>"
    message.set_content("Scan the code." if image else f"Report {subject} attached.\n")
    if image:
        message.add_attachment(image, maintype="image", subtype="png", filename="code.png",
                               disposition="inline")
    data = message.as_bytes(policy=message.policy.clone(linesep="\r\n"))
    return re.sub(rb"(?m)^\.", b"..", data)


def tree_rss_kib(pid: int) -> int:
    """Return the resident memory of `pid` and its direct children in KiB, from /proc."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            pids += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    total = 0
    for one in pids:
        try:
            for line in Path(f"/proc/{one}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


class Session:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> tuple[Session, int]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        session = cls(reader, writer)
        return session, await session.reply()

    async def reply(self) -> int:
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 120)
            if not line:
                return 0
            if len(line) < 4 or line[3:4] != b"-":
                return int(line[:3])

    async def command(self, data: bytes) -> int:
        self.writer.write(data)
        await self.writer.drain()
        return await self.reply()

    def close(self) -> None:
        self.writer.close()


async def send_one(port: int, subject: str, data: bytes, stats: dict[str, int]) -> int:
    """Send until a final reply; return its code (0 when every attempt was deferred)."""
    for _ in range(500):
        try:
            session, greeting = await Session.open(port)
        except OSError:
            stats["connect_errors"] += 1
            await asyncio.sleep(0.1)
            continue
        if greeting == 421:
            stats["deferred_421"] += 1
            session.close()
            await asyncio.sleep(0.05)
            continue
        try:
            await session.command(b"EHLO load.example.net\r\n")
            await session.command(b"MAIL FROM:<alice@example.net>\r\n")
            await session.command(b"RCPT TO:<bob@example.com>\r\n")
            if await session.command(b"DATA\r\n") != 354:
                code = 451
            else:
                code = await session.command(data + b".\r\n")
            await session.command(b"QUIT\r\n")
        finally:
            session.close()
        if 400 <= code < 500:
            stats["deferred_4xx"] += 1
            await asyncio.sleep(0.05)
            continue
        return code
    return 0


async def hold_connections(port: int, count: int) -> tuple[int, int, int]:
    """Open `count` sessions at once; return (greeted 220, refused 421, failed to connect)."""
    results = await asyncio.gather(*(Session.open(port) for _ in range(count)), return_exceptions=True)
    greeted = sum(1 for r in results if not isinstance(r, BaseException) and r[1] == 220)
    refused = sum(1 for r in results if not isinstance(r, BaseException) and r[1] == 421)
    failed = sum(1 for r in results if isinstance(r, BaseException))
    await asyncio.sleep(1)
    for result in results:
        if not isinstance(result, BaseException):
            result[0].close()
    return greeted, refused, failed


async def sample_memory(pid: int, samples: list[tuple[float, int]], start: float,
                        stop: asyncio.Event) -> None:
    while not stop.is_set():
        samples.append((time.monotonic() - start, tree_rss_kib(pid)))
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except asyncio.TimeoutError:
            pass


def stored_subjects(data_dir: Path) -> tuple[list[str], list[str]]:
    """Return the subjects in the sink folder and in the quarantine."""
    delivered = []
    for path in (data_dir / "sink").glob("*.eml"):
        head = path.read_bytes().split(b"\r\n\r\n", 1)[0]
        match = re.search(rb"^Subject: (.*)$", head, re.MULTILINE)
        if match:
            delivered.append(match.group(1).decode().strip())
    from quishguard.quarantine import QuarantineStore

    quarantined = [item.subject for item in QuarantineStore(data_dir).list(status=None)]
    return delivered, quarantined


async def run(args: argparse.Namespace) -> int:
    folder = Path(tempfile.mkdtemp(prefix="qg-load-"))
    listen, sink = free_port(), free_port()
    config = folder / "quishguard.toml"
    config.write_text(f'[smtp]\nlisten = "127.0.0.1:{listen}"\nmax_connections = {args.max_connections}\n'
                      f'[sink]\nlisten = "127.0.0.1:{sink}"\n[quarantine]\ndata_dir = "{folder / "data"}"\n'
                      f'[scan]\nworkers = {args.workers}\n'
                      # The soak measures the hop, not DNS; it must not query outside loopback.
                      '[dns]\nenabled = false\n')
    log = open(folder / "serve.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "quishguard", "serve", "--config", str(config),
                               "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", listen), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)

        start = time.monotonic()
        samples: list[tuple[float, int]] = []
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_memory(server.pid, samples, start, stop))

        greeted, refused, failed = await hold_connections(listen, args.connections)
        held_at = time.monotonic() - start

        image = qr_png(PHISH_URL)
        stats = {"deferred_421": 0, "deferred_4xx": 0, "connect_errors": 0}
        subjects = [f"load-{index}-{secrets.token_hex(4)}" for index in range(args.messages)]
        gate = asyncio.Semaphore(args.concurrency)
        codes: dict[str, int] = {}

        async def one(index: int, subject: str) -> None:
            async with gate:
                data = build_message(subject, image if index % 10 == 0 else None)
                codes[subject] = await send_one(listen, subject, data, stats)

        soak_start = time.monotonic()
        await asyncio.gather(*(one(index, subject) for index, subject in enumerate(subjects)))
        soak_seconds = time.monotonic() - soak_start
        await asyncio.sleep(1)
        stop.set()
        await sampler
    finally:
        server.terminate()
        server.wait(30)
        log.close()

    delivered, quarantined = stored_subjects(folder / "data")
    accepted = {subject for subject, code in codes.items() if code == 250}
    found = set(delivered) | set(quarantined)
    lost = sorted(accepted - found)
    duplicates = len(delivered) - len(set(delivered))
    refused_final = sum(1 for code in codes.values() if code != 250)
    peak = max(rss for _, rss in samples) if samples else 0

    print(f"## Run of {time.strftime('%Y-%m-%d')}\n")
    print(f"Machine: {os.cpu_count()} CPU cores, Python {sys.version.split()[0]}, "
          f"{args.workers} decoder workers, max_connections {args.max_connections}.\n")
    print("| figure | value |\n| --- | --- |")
    print(f"| connections opened at once | {args.connections} |")
    print(f"| greeted (220) | {greeted} |")
    print(f"| refused by the limit (421) | {refused} |")
    print(f"| connect errors | {failed} |")
    print(f"| time until every connect finished | {held_at:.1f} s |")
    print(f"| messages sent | {args.messages} ({args.concurrency} at a time) |")
    print(f"| accepted (250) | {len(accepted)} |")
    print(f"| not accepted in the end | {refused_final} |")
    print(f"| retries after 421 / other 4xx | {stats['deferred_421']} / {stats['deferred_4xx']} |")
    print(f"| in the sink / in quarantine | {len(delivered)} / {len(quarantined)} |")
    print(f"| lost (accepted, found nowhere) | {len(lost)} |")
    print(f"| duplicates in the sink | {duplicates} |")
    print(f"| soak time | {soak_seconds:.1f} s ({args.messages / soak_seconds:.0f} messages/s) |")
    print(f"| peak RSS, server and workers | {peak / 1024:.0f} MiB |\n")
    print("Resident memory of the server and its workers over time:\n")
    print("| time | RSS |\n| --- | --- |")
    step = max(1, len(samples) // 12)
    for seconds, rss in samples[::step]:
        print(f"| {seconds:.0f} s | {rss / 1024:.0f} MiB |")
    if lost:
        print(f"\nLost subjects: {', '.join(lost[:20])}", file=sys.stderr)
    return 1 if lost or refused_final else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000, help="messages in the soak (default 2000)")
    parser.add_argument("--concurrency", type=int, default=50, help="messages in flight at once (default 50)")
    parser.add_argument("--connections", type=int, default=300,
                        help="sessions opened at once in the connection test (default 300)")
    parser.add_argument("--max-connections", type=int, default=100,
                        help="the server's smtp.max_connections (default 100)")
    parser.add_argument("--workers", type=int, default=2, help="decoder worker processes (default 2)")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
