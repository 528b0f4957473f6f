"""The milter front end: an asyncio server that Postfix and Sendmail call during SMTP.

The MTA connects once per SMTP session and sends the envelope, the headers and
the body through the milter protocol (`milter/protocol.py`, version 6). At end
of message this module rebuilds the raw message, runs the same pipeline as
the SMTP proxy (`milter/smtp.py`) and carries out the verdict with milter
actions instead of relaying:

| action     | milter replies                                                       |
| ---------- | -------------------------------------------------------------------- |
| accept     | relay headers inserted, forged ones deleted, continue                |
| tag        | as accept, and the Subject changed                                   |
| quarantine | hold: headers edited, SMFIR_QUARANTINE, continue. store: SMFIR_DISCARD |
| reject     | `550 5.7.1` with the top rule                                        |
| tempfail   | `451 4.7.1`                                                          |

Rebuilding the message: each header arrives as name and value with the space
after the colon (SMFIP_HDR_LEADSPC), folded lines joined by a bare LF and no
final line end. It becomes `name:value` with every LF turned into CRLF, and
the body chunks follow an empty line, so the pipeline reads the same bytes as
through the SMTP proxy.

This is the only module of the milter that touches sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config, parse_milter_socket
from ..errors import ConfigError, QuarantineError
from ..events import emit_verdict
from ..model import Action, Envelope
from ..pipeline import Scanner, ScanResult
from ..quarantine import QuarantineStore
from ..stamp import edit_message, is_removed_field, relay_headers
from .protocol import (SMFIF_ADDHDRS, SMFIF_CHGHDRS, SMFIF_QUARANTINE, Abort, BodyChunk, Connect,
                       Disconnected, EndOfMessage, Event, Header, Helo, Macros, MailFrom,
                       MilterCodec, MilterProtocolError, Negotiated, Quit, Recipient)
from .smtp import REPLY_INTERNAL_ERROR, REPLY_QUARANTINE_FAILED, REPLY_REJECTED, REPLY_SCAN_TEMPFAIL

log = logging.getLogger(__name__)

# The SMTP proxy's size limit gives aiosmtpd's 552. The milter replies the
# same code with an enhanced status code (RFC 3463: 5.3.4 message too big for system).
REPLY_TOO_BIG = "552 5.3.4 Message size exceeds the limit"

READ_SIZE = 64 * 1024

# Macro stages that belong to the connection; the others are per message.
_CONNECTION_STAGES = (b"C", b"H")


# -- pure helpers: message rebuild and header edits ----------------------------


def rebuild_field(name: bytes, value: bytes, *, leading_space: bool) -> bytes:
    """Rebuild one header field as it was in the message, ending in CRLF.

    Without SMFIP_HDR_LEADSPC the MTA removed the space after the colon, so
    one space is put back, which is how nearly all mail is written.
    """
    value = value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    separator = b":" if leading_space else b": "
    return name + separator + value + b"\r\n"


@dataclass(frozen=True)
class HeaderEdit:
    """One milter header modification.

    `kind` is insert (at `index` among all headers, 0 is the top), change
    (the `index`-th header called `name`, from 1; a None value deletes it) or
    add (at the end). `value` has no leading space and CRLF between folded lines.
    """

    kind: str
    index: int
    name: bytes
    value: bytes | None


def _split_field(field_bytes: bytes) -> tuple[bytes, bytes]:
    """Split `Name: value\\r\\n` into the name and the value without the one space and the final CRLF."""
    name, _, value = field_bytes.partition(b":")
    if value.startswith(b" "):
        value = value[1:]
    if value.endswith(b"\r\n"):
        value = value[:-2]
    return name, value


def plan_header_edits(fields: list[bytes], added: list[bytes], *, is_removed: Callable[[bytes], bool],
                      prefix: str, subject_tag: str | None) -> list[HeaderEdit]:
    """Return the header edits that give the message the SMTP proxy would relay.

    `fields` are the rebuilt header fields in arrival order, `added` the
    fields the proxy prepends (`stamp.relay_headers`) and `is_removed` the
    proxy's test for incoming fields it drops (`stamp.is_removed_field`).
    Removals come first, from the last occurrence of each name backwards, so
    every index still points at the field it was computed for.
    """
    edits: list[HeaderEdit] = []

    occurrences: dict[bytes, int] = {}
    removed: list[tuple[int, bytes]] = []
    subject: bytes | None = None
    for field_bytes in fields:
        name = field_bytes.split(b":", 1)[0]
        key = name.strip().lower()
        occurrences[key] = occurrences.get(key, 0) + 1
        if is_removed(field_bytes):
            removed.append((occurrences[key], name))
        if key == b"subject" and subject is None:
            subject = field_bytes
    for index, name in sorted(removed, key=lambda item: item[0], reverse=True):
        edits.append(HeaderEdit("change", index, name, None))

    for position, field_bytes in enumerate(added):
        name, value = _split_field(field_bytes)
        edits.append(HeaderEdit("insert", position, name, value))

    if subject_tag:
        # The same edit function as the SMTP proxy, applied to the Subject alone.
        tagged = edit_message(subject or b"", prefix=prefix, added=[], subject_tag=subject_tag)
        name, value = _split_field(tagged)
        if subject is None:
            edits.append(HeaderEdit("add", 0, name, value))
        else:
            edits.append(HeaderEdit("change", 1, subject.split(b":", 1)[0], value))
    return edits


def _send_edits(codec: MilterCodec, edits: list[HeaderEdit]) -> None:
    for edit in edits:
        if edit.kind == "insert":
            codec.insert_header(edit.index, edit.name, edit.value or b"")
        elif edit.kind == "change":
            codec.change_header(edit.index, edit.name, edit.value)
        else:
            codec.add_header(edit.name, edit.value or b"")


# -- one MTA connection --------------------------------------------------------


@dataclass
class _Message:
    """The message under way on one milter connection."""

    mail_from: str = ""
    rcpt_tos: list[str] = field(default_factory=list)
    fields: list[bytes] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    size: int = 0
    too_big: bool = False


class MilterSession:
    """The protocol events of one MTA connection, turned into scans and milter actions."""

    def __init__(self, config: Config, scanner: Scanner, store: QuarantineStore, peer: str) -> None:
        self.config = config
        self.scanner = scanner
        self.store = store
        self.peer = peer
        self.id = secrets.token_hex(5)
        required = SMFIF_ADDHDRS | SMFIF_CHGHDRS
        if config["milter.quarantine_mode"] == "hold":
            required |= SMFIF_QUARANTINE
        self.codec = MilterCodec(required_actions=required)
        self.max_size = config["smtp.max_message_size"]
        self.prefix = config["headers.prefix"]
        self.messages = 0
        self._reset_connection()

    def _reset_connection(self) -> None:
        self.client_ip: str | None = None
        self.helo: str | None = None
        self.macros: dict[bytes, dict[str, str]] = {}
        self.message: _Message | None = None

    def _reset_message(self) -> None:
        self.message = None
        for stage in [s for s in self.macros if s not in _CONNECTION_STAGES]:
            del self.macros[stage]

    def macro(self, name: str) -> str | None:
        """Return the latest value of macro `name` (without braces), or None when the MTA sent none."""
        for values in reversed(list(self.macros.values())):
            if name in values:
                return values[name]
        return None

    async def run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read packets until the MTA quits or hangs up, answering each event in turn."""
        log.info("session=%s event=milter_connected peer=%s", self.id, self.peer)
        try:
            await self._loop(reader, writer)
        except MilterProtocolError as error:
            log.warning("session=%s event=protocol_error peer=%s error=%s", self.id, self.peer, error)
        except ConnectionError as error:
            log.warning("session=%s event=mta_gone peer=%s error=%s", self.id, self.peer,
                        type(error).__name__)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            log.info("session=%s event=milter_closed peer=%s messages=%d", self.id, self.peer,
                     self.messages)

    async def _loop(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        idle_timeout = self.config["milter.idle_timeout"]
        while True:
            try:
                data = await asyncio.wait_for(reader.read(READ_SIZE), idle_timeout)
            except TimeoutError:
                log.warning("session=%s event=idle_timeout peer=%s seconds=%.0f", self.id, self.peer,
                            idle_timeout)
                return
            if not data:
                self._disconnected(self.codec.connection_lost())
                return

            for event in self.codec.feed(data):
                if await self._handle(event, writer):
                    return
                await self._flush(writer)

    async def _flush(self, writer: asyncio.StreamWriter) -> None:
        out = self.codec.data_to_send()
        if out:
            writer.write(out)
            await writer.drain()

    def _disconnected(self, event: Disconnected) -> None:
        if event.in_message or event.truncated_bytes:
            # The MTA applies its own failure action to the message; nothing was accepted here.
            log.warning("session=%s event=mta_disconnected_mid_message peer=%s truncated_bytes=%d",
                        self.id, self.peer, event.truncated_bytes)

    async def _handle(self, event: Event, writer: asyncio.StreamWriter) -> bool:
        """Apply one event; return True when the connection is to be closed."""
        if isinstance(event, Quit):
            if not event.reuse:
                return True
            self._reset_connection()
            return False

        if isinstance(event, EndOfMessage):
            await self._end_of_message(event, writer)
            return False

        self._record(event)
        if event.reply_expected:
            self.codec.continue_()
        return False

    def _record(self, event: Event) -> None:
        if isinstance(event, Negotiated):
            log.debug("session=%s event=negotiated mta_version=%d actions=0x%x protocol=0x%x "
                      "granted=0x%x", self.id, event.mta_version, event.actions, event.protocol,
                      self.codec.protocol)
        elif isinstance(event, Macros):
            self.macros.setdefault(event.stage, {}).update(event.values)
        elif isinstance(event, Connect):
            self.client_ip = event.address
        elif isinstance(event, Helo):
            self.helo = event.name
        elif isinstance(event, MailFrom):
            self.message = _Message(mail_from=event.address)
        elif isinstance(event, Recipient):
            self._current().rcpt_tos.append(event.address)
        elif isinstance(event, Header):
            self._add_bytes(rebuild_field(event.name, event.value,
                                          leading_space=self.codec.leading_space), header=True)
        elif isinstance(event, BodyChunk):
            self._add_bytes(event.data, header=False)
        elif isinstance(event, Abort):
            self._reset_message()

    def _current(self) -> _Message:
        # SMFIP_NOMAIL is never requested, but a message without MAIL must not crash the session.
        if self.message is None:
            self.message = _Message()
        return self.message

    def _add_bytes(self, data: bytes, *, header: bool) -> None:
        message = self._current()
        message.size += len(data)
        if message.too_big or message.size > self.max_size:
            # Keep counting but stop buffering: the reply is 552 either way.
            message.too_big = True
            message.fields.clear()
            message.body.clear()
            return
        if header:
            message.fields.append(data)
        else:
            message.body += data

    # -- end of message --------------------------------------------------------

    async def _end_of_message(self, event: EndOfMessage, writer: asyncio.StreamWriter) -> None:
        if event.data:
            self._add_bytes(event.data, header=False)
        message = self._current()
        self.messages += 1
        ref = f"{self.id}.{self.messages}"
        try:
            await self._decide(ref, message, writer)
        except asyncio.CancelledError:
            raise
        except ConnectionError:
            raise
        except Exception as error:  # noqa: BLE001 - any bug of ours becomes a 451, never a lost message
            log.error("session=%s event=processing_failed error=%s", ref, type(error).__name__,
                      exc_info=error)
            if self.codec.awaiting_reply is not None:
                self.codec.reply_code(REPLY_INTERNAL_ERROR)
        finally:
            self._reset_message()
        await self._flush(writer)

    def raw_message(self, message: _Message) -> bytes:
        """Reassemble the message bytes from the rebuilt header fields and the body chunks."""
        return b"".join(message.fields) + b"\r\n" + bytes(message.body)

    def envelope(self, message: _Message) -> Envelope:
        return Envelope(
            mail_from=message.mail_from,
            rcpt_tos=tuple(message.rcpt_tos),
            client_ip=self.client_ip,
            helo=self.helo,
            queue_id=self.macro("i"),
        )

    async def _decide(self, ref: str, message: _Message, writer: asyncio.StreamWriter) -> None:
        queue_id = self.macro("i") or "-"
        if message.too_big:
            log.info("session=%s event=too_big queue_id=%s size=%d limit=%d", ref, queue_id,
                     message.size, self.max_size)
            self.codec.reply_code(REPLY_TOO_BIG)
            return

        raw = self.raw_message(message)
        envelope = self.envelope(message)
        result = await self._scan_with_progress(raw, envelope, ref, writer)
        verdict = result.verdict
        log.info("session=%s event=verdict queue_id=%s message_id=%r client=%s auth=%s daemon=%s "
                 "score=%.1f action=%s rules=%s seconds=%.3f", ref, queue_id,
                 result.facts.message_id or "-", self.client_ip or "-",
                 self.macro("auth_authen") or "-", self.macro("daemon_name") or "-",
                 verdict.score, verdict.action.label,
                 ",".join(f.rule for f in verdict.findings) or "-", result.seconds)

        reply = await self._act(ref, raw, envelope, result, message)
        emit_verdict(session_id=ref, envelope=envelope, result=result, reply=reply,
                     queue_id=self.macro("i"), front_end="milter")

    async def _act(self, ref: str, raw: bytes, envelope: Envelope, result: ScanResult,
                   message: _Message) -> str:
        """Carry out the verdict with milter replies; return a summary of the reply for the event log."""
        verdict = result.verdict
        if verdict.action in (Action.ACCEPT, Action.TAG):
            tag = self.config["headers.subject_tag"] if verdict.action is Action.TAG else None
            _send_edits(self.codec, self._header_edits(raw, message, result, tag))
            self.codec.continue_()
            return "continue"

        if verdict.action is Action.QUARANTINE:
            return await self._quarantine(ref, raw, envelope, result, message)

        if verdict.action is Action.REJECT:
            reply = REPLY_REJECTED.format(rule=verdict.top_rule or "policy")
            self.codec.reply_code(reply)
            return reply

        self.codec.reply_code(REPLY_SCAN_TEMPFAIL)
        return REPLY_SCAN_TEMPFAIL

    def _header_edits(self, raw: bytes, message: _Message, result: ScanResult,
                      subject_tag: str | None) -> list[HeaderEdit]:
        sender = result.facts.sender
        added = relay_headers(raw, result.verdict, sender.auth if sender is not None else None,
                              tuple(message.rcpt_tos), self.config)
        return plan_header_edits(message.fields, added,
                                 is_removed=lambda field_bytes: is_removed_field(field_bytes, self.config),
                                 prefix=self.prefix, subject_tag=subject_tag)

    async def _scan_with_progress(self, raw: bytes, envelope: Envelope, ref: str,
                                  writer: asyncio.StreamWriter) -> ScanResult:
        interval = self.config["milter.progress_interval"]
        task = asyncio.ensure_future(self.scanner.scan(raw, envelope, message_ref=ref))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=interval)
                if done:
                    return task.result()
                # Each progress reply restarts Postfix's milter_content_timeout.
                self.codec.progress()
                await self._flush(writer)
        finally:
            if not task.done():
                task.cancel()

    async def _quarantine(self, ref: str, raw: bytes, envelope: Envelope, result: ScanResult,
                          message: _Message) -> str:
        verdict = result.verdict
        if self.config["milter.quarantine_mode"] == "hold":
            _send_edits(self.codec, self._header_edits(raw, message, result, None))
            self.codec.quarantine(f"quishguard score {verdict.score:.1f} "
                                  f"{verdict.top_rule or 'policy'}")
            self.codec.continue_()
            log.info("session=%s event=held queue_id=%s", ref, envelope.queue_id or "-")
            return "quarantine (hold queue)"

        try:
            quarantine_id = await asyncio.to_thread(
                self.store.store, raw, envelope, verdict, subject=result.facts.subject,
                from_header=result.facts.from_header, message_id=result.facts.message_id)
        except QuarantineError as error:
            log.error("session=%s event=quarantine_failed queue_id=%s error=%s", ref,
                      envelope.queue_id or "-", error)
            self.codec.reply_code(REPLY_QUARANTINE_FAILED)
            return REPLY_QUARANTINE_FAILED
        log.info("session=%s event=quarantined queue_id=%s quarantine_id=%s", ref,
                 envelope.queue_id or "-", quarantine_id)
        self.codec.discard()
        return f"discard (quarantine id {quarantine_id})"


