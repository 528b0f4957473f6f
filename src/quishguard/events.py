"""Structured verdict events: one JSON object per scanned message.

A front end calls `emit_verdict` once per message, after it carried out the
action. The call builds a `VerdictEvent` and hands it to every registered
listener: the event log configured in `[events]` (JSON Lines to a file or
standard output, and syslog over UDP or TCP) and the Prometheus metrics.
`docs/events.md` documents the field names; `event_record` is the one place
that writes them.

Syslog messages follow RFC 5424 (facility mail, severity info, the JSON
object as the MSG with a UTF-8 BOM). Over UDP each message is one datagram
(RFC 5426); over TCP messages are framed by octet counting (RFC 6587,
section 3.4.1).

Writes happen on one background thread behind a bounded queue, so a slow
disk or an unreachable collector never blocks the SMTP event loop. When the
queue is full, events are dropped and counted, never waited for.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO, TYPE_CHECKING, Any

from .config import Config, parse_host_port
from .model import Action, Envelope

if TYPE_CHECKING:
    from .pipeline import ScanResult

log = logging.getLogger(__name__)

# Version of the event record layout; raised when a field changes meaning or
# is removed (adding a field does not raise it).
SCHEMA_VERSION = 1

# Events waiting for the writer thread. At about 2 KB per event this caps the
# backlog near 20 MB while a collector is unreachable.
QUEUE_LIMIT = 10_000

# Largest UDP datagram sent. IPv4 carries at most 65,507 bytes of payload,
# and RFC 5426 only promises that receivers take 480 (IPv4) or 1,180 (IPv6)
# octets, so rsyslog and syslog-ng need a raised max message size for big
# events. Larger events are sent with their lists cut (`"truncated": true`).
MAX_DATAGRAM_BYTES = 65_000

# RFC 5424 PRI: facility mail (2) * 8 + severity informational (6).
SYSLOG_PRI = 2 * 8 + 6
SYSLOG_APP_NAME = "quishguard"
SYSLOG_MSGID = "verdict"
UTF8_BOM = "\ufeff"

# Seconds allowed to connect to or send to a TCP collector before the event
# is dropped and the connection retried with the next event.
SYSLOG_TCP_TIMEOUT = 5.0


@dataclass(frozen=True)
class VerdictEvent:
    """One scanned message as the front end reports it, after the action was carried out.

    `reply` is the SMTP reply (or milter response) sent for the message; a
    `session_id` is ours, a `queue_id` is the upstream MTA's (XFORWARD IDENT
    or the milter `i` macro) when it sent one.
    """

    time: datetime
    session_id: str
    queue_id: str | None
    envelope: Envelope
    result: ScanResult
    reply: str
    front_end: str

    @property
    def relay_failed(self) -> bool:
        """True when the verdict was to deliver but the reply is not a 2xx."""
        delivering = self.result.verdict.action in (Action.ACCEPT, Action.TAG)
        return delivering and not self.reply.startswith("2")


Listener = Callable[[VerdictEvent], None]

_listeners: list[Listener] = []


def add_listener(listener: Listener) -> None:
    """Register `listener` to receive every event of this process."""
    _listeners.append(listener)


def remove_listener(listener: Listener) -> None:
    """Unregister `listener`; unknown listeners are ignored."""
    if listener in _listeners:
        _listeners.remove(listener)


def emit_verdict(*, session_id: str, envelope: Envelope, result: ScanResult, reply: str,
                 queue_id: str | None = None, front_end: str = "smtp") -> None:
    """Report one scanned message to the event log and the metrics.

    Call it once per message after the action was carried out. It never
    raises: a failing listener is logged, because the message was already
    delivered, stored or refused, and an exception here would send the
    client a second reply.
    """
    event = VerdictEvent(datetime.now(timezone.utc), session_id, queue_id, envelope, result,
                         reply, front_end)
    for listener in list(_listeners):
        try:
            listener(event)
        except Exception:  # noqa: BLE001 - see the docstring
            log.exception("session=%s event=event_listener_failed listener=%r", session_id, listener)


def event_record(event: VerdictEvent, hostname: str) -> dict[str, Any]:
    """Build the JSON object of one event; the keys are documented in docs/events.md."""
    verdict = event.result.verdict
    facts = event.result.facts
    sender = facts.sender
    stages = {name: round(seconds, 6) for name, seconds in event.result.stage_seconds.items()}
    stages["total"] = round(event.result.seconds, 6)
    return {
        "schema": SCHEMA_VERSION,
        "time": event.time.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "host": hostname,
        "front_end": event.front_end,
        "session_id": event.session_id,
        "queue_id": event.queue_id,
        "message_id": facts.message_id or None,
        "client_ip": event.envelope.client_ip,
        "client_helo": event.envelope.helo,
        "forwarded_ip": event.envelope.xforward_addr,
        "original_ip": sender.original_ip if sender else None,
        "mail_from": event.envelope.mail_from,
        "rcpt_to": list(event.envelope.rcpt_tos),
        "from": facts.from_header,
        "from_domain": sender.from_domain if sender else None,
        "subject": facts.subject,
        "action": verdict.action.label,
        "score": round(verdict.score, 3),
        "reply": event.reply,
        "scan_incomplete": verdict.scan_incomplete,
        "findings": [{"rule": f.rule, "score": f.score, "detail": f.detail} for f in verdict.findings],
        "qr_codes": [{"payload": q.payload, "location": q.location, "hidden_as": q.hidden_as}
                     for q in verdict.qr_codes],
        "urls": list(verdict.urls),
        "scan_seconds": stages,
    }


def encode_line(record: dict[str, Any]) -> bytes:
    """Encode a record as one JSON line; non-ASCII text stays UTF-8."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8",
                                                                               "surrogateescape") + b"\n"


