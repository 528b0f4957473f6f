"""The SMTP proxy front end, built on aiosmtpd (>= 1.4.6).

This is the only module that contains aiosmtpd's `handle_<VERB>` hooks. It turns
an SMTP session into the project's `Envelope`, runs the pipeline and carries
out the verdict: relay (accept, tag), store (quarantine), or reply 550
(reject) or 451 (tempfail). Replies are the named constants below; a client
never sees exception text, and an internal fault is a 451, never a 5xx.

Deviations from aiosmtpd's defaults, and why:
- Lines longer than RFC 5321's 1,000 octets are accepted up to the message
  size limit, because real mail carries them and a `500 Line too long`
  bounces legitimate mail.
- XFORWARD (Postfix's XFORWARD_README) is implemented and announced to
  clients inside `[org] trusted_networks` only.
- The greeting name is explicit, because aiosmtpd's default calls
  `socket.getfqdn()` for every connection, which stalls without DNS.
- A message whose DATA holds a bare CR or a bare LF (one not part of a CRLF
  pair) is rejected with `550 5.6.0` and never relayed. RFC 5321 section
  2.3.8 forbids both, and SMTP smuggling (for example `\n.\r\n` read as the
  end of data by one server and not by the next) depends on servers reading
  them differently. Rejecting, not normalising to CRLF, keeps the bytes
  that were scanned identical to the bytes relayed. aiosmtpd >= 1.4.6 ends
  DATA only at `\r\n.\r\n`, so none of these sequences can end a message
  early here.
- STARTTLS (RFC 3207) is offered when `[smtp] tls_cert` and `tls_key` are
  set. aiosmtpd 1.4.6 discards commands pipelined after STARTTLS when the
  handshake completes (RFC 3207 section 4.2); a test holds it to that.
- At most `[smtp] max_connections` sessions are open at once; further
  clients get 421 and are disconnected, so the sending MTA retries later.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import secrets
import ssl
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope as SmtpEnvelope, Session, syntax

from .. import events
from ..config import Config
from ..errors import ConfigError, QuarantineError, RelayError
from ..model import Action, Envelope
from ..pipeline import Scanner
from ..quarantine import QuarantineStore
from ..stamp import relay_copy, stamp_secret
from .relay import NextHop

log = logging.getLogger(__name__)

REPLY_NOT_ALLOWED = "554 5.7.1 Client host {ip} is not allowed to connect"
REPLY_TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"
REPLY_BARE_LINE_END = "550 5.6.0 Bare CR or LF not allowed"
REPLY_SCAN_TEMPFAIL = "451 4.7.1 Message could not be scanned completely, try again later"
REPLY_INTERNAL_ERROR = "451 4.3.0 Internal error, try again later"
REPLY_QUARANTINE_FAILED = "451 4.3.0 Message could not be stored, try again later"
REPLY_QUARANTINED = "250 2.0.0 Ok: message held in quarantine as {id}"
REPLY_REJECTED = "550 5.7.1 Message rejected as {rule}"
REPLY_RELAYED = "250 2.0.0 Ok: relayed ({text})"
REPLY_XFORWARD_OK = "250 2.0.0 Ok"
REPLY_XFORWARD_DENIED = "550 5.7.0 XFORWARD not allowed for this client"
REPLY_XFORWARD_SYNTAX = "501 5.5.4 Syntax: XFORWARD attribute=value ..."

XFORWARD_ATTRIBUTES = ("NAME", "ADDR", "PROTO", "HELO", "PORT", "IDENT", "SOURCE")
ANNOUNCED_XFORWARD = "XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE"

# A CR not followed by LF, or an LF not preceded by CR.
BARE_LINE_END = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def _in_networks(ip: str | None, networks) -> bool:
    if not ip:
        return False
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def _decode_xtext(value: str) -> str:
    """Decode RFC 3461 xtext (`+XX` hex escapes), as Postfix uses in XFORWARD."""
    out = []
    index = 0
    while index < len(value):
        char = value[index]
        if char == "+" and index + 2 < len(value) + 0 and len(value[index + 1:index + 3]) == 2:
            try:
                out.append(chr(int(value[index + 1:index + 3], 16)))
                index += 3
                continue
            except ValueError:
                pass
        out.append(char)
        index += 1
    return "".join(out)


class FilterSMTP(SMTP):
    """aiosmtpd's protocol with long lines, XFORWARD and a client allow-list."""

    def __init__(self, handler: FilterHandler, *, config: Config, **kwargs: Any) -> None:
        # aiosmtpd reads `line_length_limit` in its constructor to size its
        # stream reader, so it must be set before calling it. The +1000
        # leaves room for dot-stuffing and the line end.
        self.line_length_limit = config["smtp.max_message_size"] + 1000
        super().__init__(handler, **kwargs)
        self.config = config
        # Whether this session holds one of the `max_connections` places.
        self.counted = False

    async def _handle_client(self) -> None:
        peer_ip = self.session.peer[0] if isinstance(self.session.peer, tuple) else None
        if not _in_networks(peer_ip, self.config["smtp.client_networks"]):
            log.warning("event=client_refused client=%s", peer_ip)
            await self.push(REPLY_NOT_ALLOWED.format(ip=peer_ip))
            self.transport.close()
            return
        # Counted here, not in connection_made, so that a burst of refused
        # connections does not count against the sessions already admitted.
        # No await comes between the check and the increment.
        open_connections = self.event_handler.open_connections
        if open_connections >= self.config["smtp.max_connections"]:
            log.warning("event=client_deferred reason=max_connections client=%s open=%d", peer_ip,
                        open_connections)
            await self.push(REPLY_TOO_MANY_CONNECTIONS)
            self.transport.close()
            return
        self.counted = True
        self.event_handler.open_connections += 1
        await super()._handle_client()

    def connection_lost(self, error: Exception | None) -> None:
        if self.counted:
            self.counted = False
            self.event_handler.open_connections -= 1
        # Drop any next-hop session so an unfinished relay is never committed
        # after our client hung up.
        hop: NextHop | None = getattr(self.session, "next_hop", None)
        if hop is not None:
            hop.abort()
            self.session.next_hop = None
        super().connection_lost(error)

    @syntax("XFORWARD attribute=value ...")
    async def smtp_XFORWARD(self, arg: str) -> None:
        peer_ip = self.session.peer[0] if isinstance(self.session.peer, tuple) else None
        if not _in_networks(peer_ip, self.config["org.trusted_networks"]):
            await self.push(REPLY_XFORWARD_DENIED)
            return
        if not arg:
            await self.push(REPLY_XFORWARD_SYNTAX)
            return
        attributes = getattr(self.session, "xforward", None) or {}
        for item in arg.split():
            name, sep, value = item.partition("=")
            if not sep or name.upper() not in XFORWARD_ATTRIBUTES:
                await self.push(REPLY_XFORWARD_SYNTAX)
                return
            attributes[name.upper()] = _decode_xtext(value)
        self.session.xforward = attributes
        await self.push(REPLY_XFORWARD_OK)


