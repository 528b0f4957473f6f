"""The milter behind a real Postfix: swaks -> Postfix smtpd -> quishguard milter -> Maildir.

One private Postfix in milter mode (`smtpd_milters=inet:127.0.0.1:PORT`,
milter_protocol 6, milter_default_action tempfail) serves the whole module.
Each test starts the milter on that port in-process and stops it afterwards.
The reinjection listener of the same Postfix skips milters, so it is the
release relay for mail the milter stored.
"""

from __future__ import annotations

import asyncio
import email
import io
import os
import re
import secrets
import shutil
import subprocess
import tomllib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from quishguard.cli import release
from quishguard.milter.server import start_milter_server
from quishguard.model import Action
from quishguard.pipeline import Scanner
from quishguard.quarantine import QuarantineStore
from quishguard.stamp import verdict_headers

from ..conftest import make_config
from ..factories import make_message, qr_png
from ..postfix import PostfixInstance, free_port, new_instance, postfix_unavailable_reason
from ..smtp_client import RawClient

PHISH_URL = "https://login.example.org/verify?user=bob@example.com"
QR_MESSAGE_TEXT = "Scan me"
SAMPLES = Path(__file__).resolve().parents[2] / "samples"
# 60,000,000 bytes: room for the 20 MB message after base64 and the headers.
MESSAGE_SIZE_LIMIT = 60_000_000


def token() -> str:
    return f"qg-{secrets.token_hex(6)}"


@pytest_asyncio.fixture(scope="module")
async def milter_mta() -> AsyncIterator[PostfixInstance]:
    reason = postfix_unavailable_reason()
    if reason:
        pytest.skip(reason)
    instance = new_instance("milter", free_port(), message_size_limit=MESSAGE_SIZE_LIMIT)
    instance.start()
    yield instance
    instance.stop()
    shutil.rmtree(instance.root, ignore_errors=True)


class CountingScanner(Scanner):
    """The real scanner, counting the messages it inspected."""

    scans = 0

    async def scan(self, raw, envelope, *, message_ref="-"):
        self.scans += 1
        return await super().scan(raw, envelope, message_ref=message_ref)


@pytest_asyncio.fixture
async def start_milter(pool, tmp_path: Path, milter_mta: PostfixInstance) -> AsyncIterator[Callable[..., Any]]:
    """Return a coroutine that starts the milter on the module Postfix's milter port."""
    started: list[asyncio.AbstractServer] = []

    async def start(**sections: dict[str, Any]):
        config = make_config(tmp_path, **sections)
        store = QuarantineStore(config.data_dir)
        scanner = CountingScanner(config, pool)
        server = await start_milter_server(config, scanner, store,
                                           ("127.0.0.1", milter_mta.settings.filter_port))
        started.append(server)
        return config, store, scanner

    yield start
    for server in started:
        server.close()
        await server.wait_closed()


def postqueue_listing(mta: PostfixInstance) -> str:
    return subprocess.run(["postqueue", "-c", str(mta.etc), "-p"], capture_output=True, text=True,
                          timeout=30, check=True).stdout


async def test_accept_delivered_with_headers(start_milter, milter_mta):
    await start_milter()
    subject = token()

    sent = await milter_mta.send(subject)
    delivered = await milter_mta.wait_for_mail(subject)

    assert sent.returncode == 0, sent.transcript
    assert len(delivered) == 1
    message = email.message_from_bytes(delivered[0])
    assert message["X-Quishguard-Action"] == "accept"
    assert message["X-Quishguard-Score"] == "0.0"
    assert message["Subject"] == subject


async def test_forged_headers_replaced(start_milter, milter_mta):
    await start_milter()
    subject = token()

    sent = await milter_mta.send(subject, extra=("--add-header", "X-Quishguard-Score: -99.0",
                                                 "--add-header", "X-Quishguard-Action: accept"))
    delivered = await milter_mta.wait_for_mail(subject)

    assert sent.returncode == 0, sent.transcript
    message = email.message_from_bytes(delivered[0])
    assert message.get_all("X-Quishguard-Score") == ["0.0"]
    assert message.get_all("X-Quishguard-Action") == ["accept"]


