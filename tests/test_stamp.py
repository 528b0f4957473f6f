"""Verdict headers and header edits on raw message bytes."""

from __future__ import annotations

import email
from email.header import decode_header, make_header

from quishguard.model import Action, Finding, QrCode, Verdict
from quishguard.stamp import defang, edit_message, stamp_message, verdict_headers

RAW = (b"From: a@example.net\r\nTo: b@example.com\r\nSubject: Hello\r\n"
       b"X-Quishguard-Score: -50\r\nX-QUISHGUARD-Action:\r\n accept\r\n\r\nBody line\r\n.dot\r\n")


def verdict(**kwargs) -> Verdict:
    values = dict(score=9.25, action=Action.QUARANTINE, findings=(), qr_codes=(), urls=())
    values.update(kwargs)
    return Verdict(**values)


def test_defang_schemes():
    assert defang("https://a.example.org/x") == "hxxps://a.example.org/x"
    assert defang("HTTP://a.example.org") == "HxxP://a.example.org"
    assert defang("mailto:x@example.org") == "mailto:x@example.org"


def test_score_one_decimal():
    fields = verdict_headers(verdict(), "X-Q-")

    assert fields[0] == b"X-Q-Score: 9.2\r\n"
    assert fields[1] == b"X-Q-Action: quarantine\r\n"
    assert fields[2] == b"X-Q-Findings: none\r\n"


def test_findings_folded_under_78():
    findings = tuple(Finding(f"RULE_NUMBER_{i:02d}", 10.0 - i * 0.5, "d") for i in range(12))

    field = verdict_headers(verdict(findings=findings), "X-Quishguard-")[2]

    lines = field.decode().split("\r\n")[:-1]
    assert len(lines) > 1
    assert all(len(line) <= 78 for line in lines)
    assert all(line.startswith(" ") for line in lines[1:])
    unfolded = email.message_from_bytes(field + b"\r\n")["X-Quishguard-Findings"]
    assert "RULE_NUMBER_00=10.0, RULE_NUMBER_01=9.5" in unfolded.replace("\r\n", "")


def test_qr_header_defanged_truncated_clean():
    payload = "https://evil.example.org/\r\nBcc: victim@example.com/" + "a" * 400
    code = QrCode(payload, "message > part 1", "inline-image", "zxing")

    field = verdict_headers(verdict(qr_codes=(code,)), "X-Quishguard-")[3]

    value = field.decode().split(": ", 1)[1].rstrip("\r\n")
    assert value.startswith("hxxps://evil.example.org/Bcc: victim@example.com/")
    assert "\r" not in value and "\n" not in value
    assert len(value) == 200


def test_non_ascii_payload_rfc2047():
    code = QrCode("https://exämple.org/päy", "message > part 1", "inline-image", "zxing")

    field = verdict_headers(verdict(qr_codes=(code,)), "X-Quishguard-")[3]

    assert field.isascii()
    value = email.message_from_bytes(field + b"\r\n")["X-Quishguard-QR"]
    assert str(make_header(decode_header(value))) == "hxxps://exämple.org/päy"


def test_edit_removes_prefixed_headers_keeps_body():
    edited = edit_message(RAW, prefix="X-Quishguard-", added=[b"X-Quishguard-Score: 1.0\r\n"])

    assert edited.startswith(b"X-Quishguard-Score: 1.0\r\nFrom: a@example.net\r\n")
    assert b"-50" not in edited
    assert b"accept" not in edited
    assert edited.endswith(b"\r\n\r\nBody line\r\n.dot\r\n")


def test_subject_tag_prefixes_existing():
    edited = stamp_message(RAW, verdict(action=Action.TAG), prefix="X-Quishguard-", subject_tag="[SUSPICIOUS] ")

    assert email.message_from_bytes(edited)["Subject"] == "[SUSPICIOUS] Hello"


def test_subject_tag_adds_missing_subject():
    raw = b"From: a@example.net\r\n\r\nbody\r\n"

    edited = stamp_message(raw, verdict(action=Action.TAG), prefix="X-Q-", subject_tag="[SUSPICIOUS] ")

    assert email.message_from_bytes(edited)["Subject"] == "[SUSPICIOUS]"
    assert edited.endswith(b"\r\n\r\nbody\r\n")


def test_subject_tag_non_ascii_encoded():
    edited = stamp_message(RAW, verdict(action=Action.TAG), prefix="X-Q-", subject_tag="[VERDÄCHTIG] ")

    subject = email.message_from_bytes(edited)["Subject"]
    assert edited.split(b"\r\n\r\n")[0].isascii()
    assert str(make_header(decode_header(subject))) == "[VERDÄCHTIG] Hello"


def test_lf_only_message_split():
    raw = b"Subject: x\nX-Quishguard-Action: accept\n\nbody\n"

    edited = edit_message(raw, prefix="X-Quishguard-", added=[])

    assert edited == b"Subject: x\n\nbody\n"
