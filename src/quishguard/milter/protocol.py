"""Sans-I/O codec for the filter side of the Sendmail milter protocol, version 6.

The protocol has no RFC. This module follows the wire format that Sendmail
8.14+ (libmilter, `include/libmilter/mfdef.h`) and Postfix 3.x
(`src/milter/milter8.c`) implement, as written up in
draft-adams-milter-protocol-00:

- Every packet is a 32-bit big-endian length (counting the command byte),
  one command byte and the command's data. Strings are NUL-terminated.
- The MTA opens with SMFIC_OPTNEG. The filter answers with the protocol
  version, the actions it may take (SMFIF_*) and the protocol steps it does
  not want or will not answer (SMFIP_*). Each answered bit must be one the
  MTA offered.
- The MTA then sends one command per SMTP stage. The filter answers each one
  unless a "no reply" bit (SMFIP_NR_*) was negotiated for it. End of message
  is always answered: zero or more modifications (header edits, quarantine,
  progress), then exactly one final reply.

`MilterCodec` turns received bytes into events and replies into bytes. It
does no I/O, so the server (`milter/server.py`) owns the sockets and the
tests drive the codec with plain bytes. The codec tracks which events still
need a reply and raises `MilterProtocolError` for any packet that breaks the
protocol (too large, unknown command, malformed data, commands before the
negotiation); the caller then closes the connection, and the MTA applies its
`milter_default_action` to the message in flight.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..errors import QuishguardError

MILTER_VERSION = 6

# Largest packet accepted, in bytes. Body chunks are at most 65,535 bytes
# because no larger data size (SMFIP_MDS_256K, SMFIP_MDS_1M) is negotiated,
# and Postfix limits one header to `header_size_limit`, 102,400 bytes by
# default. 1 MiB leaves room for both and still bounds the buffer.
MAX_PACKET_SIZE = 1024 * 1024

_LENGTH = struct.Struct(">I")

# Commands from the MTA (SMFIC_*).
SMFIC_ABORT = b"A"
SMFIC_BODY = b"B"
SMFIC_CONNECT = b"C"
SMFIC_MACRO = b"D"
SMFIC_BODYEOB = b"E"
SMFIC_HELO = b"H"
SMFIC_QUIT_NC = b"K"
SMFIC_HEADER = b"L"
SMFIC_MAIL = b"M"
SMFIC_EOH = b"N"
SMFIC_OPTNEG = b"O"
SMFIC_QUIT = b"Q"
SMFIC_RCPT = b"R"
SMFIC_DATA = b"T"
SMFIC_UNKNOWN = b"U"

# Replies from the filter (SMFIR_*).
SMFIR_ADDHEADER = b"h"
SMFIR_CHGHEADER = b"m"
SMFIR_INSHEADER = b"i"
SMFIR_ACCEPT = b"a"
SMFIR_CONTINUE = b"c"
SMFIR_DISCARD = b"d"
SMFIR_PROGRESS = b"p"
SMFIR_QUARANTINE = b"q"
SMFIR_REJECT = b"r"
SMFIR_TEMPFAIL = b"t"
SMFIR_REPLYCODE = b"y"

# Actions the filter may take (SMFIF_*).
SMFIF_ADDHDRS = 0x01
SMFIF_CHGBODY = 0x02
SMFIF_ADDRCPT = 0x04
SMFIF_DELRCPT = 0x08
SMFIF_CHGHDRS = 0x10
SMFIF_QUARANTINE = 0x20

# Protocol steps (SMFIP_*): "NO" bits skip a command, "NR" bits mean the
# filter sends no reply to it.
SMFIP_NOCONNECT = 0x01
SMFIP_NOHELO = 0x02
SMFIP_NOMAIL = 0x04
SMFIP_NORCPT = 0x08
SMFIP_NOBODY = 0x10
SMFIP_NOHDRS = 0x20
SMFIP_NOEOH = 0x40
SMFIP_NR_HDR = 0x80
SMFIP_NOUNKNOWN = 0x100
SMFIP_NODATA = 0x200
SMFIP_SKIP = 0x400
SMFIP_RCPT_REJ = 0x800
SMFIP_NR_CONN = 0x1000
SMFIP_NR_HELO = 0x2000
SMFIP_NR_MAIL = 0x4000
SMFIP_NR_RCPT = 0x8000
SMFIP_NR_DATA = 0x10000
SMFIP_NR_UNKN = 0x20000
SMFIP_NR_EOH = 0x40000
SMFIP_NR_BODY = 0x80000
SMFIP_HDR_LEADSPC = 0x100000

# What quishguard asks for when the MTA offers it: skip the commands it does
# not use, answer none of the stages before end of message (it never decides
# early), and receive header values with the space after the colon, so a
# header is rebuilt exactly as it arrived.
WANTED_PROTOCOL = (SMFIP_NOUNKNOWN | SMFIP_NODATA | SMFIP_NOEOH
                   | SMFIP_NR_CONN | SMFIP_NR_HELO | SMFIP_NR_MAIL | SMFIP_NR_RCPT
                   | SMFIP_NR_HDR | SMFIP_NR_BODY | SMFIP_HDR_LEADSPC)

# The "no reply" bit of each command that is answered unless it is set.
_NO_REPLY_BIT = {
    SMFIC_CONNECT: SMFIP_NR_CONN,
    SMFIC_HELO: SMFIP_NR_HELO,
    SMFIC_MAIL: SMFIP_NR_MAIL,
    SMFIC_RCPT: SMFIP_NR_RCPT,
    SMFIC_DATA: SMFIP_NR_DATA,
    SMFIC_HEADER: SMFIP_NR_HDR,
    SMFIC_EOH: SMFIP_NR_EOH,
    SMFIC_BODY: SMFIP_NR_BODY,
    SMFIC_UNKNOWN: SMFIP_NR_UNKN,
}

# Address families in SMFIC_CONNECT.
FAMILY_UNKNOWN = "U"
FAMILY_UNIX = "L"
FAMILY_INET = "4"
FAMILY_INET6 = "6"


class MilterProtocolError(QuishguardError):
    """The MTA sent a packet that breaks the milter protocol; close the connection."""


# -- events ------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """Base of the codec's events. `reply_expected` is True when the MTA waits for an answer."""

    reply_expected: bool = field(default=False, kw_only=True)


