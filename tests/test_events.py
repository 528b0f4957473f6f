"""Verdict events: JSON Lines and RFC 5424 syslog from real SMTP sessions on loopback."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from pathlib import Path

import jsonschema
import pytest

from quishguard import events
from quishguard.events import EventLog, syslog_message

from .factories import make_message, qr_png
from .smtp_client import send

DOC = Path(__file__).resolve().parents[1] / "docs" / "events.md"
QR_URL = "https://lure.example.test/verify?u=Ym9iQGV4YW1wbGUuY29t"

NULLABLE_STRING = {"type": ["string", "null"]}

EVENT_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": [
        "schema", "time", "host", "front_end", "session_id", "queue_id", "message_id", "client_ip",
        "client_helo", "forwarded_ip", "original_ip", "mail_from", "rcpt_to", "from", "from_domain",
        "subject", "action", "score", "reply", "scan_incomplete", "findings", "qr_codes", "urls",
        "scan_seconds",
    ],
    "properties": {
        "schema": {"const": 1},
        "time": {"type": "string", "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"},
        "host": {"type": "string"},
        "front_end": {"enum": ["smtp", "milter"]},
        "session_id": {"type": "string", "minLength": 1},
        "queue_id": NULLABLE_STRING,
        "message_id": NULLABLE_STRING,
        "client_ip": NULLABLE_STRING,
        "client_helo": NULLABLE_STRING,
        "forwarded_ip": NULLABLE_STRING,
        "original_ip": NULLABLE_STRING,
        "mail_from": {"type": "string"},
        "rcpt_to": {"type": "array", "items": {"type": "string"}},
        "from": {"type": "string"},
        "from_domain": NULLABLE_STRING,
        "subject": {"type": "string"},
        "action": {"enum": ["accept", "tag", "quarantine", "reject", "tempfail"]},
        "score": {"type": "number"},
        "reply": {"type": "string", "pattern": r"^[245]\d\d "},
        "scan_incomplete": {"type": "boolean"},
        "findings": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["rule", "score", "detail"],
            "properties": {"rule": {"type": "string", "pattern": "^[A-Z][A-Z0-9_]+$"},
                           "score": {"type": "number"}, "detail": {"type": "string"}}}},
        "qr_codes": {"type": "array", "items": {
            "type": "object", "additionalProperties": False,
            "required": ["payload", "location", "hidden_as"],
            "properties": {"payload": {"type": "string"}, "location": {"type": "string"},
                           "hidden_as": {"type": "string"}}}},
        "urls": {"type": "array", "items": {"type": "string"}},
        "scan_seconds": {
            "type": "object", "additionalProperties": False,
            "required": ["decode", "sender", "rules", "total"],
            "properties": {stage: {"type": "number", "minimum": 0}
                           for stage in ("decode", "sender", "rules", "total")}},
    },
}

# RFC 5424: <PRI>VERSION TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD MSG
SYSLOG_HEADER = re.compile(
    rb"^<(?P<pri>\d{1,3})>1 (?P<time>\S+) (?P<host>\S+) quishguard (?P<pid>\d+) verdict - "
    rb"\xef\xbb\xbf(?P<msg>.*)$", re.S)


def qr_message() -> bytes:
    return make_message(subject="Scan to keep your mailbox", text="Scan the code.\n",
                        images=[("code.png", qr_png(QR_URL))])


def documented_fields() -> set[str]:
    section = DOC.read_text(encoding="utf-8").split("## Fields", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+)` \|", section, re.M))


@pytest.fixture
def event_log():
    started: list[EventLog] = []

    def start(**settings) -> EventLog:
        log = EventLog(hostname="filter.test", **settings)
        log.start()
        started.append(log)
        return log

    yield start
    for log in started:
        log.close()


async def test_events_file_one_line_per_message(start_hop, event_log, tmp_path):
    path = tmp_path / "events.jsonl"
    log = event_log(file=str(path))
    hop = await start_hop(thresholds={"tag": 2.0, "quarantine": 5.0})

    await send(hop.port, make_message(subject="Plain note"))
    _, reply = await send(hop.port, qr_message())
    assert log.flush()

    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["action"] == "accept"
    assert first["subject"] == "Plain note"
    assert second["reply"] == f"{reply[0]} {reply[1]}"
    assert second["action"] in ("tag", "quarantine")


async def test_events_record_matches_schema(start_hop, event_log, tmp_path):
    path = tmp_path / "events.jsonl"
    log = event_log(file=str(path))
    hop = await start_hop(thresholds={"tag": 2.0, "quarantine": 5.0})

    await send(hop.port, qr_message(), mail_from="carol@example.net",
               rcpt_tos=("bob@example.com", "dave@example.com"))
    assert log.flush()

    record = json.loads(path.read_text(encoding="utf-8"))
    jsonschema.validate(record, EVENT_SCHEMA)
    assert record["mail_from"] == "carol@example.net"
    assert record["rcpt_to"] == ["bob@example.com", "dave@example.com"]
    assert record["client_ip"] == "127.0.0.1"
    assert record["client_helo"] == "client.test"
    assert record["host"] == "filter.test"
    assert record["from"] == "alice@example.net"
    assert record["message_id"].endswith("@example.net>")
    assert record["scan_seconds"]["total"] >= record["scan_seconds"]["decode"]


async def test_events_urls_not_defanged(start_hop, event_log, tmp_path):
    path = tmp_path / "events.jsonl"
    log = event_log(file=str(path))
    hop = await start_hop()

    await send(hop.port, qr_message())
    assert log.flush()

    record = json.loads(path.read_text(encoding="utf-8"))
    assert [code["payload"] for code in record["qr_codes"]] == [QR_URL]
    assert QR_URL in record["urls"]
    assert "QR_URL" in [finding["rule"] for finding in record["findings"]]
    assert "hxxp" not in json.dumps(record)


async def test_events_queue_id_from_xforward(start_hop, event_log, tmp_path):
    from .smtp_client import RawClient

    path = tmp_path / "events.jsonl"
    log = event_log(file=str(path))
    hop = await start_hop()

    client = await RawClient.connect(hop.port)
    await client.command("EHLO mx.example.com")
    assert (await client.command("XFORWARD ADDR=203.0.113.9 IDENT=4XyZ1k2LmNz"))[0] == 250
    await client.command("MAIL FROM:<alice@example.net>")
    await client.command("RCPT TO:<bob@example.com>")
    await client.data(make_message())
    await client.close()
    assert log.flush()

    record = json.loads(path.read_text(encoding="utf-8"))
    assert record["queue_id"] == "4XyZ1k2LmNz"
    assert record["forwarded_ip"] == "203.0.113.9"
    assert record["client_ip"] == "127.0.0.1"


async def test_events_fields_match_docs(start_hop, event_log, tmp_path):
    path = tmp_path / "events.jsonl"
    log = event_log(file=str(path))
    hop = await start_hop()

    await send(hop.port, make_message())
    assert log.flush()

    record = json.loads(path.read_text(encoding="utf-8"))
    assert documented_fields() == set(record)
    assert set(EVENT_SCHEMA["required"]) == set(record)


async def test_events_file_reopened_after_rotation(start_hop, event_log, tmp_path):
    path = tmp_path / "events.jsonl"
    log = event_log(file=str(path))
    hop = await start_hop()

    await send(hop.port, make_message(subject="before"))
    assert log.flush()
    path.rename(tmp_path / "events.jsonl.1")
    await send(hop.port, make_message(subject="after"))
    assert log.flush()

    assert json.loads((tmp_path / "events.jsonl.1").read_text())["subject"] == "before"
    assert json.loads(path.read_text())["subject"] == "after"


async def test_events_syslog_udp_datagram(start_hop, event_log):
    collector = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    collector.bind(("127.0.0.1", 0))
    collector.settimeout(10)
    port = collector.getsockname()[1]
    event_log(syslog=f"127.0.0.1:{port}", syslog_transport="udp")
    hop = await start_hop()

    try:
        await send(hop.port, qr_message())
        datagram = await asyncio.to_thread(collector.recv, 70_000)
    finally:
        collector.close()

    match = SYSLOG_HEADER.match(datagram)
    assert match is not None, datagram[:120]
    assert match["pri"] == b"22"
    assert match["host"] == b"filter.test"
    assert re.fullmatch(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", match["time"])
    record = json.loads(match["msg"])
    jsonschema.validate(record, EVENT_SCHEMA)
    assert record["qr_codes"][0]["payload"] == QR_URL


async def test_events_syslog_tcp_octet_counting(start_hop, event_log):
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def collect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        length = int((await reader.readuntil(b" "))[:-1])
        await received.put(await reader.readexactly(length))
        writer.close()

    server = await asyncio.start_server(collect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    event_log(syslog=f"127.0.0.1:{port}", syslog_transport="tcp")
    hop = await start_hop()

    try:
        await send(hop.port, make_message(subject="over tcp"))
        message = await asyncio.wait_for(received.get(), 10)
    finally:
        server.close()

    match = SYSLOG_HEADER.match(message)
    assert match is not None, message[:120]
    assert json.loads(match["msg"])["subject"] == "over tcp"


def test_syslog_message_cut_to_limit():
    record = {"time": "2026-11-02T09:30:00.000Z", "session_id": "s1",
              "findings": [{"rule": "QR_URL", "score": 3.0, "detail": "x" * 5000}],
              "qr_codes": [{"payload": "https://a.example.test/", "location": "p", "hidden_as": "svg"}],
              "urls": [f"https://a.example.test/{i}" for i in range(3000)]}

    message = syslog_message(record, "filter.test", limit=4000)

    assert len(message) <= 4000
    cut = json.loads(SYSLOG_HEADER.match(message)["msg"])
    assert cut["truncated"] is True
    assert cut["url_count"] == 3000
    assert cut["qr_code_count"] == 1
    assert cut["urls"] == []
    assert cut["findings"] == [{"rule": "QR_URL", "score": 3.0}]


async def test_emit_verdict_survives_failing_listener(start_hop, next_hop):
    def broken(event) -> None:
        raise RuntimeError("listener bug")

    events.add_listener(broken)
    try:
        hop = await start_hop()
        _, reply = await send(hop.port, make_message())
    finally:
        events.remove_listener(broken)

    assert reply[0] == 250
    assert len(next_hop.messages) == 1
