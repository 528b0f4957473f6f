"""A local SMTP sink that stores every message it receives as a file.

`quishguard serve` starts it when no next hop is configured, so a newcomer
can send mail with swaks and read what the filter relayed. Each message is
written atomically (temporary file, fsync, rename) with mode 0600 into
`DATA_DIR/sink/` under a random name, with the envelope in an
`X-Sink-Envelope` header line at the top. It accepts every recipient and
relays nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

log = logging.getLogger(__name__)


def write_atomically(folder: Path, name: str, data: bytes) -> Path:
    """Write `data` to `folder/name` with mode 0600 so that readers never see a partial file."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    final = folder / name
    temporary = folder / f".{name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, final)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final


class SinkHandler:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        name = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(6)}.eml"
        trace = (f"X-Sink-Envelope: from=<{envelope.mail_from}> "
                 f"to={','.join('<' + r + '>' for r in envelope.rcpt_tos)}\r\n").encode("utf-8", "replace")
        try:
            path = await asyncio.to_thread(write_atomically, self.folder, name,
                                           trace + (envelope.original_content or b""))
        except OSError as error:
            log.error("event=sink_write_failed folder=%s error=%s", self.folder, error)
            return "451 4.3.0 Sink could not store the message, try again later"
        log.info("event=sink_stored file=%s rcpts=%d", path.name, len(envelope.rcpt_tos))
        return f"250 2.0.0 Ok: stored as {path.name}"


async def start_sink(folder: Path, host: str, port: int, hostname: str,
                     max_message_size: int) -> asyncio.AbstractServer:
    """Start the sink server on `host:port`; return the asyncio server."""
    loop = asyncio.get_running_loop()
    handler = SinkHandler(folder)

    class LongLineSMTP(SMTP):
        # Relayed mail may carry lines longer than RFC 5321 allows.
        line_length_limit = max_message_size + 1000

    server = await loop.create_server(
        lambda: LongLineSMTP(handler, hostname=hostname, data_size_limit=max_message_size,
                             enable_SMTPUTF8=True, loop=loop),
        host=host, port=port)
    log.info("event=sink_listening address=%s:%d folder=%s", host, port, folder)
    return server
