"""The milter codec without sockets: packets as bytes in, events and encoded replies out."""

from __future__ import annotations

import struct

import pytest

from quishguard.milter import protocol as p
from quishguard.milter.protocol import (Abort, BodyChunk, Connect, Disconnected, EndOfMessage, Header,
                                        Helo, Macros, MailFrom, MilterCodec, MilterProtocolError,
                                        Negotiated, Quit, Recipient)

# What Postfix 3.7 offers in its SMFIC_OPTNEG with milter_protocol = 6.
POSTFIX_ACTIONS = 0x1FF
POSTFIX_PROTOCOL = 0x1FFFFF


def packet(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + command + data


def optneg(version: int = 6, actions: int = POSTFIX_ACTIONS, protocol: int = POSTFIX_PROTOCOL) -> bytes:
    return packet(p.SMFIC_OPTNEG, struct.pack(">III", version, actions, protocol))


def connect_ipv4(address: bytes = b"192.0.2.7", port: int = 40000) -> bytes:
    return packet(p.SMFIC_CONNECT, b"client.example.net\0" + b"4" + struct.pack(">H", port) + address + b"\0")


def decode_replies(data: bytes) -> list[tuple[bytes, bytes]]:
    replies = []
    while data:
        (length,) = struct.unpack(">I", data[:4])
        replies.append((data[4:5], data[5:4 + length]))
        data = data[4 + length:]
    return replies


def negotiated(**kwargs) -> MilterCodec:
    codec = MilterCodec(**kwargs)
    codec.feed(optneg())
    codec.data_to_send()
    return codec


MESSAGE_PACKETS = [
    packet(p.SMFIC_MACRO, b"C" + b"j\0mx.example.com\0{daemon_name}\0smtpd\0"),
    connect_ipv4(),
    packet(p.SMFIC_HELO, b"client.example.net\0"),
    packet(p.SMFIC_MACRO, b"M" + b"{auth_authen}\0alice\0"),
    packet(p.SMFIC_MAIL, b"<alice@example.net>\0SIZE=100\0"),
    packet(p.SMFIC_RCPT, b"<bob@example.com>\0"),
    packet(p.SMFIC_MACRO, b"L" + b"i\0ABC123\0"),
    packet(p.SMFIC_HEADER, b"Subject\0 Hello\0"),
    packet(p.SMFIC_HEADER, b"X-Long\0 one\n\ttwo\0"),
    packet(p.SMFIC_BODY, b"body line\r\n"),
    packet(p.SMFIC_BODYEOB),
]


def test_negotiation_reply_version_and_flags():
    codec = MilterCodec()

    events = codec.feed(optneg())
    replies = decode_replies(codec.data_to_send())

    assert events == [Negotiated(6, POSTFIX_ACTIONS, POSTFIX_PROTOCOL)]
    assert len(replies) == 1
    code, data = replies[0]
    version, actions, protocol = struct.unpack(">III", data)
    assert code == p.SMFIC_OPTNEG
    assert version == 6
    assert actions == p.SMFIF_ADDHDRS | p.SMFIF_CHGHDRS | p.SMFIF_QUARANTINE
    assert protocol == p.WANTED_PROTOCOL
    assert protocol & p.SMFIP_HDR_LEADSPC
    assert not protocol & p.SMFIP_NOHDRS
    assert not protocol & p.SMFIP_NOBODY


def test_negotiation_asks_only_offered_bits():
    codec = MilterCodec()

    codec.feed(optneg(protocol=p.SMFIP_NOUNKNOWN | p.SMFIP_NODATA | p.SMFIP_HDR_LEADSPC))
    _, data = decode_replies(codec.data_to_send())[0]

    assert struct.unpack(">III", data)[2] == p.SMFIP_NOUNKNOWN | p.SMFIP_NODATA | p.SMFIP_HDR_LEADSPC


@pytest.mark.parametrize("version, actions, message", [
    (2, POSTFIX_ACTIONS, "version 2"),
    (6, p.SMFIF_ADDHDRS, "actions 0x10"),
])
def test_negotiation_rejects_unusable_mta(version, actions, message):
    codec = MilterCodec()

    with pytest.raises(MilterProtocolError, match=message):
        codec.feed(optneg(version=version, actions=actions))


def test_negotiation_requires_quarantine_when_asked():
    codec = MilterCodec(required_actions=p.SMFIF_ADDHDRS | p.SMFIF_CHGHDRS | p.SMFIF_QUARANTINE)

    with pytest.raises(MilterProtocolError, match="0x20"):
        codec.feed(optneg(actions=p.SMFIF_ADDHDRS | p.SMFIF_CHGHDRS))


def test_message_events_in_order():
    codec = negotiated()

    events = codec.feed(b"".join(MESSAGE_PACKETS))

    assert events == [
        Macros(b"C", {"j": "mx.example.com", "daemon_name": "smtpd"}),
        Connect("client.example.net", "4", 40000, "192.0.2.7"),
        Helo("client.example.net"),
        Macros(b"M", {"auth_authen": "alice"}),
        MailFrom("alice@example.net", ("SIZE=100",)),
        Recipient("bob@example.com", ()),
        Macros(b"L", {"i": "ABC123"}),
        Header(b"Subject", b" Hello"),
        Header(b"X-Long", b" one\n\ttwo"),
        BodyChunk(b"body line\r\n"),
        EndOfMessage(b"", reply_expected=True),
    ]


def test_split_packets_same_events():
    whole = negotiated().feed(b"".join(MESSAGE_PACKETS))
    codec = negotiated()
    stream = b"".join(MESSAGE_PACKETS)

    events = []
    for index in range(len(stream)):
        events.extend(codec.feed(stream[index:index + 1]))

    assert events == whole


def test_coalesced_negotiation_and_message():
    codec = MilterCodec()

    events = codec.feed(optneg() + b"".join(MESSAGE_PACKETS))

    assert isinstance(events[0], Negotiated)
    assert len(events) == len(MESSAGE_PACKETS) + 1
    assert events[-1] == EndOfMessage(b"", reply_expected=True)


def test_no_reply_bits_honoured_when_offered():
    codec = negotiated()

    events = codec.feed(connect_ipv4() + packet(p.SMFIC_HEADER, b"A\0 b\0"))

    assert [e.reply_expected for e in events] == [False, False]
    assert codec.awaiting_reply is None


def test_replies_expected_without_no_reply_bits():
    codec = MilterCodec()
    codec.feed(optneg(protocol=p.SMFIP_HDR_LEADSPC))
    codec.data_to_send()

    events = codec.feed(connect_ipv4() + packet(p.SMFIC_HEADER, b"A\0 b\0"))
    codec.continue_()
    codec.continue_()

    assert [e.reply_expected for e in events] == [True, True]
    assert decode_replies(codec.data_to_send()) == [(p.SMFIR_CONTINUE, b""), (p.SMFIR_CONTINUE, b"")]


@pytest.mark.parametrize("data, message", [
    (packet(b"Z", b"whatever"), "unknown command b'Z'"),
    (struct.pack(">I", 0), "length 0"),
    (packet(p.SMFIC_HEADER, b"only-a-name\0"), "1 strings"),
    (packet(p.SMFIC_MAIL), "no address"),
    (packet(p.SMFIC_CONNECT, b"host-without-family"), "address family"),
])
def test_malformed_packet_raises(data, message):
    codec = negotiated()

    with pytest.raises(MilterProtocolError, match=message):
        codec.feed(data)


def test_oversize_packet_rejected_before_buffering():
    codec = negotiated(max_packet_size=1024)

    with pytest.raises(MilterProtocolError, match="2000000 bytes, more than the limit of 1024"):
        codec.feed(struct.pack(">I", 2_000_000) + p.SMFIC_BODY)


def test_command_before_negotiation_raises():
    codec = MilterCodec()

    with pytest.raises(MilterProtocolError, match="before option negotiation"):
        codec.feed(connect_ipv4())


def test_disconnect_mid_message_reported():
    codec = negotiated()
    codec.feed(b"".join(MESSAGE_PACKETS[:8]))

    partial_body = packet(p.SMFIC_BODY, b"x" * 100)[:50]
    codec.feed(partial_body)
    event = codec.connection_lost()

    assert event == Disconnected(in_message=True, truncated_bytes=50)


def test_disconnect_between_messages_clean():
    codec = negotiated()
    codec.feed(b"".join(MESSAGE_PACKETS))
    codec.reply_code("451 4.7.1 later")

    event = codec.connection_lost()

    assert event == Disconnected(in_message=False, truncated_bytes=0)


def test_abort_ends_message():
    codec = negotiated()
    codec.feed(b"".join(MESSAGE_PACKETS[:6]))

    events = codec.feed(packet(p.SMFIC_ABORT))

    assert events == [Abort()]
    assert codec.in_message is False


def test_quit_new_connection_renegotiates():
    codec = negotiated()

    events = codec.feed(packet(p.SMFIC_QUIT_NC))

    assert events == [Quit(reuse=True)]
    with pytest.raises(MilterProtocolError, match="before option negotiation"):
        codec.feed(connect_ipv4())


@pytest.mark.parametrize("data, expected", [
    (b"h.example\0" + b"4" + struct.pack(">H", 25) + b"198.51.100.1\0",
     Connect("h.example", "4", 25, "198.51.100.1")),
    (b"h.example\0" + b"6" + struct.pack(">H", 25) + b"IPv6:2001:db8::1\0",
     Connect("h.example", "6", 25, "2001:db8::1")),
    (b"localhost\0" + b"L" + struct.pack(">H", 0) + b"/var/run/socket\0",
     Connect("localhost", "L", None, None)),
    (b"unknown\0U", Connect("unknown", "U", None, None)),
])
def test_connect_address_families(data, expected):
    codec = negotiated()

    assert codec.feed(packet(p.SMFIC_CONNECT, data)) == [expected]


def test_end_of_message_edits_encoded():
    codec = negotiated()
    codec.feed(b"".join(MESSAGE_PACKETS))

    codec.change_header(2, b"X-Quishguard-Score", None)
    codec.insert_header(0, b"X-Quishguard-Findings", b"A=1.0,\r\n B=2.0")
    codec.add_header(b"Subject", b"[TAG]")
    codec.quarantine("score 9.0 QR_URL")
    codec.progress()
    codec.continue_()
    replies = decode_replies(codec.data_to_send())

    assert replies == [
        (p.SMFIR_CHGHEADER, struct.pack(">I", 2) + b"X-Quishguard-Score\0\0"),
        (p.SMFIR_INSHEADER, struct.pack(">I", 0) + b"X-Quishguard-Findings\0 A=1.0,\n B=2.0\0"),
        (p.SMFIR_ADDHEADER, b"Subject\0 [TAG]\0"),
        (p.SMFIR_QUARANTINE, b"score 9.0 QR_URL\0"),
        (p.SMFIR_PROGRESS, b""),
        (p.SMFIR_CONTINUE, b""),
    ]
    assert codec.awaiting_reply is None


def test_header_value_without_leading_space_flag():
    codec = MilterCodec()
    codec.feed(optneg(protocol=p.SMFIP_NR_CONN))
    codec.data_to_send()
    codec.feed(packet(p.SMFIC_BODYEOB))

    codec.add_header(b"X-Test", b"value")
    codec.continue_()

    assert decode_replies(codec.data_to_send())[0] == (p.SMFIR_ADDHEADER, b"X-Test\0value\0")


def test_reply_code_encoded():
    codec = negotiated()
    codec.feed(packet(p.SMFIC_BODYEOB))

    codec.reply_code("550 5.7.1 Message rejected as QR_URL")

    assert decode_replies(codec.data_to_send()) == [
        (p.SMFIR_REPLYCODE, b"550 5.7.1 Message rejected as QR_URL\0")]


@pytest.mark.parametrize("reply", ["250 2.0.0 Ok", "55 short", "550-5.7.1 multi", ""])
def test_reply_code_invalid_raises(reply):
    codec = negotiated()
    codec.feed(packet(p.SMFIC_BODYEOB))

    with pytest.raises(ValueError, match="invalid SMTP reply"):
        codec.reply_code(reply)


def test_reply_without_waiting_command_raises():
    codec = negotiated()

    with pytest.raises(RuntimeError, match="no command is waiting"):
        codec.continue_()


def test_modification_outside_end_of_message_raises():
    codec = MilterCodec()
    codec.feed(optneg(protocol=0))
    codec.feed(connect_ipv4())

    with pytest.raises(RuntimeError, match="only allowed in answer to end of message"):
        codec.add_header(b"X-Test", b"value")


def test_quarantine_needs_negotiated_action():
    codec = MilterCodec()
    codec.feed(optneg(actions=p.SMFIF_ADDHDRS | p.SMFIF_CHGHDRS))
    codec.feed(packet(p.SMFIC_BODYEOB))

    with pytest.raises(RuntimeError, match="needs action 0x20"):
        codec.quarantine("held")
