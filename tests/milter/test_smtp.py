"""The SMTP proxy end to end: client -> quishguard -> recording next hop, all on loopback."""

from __future__ import annotations

import asyncio
import email
import functools
import os
import shutil
import signal
import subprocess

import pytest

from quishguard.cli import release
from quishguard.milter.smtp import ANNOUNCED_XFORWARD

from ..factories import make_message, qr_png
from ..smtp_client import RawClient, send

PHISH_URL = "https://login.example.org/verify?user=bob@example.com"


def headers_of(data: bytes) -> email.message.Message:
    return email.message_from_bytes(data)


async def test_accept_relays_with_verdict_headers(start_hop, next_hop):
    hop = await start_hop()

    rcpts, reply = await send(hop.port, make_message())

    assert rcpts == [(250, "2.1.5 Ok")]
    assert reply[0] == 250
    assert "HOP1" in reply[1]
    assert len(next_hop.messages) == 1
    relayed = headers_of(next_hop.messages[0].data)
    assert relayed["X-Quishguard-Action"] == "accept"
    assert relayed["X-Quishguard-Score"] == "0.0"
    assert relayed["X-Quishguard-Findings"] == "none"
    assert relayed["Subject"] == "Quarterly report"


async def test_accept_keeps_body_bytes(start_hop, next_hop):
    hop = await start_hop()
    original = make_message(text="line one\r\n.leading dot\r\nline three\r\n")

    await send(hop.port, original)

    relayed = next_hop.messages[0].data
    assert relayed.endswith(original.split(b"\r\n\r\n", 1)[1])
    assert b"\r\n.leading dot\r\n" in relayed


async def test_forged_verdict_headers_removed(start_hop, next_hop):
    hop = await start_hop()
    forged = make_message(headers={"X-Quishguard-Score": "-100.0", "x-quishguard-action": "accept",
                                   "X-Quishguard-QR": "hxxps://safe.example.org"})

    await send(hop.port, forged)

    relayed = headers_of(next_hop.messages[0].data)
    assert relayed.get_all("X-Quishguard-Score") == ["0.0"]
    assert relayed.get_all("X-Quishguard-Action") == ["accept"]
    assert relayed.get_all("X-Quishguard-QR") is None


async def test_tag_prefixes_subject(start_hop, next_hop):
    hop = await start_hop(thresholds={"tag": 0.0}, headers={"subject_tag": "[CHECK] "})

    _, reply = await send(hop.port, make_message(subject="Invoice 42"))

    assert reply[0] == 250
    relayed = headers_of(next_hop.messages[0].data)
    assert relayed["Subject"] == "[CHECK] Invoice 42"
    assert relayed["X-Quishguard-Action"] == "tag"


async def test_tag_with_empty_prefix_keeps_subject(start_hop, next_hop):
    hop = await start_hop(thresholds={"tag": 0.0}, headers={"subject_tag": ""})

    await send(hop.port, make_message(subject="Invoice 43"))

    relayed = headers_of(next_hop.messages[0].data)
    assert relayed["Subject"] == "Invoice 43"
    assert relayed["X-Quishguard-Action"] == "tag"


async def test_qr_payload_header_defanged(start_hop, next_hop):
    hop = await start_hop(thresholds={"tag": 100.0, "quarantine": 100.0})
    message = make_message(text="Scan the code below.", images=[("code.png", qr_png(PHISH_URL))])

    await send(hop.port, message)

    relayed = headers_of(next_hop.messages[0].data)
    assert relayed["X-Quishguard-QR"] == PHISH_URL.replace("https://", "hxxps://")
    assert "QR_" in relayed["X-Quishguard-Findings"]


async def test_quarantine_stores_without_relaying(start_hop, next_hop):
    hop = await start_hop(thresholds={"tag": 0.0, "quarantine": 0.0})
    message = make_message(subject="Held message")

    _, reply = await send(hop.port, message)

    assert reply[0] == 250
    assert reply[1].startswith("2.0.0 Ok: message held in quarantine as ")
    quarantine_id = reply[1].rsplit(" ", 1)[1]
    assert next_hop.messages == []
    held = hop.store.get(quarantine_id)
    assert held.subject == "Held message"
    assert hop.store.read_raw(quarantine_id) == message


async def test_quarantine_release_reaches_next_hop(start_hop, next_hop):
    hop = await start_hop(thresholds={"tag": 0.0, "quarantine": 0.0})
    _, reply = await send(hop.port, make_message(subject="Release me"))
    quarantine_id = reply[1].rsplit(" ", 1)[1]
    config = hop.config.replace(smtp_relay=f"127.0.0.1:{next_hop.port}")

    await release(hop.store, quarantine_id, config)

    assert len(next_hop.messages) == 1
    relayed = headers_of(next_hop.messages[0].data)
    assert relayed["Subject"] == "Release me"
    assert quarantine_id in relayed["X-Quishguard-Released"]
    assert relayed["X-Quishguard-Action"] == "quarantine"
    assert next_hop.messages[0].rcpt_tos == ["bob@example.com"]
    assert hop.store.get(quarantine_id).status == "released"


