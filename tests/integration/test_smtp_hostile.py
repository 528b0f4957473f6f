"""Hostile SMTP clients: smuggling sequences, STARTTLS injection, outside clients, connection floods.

Smuggling sequences are tested straight against quishguard on a raw socket
and through a real Postfix in front of it. The policy under test: DATA with
a bare CR or bare LF is rejected with `550 5.6.0` and nothing is relayed.
Sequences without one are ordinary data and are relayed inside the one
message. Postfix 3.7.11 with `smtpd_forbid_bare_newline = yes` turns them
into ordinary lines before quishguard receives the message, so through
Postfix the tests check the outcome: one message or none, never two.
"""

from __future__ import annotations

import asyncio
import email
import re
import secrets
import ssl

import pytest
import trustme

from ..postfix import PostfixInstance
from ..smtp_client import RawClient

# (name, sequence): each goes between the first body line and a smuggled
# second transaction, as in the SMTP smuggling attacks of 2023.
SMUGGLING = [
    ("lf-dot-crlf", b"\n.\r\n"),
    ("crlf-dot-cr", b"\r\n.\r"),
    ("cr-dot-crlf", b"\r.\r\n"),
    ("lf-dot-lf", b"\n.\n"),
    ("crlf-dot-lf", b"\r\n.\n"),
    ("lf-dot-cr", b"\n.\r"),
    ("crlf-nul-dot-crlf", b"\r\n\x00.\r\n"),
    ("crlf-dot-nul-crlf", b"\r\n.\x00\r\n"),
    ("lf-lf-dot-crlf", b"\n\n.\r\n"),
]

BARE_LINE_END = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def has_bare_line_end(sequence: bytes) -> bool:
    # The sequence sits between "first line" and "MAIL FROM", so a CR at its
    # end is bare too.
    return bool(BARE_LINE_END.search(b"x" + sequence + b"M"))


def smuggling_data(token: str, sequence: bytes) -> bytes:
    """DATA content (not yet ended) that hides a second transaction after `sequence`."""
    return (f"From: alice@example.net\r\nTo: bob@example.com\r\nSubject: {token}\r\n\r\n"
            "first line".encode() + sequence
            + b"MAIL FROM:<ceo@example.com>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
            + f"From: ceo@example.com\r\nTo: bob@example.com\r\nSubject: smuggled-{token}\r\n\r\n"
              "Pay the invoice.\r\n".encode())


async def send_raw(port: int, data: bytes) -> tuple[tuple[int, str], RawClient]:
    """Open a session, send `data` after DATA and end it with CRLF.CRLF; return the reply and client."""
    client = await RawClient.connect(port)
    await client.command("EHLO client.example.net")
    await client.command("MAIL FROM:<alice@example.net>")
    await client.command("RCPT TO:<bob@example.com>")
    code, text = await client.command("DATA")
    assert code == 354, (code, text)
    client.writer.write(data + b"\r\n.\r\n")
    await client.writer.drain()
    return await client.reply(), client


def top_subject(message: bytes) -> str | None:
    return email.message_from_bytes(message)["Subject"]


@pytest.mark.parametrize("name,sequence", SMUGGLING, ids=[name for name, _ in SMUGGLING])
async def test_smuggling_direct_one_message(start_hop, next_hop, name, sequence):
    hop = await start_hop()
    token = f"qg-{secrets.token_hex(6)}"

    reply, client = await send_raw(hop.port, smuggling_data(token, sequence))
    after = await client.command("QUIT")
    client.writer.close()

    # One reply for the one DATA, then QUIT's: no reply of a smuggled command.
    assert after[0] == 221
    assert all(top_subject(m.data) != f"smuggled-{token}" for m in next_hop.messages)
    if has_bare_line_end(sequence):
        assert reply == (550, "5.6.0 Bare CR or LF not allowed")
        assert next_hop.messages == []
        return
    assert reply[0] == 250
    assert len(next_hop.messages) == 1
    assert next_hop.messages[0].mail_from == "alice@example.net"
    # A leading dot is transparency (RFC 5321 section 4.5.2) and is removed on receipt.
    assert sequence.replace(b"\r\n.", b"\r\n") in next_hop.messages[0].data
    assert f"smuggled-{token}".encode() in next_hop.messages[0].data


@pytest.mark.parametrize("name,sequence", SMUGGLING, ids=[name for name, _ in SMUGGLING])
async def test_smuggling_through_postfix(start_filter, mta: PostfixInstance, name, sequence):
    await start_filter(mta.settings.filter_port, mta.reinject_port)
    token = f"qg-{secrets.token_hex(6)}"

    reply, client = await send_raw(mta.public_port, smuggling_data(token, sequence))
    try:
        await client.command("QUIT")
    except ConnectionError:
        pass  # Postfix may close the session after refusing the message.
    client.writer.close()
    await mta.wait_for_queue(lambda queued: not queued)
    delivered = mta.mail(token)

    relayed = [message for message in delivered if top_subject(message) == token]
    bounces = [message for message in delivered
               if top_subject(message) == "Undelivered Mail Returned to Sender"]

    # Never a second message, whatever Postfix and quishguard made of the sequence.
    assert all(top_subject(message) != f"smuggled-{token}" for message in delivered)
    assert len(relayed) <= 1
    assert await mta.queue() == []
    if not has_bare_line_end(sequence):
        assert reply[0] == 250
        assert len(relayed) == 1
    if relayed:
        # Delivered whole: the smuggled transaction is body text of the one message.
        assert reply[0] == 250
        assert f"smuggled-{token}".encode() in relayed[0]
        return
    # Not delivered, so the sender learns it: a 5xx while connected, or a bounce.
    if 500 <= reply[0] < 600:
        return
    assert reply[0] == 250
    assert len(bounces) == 1
    assert b"5.6.0 Bare CR or LF not allowed" in bounces[0]


