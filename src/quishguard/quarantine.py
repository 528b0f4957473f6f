"""Embedded quarantine store for the messages the hop holds back.

The SMTP proxy and the milter call `QuarantineStore.store` for every message
whose action is `quarantine`. The CLI lists, inspects, releases and deletes
them. Each message is kept as the exact bytes received plus one row in a
SQLite index with the envelope, the headers an admin needs to recognise it
and the verdict that held it.

On-disk layout under the configured `quarantine.data_dir`::

    quarantine/                 mode 0700
        index.sqlite3           mode 0600, WAL mode (plus -wal and -shm files)
        messages/               mode 0700
            <id>.eml            mode 0600, the raw message as received
            .<id>.tmp           a write in progress or left by a crash

An id is 28 lowercase hex characters: 12 of milliseconds since the Unix epoch,
so ids sort by arrival, then 16 from `secrets`. Ids never come from anything
the sender controls, and every public method checks the id format before it
builds a path, so an id cannot point outside `messages/`.

A message file is complete before its index row exists: the bytes go to a
temporary file (O_CREAT|O_EXCL, mode 0600), which is fsynced, renamed over
`<id>.eml` and followed by an fsync of the folder. Only then is the row
inserted. A crash in between leaves a file without a row, which no listing
shows and `remove_orphans` deletes later.

Several processes may open the same store at once (the server stores while
the CLI lists and releases). SQLite's WAL mode lets readers run beside the
one writer, and `busy_timeout` makes a writer wait for the lock instead of
failing at once.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import NotFoundError, QuarantineError
from .model import Action, Envelope, Finding, QrCode, Verdict

log = logging.getLogger(__name__)

HELD = "held"
RELEASED = "released"
DELETED = "deleted"
STATUSES = (HELD, RELEASED, DELETED)

SCHEMA_VERSION = 1

# Seconds a writer waits for another process to release the index lock.
BUSY_TIMEOUT_SECONDS = 10.0

# A file younger than this may belong to a `store` still running in another
# process, which can wait up to BUSY_TIMEOUT_SECONDS for the index lock.
ORPHAN_MIN_AGE_SECONDS = 3600.0

_ID_RE = re.compile(r"[0-9a-f]{28}")
_TIMESTAMP_HEX_DIGITS = 12
_RANDOM_BYTES = 8

_MIGRATIONS: dict[int, str] = {
    1: """
        CREATE TABLE messages (
            id              TEXT PRIMARY KEY,
            received_at     TEXT NOT NULL,
            score           REAL NOT NULL,
            action          TEXT NOT NULL,
            findings        TEXT NOT NULL,
            qr_codes        TEXT NOT NULL,
            urls            TEXT NOT NULL,
            scan_incomplete INTEGER NOT NULL,
            mail_from       TEXT NOT NULL,
            rcpt_tos        TEXT NOT NULL,
            client_ip       TEXT,
            queue_id        TEXT,
            from_header     TEXT NOT NULL,
            subject         TEXT NOT NULL,
            message_id      TEXT NOT NULL,
            size            INTEGER NOT NULL,
            status          TEXT NOT NULL CHECK (status IN ('held', 'released', 'deleted')),
            released_at     TEXT
        );
        CREATE INDEX messages_by_status ON messages (status, received_at);
    """,
}

_COLUMNS = (
    "id, received_at, score, action, findings, qr_codes, urls, scan_incomplete, mail_from, "
    "rcpt_tos, client_ip, queue_id, from_header, subject, message_id, size, status, released_at"
)


@dataclass(frozen=True)
class QuarantinedMessage:
    """One index row: the envelope, the display headers and the verdict of a held message.

    `subject`, `from_header` and `message_id` are stored as the sender wrote
    them. Pass them through `sanitize_for_terminal` before printing.
    """

    id: str
    received_at: datetime
    score: float
    action: Action
    findings: tuple[Finding, ...]
    qr_codes: tuple[QrCode, ...]
    urls: tuple[str, ...]
    scan_incomplete: bool
    mail_from: str
    rcpt_tos: tuple[str, ...]
    client_ip: str | None
    queue_id: str | None
    from_header: str
    subject: str
    message_id: str
    size: int
    status: str
    released_at: datetime | None

    @property
    def top_rules(self) -> tuple[str, ...]:
        """Names of the three highest-scoring findings, highest first."""
        ranked = sorted(self.findings, key=lambda finding: finding.score, reverse=True)
        return tuple(finding.rule for finding in ranked[:3])

    @property
    def verdict(self) -> Verdict:
        """The verdict that held the message, rebuilt from the row."""
        return Verdict(
            score=self.score,
            action=self.action,
            findings=self.findings,
            qr_codes=self.qr_codes,
            urls=self.urls,
            scan_incomplete=self.scan_incomplete,
        )

    @property
    def envelope(self) -> Envelope:
        """The SMTP envelope to relay the message with on release."""
        return Envelope(
            mail_from=self.mail_from,
            rcpt_tos=self.rcpt_tos,
            client_ip=self.client_ip,
            queue_id=self.queue_id,
        )


def new_id() -> str:
    """Create a quarantine id: milliseconds since the epoch in hex, then random hex."""
    millis = time.time_ns() // 1_000_000
    return f"{millis:0{_TIMESTAMP_HEX_DIGITS}x}" + secrets.token_hex(_RANDOM_BYTES)


def is_valid_id(text: str) -> bool:
    """Check that `text` has the exact id format, so it is safe to use in a file name."""
    return isinstance(text, str) and _ID_RE.fullmatch(text) is not None


def sanitize_for_terminal(text: str) -> str:
    """Escape the characters that could change what a terminal shows.

    Control characters (C0, C1, DEL), Unicode format characters such as
    bidirectional overrides and zero-width spaces, line and paragraph
    separators and lone surrogates are replaced by their Python escape, for
    example `\\x1b` or `\\u202e`, so the output shows where they were.
    """
    out: list[str] = []
    for char in text:
        if unicodedata.category(char) not in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            out.append(char)
            continue

        code = ord(char)
        if code <= 0xFF:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


class QuarantineStore:
    """The quarantine under `data_dir/quarantine/`.

    One instance holds one SQLite connection guarded by a lock, so threads may
    share it. The server calls the blocking methods through
    `asyncio.to_thread`. After a fork the child opens its own connection on
    first use, because a SQLite connection must not cross a fork.
    """

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / "quarantine"
        self.messages_dir = self.root / "messages"
        self.index_path = self.root / "index.sqlite3"
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = os.getpid()

        self._make_dirs()
        self._connect()

    def __enter__(self) -> QuarantineStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the index connection. A later call opens it again."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- writing ---------------------------------------------------------

    def store(self, raw: bytes, envelope: Envelope, verdict: Verdict, *,
              subject: str, from_header: str, message_id: str) -> str:
        """Write `raw` durably, index it as held and return the new id.

        Raises QuarantineError when the file or the row cannot be written. In
        that case no message is listed, and the caller must not accept the
        message as quarantined.
        """
        quarantine_id = new_id()
        final_path = self._message_path(quarantine_id)

        self._write_file(quarantine_id, raw)

        try:
            self._insert_row(quarantine_id, len(raw), envelope, verdict,
                             subject=subject, from_header=from_header, message_id=message_id)
        except Exception:
            # Without its row the file is an orphan, so remove it now.
            # `remove_orphans` covers a crash or an interrupt at this point.
            # Interrupts such as KeyboardInterrupt are not caught, because one
            # could arrive after the COMMIT, when the file is needed.
            try:
                final_path.unlink(missing_ok=True)
            except OSError as exc:
                log.error("quarantine %s: could not remove %s after the index insert failed: %s",
                          quarantine_id, final_path, exc)
            raise

        log.info("quarantine %s: stored %d bytes, score %.2f, action %s, rules %s",
                 quarantine_id, len(raw), verdict.score, verdict.action.label,
                 ",".join(f.rule for f in verdict.findings) or "-")
        return quarantine_id

    def mark_released(self, id: str) -> None:
        """Mark a held message as released, with the current time.

        Call this after the message was relayed. Raises NotFoundError for an
        unknown id and QuarantineError when the message is not held any more,
        so two admins cannot both record a release of one message.
        """
        _check_id(id)
        now = _utc_now()

        with self._transaction("mark as released", id) as conn:
            updated = conn.execute(
                "UPDATE messages SET status = ?, released_at = ? WHERE id = ? AND status = ?",
                (RELEASED, now, id, HELD),
            ).rowcount

        if updated == 1:
            log.info("quarantine %s: marked as released", id)
            return

        current = self.get(id)
        if current.status == RELEASED:
            when = current.released_at.isoformat(timespec="seconds") if current.released_at else "an unknown time"
            raise QuarantineError(f"quarantined message {id} was already released at {when}")
        raise QuarantineError(f"quarantined message {id} was deleted and cannot be released")

    def delete(self, id: str) -> None:
        """Remove the message file and mark the row deleted.

        The row stays, without the message body, so reports still show what
        was quarantined and why. Deleting a deleted message is allowed and
        retries the file removal. Raises NotFoundError for an unknown id.
        """
        _check_id(id)
        path = self._message_path(id)

        # The row changes first. A crash before the unlink then leaves a file
        # that `read_raw` rejects because the row is deleted, and that
        # `remove_orphans` removes.
        with self._transaction("mark as deleted", id) as conn:
            updated = conn.execute("UPDATE messages SET status = ? WHERE id = ?",
                                   (DELETED, id)).rowcount
        if updated == 0:
            raise _not_found(id)

        try:
            path.unlink(missing_ok=True)
            _fsync_dir(self.messages_dir)
        except OSError as exc:
            raise QuarantineError(
                f"quarantined message {id} is marked deleted but its file {path} could not be "
                f"removed: {exc}; fix the permissions and run the delete again"
            ) from exc

        log.info("quarantine %s: deleted", id)

    def remove_orphans(self, min_age_seconds: float = ORPHAN_MIN_AGE_SECONDS) -> list[str]:
        """Delete files that no held or released row points to, and return their names.

        These are temporary files and message files left by a crash inside
        `store` or `delete`. Files younger than `min_age_seconds` are kept,
        because another process may be between its file write and its insert.
        """
        live_ids = self._ids_with_files()
        cutoff = time.time() - min_age_seconds
        removed: list[str] = []

        try:
            entries = list(os.scandir(self.messages_dir))
        except OSError as exc:
            raise QuarantineError(f"could not list {self.messages_dir}: {exc}") from exc

        for entry in entries:
            if entry.name.endswith(".eml") and entry.name[:-4] in live_ids:
                continue
            try:
                if not entry.is_file(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_mtime > cutoff:
                    continue
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise QuarantineError(f"could not remove orphan file {entry.path}: {exc}") from exc
            removed.append(entry.name)

        if removed:
            log.warning("quarantine: removed %d orphan files: %s", len(removed), ", ".join(removed))
        return removed

    # -- reading ---------------------------------------------------------

    def get(self, id: str) -> QuarantinedMessage:
        """Return the index row of one message, in any status."""
        _check_id(id)

        with self._cursor("read", id) as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM messages WHERE id = ?", (id,)).fetchone()
        if row is None:
            raise _not_found(id)
        return _row_to_message(row, self.index_path)

    def count(self, status: str | None = HELD) -> int:
        """Count the messages in `status`, or all of them when it is None."""
        _check_status(status)

        with self._cursor("count", None) as conn:
            if status is None:
                (total,) = conn.execute("SELECT COUNT(*) FROM messages").fetchone()
            else:
                (total,) = conn.execute("SELECT COUNT(*) FROM messages WHERE status = ?",
                                        (status,)).fetchone()
        return int(total)

    def read_raw(self, id: str) -> bytes:
        """Return the message bytes exactly as received.

        Raises NotFoundError for an unknown or deleted id, and QuarantineError
        when the index lists the message but its file is missing or unreadable.
        """
        message = self.get(id)
        if message.status == DELETED:
            raise NotFoundError(f"quarantined message {id} was deleted; its content is gone")

        path = self._message_path(id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as file:
                return file.read()
        except FileNotFoundError as exc:
            raise QuarantineError(
                f"quarantined message {id} is in the index but its file {path} is missing; "
                f"run `quishguard quarantine delete {id}` to drop the entry"
            ) from exc
        except OSError as exc:
            raise QuarantineError(f"could not read quarantined message {id} from {path}: {exc}") from exc

    # Placed after the methods whose annotations use the builtin `list`,
    # because type checkers resolve that name to this method below it.
    def list(self, status: str | None = HELD, limit: int | None = None) -> list[QuarantinedMessage]:
        """Return messages newest first, only those in `status` unless it is None."""
        _check_status(status)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"invalid limit {limit!r}; expected None or an integer >= 1")

        sql = f"SELECT {_COLUMNS} FROM messages"
        params: list[object] = []
        if status is not None:
            sql += " WHERE status = ?"
            params.append(status)
        # rowid breaks ties between messages stored in the same microsecond.
        sql += " ORDER BY received_at DESC, rowid DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)

        with self._cursor("list", None) as conn:
            rows = conn.execute(sql, params).fetchall()
        return [_row_to_message(row, self.index_path) for row in rows]

    # -- files -----------------------------------------------------------

    def _message_path(self, id: str) -> Path:
        return self.messages_dir / f"{id}.eml"

    def _make_dirs(self) -> None:
        for folder in (self.root, self.messages_dir):
            try:
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
                # mkdir applies the umask and leaves an existing folder alone,
                # but quarantined mail must not be readable by other users.
                os.chmod(folder, 0o700)
            except OSError as exc:
                raise QuarantineError(
                    f"could not create the quarantine folder {folder}: {exc}; "
                    f"check quarantine.data_dir and its permissions"
                ) from exc

    def _write_file(self, id: str, raw: bytes) -> None:
        """Write `raw` to `<id>.eml` atomically and durably."""
        tmp_path = self.messages_dir / f".{id}.tmp"
        final_path = self._message_path(id)

        try:
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)
        except OSError as exc:
            raise QuarantineError(
                f"could not create {tmp_path} for quarantined message {id}: {exc}; "
                f"check the free space and permissions of {self.messages_dir}"
            ) from exc

        try:
            with os.fdopen(fd, "wb") as file:
                file.write(raw)
                file.flush()
                os.fsync(file.fileno())

            os.replace(tmp_path, final_path)
            _fsync_dir(self.messages_dir)
        except OSError as exc:
            _remove_quietly(tmp_path, id)
            raise QuarantineError(
                f"could not write quarantined message {id} to {final_path}: {exc}; "
                f"check the free space and permissions of {self.messages_dir}"
            ) from exc
        except BaseException:
            _remove_quietly(tmp_path, id)
            raise

    def _ids_with_files(self) -> set[str]:
        with self._cursor("list", None) as conn:
            rows = conn.execute("SELECT id FROM messages WHERE status != ?", (DELETED,)).fetchall()
        return {row[0] for row in rows}

    # -- index -----------------------------------------------------------

    def _insert_row(self, id: str, size: int, envelope: Envelope, verdict: Verdict, *,
                    subject: str, from_header: str, message_id: str) -> None:
        findings = [{"rule": f.rule, "score": f.score, "detail": f.detail} for f in verdict.findings]
        qr_codes = [
            {"payload": q.payload, "location": q.location, "hidden_as": q.hidden_as, "backend": q.backend}
            for q in verdict.qr_codes
        ]
        values = (
            id,
            _utc_now(),
            float(verdict.score),
            verdict.action.label,
            json.dumps(findings),
            json.dumps(qr_codes),
            json.dumps(list(verdict.urls)),
            int(verdict.scan_incomplete),
            _storable(envelope.mail_from),
            json.dumps(list(envelope.rcpt_tos)),
            _storable_or_none(envelope.client_ip),
            _storable_or_none(envelope.queue_id),
            _storable(from_header),
            _storable(subject),
            _storable(message_id),
            size,
            HELD,
            None,
        )

        with self._transaction("insert", id) as conn:
            conn.execute(f"INSERT INTO messages ({_COLUMNS}) VALUES ({', '.join('?' * len(values))})",
                         values)

    def _connect(self) -> sqlite3.Connection:
        """Open the index, creating or migrating it. The caller must not hold the lock."""
        try:
            # Creating the file first gives it mode 0600. SQLite copies the
            # mode of the database file to its -wal and -shm files.
            fd = os.open(self.index_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            os.close(fd)
        except OSError as exc:
            raise QuarantineError(
                f"could not open the quarantine index {self.index_path}: {exc}; "
                f"check quarantine.data_dir and its permissions"
            ) from exc

        try:
            # isolation_level=None turns off the module's implicit transactions,
            # so every write below starts its own BEGIN IMMEDIATE.
            conn = sqlite3.connect(self.index_path, timeout=BUSY_TIMEOUT_SECONDS,
                                   isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise _index_error(self.index_path, "open", None, exc) from exc

        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
            # NOTE: WAL needs shared memory between the processes, so the
            # folder must be on a local file system, not on NFS or SMB.
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("quarantine: %s stays in journal mode %s, not WAL; readers may wait "
                            "for writers", self.index_path, mode)
            # FULL syncs the WAL on every commit, so a stored message survives
            # a power loss once `store` has returned.
            conn.execute("PRAGMA synchronous = FULL")
            self._migrate(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise _index_error(self.index_path, "open", None, exc) from exc
        except BaseException:
            conn.close()
            raise

        self._conn = conn
        self._pid = os.getpid()
        log.debug("quarantine: opened %s", self.index_path)
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise QuarantineError(
                f"the quarantine index {self.index_path} has schema version {version}, but this "
                f"quishguard reads up to version {SCHEMA_VERSION}; upgrade quishguard"
            )

        conn.execute("BEGIN IMMEDIATE")
        try:
            # Read again under the write lock, because another process may
            # have migrated between the first read and BEGIN.
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[target].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {target}")
                log.info("quarantine: migrated %s to schema version %d", self.index_path, target)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _connection(self) -> sqlite3.Connection:
        """Return the connection of this process. The caller must hold the lock."""
        if self._conn is not None and self._pid != os.getpid():
            # The connection was inherited through fork. Drop it without
            # closing, because a SQLite connection must not be used in a
            # forked child, and close is a use.
            self._conn = None
        if self._conn is None:
            return self._connect()
        return self._conn

    @contextmanager
    def _cursor(self, action: str, id: str | None) -> Iterator[sqlite3.Connection]:
        """Run reads on the connection, turning SQLite errors into QuarantineError."""
        with self._lock:
            conn = self._connection()
            try:
                yield conn
            except sqlite3.Error as exc:
                raise _index_error(self.index_path, action, id, exc) from exc

    @contextmanager
    def _transaction(self, action: str, id: str | None) -> Iterator[sqlite3.Connection]:
        """Run writes in one BEGIN IMMEDIATE transaction, committed on success."""
        with self._lock:
            conn = self._connection()
            try:
                # IMMEDIATE takes the write lock at once, so waiting for
                # another writer follows busy_timeout instead of failing
                # later with SQLITE_BUSY on lock upgrade.
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise _index_error(self.index_path, action, id, exc) from exc



def _check_id(id: str) -> None:
    # A valid id contains no separator or dot, so it is safe in a path.
    if not is_valid_id(id):
        raise NotFoundError(
            f"invalid quarantine id {id!r}: an id is 28 lowercase hex characters; "
            f"run `quishguard quarantine list` to see the ids"
        )

def _not_found(id: str) -> NotFoundError:
    return NotFoundError(f"no quarantined message has id {id}; run `quishguard quarantine list` to see the ids")


def _index_error(path: Path, action: str, id: str | None, exc: sqlite3.Error) -> QuarantineError:
    subject = f"quarantined message {id}" if id else "the quarantine"
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
        hint = (f"another process held the lock for more than {BUSY_TIMEOUT_SECONDS:g} s; "
                f"retry, and look for a stuck quishguard process")
    else:
        hint = "check the free space and permissions, or move the file aside to start a new index"
    return QuarantineError(f"could not {action} {subject} in the index {path}: {exc}; {hint}")


def _check_status(status: str | None) -> None:
    if status is not None and status not in STATUSES:
        raise ValueError(f"unknown quarantine status {status!r}; allowed: {', '.join(STATUSES)} or None")


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _storable(text: str) -> str:
    """Return `text` unchanged unless UTF-8 cannot hold it.

    Header values decoded with surrogateescape may carry lone surrogates,
    which SQLite's UTF-8 text type rejects. Each becomes one U+FFFD.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join("\ufffd" if 0xD800 <= ord(char) <= 0xDFFF else char for char in text)
    return text


