"""Load on loopback: many concurrent connections and a soak of messages through quishguard to the
local sink, asserting that every message quishguard accepted is in the sink or in quarantine.

The soak sends 1,000 messages by default; `QUISHGUARD_SOAK=N` sets another
count for longer local runs. scripts/load_test.py measures the same load
with memory figures for docs/load.md.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path

import pytest

from quishguard.sink import start_sink

from ..factories import make_message, qr_png
from ..postfix import free_port
from ..smtp_client import RawClient

SOAK_MESSAGES = int(os.environ.get("QUISHGUARD_SOAK", "1000"))
PHISH_URL = "https://login.example.org/verify?user=bob@example.com"
QR_IMAGE = qr_png(PHISH_URL)


@pytest.fixture
async def sink(tmp_path: Path):
    """quishguard's local sink on a free port; yields (port, folder)."""
    folder = tmp_path / "sink"
    port = free_port()
    server = await start_sink(folder, "127.0.0.1", port, "sink.test", 10 * 1024 * 1024)
    yield port, folder
    server.close()


def token_message(token: str, phishing: bool) -> bytes:
    if phishing:
        return make_message(subject=token, text="Scan the code.", images=[("code.png", QR_IMAGE)])
    return make_message(subject=token, text=f"Report {token} attached.\n")


async def send_until_accepted(port: int, token: str, phishing: bool, attempts: int = 200
                              ) -> tuple[int, int]:
    """Send one message, retrying after 4xx as an MTA does; return (final code, 421 count)."""
    deferred = 0
    for _ in range(attempts):
        client = await RawClient.connect(port)
        if client.greeting[0] == 421:
            deferred += 1
            client.writer.close()
            await asyncio.sleep(0.05)
            continue
        try:
            await client.command("EHLO load.example.net")
            await client.command("MAIL FROM:<alice@example.net>")
            await client.command("RCPT TO:<bob@example.com>")
            code, _ = await client.data(token_message(token, phishing))
        finally:
            await client.close()
        if 400 <= code < 500:
            await asyncio.sleep(0.05)
            continue
        return code, deferred
    return 0, deferred


def sink_subjects(folder: Path) -> list[str]:
    subjects = []
    for path in folder.glob("*.eml"):
        for line in path.read_bytes().split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
            if line.startswith(b"Subject: "):
                subjects.append(line[9:].decode())
    return subjects


async def run_load(start_hop, sink, count: int, concurrency: int, max_connections: int
                   ) -> tuple[list[str], dict[str, int], int, list[str], list[str]]:
    port, folder = sink
    hop = await start_hop(relay_port=port, smtp={"max_connections": max_connections})
    tokens = [f"qg-{index}-{secrets.token_hex(4)}" for index in range(count)]
    codes: dict[str, int] = {}
    deferrals = 0
    gate = asyncio.Semaphore(concurrency)

    async def one(index: int, token: str) -> None:
        nonlocal deferrals
        async with gate:
            codes[token], deferred = await send_until_accepted(hop.port, token, phishing=index % 10 == 0)
            deferrals += deferred

    await asyncio.gather(*(one(index, token) for index, token in enumerate(tokens)))
    quarantined = [item.subject for item in hop.store.list(status=None)]
    return tokens, codes, deferrals, sink_subjects(folder), quarantined


async def test_concurrent_connections_limited_no_loss(start_hop, sink):
    tokens, codes, deferrals, delivered, quarantined = await run_load(
        start_hop, sink, count=200, concurrency=200, max_connections=20)

    accepted = [token for token in tokens if codes[token] == 250]
    assert len(accepted) == len(tokens)
    assert deferrals > 0, "the connection limit never replied 421"
    assert sorted(delivered + quarantined) == sorted(accepted)
    assert len(quarantined) == len(tokens) // 10


async def test_soak_messages_no_loss(start_hop, sink):
    tokens, codes, _, delivered, quarantined = await run_load(
        start_hop, sink, count=SOAK_MESSAGES, concurrency=20, max_connections=100)

    accepted = [token for token in tokens if codes[token] == 250]
    assert len(accepted) == len(tokens)
    assert len(set(delivered)) == len(delivered), "a message arrived twice"
    assert sorted(delivered + quarantined) == sorted(accepted)