@pytest.fixture(scope="module")
def certificate_authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(certificate_authority, tmp_path) -> dict[str, str]:
    server = certificate_authority.issue_cert("localhost", "127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    server.cert_chain_pems[0].write_to_path(str(cert))
    for pem in server.cert_chain_pems[1:]:
        with open(cert, "ab") as handle:
            handle.write(pem.bytes())
    server.private_key_pem.write_to_path(str(key))
    return {"tls_cert": str(cert), "tls_key": str(key)}


def client_context(certificate_authority) -> ssl.SSLContext:
    context = ssl.create_default_context()
    certificate_authority.configure_trust(context)
    return context


async def test_starttls_offered_when_configured(start_hop, tls_files):
    with_tls = await start_hop(smtp=tls_files)
    without_tls = await start_hop()

    offers = []
    for hop in (with_tls, without_tls):
        client = await RawClient.connect(hop.port)
        offers.append(await client.command("EHLO client.example.net"))
        await client.close()

    assert "STARTTLS" in offers[0][1].splitlines()
    assert "STARTTLS" not in offers[1][1].splitlines()


async def test_starttls_relays_encrypted_session(start_hop, next_hop, tls_files, certificate_authority):
    hop = await start_hop(smtp=tls_files)
    client = await RawClient.connect(hop.port)
    await client.command("EHLO client.example.net")

    ready = await client.command("STARTTLS")
    await client.writer.start_tls(client_context(certificate_authority), server_hostname="localhost")
    ehlo = await client.command("EHLO client.example.net")
    await client.command("MAIL FROM:<alice@example.net>")
    await client.command("RCPT TO:<bob@example.com>")
    reply = await client.data(b"Subject: over TLS\r\n\r\nHello.\r\n")
    await client.close()

    assert ready[0] == 220
    assert ehlo[0] == 250
    assert "STARTTLS" not in ehlo[1].splitlines()
    assert reply[0] == 250
    assert len(next_hop.messages) == 1


async def test_starttls_pipelined_command_discarded(start_hop, next_hop, tls_files, certificate_authority):
    hop = await start_hop(smtp=tls_files)
    client = await RawClient.connect(hop.port)
    await client.command("EHLO client.example.net")

    # STARTTLS and an injected command in one packet, as in the STARTTLS
    # command injection attacks (RFC 3207 section 4.2 requires discarding it).
    client.writer.write(b"STARTTLS\r\nHELP\r\n")
    await client.writer.drain()
    ready = await client.reply()
    await client.writer.start_tls(client_context(certificate_authority), server_hostname="localhost")
    first_encrypted = await client.command("NOOP")
    second_encrypted = await client.command("NOOP")
    await client.close()

    assert ready[0] == 220
    # Had HELP run after the handshake, its reply would come first.
    assert first_encrypted[0] == 250
    assert "Supported commands" not in first_encrypted[1]
    assert "Supported commands" not in second_encrypted[1]


async def test_starttls_half_configured_rejected(start_hop, tls_files):
    from quishguard.errors import ConfigError

    with pytest.raises(ConfigError, match="tls_cert and smtp.tls_key must be set together"):
        await start_hop(smtp={"tls_cert": tls_files["tls_cert"]})


async def test_outside_client_refused(start_hop, next_hop):
    hop = await start_hop(smtp={"client_networks": ["127.0.0.1/32"]})

    outside = await RawClient.connect(hop.port, local_addr="127.0.0.2")
    refused = outside.greeting
    closed = await outside.reader.read()
    outside.writer.close()
    inside = await RawClient.connect(hop.port, local_addr="127.0.0.1")
    accepted = inside.greeting
    await inside.close()

    assert refused == (554, "5.7.1 Client host 127.0.0.2 is not allowed to connect")
    assert closed == b""
    assert accepted[0] == 220
    assert next_hop.messages == []


async def test_outside_client_cannot_relay(start_hop, next_hop):
    hop = await start_hop(smtp={"client_networks": ["127.0.0.1/32"]})

    outside = await RawClient.connect(hop.port, local_addr="127.0.0.2")
    # Pipelined, so the commands reach the server even if it closed the connection.
    outside.writer.write(b"EHLO outside.example.net\r\nMAIL FROM:<spam@example.net>\r\n"
                         b"RCPT TO:<victim@example.org>\r\nDATA\r\nSubject: spam\r\n\r\nspam\r\n.\r\n")
    try:
        rest = await outside.reader.read()
    except ConnectionResetError:
        rest = b""  # The server closed with our commands unread, which resets the connection.
    outside.writer.close()

    assert outside.greeting[0] == 554
    assert rest == b""
    assert next_hop.messages == []


async def test_connection_limit_replies_421(start_hop):
    hop = await start_hop(smtp={"max_connections": 3})

    held = [await RawClient.connect(hop.port) for _ in range(3)]
    extra = await RawClient.connect(hop.port)
    closed = await extra.reader.read()
    extra.writer.close()
    await held[0].close()
    await asyncio.sleep(0.1)
    after_close = await RawClient.connect(hop.port)
    for client in held[1:] + [after_close]:
        await client.close()

    assert [client.greeting[0] for client in held] == [220, 220, 220]
    assert extra.greeting == (421, "4.7.0 Too many connections, try again later")
    assert closed == b""
    assert after_close.greeting[0] == 220
