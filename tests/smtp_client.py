"""A minimal SMTP client for tests that returns every reply instead of raising."""

from __future__ import annotations

import asyncio
import re


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.greeting: tuple[int, str] = (0, "")

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1", local_addr: str | None = None) -> RawClient:
        reader, writer = await asyncio.open_connection(
            host, port, limit=2**26, local_addr=(local_addr, 0) if local_addr else None)
        client = cls(reader, writer)
        client.greeting = await client.reply()
        return client

    async def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 30)
            if not line:
                return 0, "connection closed"
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text[4:])
            if len(text) < 4 or text[3] != "-":
                return int(text[:3]), "\n".join(lines)

    async def command(self, line: str) -> tuple[int, str]:
        self.writer.write(line.encode("utf-8") + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def data(self, message: bytes) -> tuple[int, str]:
        code, text = await self.command("DATA")
        if code != 354:
            return code, text
        normalised = re.sub(rb"\r?\n", b"\r\n", message)
        if not normalised.endswith(b"\r\n"):
            normalised += b"\r\n"
        stuffed = re.sub(rb"(?m)^\.", b"..", normalised)
        self.writer.write(stuffed + b".\r\n")
        await self.writer.drain()
        return await self.reply()

    async def close(self) -> None:
        try:
            await self.command("QUIT")
        except (ConnectionError, asyncio.TimeoutError):
            pass
        self.writer.close()


async def send(port: int, message: bytes, *, mail_from: str = "alice@example.net",
               rcpt_tos: tuple[str, ...] = ("bob@example.com",), helo: str = "client.test"
               ) -> tuple[list[tuple[int, str]], tuple[int, str]]:
    """Send one message; return the RCPT replies and the DATA reply."""
    client = await RawClient.connect(port)
    try:
        await client.command(f"EHLO {helo}")
        code, text = await client.command(f"MAIL FROM:<{mail_from}>")
        assert code == 250, (code, text)
        rcpt_replies = [await client.command(f"RCPT TO:<{r}>") for r in rcpt_tos]
        if not any(code == 250 for code, _ in rcpt_replies):
            return rcpt_replies, (0, "no recipient accepted")
        return rcpt_replies, await client.data(message)
    finally:
        await client.close()