@dataclass(frozen=True)
class Negotiated(Event):
    """Option negotiation finished; the codec already queued its answer."""

    mta_version: int
    actions: int
    protocol: int


@dataclass(frozen=True)
class Macros(Event):
    """Macro values for the command `stage` (one SMFIC_* byte); names without braces."""

    stage: bytes
    values: dict[str, str]


@dataclass(frozen=True)
class Connect(Event):
    """SMTP client connection. `address` is None for a local or unknown client."""

    hostname: str
    family: str
    port: int | None
    address: str | None


@dataclass(frozen=True)
class Helo(Event):
    name: str


@dataclass(frozen=True)
class MailFrom(Event):
    """MAIL FROM with the address without angle brackets, and the ESMTP parameters."""

    address: str
    parameters: tuple[str, ...]


@dataclass(frozen=True)
class Recipient(Event):
    """RCPT TO with the address without angle brackets, and the ESMTP parameters."""

    address: str
    parameters: tuple[str, ...]


@dataclass(frozen=True)
class Data(Event):
    """The DATA command, before any header."""


@dataclass(frozen=True)
class Header(Event):
    """One header field. Folded lines are joined by a bare LF and the value has no final line end."""

    name: bytes
    value: bytes


@dataclass(frozen=True)
class EndOfHeaders(Event):
    pass


@dataclass(frozen=True)
class BodyChunk(Event):
    """A piece of the body, with CRLF line ends as the MTA sends them."""

    data: bytes


@dataclass(frozen=True)
class EndOfMessage(Event):
    """End of the body, possibly with a last piece of it; always answered."""

    data: bytes


@dataclass(frozen=True)
class Abort(Event):
    """The MTA dropped the current message (RSET, a rejected stage, or a reply from another filter)."""


@dataclass(frozen=True)
class Quit(Event):
    """The MTA closes the filter connection, or reuses it for a new SMTP session when `reuse` is True."""

    reuse: bool = False


@dataclass(frozen=True)
class UnknownSmtpCommand(Event):
    """An SMTP command the MTA did not recognise (only sent when SMFIP_NOUNKNOWN was not granted)."""

    line: bytes


