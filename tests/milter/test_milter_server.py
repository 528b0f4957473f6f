"""The milter server over real loopback sockets, driven by a small MTA-side client.

`MtaClient` speaks the MTA side the way Postfix 3.7 does with
milter_protocol = 6: it offers every action and protocol bit, sends macros,
the connect address, HELO, the envelope, each header as name and value with
the space after the colon and LF between folded lines, and the body in
chunks of at most 65,535 bytes. `apply_edits` applies the returned header
edits the way the MTA does, so a test can compare the delivered message with
what the SMTP proxy relays.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email
import re
import socket
import struct
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from quishguard.milter import protocol as p
from quishguard.milter.server import start_milter_server
from quishguard.model import Action, Envelope
from quishguard.pipeline import Scanner, ScanResult
from quishguard.quarantine import QuarantineStore
from quishguard.stamp import relay_copy, verify_stamp

from ..conftest import make_config
from ..factories import make_message, qr_png
from ..smtp_client import send

PHISH_URL = "https://login.example.org/verify?user=bob@example.com"
SAMPLES = Path(__file__).resolve().parents[2] / "samples"
SAMPLE_FILES = sorted(SAMPLES.glob("*.eml"))
FINAL_REPLIES = {p.SMFIR_ACCEPT, p.SMFIR_CONTINUE, p.SMFIR_DISCARD, p.SMFIR_REJECT,
                 p.SMFIR_TEMPFAIL, p.SMFIR_REPLYCODE}


def normalise(raw: bytes) -> bytes:
    """Turn line ends into CRLF and end with CRLF, as an MTA receives a message over SMTP."""
    text = re.sub(rb"\r?\n", b"\r\n", raw)
    return text if text.endswith(b"\r\n") else text + b"\r\n"


def split_fields(raw: bytes) -> tuple[list[bytes], bytes]:
    """Split a CRLF message into header fields (each with its CRLF) and the body after the empty line."""
    block, _, body = raw.partition(b"\r\n\r\n")
    fields: list[bytes] = []
    for line in (block + b"\r\n").splitlines(keepends=True):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line
        else:
            fields.append(line)
    return fields, body


def apply_edits(fields: list[bytes], modifications: list[tuple[bytes, bytes]]) -> list[bytes]:
    """Apply SMFIR_INSHEADER, SMFIR_CHGHEADER and SMFIR_ADDHEADER to `fields` as the MTA does."""
    fields = list(fields)

    def field_of(name: bytes, value: bytes) -> bytes:
        return name + b":" + value.replace(b"\n", b"\r\n") + b"\r\n"

    for code, data in modifications:
        if code == p.SMFIR_INSHEADER:
            index = struct.unpack(">I", data[:4])[0]
            name, value, _ = data[4:].split(b"\0")
            fields.insert(index, field_of(name, value))
        elif code == p.SMFIR_ADDHEADER:
            name, value, _ = data.split(b"\0")
            fields.append(field_of(name, value))
        elif code == p.SMFIR_CHGHEADER:
            index = struct.unpack(">I", data[:4])[0]
            name, value, _ = data[4:].split(b"\0")
            positions = [i for i, f in enumerate(fields)
                         if f.split(b":", 1)[0].strip().lower() == name.lower()]
            if index > len(positions):
                continue
            if value:
                fields[positions[index - 1]] = field_of(name, value)
            else:
                del fields[positions[index - 1]]
    return fields


@dataclasses.dataclass
class MilterReply:
    code: bytes
    data: bytes
    modifications: list[tuple[bytes, bytes]]
    progress: int

    @property
    def text(self) -> str:
        return self.data.rstrip(b"\0").decode()

    def header_edits(self) -> list[tuple[bytes, bytes]]:
        return [(c, d) for c, d in self.modifications if c in (p.SMFIR_INSHEADER, p.SMFIR_CHGHEADER,
                                                                p.SMFIR_ADDHEADER)]


class MtaClient:
    """The MTA side of one milter connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.protocol = 0

    @classmethod
    async def connect(cls, port: int, *, actions: int = 0x1FF, protocol: int = 0x1FFFFF) -> MtaClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        client.send(p.SMFIC_OPTNEG, struct.pack(">III", 6, actions, protocol))
        code, data = await client.read_packet()
        assert code == p.SMFIC_OPTNEG
        client.protocol = struct.unpack(">III", data)[2]
        return client

    def send(self, command: bytes, data: bytes = b"") -> None:
        self.writer.write(struct.pack(">I", len(data) + 1) + command + data)

    async def read_packet(self) -> tuple[bytes, bytes]:
        header = await asyncio.wait_for(self.reader.readexactly(4), 60)
        (length,) = struct.unpack(">I", header)
        packet = await asyncio.wait_for(self.reader.readexactly(length), 60)
        return packet[:1], packet[1:]

    async def step(self, command: bytes, data: bytes, no_reply_bit: int) -> None:
        self.send(command, data)
        if not self.protocol & no_reply_bit:
            code, _ = await self.read_packet()
            assert code == p.SMFIR_CONTINUE

    async def session(self, client_ip: str = "192.0.2.7", helo: str = "client.example.net") -> None:
        self.send(p.SMFIC_MACRO, b"C" + b"j\0mx.example.com\0{daemon_name}\0smtpd\0")
        await self.step(p.SMFIC_CONNECT, b"client.example.net\0" + b"4" + struct.pack(">H", 40000)
                        + client_ip.encode() + b"\0", p.SMFIP_NR_CONN)
        await self.step(p.SMFIC_HELO, helo.encode() + b"\0", p.SMFIP_NR_HELO)

    async def envelope(self, mail_from: str, rcpt_tos: tuple[str, ...]) -> None:
        self.send(p.SMFIC_MACRO, b"M" + b"i\0QUEUE42\0{auth_authen}\0\0")
        await self.step(p.SMFIC_MAIL, f"<{mail_from}>\0".encode(), p.SMFIP_NR_MAIL)
        for rcpt in rcpt_tos:
            await self.step(p.SMFIC_RCPT, f"<{rcpt}>\0".encode(), p.SMFIP_NR_RCPT)

    async def message(self, raw: bytes, *, mail_from: str = "alice@example.net",
                      rcpt_tos: tuple[str, ...] = ("bob@example.com",)) -> MilterReply:
        """Send envelope, headers, body and end of message; return the end-of-message reply."""
        await self.envelope(mail_from, rcpt_tos)
        fields, body = split_fields(normalise(raw))
        leading_space = bool(self.protocol & p.SMFIP_HDR_LEADSPC)
        for field_bytes in fields:
            name, _, value = field_bytes[:-2].partition(b":")
            if not leading_space and value.startswith(b" "):
                value = value[1:]
            await self.step(p.SMFIC_HEADER, name + b"\0" + value.replace(b"\r\n", b"\n") + b"\0",
                            p.SMFIP_NR_HDR)
        for start in range(0, len(body), 65535):
            await self.step(p.SMFIC_BODY, body[start:start + 65535], p.SMFIP_NR_BODY)
        self.send(p.SMFIC_BODYEOB)
        return await self.end_of_message()

    async def end_of_message(self) -> MilterReply:
        modifications: list[tuple[bytes, bytes]] = []
        progress = 0
        while True:
            code, data = await self.read_packet()
            if code == p.SMFIR_PROGRESS:
                progress += 1
            elif code in FINAL_REPLIES:
                return MilterReply(code, data, modifications, progress)
            else:
                modifications.append((code, data))

    async def close(self) -> None:
        self.send(p.SMFIC_QUIT)
        self.writer.close()