def syslog_message(record: dict[str, Any], hostname: str, limit: int | None = None) -> bytes:
    """Format a record as an RFC 5424 message; cut its lists when it exceeds `limit` bytes."""
    timestamp = record["time"]
    # RFC 5424 limits HOSTNAME to 255 printable ASCII characters.
    host = "".join(c for c in hostname if 33 <= ord(c) <= 126)[:255] or "-"
    header = f"<{SYSLOG_PRI}>1 {timestamp} {host} {SYSLOG_APP_NAME} {os.getpid()} {SYSLOG_MSGID} - "
    message = (header + UTF8_BOM).encode("utf-8") + encode_line(record).rstrip(b"\n")
    if limit is None or len(message) <= limit:
        return message

    cut = dict(record, truncated=True,
               findings=[{"rule": f["rule"], "score": f["score"]} for f in record["findings"]],
               qr_codes=[], urls=[],
               qr_code_count=len(record["qr_codes"]), url_count=len(record["urls"]))
    message = (header + UTF8_BOM).encode("utf-8") + encode_line(cut).rstrip(b"\n")
    return message[:limit]


class _JsonLinesFile:
    """Appends lines to a file, reopening it when log rotation moved it away."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.handle: IO[bytes] | None = None
        self.inode: tuple[int, int] | None = None

    def write(self, line: bytes) -> None:
        if self.path == "-":
            sys.stdout.buffer.write(line)
            sys.stdout.buffer.flush()
            return

        # Like logging.handlers.WatchedFileHandler: a changed or missing inode
        # means logrotate renamed the file, so the next line starts a new one.
        try:
            stat = os.stat(self.path)
            current = (stat.st_dev, stat.st_ino)
        except FileNotFoundError:
            current = None
        if self.handle is None or current != self.inode:
            self.close()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self.handle = os.fdopen(fd, "ab")
            stat = os.fstat(fd)
            self.inode = (stat.st_dev, stat.st_ino)
        self.handle.write(line)
        self.handle.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


class _SyslogSender:
    """Sends RFC 5424 messages to one collector over UDP or TCP."""

    def __init__(self, address: str, transport: str) -> None:
        self.host, self.port = parse_host_port(address)
        self.transport = transport
        self.sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        kind = socket.SOCK_DGRAM if self.transport == "udp" else socket.SOCK_STREAM
        info = socket.getaddrinfo(self.host, self.port, type=kind)[0]
        sock = socket.socket(info[0], kind)
        sock.settimeout(SYSLOG_TCP_TIMEOUT)
        try:
            sock.connect(info[4])
        except OSError:
            sock.close()
            raise
        return sock

    def send(self, record: dict[str, Any], hostname: str) -> None:
        if self.sock is None:
            self.sock = self._connect()
        try:
            if self.transport == "udp":
                self.sock.send(syslog_message(record, hostname, MAX_DATAGRAM_BYTES))
            else:
                message = syslog_message(record, hostname)
                self.sock.sendall(str(len(message)).encode("ascii") + b" " + message)
        except OSError:
            # Reconnect with the next event; a collector restart breaks TCP.
            self.close()
            raise

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class EventLog:
    """The `[events]` outputs, written by one background thread.

    Start it with `start()`, which also registers it as a listener, and stop
    it with `close()`, which writes what is queued first.
    """

    def __init__(self, *, file: str = "", syslog: str = "", syslog_transport: str = "udp",
                 hostname: str = "-") -> None:
        self.hostname = hostname
        self.file = _JsonLinesFile(file) if file else None
        self.syslog = _SyslogSender(syslog, syslog_transport) if syslog else None
        self.dropped = 0
        self.failed = 0
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(QUEUE_LIMIT)
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, config: Config) -> EventLog:
        return cls(file=config["events.file"], syslog=config["events.syslog"],
                   syslog_transport=config["events.syslog_transport"], hostname=config.hostname)

    @property
    def enabled(self) -> bool:
        return self.file is not None or self.syslog is not None

    def start(self) -> None:
        """Start the writer thread and register with `add_listener`."""
        self._thread = threading.Thread(target=self._run, name="quishguard-events", daemon=True)
        self._thread.start()
        add_listener(self)
        log.info("event=events_started file=%s syslog=%s", self.file.path if self.file else "-",
                 f"{self.syslog.transport}:{self.syslog.host}:{self.syslog.port}" if self.syslog else "-")

    def __call__(self, event: VerdictEvent) -> None:
        try:
            self._queue.put_nowait(event_record(event, self.hostname))
        except queue.Full:
            self.dropped += 1
            # Log the first drop and then every thousandth, so a dead
            # collector does not flood the log.
            if self.dropped % 1000 == 1:
                log.warning("session=%s event=events_dropped total=%d reason=queue_full",
                            event.session_id, self.dropped)

    def _run(self) -> None:
        while True:
            record = self._queue.get()
            try:
                if record is None:
                    return
                self._write(record)
            finally:
                self._queue.task_done()

    def _write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            try:
                self.file.write(encode_line(record))
            except OSError as error:
                self._failed("file", record, error)
        if self.syslog is not None:
            try:
                self.syslog.send(record, self.hostname)
            except OSError as error:
                self._failed("syslog", record, error)

    def _failed(self, output: str, record: dict[str, Any], error: OSError) -> None:
        self.failed += 1
        if self.failed % 1000 == 1:
            log.warning("session=%s event=event_write_failed output=%s error=%s total=%d",
                        record["session_id"], output, error, self.failed)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the queued events are written; return False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self) -> None:
        """Unregister, write what is queued and stop the thread."""
        remove_listener(self)
        if self._thread is not None:
            try:
                self._queue.put(None, timeout=10)
            except queue.Full:
                log.warning("event=events_stop_timed_out queued=%d", self._queue.qsize())
            self._thread.join(timeout=10)
            self._thread = None
        if self.file is not None:
            self.file.close()
        if self.syslog is not None:
            self.syslog.close()