async def test_tag_rewrites_subject(start_milter, milter_mta):
    await start_milter(thresholds={"tag": 0.0}, headers={"subject_tag": "[CHECK] "})
    subject = token()

    sent = await milter_mta.send(subject)
    delivered = await milter_mta.wait_for_mail(subject)

    assert sent.returncode == 0, sent.transcript
    message = email.message_from_bytes(delivered[0])
    assert message["X-Quishguard-Action"] == "tag"
    assert message["Subject"] == f"[CHECK] {subject}"


async def test_quarantine_hold_queue(start_milter, milter_mta):
    await start_milter()
    subject = token()
    data = make_message(subject=subject, text=QR_MESSAGE_TEXT, images=[("c.png", qr_png(PHISH_URL))])

    sent = await milter_mta.send(subject, data=data)
    held = await milter_mta.wait_for_queue(lambda queued: any(q.queue_name == "hold" for q in queued))
    listing = postqueue_listing(milter_mta)
    queue_id = next(q.queue_id for q in held if q.queue_name == "hold")
    subprocess.run(["postsuper", "-c", str(milter_mta.etc), "-H", queue_id], check=True, timeout=30,
                   capture_output=True)
    await milter_mta.flush()
    released = await milter_mta.wait_for_mail(subject)

    assert sent.returncode == 0, sent.transcript
    assert f"{queue_id}!" in listing
    assert milter_mta.mail(subject) == released
    assert len(released) == 1
    assert email.message_from_bytes(released[0])["X-Quishguard-Action"] == "quarantine"


async def test_quarantine_store_then_release(start_milter, milter_mta):
    config, store, scanner = await start_milter(milter={
        "quarantine_mode": "store", "release_relay": f"127.0.0.1:{milter_mta.reinject_port}"})
    subject = token()
    data = make_message(subject=subject, text=QR_MESSAGE_TEXT, images=[("c.png", qr_png(PHISH_URL))])

    sent = await milter_mta.send(subject, data=data)
    stored = [item for item in store.list() if item.subject == subject]
    queue_after_send = await milter_mta.queue()
    reply = await release(store, stored[0].id, config)
    delivered = await milter_mta.wait_for_mail(subject)

    assert sent.returncode == 0, sent.transcript
    assert len(stored) == 1
    assert stored[0].queue_id
    assert queue_after_send == []
    assert reply.startswith("250")
    assert len(delivered) == 1
    message = email.message_from_bytes(delivered[0])
    assert message["X-Quishguard-Action"] == "quarantine"
    assert message["X-Quishguard-Released"] is not None
    assert scanner.scans == 1


async def test_reject_550_to_sender(start_milter, milter_mta):
    await start_milter(thresholds={"reject": 8.0})
    subject = token()
    data = make_message(subject=subject, text=QR_MESSAGE_TEXT, images=[("c.png", qr_png(PHISH_URL))])

    sent = await milter_mta.send(subject, data=data)

    assert sent.returncode != 0
    assert any(reply.startswith("550 5.7.1 Message rejected as ") for reply in sent.replies())
    assert await milter_mta.queue() == []
    assert milter_mta.mail(subject) == []


async def test_tempfail_451_to_sender(start_milter, milter_mta):
    await start_milter(scan={"budget_seconds": 0.1, "fail_mode": "tempfail"})
    subject = token()
    data = make_message(subject=subject, text="see attachment",
                        attachments=[("noise.png", "image/png", _noise_png(3000))])

    sent = await milter_mta.send(subject, data=data)

    assert sent.returncode != 0
    assert any(reply.startswith("451 4.7.1 ") for reply in sent.replies())
    assert await milter_mta.queue() == []
    assert milter_mta.mail(subject) == []


async def test_milter_down_tempfails_sender(milter_mta):
    subject = token()

    sent = await milter_mta.send(subject)

    assert sent.returncode != 0
    assert any(reply.startswith("451 4.7.1") for reply in sent.replies())
    assert await milter_mta.queue() == []
    assert milter_mta.mail(subject) == []


async def test_several_messages_one_smtp_session(start_milter, milter_mta):
    _, _, scanner = await start_milter(thresholds={"tag": 100.0, "quarantine": 100.0})
    subjects = [token() for _ in range(3)]
    client = await RawClient.connect(milter_mta.public_port)
    await client.command("EHLO client.example.net")

    replies = []
    for subject in subjects:
        await client.command("MAIL FROM:<alice@example.net>")
        await client.command("RCPT TO:<bob@example.com>")
        replies.append(await client.data(make_message(subject=subject)))
    await client.command("RSET")
    await client.close()
    delivered = [await milter_mta.wait_for_mail(subject) for subject in subjects]

    assert [code for code, _ in replies] == [250, 250, 250]
    assert [len(found) for found in delivered] == [1, 1, 1]
    for subject, found in zip(subjects, delivered):
        message = email.message_from_bytes(found[0])
        assert message["Subject"] == subject
        assert message["X-Quishguard-Action"] == "accept"
    assert scanner.scans == 3


