"""The sender history behind SENDER_FIRST_SEEN_PERSON: outside addresses that used a person's name.

Only `serve` and the milter keep it; `scan` never writes state. The file is
`senders.sqlite3` in the data folder (mode 0600, beside the quarantine
index but separate from it). Only addresses of outside senders whose display
name matched an organisation person are stored, with the time first and last
delivered, and only after their message was relayed: a quarantined impostor
stays first-seen.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

from .errors import QuishguardError

log = logging.getLogger(__name__)

FILE_NAME = "senders.sqlite3"

# How long a writer waits for another process's lock before failing.
BUSY_TIMEOUT_SECONDS = 5.0


class SendersSeenError(QuishguardError):
    """The sender history could not be read or written."""


class SendersSeen:
    """A small SQLite table of sender addresses; safe to call from several threads."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / FILE_NAME
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Create the file as 0600 before SQLite opens it with the umask's mode.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            os.close(fd)
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, check_same_thread=False)
            conn.execute("CREATE TABLE IF NOT EXISTS senders_seen ("
                         " address TEXT PRIMARY KEY, first_seen REAL NOT NULL, last_seen REAL NOT NULL)")
            conn.commit()
        except (OSError, sqlite3.Error) as error:
            raise SendersSeenError(f"cannot open the sender history {self.path}: {error}") from error
        self._conn = conn
        return conn

    def contains(self, address: str) -> bool:
        """Tell whether `address` (case-insensitive) was delivered before."""
        with self._lock:
            try:
                row = self._connection().execute("SELECT 1 FROM senders_seen WHERE address = ?",
                                                 (address.lower(),)).fetchone()
            except sqlite3.Error as error:
                raise SendersSeenError(f"cannot read the sender history {self.path}: {error}") from error
        return row is not None

    def add(self, address: str) -> None:
        """Record that mail from `address` was delivered now."""
        now = time.time()
        with self._lock:
            try:
                conn = self._connection()
                conn.execute("INSERT INTO senders_seen (address, first_seen, last_seen) VALUES (?, ?, ?) "
                             "ON CONFLICT(address) DO UPDATE SET last_seen = excluded.last_seen",
                             (address.lower(), now, now))
                conn.commit()
            except sqlite3.Error as error:
                raise SendersSeenError(f"cannot write the sender history {self.path}: {error}") from error

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
