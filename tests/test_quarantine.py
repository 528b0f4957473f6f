"""Tests of the quarantine store against real SQLite and real files in tmp_path."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from quishguard import quarantine
from quishguard.errors import NotFoundError, QuarantineError
from quishguard.model import Action, Envelope, Finding, QrCode, Verdict
from quishguard.quarantine import QuarantineStore, is_valid_id, new_id, sanitize_for_terminal

SRC_DIR = Path(quarantine.__file__).resolve().parents[1]

RAW = b"From: Payroll <payroll@example.net>\r\nSubject: Update\r\n\r\nScan the code.\r\n"


def make_envelope(**overrides: object) -> Envelope:
    values: dict[str, object] = {
        "mail_from": "bounce@example.net",
        "rcpt_tos": ("alice@example.org", "bob@example.org"),
        "client_ip": "192.0.2.10",
        "queue_id": "4XyZ1234",
    }
    values.update(overrides)
    return Envelope(**values)  # type: ignore[arg-type]


def make_verdict(**overrides: object) -> Verdict:
    values: dict[str, object] = {
        "score": 11.5,
        "action": Action.QUARANTINE,
        "findings": (
            Finding("QR_URL_SHORTENER", 2.0, "payload host bit.ly"),
            Finding("QR_IN_PDF", 4.5, "attachment 2, page 1"),
            Finding("CAPTCHA_GATE", 3.0, "html part 1"),
            Finding("DIRECT_SEND_SPOOF", 2.0, "From domain is ours, client outside"),
        ),
        "qr_codes": (
            QrCode("https://bit.ly/x", "attachment 2, page 1", "pdf-image", "zxing-cpp"),
        ),
        "urls": ("https://bit.ly/x", "https://example.net/login"),
        "scan_incomplete": True,
    }
    values.update(overrides)
    return Verdict(**values)  # type: ignore[arg-type]


def store_one(qstore: QuarantineStore, raw: bytes = RAW, subject: str = "Update") -> str:
    return qstore.store(raw, make_envelope(), make_verdict(), subject=subject,
                        from_header="Payroll <payroll@example.net>", message_id="<m1@example.net>")


@pytest.fixture
def qstore(tmp_path: Path) -> Iterator[QuarantineStore]:
    with QuarantineStore(tmp_path) as opened:
        yield opened


def message_files(tmp_path: Path) -> list[str]:
    return sorted(os.listdir(tmp_path / "quarantine" / "messages"))


def test_store_get_round_trip(qstore: QuarantineStore) -> None:
    before = datetime.now(timezone.utc)
    qid = store_one(qstore)
    after = datetime.now(timezone.utc)

    message = qstore.get(qid)

    assert message.id == qid
    assert before <= message.received_at <= after
    assert message.received_at.tzinfo is not None
    assert message.score == 11.5
    assert message.action is Action.QUARANTINE
    assert message.findings == make_verdict().findings
    assert message.qr_codes == make_verdict().qr_codes
    assert message.urls == ("https://bit.ly/x", "https://example.net/login")
    assert message.scan_incomplete is True
    assert message.mail_from == "bounce@example.net"
    assert message.rcpt_tos == ("alice@example.org", "bob@example.org")
    assert message.client_ip == "192.0.2.10"
    assert message.queue_id == "4XyZ1234"
    assert message.from_header == "Payroll <payroll@example.net>"
    assert message.subject == "Update"
    assert message.message_id == "<m1@example.net>"
    assert message.size == len(RAW)
    assert message.status == "held"
    assert message.released_at is None


def test_read_raw_returns_exact_bytes(qstore: QuarantineStore) -> None:
    raw = RAW + bytes(range(256))
    qid = store_one(qstore, raw=raw)

    assert qstore.read_raw(qid) == raw


def test_store_empty_envelope_fields(qstore: QuarantineStore) -> None:
    envelope = Envelope(mail_from="", rcpt_tos=("a@example.org",))
    verdict = make_verdict(findings=(), qr_codes=(), urls=(), scan_incomplete=False)

    qid = qstore.store(b"", envelope, verdict, subject="", from_header="", message_id="")
    message = qstore.get(qid)

    assert message.mail_from == ""
    assert message.client_ip is None
    assert message.queue_id is None
    assert message.findings == ()
    assert message.size == 0
    assert qstore.read_raw(qid) == b""


def test_store_keeps_hostile_subject(qstore: QuarantineStore) -> None:
    subject = "Invoice \x1b[2J\u202egnp.exe\r\nBcc: x"

    qid = store_one(qstore, subject=subject)

    assert qstore.get(qid).subject == subject


def test_store_replaces_lone_surrogates(qstore: QuarantineStore) -> None:
    qid = store_one(qstore, subject="caf\udce9")

    assert qstore.get(qid).subject == "caf\ufffd"


def test_message_file_mode_0600(qstore: QuarantineStore, tmp_path: Path) -> None:
    qid = store_one(qstore)

    mode = stat.S_IMODE(os.stat(tmp_path / "quarantine" / "messages" / f"{qid}.eml").st_mode)

    assert mode == 0o600


def test_index_file_mode_0600(qstore: QuarantineStore, tmp_path: Path) -> None:
    mode = stat.S_IMODE(os.stat(tmp_path / "quarantine" / "index.sqlite3").st_mode)

    assert mode == 0o600


def test_directories_mode_0700(qstore: QuarantineStore, tmp_path: Path) -> None:
    assert stat.S_IMODE(os.stat(tmp_path / "quarantine").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "quarantine" / "messages").st_mode) == 0o700


def test_open_tightens_existing_directory(tmp_path: Path) -> None:
    (tmp_path / "quarantine").mkdir(mode=0o755)
    os.chmod(tmp_path / "quarantine", 0o755)

    QuarantineStore(tmp_path).close()

    assert stat.S_IMODE(os.stat(tmp_path / "quarantine").st_mode) == 0o700


def test_open_sets_wal_and_schema(qstore: QuarantineStore, tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "quarantine" / "index.sqlite3")
    try:
        journal_mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        user_version = conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()

    assert journal_mode == "wal"
    assert user_version == quarantine.SCHEMA_VERSION


def test_open_twice_keeps_rows(tmp_path: Path) -> None:
    with QuarantineStore(tmp_path) as first:
        qid = store_one(first)

    with QuarantineStore(tmp_path) as second:
        assert second.get(qid).id == qid


def test_open_newer_schema_raises(tmp_path: Path) -> None:
    QuarantineStore(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "quarantine" / "index.sqlite3")
    conn.execute("PRAGMA user_version = 99")
    conn.close()

    with pytest.raises(QuarantineError) as excinfo:
        QuarantineStore(tmp_path)

    assert "schema version 99" in str(excinfo.value)
    assert "upgrade quishguard" in str(excinfo.value)


def test_open_data_dir_is_file(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "data"
    not_a_dir.write_text("")

    with pytest.raises(QuarantineError) as excinfo:
        QuarantineStore(not_a_dir)

    assert str(not_a_dir / "quarantine") in str(excinfo.value)
    assert isinstance(excinfo.value.__cause__, OSError)


def test_open_corrupt_index_raises(tmp_path: Path) -> None:
    (tmp_path / "quarantine").mkdir()
    (tmp_path / "quarantine" / "index.sqlite3").write_bytes(b"this is not a database" * 100)

    with pytest.raises(QuarantineError) as excinfo:
        QuarantineStore(tmp_path)

    assert "index.sqlite3" in str(excinfo.value)
    assert isinstance(excinfo.value.__cause__, sqlite3.Error)


def test_list_newest_first(qstore: QuarantineStore) -> None:
    ids = [store_one(qstore) for _ in range(5)]

    listed = [message.id for message in qstore.list()]

    assert listed == list(reversed(ids))


def test_list_status_filter(qstore: QuarantineStore) -> None:
    held_id, released_id, deleted_id = (store_one(qstore) for _ in range(3))
    qstore.mark_released(released_id)
    qstore.delete(deleted_id)

    assert [m.id for m in qstore.list()] == [held_id]
    assert [m.id for m in qstore.list("released")] == [released_id]
    assert [m.id for m in qstore.list("deleted")] == [deleted_id]
    assert [m.id for m in qstore.list(None)] == [deleted_id, released_id, held_id]


def test_list_limit(qstore: QuarantineStore) -> None:
    ids = [store_one(qstore) for _ in range(4)]

    assert [m.id for m in qstore.list(limit=2)] == [ids[3], ids[2]]


@pytest.mark.parametrize("status, limit", [("quarantined", None), ("HELD", None), ("held", 0), ("held", -1)])
def test_list_invalid_arguments_raise(qstore: QuarantineStore, status: str, limit: int | None) -> None:
    with pytest.raises(ValueError):
        qstore.list(status, limit)


def test_count_by_status(qstore: QuarantineStore) -> None:
    ids = [store_one(qstore) for _ in range(3)]
    qstore.mark_released(ids[0])

    assert qstore.count() == 2
    assert qstore.count("released") == 1
    assert qstore.count("deleted") == 0
    assert qstore.count(None) == 3


def test_mark_released_sets_status_time(qstore: QuarantineStore) -> None:
    qid = store_one(qstore)
    before = datetime.now(timezone.utc)

    qstore.mark_released(qid)
    message = qstore.get(qid)

    assert message.status == "released"
    assert message.released_at is not None
    assert before <= message.released_at <= datetime.now(timezone.utc) + timedelta(seconds=1)
    assert qstore.read_raw(qid) == RAW


def test_mark_released_twice_raises(qstore: QuarantineStore) -> None:
    qid = store_one(qstore)
    qstore.mark_released(qid)

    with pytest.raises(QuarantineError) as excinfo:
        qstore.mark_released(qid)

    assert "already released" in str(excinfo.value)
    assert not isinstance(excinfo.value, NotFoundError)


def test_mark_released_deleted_raises(qstore: QuarantineStore) -> None:
    qid = store_one(qstore)
    qstore.delete(qid)

    with pytest.raises(QuarantineError) as excinfo:
        qstore.mark_released(qid)

    assert "deleted" in str(excinfo.value)
    assert qstore.get(qid).status == "deleted"


def test_delete_removes_file(qstore: QuarantineStore, tmp_path: Path) -> None:
    qid = store_one(qstore)
    other = store_one(qstore)

    qstore.delete(qid)

    assert not (tmp_path / "quarantine" / "messages" / f"{qid}.eml").exists()
    assert message_files(tmp_path) == [f"{other}.eml"]
    assert qstore.get(qid).status == "deleted"
    assert qstore.count() == 1


def test_delete_twice_is_allowed(qstore: QuarantineStore) -> None:
    qid = store_one(qstore)
    qstore.delete(qid)

    qstore.delete(qid)

    assert qstore.get(qid).status == "deleted"


def test_read_raw_deleted_raises(qstore: QuarantineStore) -> None:
    qid = store_one(qstore)
    qstore.delete(qid)

    with pytest.raises(NotFoundError) as excinfo:
        qstore.read_raw(qid)

    assert qid in str(excinfo.value)


def test_read_raw_missing_file_raises(qstore: QuarantineStore, tmp_path: Path) -> None:
    qid = store_one(qstore)
    (tmp_path / "quarantine" / "messages" / f"{qid}.eml").unlink()

    with pytest.raises(QuarantineError) as excinfo:
        qstore.read_raw(qid)

    assert "missing" in str(excinfo.value)
    assert not isinstance(excinfo.value, NotFoundError)


@pytest.mark.parametrize("method", ["get", "read_raw", "mark_released", "delete"])
def test_unknown_id_raises_not_found(qstore: QuarantineStore, method: str) -> None:
    unknown = new_id()

    with pytest.raises(NotFoundError) as excinfo:
        getattr(qstore, method)(unknown)

    assert unknown in str(excinfo.value)
    assert "quishguard quarantine list" in str(excinfo.value)


MALICIOUS_IDS = [
    "../x",
    "a/b",
    "",
    "..",
    "/etc/passwd",
    "../" + "0" * 25,
    "0" * 27,
    "0" * 29,
    "0" * 28 + "\n",
    "0" * 27 + "\x00",
    "A" * 28,
    "g" * 28,
    "\uff10" * 28,
]


@pytest.mark.parametrize("bad_id", MALICIOUS_IDS)
@pytest.mark.parametrize("method", ["get", "read_raw", "mark_released", "delete"])
def test_malicious_id_rejected(qstore: QuarantineStore, tmp_path: Path, method: str, bad_id: str) -> None:
    # "../x" would name quarantine/x.eml if it reached a path.
    sentinel = tmp_path / "quarantine" / "x.eml"
    sentinel.write_bytes(b"outside")

    with pytest.raises(NotFoundError) as excinfo:
        getattr(qstore, method)(bad_id)

    assert "invalid quarantine id" in str(excinfo.value)
    assert sentinel.read_bytes() == b"outside"


@pytest.mark.parametrize("bad_id", MALICIOUS_IDS)
def test_is_valid_id_rejects(bad_id: str) -> None:
    assert not is_valid_id(bad_id)


def test_new_id_unique_and_valid() -> None:
    ids = [new_id() for _ in range(20_000)]

    assert len(set(ids)) == len(ids)
    assert all(is_valid_id(qid) for qid in ids)


def test_new_id_sorts_by_time() -> None:
    first = new_id()
    # Ids start with the time in milliseconds, so ids 2 ms apart sort in order.
    time.sleep(0.002)
    second = new_id()

    assert first < second


def test_store_ids_unique_many(qstore: QuarantineStore, tmp_path: Path) -> None:
    ids = [store_one(qstore) for _ in range(200)]

    assert len(set(ids)) == 200
    assert all(is_valid_id(qid) for qid in ids)
    assert qstore.count() == 200
    assert len(message_files(tmp_path)) == 200


def test_two_instances_share_rows(tmp_path: Path) -> None:
    with QuarantineStore(tmp_path) as server, QuarantineStore(tmp_path) as cli:
        qid = store_one(server)

        assert [m.id for m in cli.list()] == [qid]

        cli.mark_released(qid)

        assert server.get(qid).status == "released"
        assert server.count() == 0


WRITER_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from quishguard.model import Action, Envelope, Verdict
    from quishguard.quarantine import QuarantineStore

    store = QuarantineStore(Path(sys.argv[1]))
    for n in range(int(sys.argv[2])):
        store.store(b"x" * 1000, Envelope("a@example.net", ("b@example.org",)),
                    Verdict(9.0, Action.QUARANTINE, (), (), ()),
                    subject=f"s{n}", from_header="a@example.net", message_id=f"<{n}@x>")
    store.close()
""")


