"""`quishguard audit` on generated mailboxes with a known number of messages that bypassed the hop."""

from __future__ import annotations

import json
import mailbox

import pytest

from quishguard.cli import main
from quishguard.stamp import stamp_field

from .factories import make_message

SECRET = "audit test secret 0123456789"
PREFIX = "X-Quishguard-"
HOP_RECEIVED = "from mx.example.com (mx.example.com [10.0.0.5]) by mailbox.example.com with ESMTP id M1"
DIRECT_RECEIVED = ("from attacker.example.net (attacker.example.net [203.0.113.45]) "
                   "by tenant.mail.protection.example with ESMTP id D1")


def delivered(index: int, bypassed: bool) -> bytes:
    """Return a delivered copy: through the hop (stamped) or straight to the mailbox (no stamp)."""
    sender = "ceo@example.com" if bypassed else f"partner{index}@example.net"
    raw = make_message(subject=f"Message {index}", sender=sender, to="bob@example.com")
    if bypassed:
        return f"Received: {DIRECT_RECEIVED}\r\n".encode() + raw
    stamp = stamp_field(raw, ["bob@example.com"], "accept", SECRET.encode(), PREFIX)
    return f"Received: {HOP_RECEIVED}\r\nDelivered-To: bob@example.com\r\n".encode() + stamp + raw


# Positions of the messages that bypassed the hop, out of TOTAL.
TOTAL = 9
BYPASSED = {2, 5, 8}


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "quishguard.toml"
    path.write_text(f'[stamp]\nsecret = "{SECRET}"\n\n[org]\ndomains = ["example.com"]\n'
                    'trusted_networks = ["10.0.0.0/8"]\n')
    return path


def make_maildir(tmp_path):
    box = mailbox.Maildir(tmp_path / "Maildir", create=True)
    for index in range(TOTAL):
        box.add(delivered(index, index in BYPASSED))
    return tmp_path / "Maildir"


def make_mbox(tmp_path):
    box = mailbox.mbox(tmp_path / "inbox.mbox", create=True)
    for index in range(TOTAL):
        box.add(delivered(index, index in BYPASSED))
    box.flush()
    box.close()
    return tmp_path / "inbox.mbox"


def make_folder(tmp_path):
    folder = tmp_path / "eml"
    folder.mkdir()
    for index in range(TOTAL):
        (folder / f"{index:02d}.eml").write_bytes(delivered(index, index in BYPASSED))
    return folder


def run_audit(capsys, *arguments) -> tuple[int, list[dict]]:
    code = main(["audit", *arguments])
    output = capsys.readouterr().out
    return code, [json.loads(line) for line in output.splitlines() if line.strip()]


@pytest.mark.parametrize("make_input", [make_maildir, make_mbox, make_folder])
def test_audit_finds_bypassed_messages(tmp_path, capsys, config_file, make_input):
    code, records = run_audit(capsys, "--config", str(config_file), "--format", "json", str(make_input(tmp_path)))

    assert code == 1
    assert len(records) == TOTAL
    assert sum(record["stamp"] == "missing" for record in records) == len(BYPASSED)
    assert sum(record["stamp"] == "valid" for record in records) == TOTAL - len(BYPASSED)
    assert sum(record["org_sender_unauthenticated"] for record in records) == len(BYPASSED)


def test_audit_reports_received_path(tmp_path, capsys, config_file):
    path = tmp_path / "one.eml"
    path.write_bytes(delivered(0, bypassed=True))

    _code, records = run_audit(capsys, "--config", str(config_file), "--format", "json", str(path))

    assert records[0]["received_path"] == [
        {"from": "attacker.example.net", "ip": "203.0.113.45", "by": "tenant.mail.protection.example"}]


def test_audit_all_stamped_exit_zero(tmp_path, capsys, config_file):
    folder = tmp_path / "eml"
    folder.mkdir()
    for index in range(3):
        (folder / f"{index}.eml").write_bytes(delivered(index, bypassed=False))

    code, records = run_audit(capsys, "--config", str(config_file), "--format", "json", str(folder))

    assert code == 0
    assert [record["stamp"] for record in records] == ["valid"] * 3


def test_audit_text_format_one_line_each(tmp_path, capsys, config_file):
    code = main(["audit", "--config", str(config_file), str(make_folder(tmp_path))])
    lines = capsys.readouterr().out.splitlines()

    assert code == 1
    assert len(lines) == TOTAL
    assert sum("org-sender-unauthenticated" in line for line in lines) == len(BYPASSED)


def test_audit_missing_input_exit_two(tmp_path, capsys, config_file):
    code = main(["audit", "--config", str(config_file), str(tmp_path / "absent.eml")])

    assert code == 2


def test_audit_without_secret_exit_two(tmp_path, capsys):
    path = tmp_path / "one.eml"
    path.write_bytes(delivered(0, bypassed=False))

    code = main(["audit", str(path)])

    assert code == 2
    assert "[stamp] secret" in capsys.readouterr().err