# -- the listener --------------------------------------------------------------


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket file left by an earlier run; refuse to touch anything else."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"milter.listen names {path}, which exists and is not a socket; "
                          "choose another path")
    path.unlink()


async def start_milter_server(config: Config, scanner: Scanner, store: QuarantineStore,
                              listen: str | tuple[str, int] | None = None) -> asyncio.AbstractServer:
    """Start listening and return the server (close it to stop).

    `listen` is a socket string such as `inet:127.0.0.1:9900` or `unix:/PATH`,
    or a (HOST, PORT) pair where port 0 lets the kernel choose. None means
    `milter.listen`.
    """
    if config["milter.quarantine_mode"] == "store" and not config["milter.release_relay"]:
        raise ConfigError('milter.quarantine_mode = "store" needs milter.release_relay, the next hop '
                          "that released mail goes to without passing the milter again")

    address = listen or config["milter.listen"]
    if isinstance(address, tuple):
        host, port = address
    else:
        try:
            host, port = parse_milter_socket(address)
        except ValueError as error:
            raise ConfigError(f"invalid milter socket: {error}") from None

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        peer_text = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        await MilterSession(config, scanner, store, peer_text).run(reader, writer)

    if host == "unix":
        path = Path(str(port))
        _remove_stale_socket(path)
        server = await asyncio.start_unix_server(on_connection, path=os.fspath(path))
    else:
        server = await asyncio.start_server(on_connection, host=host, port=int(port))
    log.info("event=milter_listening address=%s quarantine_mode=%s", address,
             config["milter.quarantine_mode"])
    return server