async def test_reject_names_top_rule(start_hop, next_hop):
    hop = await start_hop(thresholds={"tag": 1.0, "quarantine": 1.0, "reject": 1.0})
    message = make_message(text="Scan me", images=[("code.png", qr_png(PHISH_URL))])

    _, reply = await send(hop.port, message)

    assert reply[0] == 550
    assert reply[1].startswith("5.7.1 Message rejected as ")
    assert reply[1].split()[-1].isupper()
    assert next_hop.messages == []
    assert hop.store.list(status=None) == []


async def test_recipient_refused_by_next_hop(start_hop, next_hop):
    next_hop.refused_recipients["nobody@example.com"] = "550 5.1.1 No such user"
    hop = await start_hop()

    rcpts, reply = await send(hop.port, make_message(),
                              rcpt_tos=("nobody@example.com", "bob@example.com"))

    assert rcpts[0] == (550, "5.1.1 No such user")
    assert rcpts[1][0] == 250
    assert reply[0] == 250
    assert next_hop.messages[0].rcpt_tos == ["bob@example.com"]


async def test_next_hop_down_gives_451(start_hop, unused_tcp_port):
    hop = await start_hop(relay_port=unused_tcp_port)

    rcpts, _ = await send(hop.port, make_message())

    assert rcpts[0][0] == 451
    assert rcpts[0][1].startswith("4.4.1")


@pytest.mark.parametrize("hop_reply", ["452 4.3.1 Insufficient system storage",
                                       "554 5.6.0 Message content refused"])
async def test_next_hop_data_reply_passed_back(start_hop, next_hop, hop_reply):
    next_hop.data_reply = hop_reply
    hop = await start_hop()

    _, reply = await send(hop.port, make_message())

    assert f"{reply[0]} {reply[1]}" == hop_reply


async def test_next_hop_timeout_gives_451(start_hop, next_hop):
    next_hop.data_delay = 3.0
    hop = await start_hop(smtp={"relay_timeout": 1.0})

    _, reply = await send(hop.port, make_message())

    assert reply[0] == 451
    assert reply[1].startswith("4.4.1")


async def test_long_line_relayed_intact(start_hop, next_hop):
    hop = await start_hop()
    long_line = b"x" * 500_000
    message = make_message(text=None, html="<p>" + "y" * 10 + "</p>").replace(
        b"\r\n\r\n", b"\r\nX-Long: " + long_line + b"\r\n\r\n", 1)

    _, reply = await send(hop.port, message)

    assert reply[0] == 250
    assert long_line in next_hop.messages[0].data


async def test_size_limit_announced(start_hop):
    hop = await start_hop(smtp={"max_message_size": 2_000_000})
    client = await RawClient.connect(hop.port)

    code, text = await client.command("EHLO client.test")
    await client.close()

    assert code == 250
    assert "SIZE 2000000" in text.splitlines()


async def test_xforward_announced_to_trusted_only(start_hop):
    trusting = await start_hop()
    distrusting = await start_hop(org={"trusted_networks": ["192.0.2.0/24"]})

    replies = []
    for hop in (trusting, distrusting):
        client = await RawClient.connect(hop.port)
        replies.append(await client.command("EHLO mta.example.com"))
        await client.close()

    assert ANNOUNCED_XFORWARD in replies[0][1].splitlines()
    assert "XFORWARD" not in replies[1][1]


async def test_xforward_refused_for_untrusted(start_hop):
    hop = await start_hop(org={"trusted_networks": ["192.0.2.0/24"]})
    client = await RawClient.connect(hop.port)
    await client.command("EHLO mta.example.com")

    code, _ = await client.command("XFORWARD ADDR=203.0.113.9")
    await client.close()

    assert code == 550


async def test_xforward_address_drives_direct_send(start_hop, next_hop):
    hop = await start_hop(org={"domains": ["example.com"]})
    spoof = make_message(sender="ceo@example.com", to="bob@example.com", text="Please call me.")
    client = await RawClient.connect(hop.port)
    await client.command("EHLO mta.example.com")

    xforward = await client.command("XFORWARD NAME=spoofer.test ADDR=203.0.113.9 PROTO=ESMTP HELO=spoofer.test")
    await client.command("MAIL FROM:<ceo@example.com>")
    await client.command("RCPT TO:<bob@example.com>")
    reply = await client.data(spoof)
    await client.close()

    assert xforward[0] == 250
    assert reply[0] == 250
    findings = headers_of(next_hop.messages[0].data)["X-Quishguard-Findings"]
    assert "SENDER_DIRECT_SEND" in findings