class RecordingScanner(Scanner):
    """The real scanner, keeping the raw bytes and envelope it was given; `delay` slows each scan."""

    def __init__(self, *args: Any, delay: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delay = delay
        self.seen: list[tuple[bytes, Envelope | None]] = []

    async def scan(self, raw: bytes, envelope: Envelope | None, *, message_ref: str = "-") -> ScanResult:
        self.seen.append((raw, envelope))
        if self.delay:
            await asyncio.sleep(self.delay)
        return await super().scan(raw, envelope, message_ref=message_ref)


@dataclasses.dataclass
class RunningMilter:
    port: int
    store: QuarantineStore
    scanner: RecordingScanner
    server: asyncio.AbstractServer
    config: Any


@pytest_asyncio.fixture
async def start_milter(pool, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Return a coroutine that starts the milter on a free loopback port with config sections."""
    started: list[RunningMilter] = []

    async def start(delay: float = 0.0, **sections: dict[str, Any]) -> RunningMilter:
        config = make_config(tmp_path, **sections)
        store = QuarantineStore(config.data_dir)
        scanner = RecordingScanner(config, pool, delay=delay)
        server = await start_milter_server(config, scanner, store, ("127.0.0.1", 0))
        running = RunningMilter(server.sockets[0].getsockname()[1], store, scanner, server, config)
        started.append(running)
        return running

    yield start
    for running in started:
        running.server.close()


def delivered(raw: bytes, reply: MilterReply) -> email.message.Message:
    fields, body = split_fields(normalise(raw))
    edited = apply_edits(fields, reply.header_edits())
    return email.message_from_bytes(b"".join(edited) + b"\r\n" + body)


async def one_message(port: int, raw: bytes, client_ip: str = "192.0.2.7", **kwargs: Any) -> MilterReply:
    client = await MtaClient.connect(port)
    await client.session(client_ip)
    reply = await client.message(raw, **kwargs)
    await client.close()
    return reply


# -- actions -------------------------------------------------------------------


async def test_accept_inserts_verdict_headers(start_milter):
    milter = await start_milter()
    raw = make_message()

    reply = await one_message(milter.port, raw)

    assert reply.code == p.SMFIR_CONTINUE
    message = delivered(raw, reply)
    assert message["X-Quishguard-Action"] == "accept"
    assert message["X-Quishguard-Score"] == "0.0"
    assert message["X-Quishguard-Findings"] == "none"
    assert message["Subject"] == "Quarterly report"


async def test_accept_envelope_from_packets(start_milter):
    milter = await start_milter()

    await one_message(milter.port, make_message(), mail_from="carol@example.net",
                      rcpt_tos=("bob@example.com", "dave@example.com"))

    envelope = milter.scanner.seen[0][1]
    assert envelope.mail_from == "carol@example.net"
    assert envelope.rcpt_tos == ("bob@example.com", "dave@example.com")
    assert envelope.client_ip == "192.0.2.7"
    assert envelope.helo == "client.example.net"
    assert envelope.queue_id == "QUEUE42"


async def test_forged_headers_deleted(start_milter):
    milter = await start_milter()
    raw = make_message(headers={"X-Quishguard-Score": "-100.0", "x-quishguard-action": "accept",
                                "X-Quishguard-QR": "hxxps://safe.example.org"})

    reply = await one_message(milter.port, raw)

    message = delivered(raw, reply)
    assert message.get_all("X-Quishguard-Score") == ["0.0"]
    assert message.get_all("X-Quishguard-Action") == ["accept"]
    assert message.get_all("X-Quishguard-QR") is None


async def test_forged_duplicates_deleted_by_index(start_milter):
    milter = await start_milter()
    raw = normalise(b"X-Quishguard-Score: 1\r\nX-Quishguard-Score: 2\r\nSubject: dup\r\n"
                    b"From: a@example.net\r\n\r\nbody\r\n")

    reply = await one_message(milter.port, raw)

    changes = [d for c, d in reply.header_edits() if c == p.SMFIR_CHGHEADER]
    assert [struct.unpack(">I", d[:4])[0] for d in changes] == [2, 1]
    assert delivered(raw, reply).get_all("X-Quishguard-Score") == ["0.0"]


async def test_stamp_and_forged_results_like_proxy(start_milter):
    milter = await start_milter(stamp={"secret": "s" * 32}, auth={"authserv_id": "mx.example.com"})
    raw = make_message(headers={"Authentication-Results": "mx.example.com; dmarc=pass header.from=example.com"})

    reply = await one_message(milter.port, raw)

    fields, body = split_fields(normalise(raw))
    delivered_bytes = b"".join(apply_edits(fields, reply.header_edits())) + b"\r\n" + body
    check = verify_stamp(delivered_bytes, b"s" * 32, "X-Quishguard-", ["bob@example.com"])
    message = email.message_from_bytes(delivered_bytes)
    assert message.get_all("Authentication-Results") is None
    assert check.status == "valid"
    assert check.action == "accept"


async def test_tag_changes_subject(start_milter):
    milter = await start_milter(thresholds={"tag": 0.0}, headers={"subject_tag": "[CHECK] "})
    raw = make_message(subject="Invoice 42")

    reply = await one_message(milter.port, raw)

    message = delivered(raw, reply)
    assert message["Subject"] == "[CHECK] Invoice 42"
    assert message["X-Quishguard-Action"] == "tag"


async def test_tag_adds_missing_subject(start_milter):
    milter = await start_milter(thresholds={"tag": 0.0}, headers={"subject_tag": "[CHECK] "})
    raw = normalise(b"From: a@example.net\r\nTo: b@example.com\r\n\r\nno subject here\r\n")

    reply = await one_message(milter.port, raw)

    assert delivered(raw, reply)["Subject"] == "[CHECK]"


async def test_quarantine_hold_queue(start_milter):
    milter = await start_milter()
    raw = make_message(text="Scan me", images=[("c.png", qr_png(PHISH_URL))])

    reply = await one_message(milter.port, raw)

    quarantine = [d for c, d in reply.modifications if c == p.SMFIR_QUARANTINE]
    assert reply.code == p.SMFIR_CONTINUE
    assert len(quarantine) == 1
    assert quarantine[0].startswith(b"quishguard score ")
    assert delivered(raw, reply)["X-Quishguard-Action"] == "quarantine"
    assert milter.store.count() == 0


async def test_quarantine_store_discards(start_milter):
    milter = await start_milter(milter={"quarantine_mode": "store", "release_relay": "127.0.0.1:10099"})
    raw = make_message(text="Scan me", images=[("c.png", qr_png(PHISH_URL))])

    reply = await one_message(milter.port, raw)

    held = milter.store.list()
    assert reply.code == p.SMFIR_DISCARD
    assert len(held) == 1
    assert held[0].queue_id == "QUEUE42"
    assert held[0].rcpt_tos == ("bob@example.com",)
    assert milter.store.read_raw(held[0].id) == normalise(raw)


async def test_quarantine_store_release_uses_release_relay(start_milter, next_hop):
    from quishguard.cli import release

    milter = await start_milter(milter={"quarantine_mode": "store",
                                        "release_relay": f"127.0.0.1:{next_hop.port}"},
                                smtp={"relay": "127.0.0.1:9"})
    await one_message(milter.port, make_message(text="Scan me", images=[("c.png", qr_png(PHISH_URL))]))
    quarantine_id = milter.store.list()[0].id

    reply = await release(milter.store, quarantine_id, milter.config)

    assert reply.startswith("250")
    assert len(next_hop.messages) == 1
    assert b"X-Quishguard-Released:" in next_hop.messages[0].data


async def test_store_mode_without_release_relay_refused(start_milter):
    from quishguard.errors import ConfigError

    with pytest.raises(ConfigError, match="release_relay"):
        await start_milter(milter={"quarantine_mode": "store"})


async def test_reject_reply_code(start_milter):
    milter = await start_milter(thresholds={"reject": 8.0})

    reply = await one_message(milter.port, make_message(text="Scan me", images=[("c.png", qr_png(PHISH_URL))]))

    assert reply.code == p.SMFIR_REPLYCODE
    assert reply.text.startswith("550 5.7.1 Message rejected as ")


async def test_tempfail_when_scan_incomplete(start_milter):
    milter = await start_milter(scan={"budget_seconds": 0.1, "fail_mode": "tempfail"},
                                thresholds={"tag": 100.0, "quarantine": 100.0})
    raw = make_message(text="see attachment", attachments=[("noise.png", "image/png", _noise_png(3000))])

    reply = await one_message(milter.port, raw)

    assert reply.code == p.SMFIR_REPLYCODE
    assert reply.text.startswith("451 4.7.1 ")


async def test_progress_during_slow_scan(start_milter):
    milter = await start_milter(delay=2.4, milter={"progress_interval": 1.0})

    reply = await one_message(milter.port, make_message())

    assert reply.progress == 2
    assert reply.code == p.SMFIR_CONTINUE


async def test_oversize_message_552(start_milter):
    milter = await start_milter(smtp={"max_message_size": 4096})

    reply = await one_message(milter.port, make_message(text="x" * 10_000))

    assert reply.code == p.SMFIR_REPLYCODE
    assert reply.text.startswith("552 5.3.4 ")
    assert milter.scanner.seen == []


# -- connections -----------------------------------------------------------------


async def test_several_messages_one_connection(start_milter):
    milter = await start_milter()
    client = await MtaClient.connect(milter.port)
    await client.session()

    first = await client.message(make_message(subject="one"))
    await client.envelope("alice@example.net", ("bob@example.com",))
    client.send(p.SMFIC_ABORT)
    second = await client.message(make_message(subject="two"), mail_from="carol@example.net")
    third = await client.message(make_message(subject="three"))
    await client.close()

    assert [first.code, second.code, third.code] == [p.SMFIR_CONTINUE] * 3
    subjects = [email.message_from_bytes(raw)["Subject"] for raw, _ in milter.scanner.seen]
    assert subjects == ["one", "two", "three"]
    assert milter.scanner.seen[1][1].mail_from == "carol@example.net"
    assert milter.scanner.seen[1][1].rcpt_tos == ("bob@example.com",)


async def test_replies_without_no_reply_flags(start_milter):
    milter = await start_milter()
    client = await MtaClient.connect(milter.port, protocol=p.SMFIP_HDR_LEADSPC)
    await client.session()

    reply = await client.message(make_message())
    await client.close()

    assert client.protocol == p.SMFIP_HDR_LEADSPC
    assert reply.code == p.SMFIR_CONTINUE


async def test_without_leading_space_same_bytes(start_milter):
    milter = await start_milter()
    raw = make_message(subject="A subject long enough to be folded by the generator " * 2)

    client = await MtaClient.connect(milter.port, protocol=p.SMFIP_NR_HDR)
    await client.session()
    await client.message(raw)
    await client.close()

    assert milter.scanner.seen[0][0] == normalise(raw)


async def test_disconnect_mid_message_keeps_serving(start_milter):
    milter = await start_milter()
    client = await MtaClient.connect(milter.port)
    await client.session()
    await client.envelope("alice@example.net", ("bob@example.com",))
    client.send(p.SMFIC_HEADER, b"Subject\0 cut\0")
    client.writer.write(struct.pack(">I", 1000) + p.SMFIC_BODY + b"partial")
    await client.writer.drain()
    client.writer.close()

    reply = await one_message(milter.port, make_message())

    assert reply.code == p.SMFIR_CONTINUE
    assert len(milter.scanner.seen) == 1


async def test_oversize_packet_closes_connection(start_milter):
    milter = await start_milter()
    client = await MtaClient.connect(milter.port)

    client.writer.write(struct.pack(">I", 50 * 1024 * 1024) + p.SMFIC_BODY)
    await client.writer.drain()
    closed = await asyncio.wait_for(client.reader.read(), 10)

    assert closed == b""


async def test_unix_socket_listener(pool, tmp_path):
    config = make_config(tmp_path)
    store = QuarantineStore(config.data_dir)
    path = tmp_path / "milter.sock"
    server = await start_milter_server(config, Scanner(config, pool), store, f"unix:{path}")
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(struct.pack(">I", 13) + p.SMFIC_OPTNEG + struct.pack(">III", 6, 0x1FF, 0x1FFFFF))
        header = await asyncio.wait_for(reader.readexactly(5), 10)
        writer.close()
    finally:
        server.close()

    assert header[4:5] == p.SMFIC_OPTNEG


async def test_cli_milter_starts_and_stops(tmp_path):
    port = _free_port()
    config_file = tmp_path / "quishguard.toml"
    config_file.write_text(f'[quarantine]\ndata_dir = "{tmp_path / "data"}"\n[scan]\nworkers = 1\n')
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "quishguard", "milter", "--config", str(config_file),
        "--listen", f"inet:127.0.0.1:{port}", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        client = await _connect_when_listening(port)
        await client.session()
        reply = await client.message(make_message())
        await client.close()
    finally:
        process.terminate()
        _, errors = await asyncio.wait_for(process.communicate(), 30)

    assert reply.code == p.SMFIR_CONTINUE
    assert process.returncode == 0, errors.decode()
    assert b"event=milter_listening" in errors


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def _connect_when_listening(port: int, timeout: float = 60.0) -> MtaClient:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await MtaClient.connect(port)
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


# -- the SMTP proxy and the milter agree ------------------------------------------


@pytest.fixture(scope="module")
def sample_sections() -> dict[str, Any]:
    with open(SAMPLES / "quishguard.toml", "rb") as handle:
        return tomllib.load(handle)


async def test_samples_same_verdict_serve_and_milter(start_milter, start_hop, next_hop, sample_sections,
                                                     monkeypatch):
    milter = await start_milter(**sample_sections)
    hop = await start_hop(**sample_sections)
    proxy_scans: list[tuple[bytes, ScanResult]] = []
    milter_scans: list[tuple[bytes, ScanResult]] = []
    original_scan = Scanner.scan

    async def recording_scan(self, raw, envelope, *, message_ref="-"):
        result = await original_scan(self, raw, envelope, message_ref=message_ref)
        (milter_scans if self is milter.scanner else proxy_scans).append((raw, result))
        return result

    monkeypatch.setattr(Scanner, "scan", recording_scan)
    actions = {}
    for path in SAMPLE_FILES:
        raw = path.read_bytes()
        relayed_before = len(next_hop.messages)
        _, proxy_reply = await send(hop.port, raw)
        # The proxy's client is 127.0.0.1, so the milter's SMTP client is too.
        milter_reply = await one_message(milter.port, raw, client_ip="127.0.0.1")
        proxy_raw, proxy_result = proxy_scans[-1]
        milter_raw, milter_result = milter_scans[-1]
        fields, body = split_fields(milter_raw)
        delivered_bytes = b"".join(apply_edits(fields, milter_reply.header_edits())) + b"\r\n" + body
        verdict = milter_result.verdict
        actions[path.stem] = verdict.action

        assert milter_raw == proxy_raw, path.name
        assert verdict == proxy_result.verdict, path.name
        sender = milter_result.facts.sender
        assert delivered_bytes == relay_copy(milter_raw, verdict, sender.auth if sender else None,
                                             ("bob@example.com",), milter.config), path.name
        if verdict.action is Action.QUARANTINE:
            assert proxy_reply[0] == 250, path.name
            assert len(next_hop.messages) == relayed_before, path.name
        else:
            assert delivered_bytes == next_hop.messages[-1].data, path.name

    assert Action.QUARANTINE in actions.values()
    assert Action.ACCEPT in actions.values()


def _noise_png(size: int) -> bytes:
    """A square PNG of random pixels: slow for every QR backend, and contains no code."""
    import io

    import numpy
    from PIL import Image

    pixels = numpy.random.default_rng(7).integers(0, 256, (size, size), dtype=numpy.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()

