"""Fixtures for integration tests: quishguard on a chosen port, `quishguard serve` as a process,
a next hop that can be stopped and restarted on its port, and private Postfix instances.

Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiosmtpd.smtp import SMTP

from quishguard.milter.smtp import start_server
from quishguard.pipeline import Scanner
from quishguard.quarantine import QuarantineStore
from quishguard.workers import WorkerPool

from ..conftest import RecordingHop, RunningHop, make_config
from ..postfix import PostfixInstance, free_port, new_instance, postfix, postfix_unavailable_reason  # noqa: F401

QUISHGUARD = [sys.executable, "-m", "quishguard"]


@pytest_asyncio.fixture
async def start_filter(pool: WorkerPool, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Return a coroutine `start(listen_port, relay_port, **sections)` that runs quishguard in-process."""
    started: list[RunningHop] = []

    async def start(listen_port: int, relay_port: int, **sections: dict[str, Any]) -> RunningHop:
        config = make_config(tmp_path, **sections)
        store = QuarantineStore(config.data_dir)
        server = await start_server(config, Scanner(config, pool), store, ("127.0.0.1", relay_port),
                                    ("127.0.0.1", listen_port))
        running = RunningHop(listen_port, config, store, server)
        started.append(running)
        return running

    yield start
    for running in started:
        running.server.close()


class PortHop(RecordingHop):
    """A RecordingHop that listens on a given port, so it can be stopped and started again there."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: SMTP(self, hostname="nexthop.test", data_size_limit=None, loop=loop),
            host="127.0.0.1", port=self.port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None


@pytest_asyncio.fixture
async def port_hop() -> AsyncIterator[PortHop]:
    hop = PortHop(free_port())
    await hop.start()
    yield hop
    await hop.stop()


async def wait_listening(port: int, timeout: float = 60.0,
                         process: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until a TCP connection to 127.0.0.1:`port` succeeds.

    Raise TimeoutError after `timeout` seconds, or at once when `process`
    (the server expected to listen) has exited.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise TimeoutError(f"the server for 127.0.0.1:{port} exited with {process.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def child_pids(pid: int) -> list[int]:
    """Return the PIDs of the direct children of `pid`, from /proc."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return children


def cpu_ticks(pid: int) -> int:
    """Return user plus system CPU time of `pid` in clock ticks, 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


class ServeProcess:
    """`quishguard serve` as a child process, for tests that restart or kill -9 it.

    `config_text` is TOML appended after the `[smtp]` and `[quarantine]`
    sections that this class writes.
    """

    def __init__(self, folder: Path, listen_port: int, relay_port: int, config_text: str = "") -> None:
        self.folder = folder
        self.listen_port = listen_port
        self.config_file = folder / "quishguard.toml"
        self.config_file.write_text(
            f'[smtp]\nlisten = "127.0.0.1:{listen_port}"\nrelay = "127.0.0.1:{relay_port}"\n'
            f'[quarantine]\ndata_dir = "{folder / "data"}"\n'
            # Tests reach only loopback, so the hop must not ask the system's resolvers.
            f'[dns]\nenabled = false\n{config_text}')
        self.log_file = folder / "serve.log"
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen([*QUISHGUARD, "serve", "--config", str(self.config_file)],
                                            stdout=log, stderr=subprocess.STDOUT, cwd=self.folder)
        try:
            await wait_listening(self.listen_port, process=self.process)
        except TimeoutError as error:
            raise TimeoutError(f"{error}; quishguard serve log:\n{self.log_text()[-3000:]}") from None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        """Send SIGKILL to the server process and reap it (its workers see the pipe close and exit)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        """Stop with SIGTERM, as a service manager does for a restart."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    async def busy_worker(self, timeout: float = 20.0) -> int | None:
        """Return the PID of a decode worker that is using CPU, or None when none is within `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            before = {pid: cpu_ticks(pid) for pid in child_pids(self.pid)}
            await asyncio.sleep(0.2)
            for pid, ticks in before.items():
                if cpu_ticks(pid) - ticks >= 5:
                    return pid
        return None


@pytest_asyncio.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Callable[..., ServeProcess]]:
    """Return a coroutine function `start(listen_port, relay_port, config_text="")` that runs `quishguard serve`."""
    started: list[ServeProcess] = []

    async def start(listen_port: int, relay_port: int, config_text: str = "") -> ServeProcess:
        folder = tmp_path / f"serve-{len(started)}"
        folder.mkdir()
        process = ServeProcess(folder, listen_port, relay_port, config_text)
        started.append(process)
        await process.start()
        return process

    # Workers of a killed server exit by themselves when their pipe closes.
    yield start
    for process in started:
        process.stop()


@pytest_asyncio.fixture(scope="module", params=["after-queue", "before-queue"])
async def mta(request: pytest.FixtureRequest) -> AsyncIterator[PostfixInstance]:
    """A private Postfix in each SMTP filter mode, shared by a module's tests.

    Its filter port is reserved but nothing listens there until a test
    starts quishguard on `mta.settings.filter_port`.
    """
    reason = postfix_unavailable_reason()
    if reason:
        pytest.skip(reason)
    instance = new_instance(request.param, free_port())
    instance.start()
    yield instance
    instance.stop()
    shutil.rmtree(instance.root, ignore_errors=True)