@dataclass(frozen=True)
class Disconnected(Event):
    """The MTA closed the stream. `in_message` is True when a message was under way."""

    in_message: bool
    truncated_bytes: int


# -- parsing helpers ----------------------------------------------------------


def _text(raw: bytes) -> str:
    # Envelope fields may carry SMTPUTF8 addresses; anything else undecodable
    # is kept visible rather than rejected.
    return raw.decode("utf-8", "replace")


def _strings(data: bytes) -> list[bytes]:
    """Split NUL-terminated strings. A missing final NUL is tolerated."""
    if not data:
        return []
    parts = data.split(b"\0")
    if parts[-1] == b"":
        parts.pop()
    return parts


def _strip_brackets(address: str) -> str:
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        return address[1:-1]
    return address


def _macro_name(raw: bytes) -> str:
    name = _text(raw)
    if name.startswith("{") and name.endswith("}"):
        return name[1:-1]
    return name


def _client_address(raw: bytes) -> str:
    # Sendmail writes IPv6 clients as "IPv6:2001:db8::1" in some set-ups.
    address = _text(raw)
    if address[:5].lower() == "ipv6:":
        return address[5:]
    return address


# -- the codec ----------------------------------------------------------------


class MilterCodec:
    """One filter connection's protocol state: bytes in, events out, replies in, bytes out.

    `feed` returns the events parsed from new bytes. Each event with
    `reply_expected` must be answered, in order, with one of the final
    replies (`continue_`, `accept`, `discard`, `reply_code`...), and only
    `EndOfMessage` may be preceded by modifications and progress replies.
    `data_to_send` returns the encoded replies queued so far.
    """

    def __init__(self, *, required_actions: int = SMFIF_ADDHDRS | SMFIF_CHGHDRS,
                 wanted_actions: int = SMFIF_ADDHDRS | SMFIF_CHGHDRS | SMFIF_QUARANTINE,
                 wanted_protocol: int = WANTED_PROTOCOL,
                 max_packet_size: int = MAX_PACKET_SIZE) -> None:
        self.required_actions = required_actions
        self.wanted_actions = wanted_actions | required_actions
        self.wanted_protocol = wanted_protocol
        self.max_packet_size = max_packet_size
        self.negotiated = False
        self.protocol = 0
        self.actions = 0
        self.in_message = False
        self._buffer = bytearray()
        self._outgoing = bytearray()
        self._pending: list[bytes] = []

    @property
    def leading_space(self) -> bool:
        """True when header values carry the space after the colon (SMFIP_HDR_LEADSPC)."""
        return bool(self.protocol & SMFIP_HDR_LEADSPC)

    @property
    def awaiting_reply(self) -> bytes | None:
        """The command byte of the oldest event that still needs a reply, or None."""
        return self._pending[0] if self._pending else None

    # -- input ---------------------------------------------------------------

    def feed(self, data: bytes) -> list[Event]:
        """Parse `data` (any split of the stream) into events; raise MilterProtocolError on a bad packet."""
        self._buffer += data
        events: list[Event] = []

        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length == 0:
                raise MilterProtocolError("received a packet of length 0; a packet needs a command byte")
            if length > self.max_packet_size:
                raise MilterProtocolError(
                    f"received a packet of {length} bytes, more than the limit of "
                    f"{self.max_packet_size} bytes")
            if len(self._buffer) < _LENGTH.size + length:
                break

            packet = bytes(self._buffer[_LENGTH.size:_LENGTH.size + length])
            del self._buffer[:_LENGTH.size + length]
            event = self._parse(packet[:1], packet[1:])
            if event is not None:
                events.append(event)
        return events

    def connection_lost(self) -> Disconnected:
        """Report the end of the stream, with any partial packet left unread."""
        event = Disconnected(in_message=self.in_message, truncated_bytes=len(self._buffer))
        self._buffer.clear()
        self.in_message = False
        return event

    def _parse(self, command: bytes, data: bytes) -> Event | None:
        if command == SMFIC_OPTNEG:
            return self._negotiate(data)
        if not self.negotiated:
            raise MilterProtocolError(f"received command {command!r} before option negotiation")

        event = self._parse_command(command, data)
        if event.reply_expected:
            self._pending.append(command)
        return event

    def _parse_command(self, command: bytes, data: bytes) -> Event:
        expected = self._reply_expected(command)

        if command == SMFIC_MACRO:
            return self._parse_macros(data)

        if command == SMFIC_CONNECT:
            return self._parse_connect(data, expected)

        if command == SMFIC_HELO:
            names = _strings(data)
            return Helo(_text(names[0]) if names else "", reply_expected=expected)

        if command in (SMFIC_MAIL, SMFIC_RCPT):
            args = [_text(a) for a in _strings(data)]
            if not args:
                raise MilterProtocolError(f"command {command!r} carries no address")
            if command == SMFIC_MAIL:
                self.in_message = True
                return MailFrom(_strip_brackets(args[0]), tuple(args[1:]), reply_expected=expected)
            return Recipient(_strip_brackets(args[0]), tuple(args[1:]), reply_expected=expected)

        if command == SMFIC_DATA:
            return Data(reply_expected=expected)

        if command == SMFIC_HEADER:
            fields = _strings(data)
            if len(fields) != 2:
                raise MilterProtocolError(f"header packet has {len(fields)} strings, expected name and value")
            return Header(fields[0], fields[1], reply_expected=expected)

        if command == SMFIC_EOH:
            return EndOfHeaders(reply_expected=expected)

        if command == SMFIC_BODY:
            return BodyChunk(data, reply_expected=expected)

        if command == SMFIC_BODYEOB:
            self.in_message = False
            return EndOfMessage(data, reply_expected=True)

        if command == SMFIC_ABORT:
            self.in_message = False
            return Abort()

        if command in (SMFIC_QUIT, SMFIC_QUIT_NC):
            return self._quit(reuse=command == SMFIC_QUIT_NC)

        if command == SMFIC_UNKNOWN:
            return UnknownSmtpCommand(data.rstrip(b"\0"), reply_expected=expected)

        # libmilter closes the connection on an unknown command too: without
        # knowing the command, the filter cannot know whether to answer it.
        raise MilterProtocolError(f"received unknown command {command!r}")

    def _reply_expected(self, command: bytes) -> bool:
        bit = _NO_REPLY_BIT.get(command)
        return bit is not None and not self.protocol & bit

    def _negotiate(self, data: bytes) -> Negotiated:
        if len(data) < 12:
            raise MilterProtocolError(f"option negotiation carries {len(data)} bytes, expected 12")
        version, offered_actions, offered_protocol = struct.unpack(">III", data[:12])
        if version < MILTER_VERSION:
            raise MilterProtocolError(
                f"the MTA speaks milter protocol version {version}; quishguard needs version "
                f"{MILTER_VERSION} (Postfix: milter_protocol = 6)")

        missing = self.required_actions & ~offered_actions
        if missing:
            raise MilterProtocolError(
                f"the MTA does not allow the filter actions 0x{missing:x} (offered 0x{offered_actions:x})")

        self.actions = self.wanted_actions & offered_actions
        self.protocol = self.wanted_protocol & offered_protocol
        self.negotiated = True
        self._pending.clear()
        self.in_message = False
        self._queue(SMFIC_OPTNEG, struct.pack(">III", MILTER_VERSION, self.actions, self.protocol))
        return Negotiated(version, offered_actions, offered_protocol)

    def _parse_macros(self, data: bytes) -> Macros:
        if not data:
            raise MilterProtocolError("macro packet carries no stage byte")
        items = _strings(data[1:])
        if len(items) % 2:
            # Sendmail and Postfix always send pairs; keep the pairs, drop the odd name.
            items = items[:-1]
        values = {_macro_name(items[i]): _text(items[i + 1]) for i in range(0, len(items), 2)}
        return Macros(data[:1], values)

    def _parse_connect(self, data: bytes, expected: bool) -> Connect:
        hostname, sep, rest = data.partition(b"\0")
        if not sep or not rest:
            raise MilterProtocolError("connect packet is missing the address family")
        family = chr(rest[0])
        if family == FAMILY_UNKNOWN:
            return Connect(_text(hostname), family, None, None, reply_expected=expected)
        if len(rest) < 3:
            raise MilterProtocolError("connect packet is missing the port")
        (port,) = struct.unpack(">H", rest[1:3])
        address = rest[3:].split(b"\0", 1)[0]
        if family == FAMILY_UNIX:
            return Connect(_text(hostname), family, None, None, reply_expected=expected)
        return Connect(_text(hostname), family, port, _client_address(address), reply_expected=expected)

    def _quit(self, *, reuse: bool) -> Quit:
        self.in_message = False
        self._pending.clear()
        if reuse:
            # SMFIC_QUIT_NC: the MTA starts over with a new negotiation.
            self.negotiated = False
            self.protocol = 0
        return Quit(reuse=reuse)

    # -- output --------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Return and clear the encoded replies queued so far."""
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    def _queue(self, code: bytes, payload: bytes = b"") -> None:
        self._outgoing += _LENGTH.pack(len(payload) + 1) + code + payload

    def _final(self, code: bytes, payload: bytes = b"") -> None:
        if not self._pending:
            raise RuntimeError(f"reply {code!r} sent, but no command is waiting for one")
        self._pending.pop(0)
        self._queue(code, payload)

    def _modification(self, code: bytes, payload: bytes, action: int) -> None:
        if self.awaiting_reply != SMFIC_BODYEOB:
            raise RuntimeError(f"modification {code!r} is only allowed in answer to end of message")
        if not self.actions & action:
            raise RuntimeError(f"modification {code!r} needs action 0x{action:x}, not negotiated")
        self._queue(code, payload)

    def continue_(self) -> None:
        """Answer the oldest waiting command with SMFIR_CONTINUE (at end of message: accept)."""
        self._final(SMFIR_CONTINUE)

    def accept(self) -> None:
        self._final(SMFIR_ACCEPT)

    def discard(self) -> None:
        """Accept the message and then drop it silently."""
        self._final(SMFIR_DISCARD)

    def reply_code(self, reply: str) -> None:
        """Answer with an SMTP reply such as `550 5.7.1 text`; only 4xx and 5xx are allowed."""
        if len(reply) < 4 or reply[0] not in "45" or not reply[:3].isdigit() or reply[3] != " ":
            raise ValueError(f"invalid SMTP reply {reply!r}; expected '4xx text' or '5xx text'")
        text = "".join(c for c in reply if c.isprintable())
        self._final(SMFIR_REPLYCODE, text.encode("utf-8") + b"\0")

    def progress(self) -> None:
        """Tell the MTA the filter is still working, which restarts its timeout."""
        if self.awaiting_reply != SMFIC_BODYEOB:
            raise RuntimeError("progress is only allowed in answer to end of message")
        self._queue(SMFIR_PROGRESS)

    def _header_value(self, value: bytes) -> bytes:
        # The MTA folds at bare LF. With SMFIP_HDR_LEADSPC it takes the value
        # verbatim, so the space after the colon is ours to send.
        value = value.replace(b"\r\n", b"\n")
        if self.leading_space:
            return b" " + value
        return value

    def insert_header(self, index: int, name: bytes, value: bytes) -> None:
        """Insert a header at position `index` among all headers (0 is the top)."""
        payload = _LENGTH.pack(index) + name + b"\0" + self._header_value(value) + b"\0"
        self._modification(SMFIR_INSHEADER, payload, SMFIF_ADDHDRS)

    def add_header(self, name: bytes, value: bytes) -> None:
        """Append a header at the end of the header block."""
        self._modification(SMFIR_ADDHEADER, name + b"\0" + self._header_value(value) + b"\0",
                           SMFIF_ADDHDRS)

    def change_header(self, index: int, name: bytes, value: bytes | None) -> None:
        """Replace the `index`-th (from 1) header called `name`; None deletes it."""
        encoded = b"" if value is None else self._header_value(value)
        payload = _LENGTH.pack(index) + name + b"\0" + encoded + b"\0"
        self._modification(SMFIR_CHGHEADER, payload, SMFIF_CHGHDRS)

    def quarantine(self, reason: str) -> None:
        """Ask the MTA to put the message in its hold queue with `reason`."""
        text = "".join(c for c in reason if c.isprintable()) or "quarantined"
        self._modification(SMFIR_QUARANTINE, text.encode("utf-8") + b"\0", SMFIF_QUARANTINE)