def test_concurrent_processes_store_all(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC_DIR), os.environ.get("PYTHONPATH", "")])}
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(tmp_path), "40"], env=env,
                         stderr=subprocess.PIPE)
        for _ in range(3)
    ]

    # Read while the writers run, as the CLI does beside the server.
    with QuarantineStore(tmp_path) as reader:
        while any(writer.poll() is None for writer in writers):
            reader.list(limit=10)

        errors = [writer.stderr.read().decode() for writer in writers]
        assert [writer.returncode for writer in writers] == [0, 0, 0], errors
        assert reader.count() == 120
    assert len(message_files(tmp_path)) == 120


def test_insert_failure_leaves_no_message(
    qstore: QuarantineStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_insert(*args: object, **kwargs: object) -> None:
        raise QuarantineError("simulated index failure")

    monkeypatch.setattr(QuarantineStore, "_insert_row", failing_insert)

    with pytest.raises(QuarantineError):
        store_one(qstore)

    assert qstore.list(None) == []
    assert qstore.count(None) == 0
    assert message_files(tmp_path) == []


def test_sqlite_insert_error_wrapped(
    qstore: QuarantineStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Dropping the table makes the INSERT itself fail inside SQLite.
    conn = sqlite3.connect(tmp_path / "quarantine" / "index.sqlite3")
    conn.execute("DROP TABLE messages")
    conn.commit()
    conn.close()

    with pytest.raises(QuarantineError) as excinfo:
        store_one(qstore)

    assert isinstance(excinfo.value.__cause__, sqlite3.Error)
    assert "index.sqlite3" in str(excinfo.value)
    assert message_files(tmp_path) == []


def test_crash_before_insert_not_listed(qstore: QuarantineStore, tmp_path: Path) -> None:
    # A crash after the file write and before the insert leaves exactly this:
    # a complete <id>.eml and a stale temporary file from an earlier crash.
    orphan = new_id()
    qstore._write_file(orphan, RAW)
    stale_tmp = tmp_path / "quarantine" / "messages" / f".{new_id()}.tmp"
    stale_tmp.write_bytes(b"half a mess")

    assert qstore.list(None) == []
    assert qstore.count(None) == 0
    with pytest.raises(NotFoundError):
        qstore.get(orphan)
    with pytest.raises(NotFoundError):
        qstore.read_raw(orphan)


def test_remove_orphans_skips_young_files(qstore: QuarantineStore, tmp_path: Path) -> None:
    kept = store_one(qstore)
    qstore._write_file(new_id(), RAW)

    removed = qstore.remove_orphans()

    assert removed == []
    assert len(message_files(tmp_path)) == 2
    assert qstore.read_raw(kept) == RAW


def test_remove_orphans_deletes_old_files(qstore: QuarantineStore, tmp_path: Path) -> None:
    kept = store_one(qstore)
    released = store_one(qstore)
    qstore.mark_released(released)
    orphan = new_id()
    qstore._write_file(orphan, RAW)
    stale_tmp = f".{new_id()}.tmp"
    (tmp_path / "quarantine" / "messages" / stale_tmp).write_bytes(b"half")

    removed = qstore.remove_orphans(min_age_seconds=0)

    assert sorted(removed) == sorted([f"{orphan}.eml", stale_tmp])
    assert message_files(tmp_path) == sorted([f"{kept}.eml", f"{released}.eml"])


def test_replace_failure_removes_temp_file(
    qstore: QuarantineStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(quarantine.os, "replace", failing_replace)

    with pytest.raises(QuarantineError) as excinfo:
        store_one(qstore)

    assert "No space left on device" in str(excinfo.value)
    assert message_files(tmp_path) == []
    assert qstore.count(None) == 0


def test_top_rules_by_score(qstore: QuarantineStore) -> None:
    qid = store_one(qstore)

    assert qstore.get(qid).top_rules == ("QR_IN_PDF", "CAPTCHA_GATE", "QR_URL_SHORTENER")


def test_verdict_and_envelope_rebuilt(qstore: QuarantineStore) -> None:
    qid = store_one(qstore)
    message = qstore.get(qid)

    assert message.verdict == make_verdict()
    assert message.envelope == make_envelope()


def test_store_usable_across_threads(qstore: QuarantineStore) -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        ids = list(pool.map(lambda _: store_one(qstore), range(40)))

    assert len(set(ids)) == 40
    assert qstore.count() == 40


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Invoice 42", "Invoice 42"),
        ("Grüße 日本 🙂", "Grüße 日本 🙂"),
        ("\x1b[2Jcleared", "\\x1b[2Jcleared"),
        ("line\r\nBcc: x", "line\\x0d\\x0aBcc: x"),
        ("tab\there", "tab\\x09here"),
        ("\x7f\x9b", "\\x7f\\x9b"),
        ("exe.\u202efdp", "exe.\\u202efdp"),
        ("zero\u200bwidth", "zero\\u200bwidth"),
        ("sep\u2028line", "sep\\u2028line"),
        ("caf\udce9", "caf\\udce9"),
        ("tag\U000e0041", "tag\\U000e0041"),
    ],
)
def test_sanitize_for_terminal_escapes(text: str, expected: str) -> None:
    assert sanitize_for_terminal(text) == expected


def test_store_lock_timeout_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quarantine, "BUSY_TIMEOUT_SECONDS", 0.1)
    qstore = QuarantineStore(tmp_path)
    other_writer = sqlite3.connect(tmp_path / "quarantine" / "index.sqlite3", isolation_level=None)
    other_writer.execute("BEGIN IMMEDIATE")

    try:
        with pytest.raises(QuarantineError) as excinfo:
            store_one(qstore)
    finally:
        other_writer.execute("ROLLBACK")
        other_writer.close()

    assert "held the lock" in str(excinfo.value)
    assert message_files(tmp_path) == []
    assert qstore.count(None) == 0
    qstore.close()