async def test_untrusted_client_refused(start_hop, next_hop):
    hop = await start_hop(smtp={"client_networks": ["192.0.2.0/24"]})

    client = await RawClient.connect(hop.port)
    code, _ = client.greeting
    client.writer.close()

    assert code == 554
    assert next_hop.messages == []


async def test_scan_budget_fail_mode_accept(start_hop, next_hop):
    hop = await start_hop(scan={"budget_seconds": 0.1})
    big = _noise_png(2000)
    message = make_message(text="see attachment", attachments=[("noise.png", "image/png", big)])

    _, reply = await send(hop.port, message)

    assert reply[0] == 250
    findings = headers_of(next_hop.messages[0].data)["X-Quishguard-Findings"]
    assert "SCAN_INCOMPLETE" in findings


async def test_scan_budget_fail_mode_tempfail(start_hop, next_hop):
    hop = await start_hop(scan={"budget_seconds": 0.1, "fail_mode": "tempfail"})
    message = make_message(text="see attachment", attachments=[("noise.png", "image/png", _noise_png(2000))])

    _, reply = await send(hop.port, message)

    assert reply[0] == 451
    assert reply[1].startswith("4.7.1")
    assert next_hop.messages == []


async def test_killed_worker_replaced_alone(start_hop, next_hop, pool):
    hop = await start_hop(thresholds={"tag": 100.0, "quarantine": 100.0})
    slow = make_message(text="see attachment", attachments=[("noise.png", "image/png", _noise_png(2000))])
    restarts = pool.restarts

    sending = asyncio.create_task(send(hop.port, slow))
    for _ in range(100):
        await asyncio.sleep(0.05)
        busy = pool.busy_pids()
        if busy:
            break
    os.kill(busy[0], signal.SIGKILL)
    _, reply = await sending
    _, second = await send(hop.port, make_message(text="Scan me", images=[("c.png", qr_png(PHISH_URL))]))

    assert reply[0] == 250
    assert "SCAN_INCOMPLETE" in headers_of(next_hop.messages[0].data)["X-Quishguard-Findings"]
    assert pool.restarts == restarts + 1
    assert second[0] == 250
    assert headers_of(next_hop.messages[1].data)["X-Quishguard-QR"].startswith("hxxps://")


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
async def test_swaks_message_through_hop(start_hop, next_hop):
    hop = await start_hop()

    process = await asyncio.create_subprocess_exec(
        "swaks", "--server", "127.0.0.1", "--port", str(hop.port), "--from", "alice@example.net",
        "--to", "bob@example.com", "--header", "Subject: swaks test", "--body", "Hello from swaks",
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, _ = await process.communicate()

    assert process.returncode == 0, output.decode()
    assert b"<-  250 2.0.0 Ok: relayed" in output
    relayed = headers_of(next_hop.messages[0].data)
    assert relayed["Subject"] == "swaks test"
    assert relayed["X-Quishguard-Action"] == "accept"


@functools.lru_cache(maxsize=4)
def _noise_png(size: int) -> bytes:
    """A square PNG of random pixels: slow for every QR backend, and holds no code."""
    import io

    import numpy
    from PIL import Image

    rng = numpy.random.default_rng(7)
    pixels = rng.integers(0, 256, (size, size), dtype=numpy.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()



async def test_client_hangup_keeps_worker(start_hop, next_hop, pool):
    hop = await start_hop(thresholds={"tag": 100.0, "quarantine": 100.0})
    slow = make_message(text="see attachment", attachments=[("blank.pdf", "application/pdf", _blank_pdf(4))])
    restarts = pool.restarts
    client = await RawClient.connect(hop.port)
    await client.command("EHLO client.test")
    await client.command("MAIL FROM:<alice@example.net>")
    await client.command("RCPT TO:<bob@example.com>")
    await client.command("DATA")

    client.writer.write(slow.replace(b"\n.", b"\n..") + b"\r\n.\r\n")
    await client.writer.drain()
    for _ in range(100):
        await asyncio.sleep(0.05)
        if pool.busy_pids():
            break
    client.writer.transport.abort()
    for _ in range(400):
        await asyncio.sleep(0.05)
        if len(pool.idle_pids()) == pool.size:
            break
    _, reply = await send(hop.port, make_message(subject="After hang-up"))

    assert pool.restarts == restarts
    assert reply[0] == 250
    assert [headers_of(m.data)["Subject"] for m in next_hop.messages] == ["After hang-up"]


def _blank_pdf(pages: int) -> bytes:
    """A PDF of empty A4 pages: each page is rendered and searched, which takes a while."""
    import pymupdf

    document = pymupdf.open()
    for _ in range(pages):
        document.new_page(width=595, height=842)
    return document.tobytes()