class FilterHandler:
    """aiosmtpd handler hooks: relay decisions, scanning and actions."""

    def __init__(self, config: Config, scanner: Scanner, store: QuarantineStore,
                 relay: tuple[str, int]) -> None:
        self.config = config
        self.scanner = scanner
        self.store = store
        self.relay_host, self.relay_port = relay
        self.prefix = config["headers.prefix"]
        self.open_connections = 0
        if stamp_secret(config) is None:
            log.warning("event=stamp_disabled reason=no_secret fix='set [stamp] secret so audit can "
                        "tell which delivered messages passed the hop'")

    def _session_id(self, session: Session) -> str:
        sid = getattr(session, "qg_id", None)
        if sid is None:
            sid = secrets.token_hex(5)
            session.qg_id = sid
        return sid

    async def handle_EHLO(self, server: FilterSMTP, session: Session, envelope: SmtpEnvelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        peer_ip = session.peer[0] if isinstance(session.peer, tuple) else None
        if _in_networks(peer_ip, self.config["org.trusted_networks"]):
            responses.insert(-1, f"250-{ANNOUNCED_XFORWARD}")
        return responses

    async def handle_MAIL(self, server: FilterSMTP, session: Session, envelope: SmtpEnvelope,
                          address: str, mail_options: list[str]) -> str:
        await self._drop_next_hop(session)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: FilterSMTP, session: Session, envelope: SmtpEnvelope,
                          address: str, rcpt_options: list[str]) -> str:
        sid = self._session_id(session)
        hop: NextHop | None = getattr(session, "next_hop", None)
        if hop is None:
            hop = NextHop(self.relay_host, self.relay_port, timeout=self.config["smtp.relay_timeout"],
                          local_hostname=self.config.hostname)
            try:
                await hop.begin(envelope.mail_from, envelope.mail_options)
            except RelayError as error:
                log.info("session=%s event=rcpt_deferred rcpt=%r reply=%r", sid, address, error.reply)
                return error.reply
            session.next_hop = hop

        try:
            code, text = await hop.rcpt(address, rcpt_options)
        except RelayError as error:
            session.next_hop = None
            return error.reply
        if 200 <= code < 300:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        else:
            log.info("session=%s event=rcpt_refused_by_next_hop rcpt=%r code=%d", sid, address, code)
        return f"{code} {text}"

    async def handle_RSET(self, server: FilterSMTP, session: Session, envelope: SmtpEnvelope) -> str:
        await self._drop_next_hop(session)
        return "250 2.0.0 Ok"

    async def handle_QUIT(self, server: FilterSMTP, session: Session, envelope: SmtpEnvelope) -> str:
        await self._drop_next_hop(session)
        return "221 2.0.0 Bye"

    async def _drop_next_hop(self, session: Session) -> None:
        hop: NextHop | None = getattr(session, "next_hop", None)
        session.next_hop = None
        if hop is not None:
            await hop.finish()

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd's default would send the exception text with a permanent
        # 500; a bug of ours must make the client retry, not bounce.
        log.error("event=session_error error=%s", type(error).__name__, exc_info=error)
        return REPLY_INTERNAL_ERROR

    async def handle_DATA(self, server: FilterSMTP, session: Session, envelope: SmtpEnvelope) -> str:
        sid = self._session_id(session)
        hop: NextHop | None = getattr(session, "next_hop", None)
        session.next_hop = None
        if BARE_LINE_END.search(envelope.original_content or b""):
            log.warning("session=%s event=rejected reason=bare_line_end", sid)
            if hop is not None:
                await hop.finish()
            return REPLY_BARE_LINE_END
        try:
            reply = await self._process(sid, session, envelope, hop)
            ours, result = session.qg_scanned
            events.emit_verdict(session_id=sid, envelope=ours, result=result, reply=reply,
                                queue_id=ours.queue_id)
            return reply
        except asyncio.CancelledError:
            log.warning("session=%s event=client_gone stage=data", sid)
            if hop is not None:
                hop.abort()
            raise
        except Exception as error:  # noqa: BLE001 - any bug of ours becomes a 451, never a lost message
            log.error("session=%s event=processing_failed error=%s", sid, type(error).__name__,
                      exc_info=error)
            if hop is not None:
                hop.abort()
            return REPLY_INTERNAL_ERROR

    async def _process(self, sid: str, session: Session, envelope: SmtpEnvelope,
                       hop: NextHop | None) -> str:
        raw: bytes = envelope.original_content or b""
        peer_ip = session.peer[0] if isinstance(session.peer, tuple) else None
        xforward = getattr(session, "xforward", None) or {}
        ours = Envelope(
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            client_ip=peer_ip,
            helo=session.host_name,
            xforward_addr=xforward.get("ADDR"),
            xforward_helo=xforward.get("HELO"),
            queue_id=xforward.get("IDENT"),
        )

        result = await self.scanner.scan(raw, ours, message_ref=sid)
        # handle_DATA reports the scan as an event once the action is done.
        session.qg_scanned = (ours, result)
        verdict = result.verdict
        message_id = result.facts.message_id or "-"
        log.info("session=%s event=verdict message_id=%r client=%s score=%.1f action=%s rules=%s "
                 "seconds=%.3f", sid, message_id, ours.xforward_addr or peer_ip, verdict.score,
                 verdict.action.label, ",".join(f.rule for f in verdict.findings) or "-", result.seconds)

        if verdict.action in (Action.ACCEPT, Action.TAG):
            if hop is None:
                return REPLY_INTERNAL_ERROR
            auth = result.facts.sender.auth if result.facts.sender is not None else None
            stamped = relay_copy(raw, verdict, auth, ours.rcpt_tos, self.config)
            try:
                code, text = await hop.data(stamped)
            except RelayError as error:
                log.warning("session=%s event=relay_failed message_id=%r reply=%r", sid, message_id,
                            error.reply)
                await hop.finish()
                return error.reply
            await hop.finish()
            log.info("session=%s event=relayed message_id=%r next_hop_reply=%r", sid, message_id,
                     f"{code} {text}")
            return REPLY_RELAYED.format(text=text.replace("\r", " ").replace("\n", " ")[:200])

        if hop is not None:
            await hop.finish()

        if verdict.action is Action.QUARANTINE:
            try:
                qid = await asyncio.to_thread(
                    self.store.store, raw, ours, verdict, subject=result.facts.subject,
                    from_header=result.facts.from_header, message_id=result.facts.message_id)
            except QuarantineError as error:
                log.error("session=%s event=quarantine_failed message_id=%r error=%s", sid,
                          message_id, error)
                return REPLY_QUARANTINE_FAILED
            log.info("session=%s event=quarantined message_id=%r quarantine_id=%s", sid, message_id, qid)
            return REPLY_QUARANTINED.format(id=qid)

        if verdict.action is Action.REJECT:
            return REPLY_REJECTED.format(rule=verdict.top_rule or "policy")

        return REPLY_SCAN_TEMPFAIL