async def test_large_message_with_images(start_milter, milter_mta):
    await start_milter()
    subject = token()
    images = [(f"qr{i}.png", qr_png(f"{PHISH_URL}&n={i}")) for i in range(3)]
    filler = os.urandom(14 * 1024 * 1024)
    data = make_message(subject=subject, text=QR_MESSAGE_TEXT, images=images,
                        attachments=[("archive.bin", "application/octet-stream", filler)])

    sent = await milter_mta.send(subject, data=data, extra=("--timeout", "120"))
    held = await milter_mta.wait_for_queue(lambda queued: any(q.queue_name == "hold" for q in queued))

    assert len(data) > 19_000_000
    assert sent.returncode == 0, sent.transcript
    assert [q.queue_name for q in held] == ["hold"]
    subprocess.run(["postsuper", "-c", str(milter_mta.etc), "-d", "ALL", "hold"], check=True, timeout=30,
                   capture_output=True)


async def test_samples_same_verdict_headers_as_serve(start_milter, milter_mta, postfix, start_filter):
    """Each sample through Postfix + milter and through Postfix + `serve` (before-queue) gets the same verdict headers."""
    with open(SAMPLES / "quishguard.toml", "rb") as handle:
        sections = tomllib.load(handle)
    await start_milter(**sections)
    proxy_mta = postfix("before-queue", free_port())
    hop = await start_filter(proxy_mta.settings.filter_port, proxy_mta.reinject_port, **sections)
    compared: dict[str, int] = {"stored": 0, "relayed": 0}

    for path in sorted(SAMPLES.glob("*.eml")):
        subject = token()
        data = path.read_bytes().replace(b"Subject: ", f"Subject: {subject} ".encode(), 1)

        via_milter = await milter_mta.send(subject, data=data)
        via_proxy = await proxy_mta.send(subject, data=data)
        milter_queue = await milter_mta.queue()
        for queued in milter_queue:
            subprocess.run(["postsuper", "-c", str(milter_mta.etc), "-H", queued.queue_id],
                           check=True, timeout=30, capture_output=True)
        await milter_mta.flush()
        milter_copy = await milter_mta.wait_for_mail(subject)
        stored = [item for item in hop.store.list() if subject in item.subject]
        proxy_copy = [] if stored else await proxy_mta.wait_for_mail(subject)

        assert via_milter.returncode == 0, via_milter.transcript
        assert via_proxy.returncode == 0, via_proxy.transcript
        assert len(milter_copy) == 1, path.name
        milter_headers = _verdict_fields(milter_copy[0])
        if stored:
            expected = [f.decode() for f in verdict_headers(stored[0].verdict, "X-Quishguard-")]
            assert milter_headers == [_unfold(f) for f in expected], path.name
            assert stored[0].action is Action.QUARANTINE
            compared["stored"] += 1
        else:
            assert len(proxy_copy) == 1, path.name
            assert milter_headers == _verdict_fields(proxy_copy[0]), path.name
            compared["relayed"] += 1
        assert milter_headers[1].startswith("X-Quishguard-Action: "), path.name

    assert compared["stored"] >= 1
    assert compared["relayed"] >= 1


def _unfold(field_text: str) -> str:
    return re.sub(r"\r?\n[ \t]+", " ", field_text).rstrip("\r\n")


def _verdict_fields(raw: bytes) -> list[str]:
    """Return the X-Quishguard-* fields of a delivered message, unfolded, in order."""
    block = raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode("utf-8", "replace")
    return [line for line in _unfold(block).split("\n") if line.lower().startswith("x-quishguard-")]


def _noise_png(size: int) -> bytes:
    """A square PNG of random pixels: slow for every QR backend, and contains no code."""
    import numpy
    from PIL import Image

    pixels = numpy.random.default_rng(7).integers(0, 256, (size, size), dtype=numpy.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