def _storable_or_none(text: str | None) -> str | None:
    return None if text is None else _storable(text)


def _fsync_dir(path: Path) -> None:
    """Flush a folder's entries, so a rename or unlink survives a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: Path, id: str) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.error("quarantine %s: could not remove the temporary file %s: %s", id, path, exc)


def _row_to_message(row: tuple, index_path: Path) -> QuarantinedMessage:
    (id, received_at, score, action, findings, qr_codes, urls, scan_incomplete, mail_from,
     rcpt_tos, client_ip, queue_id, from_header, subject, message_id, size, status,
     released_at) = row

    try:
        return QuarantinedMessage(
            id=id,
            received_at=datetime.fromisoformat(received_at),
            score=float(score),
            action=Action.parse(action),
            findings=tuple(Finding(rule=f["rule"], score=float(f["score"]), detail=f["detail"])
                           for f in json.loads(findings)),
            qr_codes=tuple(QrCode(payload=q["payload"], location=q["location"],
                                  hidden_as=q["hidden_as"], backend=q.get("backend", ""))
                           for q in json.loads(qr_codes)),
            urls=tuple(json.loads(urls)),
            scan_incomplete=bool(scan_incomplete),
            mail_from=mail_from,
            rcpt_tos=tuple(json.loads(rcpt_tos)),
            client_ip=client_ip,
            queue_id=queue_id,
            from_header=from_header,
            subject=subject,
            message_id=message_id,
            size=int(size),
            status=status,
            released_at=datetime.fromisoformat(released_at) if released_at else None,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise QuarantineError(
            f"the row of quarantined message {id} in {index_path} is corrupt: {exc}; "
            f"delete it with `quishguard quarantine delete {id}`"
        ) from exc