def tls_context(config: Config) -> ssl.SSLContext | None:
    """Return the STARTTLS server context of `[smtp] tls_cert` and `tls_key`, or None when unset."""
    cert, key = config["smtp.tls_cert"], config["smtp.tls_key"]
    if not cert and not key:
        return None
    if not cert or not key:
        raise ConfigError("smtp.tls_cert and smtp.tls_key must be set together; "
                          f"got tls_cert={cert!r} and tls_key={key!r}")

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"cannot load smtp.tls_cert {cert!r} with smtp.tls_key {key!r}: {error}; "
                          "both must be PEM files and the key must match the certificate") from error
    return context


async def start_server(config: Config, scanner: Scanner, store: QuarantineStore,
                       relay: tuple[str, int], listen: tuple[str, int]) -> asyncio.AbstractServer:
    """Start listening; return the asyncio server (close it to stop)."""
    handler = FilterHandler(config, scanner, store, relay)
    loop = asyncio.get_running_loop()
    context = tls_context(config)

    def factory() -> FilterSMTP:
        return FilterSMTP(handler, config=config, hostname=config.hostname,
                          data_size_limit=config["smtp.max_message_size"],
                          enable_SMTPUTF8=True, decode_data=False, ident="quishguard ESMTP",
                          timeout=config["smtp.session_timeout"], tls_context=context, loop=loop)

    host, port = listen
    server = await loop.create_server(factory, host=host, port=port)
    log.info("event=listening address=%s:%d next_hop=%s:%d starttls=%s", host, port, *relay,
             "on" if context else "off")
    return server
