"""A private Postfix instance on loopback for integration tests.

Each instance lives in its own folder under /tmp (configuration, queue,
data, log and one catch-all Maildir), listens only on 127.0.0.1 with ports
chosen by the kernel, and cannot deliver anywhere but that Maildir: the
default, relay and local transports are `error:`. Its configuration is
rendered from the project's template in deploy/postfix/, in one of the
deployment modes of `quishguard.postfix_config`.

Postfix runs only as root (a non-root `postfix start` exits 1 silently), so
the `postfix` fixture skips its tests when Postfix or swaks is missing or the
tests do not run as root. Helpers that wait are coroutines, because the
quishguard under test usually runs on the same event loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from quishguard.postfix_config import PostfixSettings, write_postfix_config

# Longest wait for mail to reach the Maildir or leave the queue. Postfix
# delivers in under 0.1 s on loopback, and retries every 2 s here.
DELIVERY_TIMEOUT = 30.0


_handed_out: set[int] = set()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago and not returned before.

    The kernel may offer a port again as soon as the probe closes it, so a
    test that asks for a filter port and then for Postfix's ports could get
    the same one twice without the record of ports handed out.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def postfix_unavailable_reason() -> str | None:
    """Return why a private Postfix cannot run here, or None when it can."""
    if shutil.which("postfix") is None:
        return "postfix is not installed (scripts/setup.sh installs it)"
    if shutil.which("swaks") is None:
        return "swaks is not installed (scripts/setup.sh installs it)"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root"
    return None


@dataclass(frozen=True)
class SwaksResult:
    returncode: int
    transcript: str

    def replies(self) -> list[str]:
        """Return the server replies, one string per reply line, without the `<-` marker."""
        return [line[4:].strip() for line in self.transcript.splitlines()
                if line.startswith(("<-", "<**"))]


@dataclass(frozen=True)
class QueuedMessage:
    queue_id: str
    queue_name: str
    sender: str
    recipients: tuple[str, ...]
    reasons: tuple[str, ...]


class PostfixInstance:
    """One private Postfix: its folder, its ports and helpers to send, read and wait."""

    def __init__(self, root: Path, settings: PostfixSettings, public_port: int, reinject_port: int) -> None:
        self.root = root
        self.settings = settings
        self.public_port = public_port
        self.reinject_port = reinject_port
        self.etc = root / "etc"
        self.maildir = root / "mail" / "inbox"
        self.maillog = root / "log" / "maillog"

    # Life cycle.

    def prepare(self) -> None:
        nobody = pwd.getpwnam("nobody")
        for name in ("etc", "queue", "data", "log", "mail"):
            (self.root / name).mkdir(mode=0o755, exist_ok=True)
        os.chown(self.root / "mail", nobody.pw_uid, nobody.pw_gid)
        # master(8) writes its lock file into data_directory as the mail owner.
        mail_owner = pwd.getpwnam("postfix")
        os.chown(self.root / "data", mail_owner.pw_uid, mail_owner.pw_gid)
        write_postfix_config(self.settings, self.etc)

    def postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["postfix", "-c", str(self.etc), *args], capture_output=True, text=True,
                              timeout=60, check=check)

    def start(self) -> None:
        result = self.postfix("start", check=False)
        if result.returncode != 0:
            raise RuntimeError(f"postfix start failed in {self.root}: {result.stdout}{result.stderr}"
                               f"\nmaillog:\n{self.log_text()}")
        self._wait_listening(self.public_port)

    def _wait_listening(self, port: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"Postfix in {self.root} is not listening on 127.0.0.1:{port} after {timeout} s")

    def master_pid(self) -> int | None:
        try:
            return int((self.root / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        pid = self.master_pid()
        self.postfix("stop", check=False)
        deadline = time.monotonic() + 15
        while pid is not None and time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.05)

    # Sending.

    async def swaks(self, *args: str, port: int | None = None, timeout: float = 60.0) -> SwaksResult:
        """Run swaks against the public listener; return its exit code and transcript."""
        command = ["swaks", "--server", "127.0.0.1", "--port", str(port or self.public_port),
                   "--helo", "client.example.net", "--timeout", "30", *args]
        process = await asyncio.create_subprocess_exec(
            *command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
        return SwaksResult(process.returncode or 0, output.decode("utf-8", "replace"))

    async def send(self, token: str, *, body: str = "Hello from swaks.", to: str = "bob@example.com",
                   sender: str = "alice@example.net", data: bytes | None = None,
                   extra: tuple[str, ...] = ()) -> SwaksResult:
        """Send one message whose Subject contains `token`, or the raw `data` when given."""
        args = ["--from", sender, "--to", to]
        if data is None:
            args += ["--header", f"Subject: {token}", "--body", body]
            return await self.swaks(*args, *extra)

        message_file = self.root / f"message-{token}.eml"
        message_file.write_bytes(data)
        return await self.swaks(*args, "--data", str(message_file), *extra)

    # Reading the Maildir, the queue and the log.

    def mail(self, token: str | None = None) -> list[bytes]:
        """Return the delivered messages (oldest first) that contain `token`, or all of them."""
        folder = self.maildir / "new"
        if not folder.is_dir():
            return []
        files = sorted(folder.iterdir(), key=lambda path: path.stat().st_mtime_ns)
        messages = [path.read_bytes() for path in files]
        if token is None:
            return messages
        return [message for message in messages if token.encode() in message]

    async def wait_for_mail(self, token: str, count: int = 1, timeout: float = DELIVERY_TIMEOUT) -> list[bytes]:
        """Wait until `count` messages containing `token` are delivered; return them.

        Return what was delivered so far when the time runs out, so the
        caller's assert shows the shortfall.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = self.mail(token)
            if len(found) >= count or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.1)

    async def _run(self, *command: str) -> str:
        process = await asyncio.create_subprocess_exec(
            *command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        output, errors = await asyncio.wait_for(process.communicate(), 30)
        if process.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {errors.decode(errors='replace')}")
        return output.decode("utf-8", "replace")

    async def queue(self) -> list[QueuedMessage]:
        """Return the messages in the queue, from `postqueue -j`."""
        output = await self._run("postqueue", "-c", str(self.etc), "-j")
        queued = []
        for line in output.splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            recipients = record.get("recipients", [])
            queued.append(QueuedMessage(
                queue_id=record["queue_id"], queue_name=record["queue_name"], sender=record["sender"],
                recipients=tuple(r["address"] for r in recipients),
                reasons=tuple(r.get("delay_reason", "") for r in recipients)))
        return queued

    async def flush(self) -> None:
        """Ask the queue manager to retry every deferred message now (`postqueue -f`)."""
        await self._run("postqueue", "-c", str(self.etc), "-f")

    async def wait_for_queue(self, predicate: Callable[[list[QueuedMessage]], bool],
                             timeout: float = DELIVERY_TIMEOUT) -> list[QueuedMessage]:
        """Poll the queue until `predicate(queue)` holds; return the last queue seen."""
        deadline = time.monotonic() + timeout
        while True:
            queued = await self.queue()
            if predicate(queued) or time.monotonic() > deadline:
                return queued
            await asyncio.sleep(0.2)

    def log_text(self) -> str:
        try:
            return self.maillog.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    async def wait_for_log(self, pattern: str, timeout: float = DELIVERY_TIMEOUT) -> re.Match[str] | None:
        """Wait until the maillog matches the regular expression `pattern`; return the match."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.log_text())
            if match or time.monotonic() > deadline:
                return match
            await asyncio.sleep(0.1)


def new_instance(mode: str, filter_port: int, **overrides: Any) -> PostfixInstance:
    """Create (not start) an instance in a new folder under /tmp.

    The folder must be reachable by the `postfix` and `nobody` users, so it
    cannot live under pytest's tmp_path (mode 0700). Its path stays short
    because Postfix's UNIX sockets live below it (108-byte limit).
    """
    root = Path(tempfile.mkdtemp(prefix="qgpf-", dir="/tmp"))
    root.chmod(0o755)
    public_port, reinject_port = free_port(), free_port()
    settings = PostfixSettings.loopback_test(root, mode=mode, public_port=public_port,
                                             reinject_port=reinject_port, filter_port=filter_port,
                                             **overrides)
    instance = PostfixInstance(root, settings, public_port, reinject_port)
    instance.prepare()
    return instance


@pytest_asyncio.fixture
async def postfix() -> AsyncIterator[Callable[..., PostfixInstance]]:
    """Return a function `start(mode, filter_port, **settings)` that starts a private Postfix.

    Every instance started is stopped and its folder removed afterwards.
    """
    reason = postfix_unavailable_reason()
    if reason:
        pytest.skip(reason)
    started: list[PostfixInstance] = []

    def start(mode: str, filter_port: int, **overrides: Any) -> PostfixInstance:
        instance = new_instance(mode, filter_port, **overrides)
        started.append(instance)
        instance.start()
        return instance

    yield start
    for instance in started:
        instance.stop()
        shutil.rmtree(instance.root, ignore_errors=True)
