"""Faults behind a real Postfix: the message ends delivered, deferred and retried, or refused
to a client that still holds it, and never lost.

One test per fault, each run in the after-queue mode (Postfix has already
answered 250, so it must keep the message and retry) and in the
before-queue mode (the client sees quishguard's reply, so a fault must be a
4xx and nothing may be queued). The next hop is either Postfix's own
reinjection listener, which delivers into the Maildir, or a recording hop
that the test stops, slows down or makes refuse.
"""

from __future__ import annotations

import asyncio
import email
import io
import os
import secrets
import signal

import numpy
import pytest
from PIL import Image

from ..factories import make_message, qr_png
from ..postfix import PostfixInstance, free_port

MODES = ["after-queue", "before-queue"]
PHISH_URL = "https://login.example.org/verify?user=bob@example.com"

# Two workers, a short scan budget so a retried slow message finishes
# quickly, and thresholds out of reach so every message is relayed and its
# verdict headers can be read in the Maildir.
SERVE_CONFIG = """
[scan]
workers = 2
budget_seconds = 3
[thresholds]
tag = 100.0
quarantine = 100.0
"""


def token() -> str:
    return f"qg-{secrets.token_hex(6)}"


def noise_png(size: int) -> bytes:
    """A square PNG of random pixels: slow for every QR backend, and holds no code."""
    pixels = numpy.random.default_rng(7).integers(0, 256, (size, size), dtype=numpy.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def deferred_reasons(queue) -> list[str]:
    return [reason for item in queue if item.queue_name == "deferred" for reason in item.reasons]


async def retry_until_delivered(mta: PostfixInstance, subject: str, count: int = 1) -> list[bytes]:
    """Flush the queue now and then until `count` messages with `subject` are delivered."""
    for _ in range(10):
        await mta.flush()
        delivered = await mta.wait_for_mail(subject, count, timeout=3)
        if len(delivered) >= count:
            return delivered
    return mta.mail(subject)


def client_messages(queue) -> list:
    """Return the queued messages from the test client, leaving out Postfix's postmaster notices.

    Postfix reports a before-queue filter that cannot be reached to the
    postmaster (notify_classes includes "software"), so such a notice may be
    queued while the client's message is not.
    """
    return [item for item in queue if item.sender == "alice@example.net"]


def refused_with(result, prefix: str) -> bool:
    return any(reply.startswith(prefix) for reply in result.replies())


@pytest.mark.parametrize("mode", MODES)
async def test_filter_down_then_back(postfix, start_filter, mode):
    filter_port = free_port()
    mta = postfix(mode, filter_port)
    subject = token()

    sent = await mta.send(subject)

    if mode == "after-queue":
        assert sent.returncode == 0, sent.transcript
        queue = await mta.wait_for_queue(lambda queued: bool(deferred_reasons(queued)))
        assert len(queue) == 1, f"{queue}\n{mta.log_text()}"
        assert "Connection refused" in deferred_reasons(queue)[0]
        assert mta.mail(subject) == []
    else:
        assert sent.returncode != 0
        assert refused_with(sent, "451 4.3.0")
        assert client_messages(await mta.queue()) == []

    await start_filter(filter_port, mta.reinject_port)
    if mode == "before-queue":
        # The client kept the message and sends it again.
        resent = await mta.send(subject)
        assert resent.returncode == 0, resent.transcript
    delivered = await retry_until_delivered(mta, subject)

    assert len(delivered) == 1
    assert email.message_from_bytes(delivered[0])["X-Quishguard-Action"] == "accept"
    assert await mta.wait_for_queue(lambda queued: not queued) == []


@pytest.mark.parametrize("mode", MODES)
async def test_filter_restart_mid_stream(postfix, serve, mode):
    filter_port = free_port()
    mta = postfix(mode, filter_port)
    server = await serve(filter_port, mta.reinject_port, SERVE_CONFIG)
    subjects = [token() for _ in range(8)]

    async def send_all():
        results = []
        for subject in subjects:
            results.append(await mta.send(subject))
            await asyncio.sleep(0.1)
        return results

    sending = asyncio.create_task(send_all())
    await mta.wait_for_mail(subjects[1])
    server.stop()
    await asyncio.sleep(0.5)
    await server.start()
    results = await sending

    refused = [subject for subject, result in zip(subjects, results) if result.returncode != 0]
    for subject, result in zip(subjects, results):
        # A restart may only ever cause a temporary refusal.
        assert not refused_with(result, "5"), result.transcript
        if mode == "after-queue":
            assert result.returncode == 0, result.transcript
    for subject in refused:
        resent = await mta.send(subject)
        assert resent.returncode == 0, resent.transcript
    delivered = {subject: await retry_until_delivered(mta, subject) for subject in subjects}

    for subject in subjects:
        assert len(delivered[subject]) >= 1, f"{subject} lost"
    assert await mta.wait_for_queue(lambda queued: not queued) == []


@pytest.mark.parametrize("mode", MODES)
async def test_next_hop_down_then_back(postfix, start_filter, port_hop, mode):
    await port_hop.stop()
    filter_port = free_port()
    mta = postfix(mode, filter_port)
    await start_filter(filter_port, port_hop.port)
    subject = token()

    sent = await mta.send(subject)

    if mode == "after-queue":
        assert sent.returncode == 0, sent.transcript
        queue = await mta.wait_for_queue(lambda queued: bool(deferred_reasons(queued)))
        assert "4.4.1 Next hop unavailable" in deferred_reasons(queue)[0]
    else:
        assert sent.returncode != 0
        assert refused_with(sent, "451 4.4.1")
        assert client_messages(await mta.queue()) == []

    await port_hop.start()
    if mode == "before-queue":
        resent = await mta.send(subject)
        assert resent.returncode == 0, resent.transcript
    else:
        await mta.flush()
    queue = await mta.wait_for_queue(lambda queued: not queued)

    assert queue == []
    assert len(port_hop.messages) == 1
    assert subject.encode() in port_hop.messages[0].data


@pytest.mark.parametrize("mode", MODES)
async def test_next_hop_slow_then_fast(postfix, start_filter, port_hop, mode):
    port_hop.data_delay = 3.0
    filter_port = free_port()
    mta = postfix(mode, filter_port)
    await start_filter(filter_port, port_hop.port, smtp={"relay_timeout": 1.0})
    subject = token()

    sent = await mta.send(subject)

    if mode == "after-queue":
        assert sent.returncode == 0, sent.transcript
        queue = await mta.wait_for_queue(lambda queued: bool(deferred_reasons(queued)))
        assert "4.4.1 Next hop unavailable" in deferred_reasons(queue)[0]
    else:
        assert sent.returncode != 0
        assert refused_with(sent, "451 4.4.1")
        assert client_messages(await mta.queue()) == []
    # The slow hop's late acceptance of the abandoned session must not count.
    await asyncio.sleep(port_hop.data_delay)
    assert port_hop.messages == []

    port_hop.data_delay = 0.0
    if mode == "before-queue":
        resent = await mta.send(subject)
        assert resent.returncode == 0, resent.transcript
    else:
        await mta.flush()
    queue = await mta.wait_for_queue(lambda queued: not queued)

    assert queue == []
    assert len(port_hop.messages) == 1


@pytest.mark.parametrize("mode", MODES)
async def test_next_hop_4xx_then_accepts(postfix, start_filter, port_hop, mode):
    port_hop.data_reply = "452 4.3.1 Insufficient system storage"
    filter_port = free_port()
    mta = postfix(mode, filter_port)
    await start_filter(filter_port, port_hop.port)
    subject = token()

    sent = await mta.send(subject)

    if mode == "after-queue":
        assert sent.returncode == 0, sent.transcript
        queue = await mta.wait_for_queue(lambda queued: bool(deferred_reasons(queued)))
        assert "452 4.3.1 Insufficient system storage" in deferred_reasons(queue)[0]
    else:
        assert sent.returncode != 0
        assert refused_with(sent, "452 4.3.1")
        assert client_messages(await mta.queue()) == []

    port_hop.data_reply = None
    if mode == "before-queue":
        resent = await mta.send(subject)
        assert resent.returncode == 0, resent.transcript
    else:
        await mta.flush()
    queue = await mta.wait_for_queue(lambda queued: not queued)

    assert queue == []
    assert len(port_hop.messages) == 1


@pytest.mark.parametrize("mode", MODES)
async def test_next_hop_5xx_bounced_or_refused(postfix, start_filter, port_hop, mode):
    port_hop.data_reply = "554 5.6.0 Message content refused"
    filter_port = free_port()
    mta = postfix(mode, filter_port)
    await start_filter(filter_port, port_hop.port)
    subject = token()

    sent = await mta.send(subject)

    assert port_hop.messages == []
    if mode == "before-queue":
        assert sent.returncode != 0
        assert refused_with(sent, "554 5.6.0 Message content refused")
        assert client_messages(await mta.queue()) == []
        return
    # Postfix answered 250 already, so the sender gets a bounce (delivered to the catch-all Maildir).
    assert sent.returncode == 0, sent.transcript
    bounces = await mta.wait_for_mail(subject)
    assert len(bounces) == 1
    assert email.message_from_bytes(bounces[0])["Subject"] == "Undelivered Mail Returned to Sender"
    assert b"554 5.6.0 Message content refused" in bounces[0]
    assert await mta.wait_for_queue(lambda queued: not queued) == []


@pytest.mark.parametrize("mode", MODES)
async def test_kill_filter_mid_transaction(postfix, serve, mode):
    filter_port = free_port()
    mta = postfix(mode, filter_port)
    server = await serve(filter_port, mta.reinject_port, SERVE_CONFIG)
    subject = token()
    slow = make_message(subject=subject, text="see attachment",
                        attachments=[("noise.png", "image/png", noise_png(3000))])

    sending = asyncio.create_task(mta.send(subject, data=slow))
    busy = await server.busy_worker()
    assert busy is not None, "the message was never scanned"
    server.kill()
    sent = await sending

    if mode == "after-queue":
        assert sent.returncode == 0, sent.transcript
        queue = await mta.wait_for_queue(lambda queued: bool(deferred_reasons(queued)))
        assert len(queue) == 1
    else:
        assert sent.returncode != 0
        assert refused_with(sent, "451")
        assert client_messages(await mta.queue()) == []
    assert mta.mail(subject) == []

    await server.start()
    if mode == "before-queue":
        resent = await mta.send(subject, data=slow)
        assert resent.returncode == 0, resent.transcript
    delivered = await retry_until_delivered(mta, subject)
    next_subject = token()
    next_message = make_message(subject=next_subject, text="Scan me", images=[("c.png", qr_png(PHISH_URL))])
    next_sent = await mta.send(next_subject, data=next_message)
    next_delivered = await mta.wait_for_mail(next_subject)

    # The killed transaction had not relayed yet, so exactly one copy arrives.
    assert len(delivered) == 1
    assert next_sent.returncode == 0, next_sent.transcript
    assert len(next_delivered) == 1, mta.log_text()[-4000:] + server.log_text()[-3000:]
    assert email.message_from_bytes(next_delivered[0])["X-Quishguard-QR"].startswith("hxxps://")
    assert await mta.wait_for_queue(lambda queued: not queued) == []


async def test_kill_worker_mid_scan(postfix, serve):
    filter_port = free_port()
    mta = postfix("after-queue", filter_port)
    server = await serve(filter_port, mta.reinject_port, SERVE_CONFIG)
    subject = token()
    slow = make_message(subject=subject, text="see attachment",
                        attachments=[("noise.png", "image/png", noise_png(3000))])

    sending = asyncio.create_task(mta.send(subject, data=slow))
    busy = await server.busy_worker()
    assert busy is not None, "the message was never scanned"
    os.kill(busy, signal.SIGKILL)
    sent = await sending
    delivered = await mta.wait_for_mail(subject)
    next_subject = token()
    next_message = make_message(subject=next_subject, text="Scan me", images=[("c.png", qr_png(PHISH_URL))])
    await mta.send(next_subject, data=next_message)
    next_delivered = await mta.wait_for_mail(next_subject)

    assert sent.returncode == 0, sent.transcript
    assert len(delivered) == 1
    assert "SCAN_INCOMPLETE" in email.message_from_bytes(delivered[0])["X-Quishguard-Findings"]
    assert len(next_delivered) == 1
    assert email.message_from_bytes(next_delivered[0])["X-Quishguard-QR"].startswith("hxxps://")
    assert server.process.poll() is None
