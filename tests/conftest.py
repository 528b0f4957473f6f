"""Shared fixtures: a decoder worker pool, a recording next hop and a running filter hop.

Every server here listens on 127.0.0.1 with a port chosen by the kernel.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiosmtpd.smtp import SMTP, Envelope, Session

from quishguard.config import Config, build_config
from quishguard.milter.smtp import start_server
from quishguard.pipeline import Scanner
from quishguard.quarantine import QuarantineStore
from quishguard.scoring.rules import RULES
from quishguard.workers import WorkerPool


@pytest_asyncio.fixture(scope="session")
async def pool() -> AsyncIterator[WorkerPool]:
    workers = WorkerPool(2)
    await workers.start()
    yield workers
    await workers.close()


def make_config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    """Build a config from `section={key: value}` keyword arguments, data in tmp_path."""
    data: dict[str, Any] = {"quarantine": {"data_dir": str(tmp_path / "data")}}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return build_config(data, "test", known_rules={rule.name for rule in RULES})


@dataclasses.dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes


class RecordingHop:
    """An aiosmtpd next hop that stores what it accepts and can refuse on demand."""

    def __init__(self) -> None:
        self.messages: list[Received] = []
        self.refused_recipients: dict[str, str] = {}
        self.data_reply: str | None = None
        self.data_delay = 0.0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        if address in self.refused_recipients:
            return self.refused_recipients[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        if self.data_reply:
            return self.data_reply
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                      envelope.original_content))
        return f"250 2.0.0 Ok: queued as HOP{len(self.messages)}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        class LongLines(SMTP):
            line_length_limit = 60 * 1024 * 1024

        self.server = await loop.create_server(
            lambda: LongLines(self, hostname="nexthop.test", data_size_limit=None, loop=loop),
            host="127.0.0.1", port=0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest_asyncio.fixture
async def next_hop() -> AsyncIterator[RecordingHop]:
    hop = RecordingHop()
    await hop.start()
    yield hop
    await hop.stop()


@dataclasses.dataclass
class RunningHop:
    port: int
    config: Config
    store: QuarantineStore
    server: asyncio.AbstractServer


@pytest_asyncio.fixture
async def start_hop(pool: WorkerPool, next_hop: RecordingHop, tmp_path: Path
                    ) -> AsyncIterator[Callable[..., Any]]:
    """Return a coroutine that starts quishguard with config sections as keyword arguments."""
    started: list[RunningHop] = []

    async def start(relay_port: int | None = None, **sections: dict[str, Any]) -> RunningHop:
        config = make_config(tmp_path, **sections)
        store = QuarantineStore(config.data_dir)
        scanner = Scanner(config, pool)
        server = await start_server(config, scanner, store, ("127.0.0.1", relay_port or next_hop.port),
                                    ("127.0.0.1", 0))
        running = RunningHop(server.sockets[0].getsockname()[1], config, store, server)
        started.append(running)
        return running

    yield start
    for running in started:
        running.server.close()
