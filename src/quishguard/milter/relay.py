"""The SMTP client side of the hop: one session with the next hop per inbound transaction.

Relay is synchronous, as in Postfix's before-queue proxy: MAIL FROM and each
RCPT TO are forwarded during the inbound dialogue and the next hop's reply is
passed back, so a recipient it refuses is refused to our client at RCPT time.
DATA is sent only after the scan, and our client gets 250 only after the next
hop accepted the message. An unreachable or timing-out next hop becomes
`451 4.4.1` so the sending MTA keeps the message and retries.

Uses aiosmtplib (>= 5.1.3), which normalises line endings to CRLF and
dot-stuffs the message data (RFC 5321 section 4.5.2).
"""

from __future__ import annotations

import logging

import aiosmtplib

from ..errors import RelayError, RelayPermError, RelayTempError

log = logging.getLogger(__name__)

REPLY_NEXT_HOP_UNAVAILABLE = (451, "4.4.1 Next hop unavailable, try again later")


def _first_line(text: str) -> str:
    return (text.splitlines() or [""])[0].strip()


def _error_from_response(error: aiosmtplib.SMTPResponseException) -> RelayError:
    """Turn the next hop's refusal into the reply we pass back to our client."""
    code = error.code
    text = _first_line(error.message) or "Refused by next hop"
    if 400 <= code < 500:
        return RelayTempError(code, text)
    if 500 <= code < 600:
        return RelayPermError(code, text)
    # A reply outside 4xx/5xx to a command that needed 2xx is a protocol
    # error of the next hop; the message must be retried, not bounced.
    return RelayTempError(451, f"4.4.0 Unexpected reply from next hop: {code}")


class NextHop:
    """One SMTP session with the next hop, used for one inbound transaction."""

    def __init__(self, host: str, port: int, *, timeout: float, local_hostname: str) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._client = aiosmtplib.SMTP(hostname=host, port=port, timeout=timeout,
                                       local_hostname=local_hostname, start_tls=False,
                                       use_tls=False)
        self.recipients: list[str] = []

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def begin(self, mail_from: str, mail_options: list[str]) -> None:
        """Connect, greet and send MAIL FROM; raise RelayError on any failure."""
        try:
            await self._client.connect()
            await self._client.ehlo()
            options = []
            if "BODY=8BITMIME" in mail_options and self._client.supports_extension("8bitmime"):
                options.append("BODY=8BITMIME")
            if "SMTPUTF8" in mail_options and self._client.supports_extension("smtputf8"):
                options.append("SMTPUTF8")
            await self._client.mail(mail_from, options=options)
        except aiosmtplib.SMTPResponseException as error:
            self.abort()
            raise _error_from_response(error) from error
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
            self.abort()
            log.warning("event=next_hop_unavailable next_hop=%s error=%s", self.address,
                        type(error).__name__)
            raise RelayTempError(*REPLY_NEXT_HOP_UNAVAILABLE) from error

    async def rcpt(self, address: str, options: list[str]) -> tuple[int, str]:
        """Forward one RCPT TO and return the next hop's reply (code, text)."""
        try:
            response = await self._client.rcpt(address)
        except aiosmtplib.SMTPResponseException as error:
            refused = _error_from_response(error)
            return refused.code, refused.text
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
            self.abort()
            log.warning("event=next_hop_unavailable next_hop=%s stage=rcpt error=%s",
                        self.address, type(error).__name__)
            raise RelayTempError(*REPLY_NEXT_HOP_UNAVAILABLE) from error
        self.recipients.append(address)
        return response.code, _first_line(response.message)

    async def data(self, message: bytes) -> tuple[int, str]:
        """Send the message and return the next hop's 2xx reply; raise RelayError otherwise."""
        try:
            response = await self._client.data(message)
        except aiosmtplib.SMTPResponseException as error:
            raise _error_from_response(error) from error
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
            self.abort()
            log.warning("event=next_hop_unavailable next_hop=%s stage=data error=%s",
                        self.address, type(error).__name__)
            raise RelayTempError(*REPLY_NEXT_HOP_UNAVAILABLE) from error
        return response.code, _first_line(response.message)

    async def finish(self) -> None:
        """End the session politely; errors are logged, not raised."""
        if not self._client.is_connected:
            return
        try:
            await self._client.quit()
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
            log.debug("event=next_hop_quit_failed next_hop=%s error=%s", self.address,
                      type(error).__name__)
            self.abort()

    def abort(self) -> None:
        """Drop the connection at once, so an unfinished DATA is never committed."""
        if self._client.is_connected:
            self._client.close()


async def relay_message(host: str, port: int, mail_from: str, recipients: list[str],
                        message: bytes, *, timeout: float, local_hostname: str) -> tuple[int, str]:
    """Relay a whole message in one session (used by quarantine release).

    Raise RelayError when the next hop refuses the sender, every recipient,
    or the data. Return the DATA reply and log recipients refused one by one.
    """
    hop = NextHop(host, port, timeout=timeout, local_hostname=local_hostname)
    await hop.begin(mail_from, [])
    try:
        refused = []
        for recipient in recipients:
            code, text = await hop.rcpt(recipient, [])
            if code >= 400:
                refused.append(f"{recipient}: {code} {text}")
        if refused:
            log.warning("event=release_recipients_refused next_hop=%s refused=%r", hop.address, refused)
        if not hop.recipients:
            raise RelayPermError(550, "5.1.1 Every recipient was refused by the next hop: "
                                 + "; ".join(refused))
        return await hop.data(message)
    finally:
        await hop.finish()
