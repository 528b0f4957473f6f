"""The Stamp header: it survives downstream rewriting of the body and headers, and fails when moved or altered."""

from __future__ import annotations

import base64
import re

import pytest

from quishguard.config import build_config
from quishguard.model import Action, AuthCheck, AuthFacts, Verdict
from quishguard.scoring.rules import RULES
from quishguard.stamp import relay_copy, split_message, stamp_field, verify_stamp

from .factories import make_message

SECRET = b"correct horse battery staple"
PREFIX = "X-Quishguard-"
RECIPIENTS = ("bob@example.com", "carol@example.com")


def stamped(raw: bytes, recipients=RECIPIENTS, action: str = "accept") -> bytes:
    return stamp_field(raw, recipients, action, SECRET, PREFIX, now=1_790_000_000) + raw


def reencoded(raw: bytes) -> bytes:
    """Return a copy as a mailbox export makes it: headers refolded, body re-encoded to base64."""
    block, body = split_message(raw)
    unfolded = re.sub(rb"\r\n[ \t]+", b" ", block)
    refolded = re.sub(rb"(Date|From|Message-ID): ", rb"\1:\r\n    ", unfolded)
    refolded = refolded.replace(b"Content-Transfer-Encoding: 7bit", b"Content-Transfer-Encoding: base64")
    if b"Content-Transfer-Encoding: base64" not in refolded:
        refolded = refolded[:-2] + b"Content-Transfer-Encoding: base64\r\n\r\n"
    return refolded + base64.encodebytes(body).replace(b"\n", b"\r\n")


def test_stamp_round_trip_valid():
    check = verify_stamp(stamped(make_message()), SECRET, PREFIX, ["bob@example.com"])

    assert check.status == "valid"
    assert check.action == "accept"
    assert check.timestamp == 1_790_000_000


def test_stamp_reencoded_copy_valid():
    copy = reencoded(stamped(make_message()))

    assert copy.count(b"Hello Bob") == 0
    assert verify_stamp(copy, SECRET, PREFIX).status == "valid"


def test_stamp_moved_to_other_message_invalid():
    original = stamped(make_message(subject="Invoice 1"))
    stamp_header = re.match(rb"X-Quishguard-Stamp:.*?\r\n(?![ \t])", original, re.DOTALL).group(0)
    other = make_message(subject="Invoice 2", sender="mallory@example.net")

    assert verify_stamp(stamp_header + other, SECRET, PREFIX).status == "invalid"


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"a=accept", b"a=tag"),
        (b"t=1790000000", b"t=1790000001"),
        (b"Date: Mon, 02 Nov 2026", b"Date: Tue, 03 Nov 2026"),
        (b"alice@example.net", b"ceo@example.com"),
    ],
)
def test_stamp_tampered_invalid(old, new):
    raw = stamped(make_message())
    assert old in raw

    check = verify_stamp(raw.replace(old, new, 1), SECRET, PREFIX)

    assert check.status == "invalid"


def test_stamp_other_recipient_invalid():
    check = verify_stamp(stamped(make_message()), SECRET, PREFIX, ["mallory@example.com"])

    assert check.status == "invalid"
    assert "recipients" in check.reason


def test_stamp_wrong_secret_invalid():
    assert verify_stamp(stamped(make_message()), b"another secret value", PREFIX).status == "invalid"


def test_stamp_absent_missing():
    assert verify_stamp(make_message(), SECRET, PREFIX).status == "missing"


def test_stamp_hides_recipients():
    raw = stamped(make_message())

    assert b"carol" not in split_message(raw)[0].split(b"From:")[0]


def hop_config(**stamp):
    return build_config({"stamp": stamp, "auth": {"authserv_id": "hop.example.com"}}, "test",
                        known_rules={rule.name for rule in RULES})


VERDICT = Verdict(score=0.0, action=Action.ACCEPT, findings=(), qr_codes=(), urls=())
AUTH = AuthFacts(checks=(AuthCheck("spf", "pass", (("smtp.mailfrom", "alice@example.net"),)),
                         AuthCheck("dmarc", "pass", (("header.from", "example.net"),))), dmarc="pass")


def test_relay_copy_adds_results_and_stamp():
    raw = make_message(headers={"Authentication-Results": "hop.example.com; dmarc=pass header.from=example.com"})

    relayed = relay_copy(raw, VERDICT, AUTH, RECIPIENTS, hop_config(secret="s" * 20))
    headers = re.sub(rb"\r\n[ \t]+", b" ", split_message(relayed)[0])

    assert headers.count(b"Authentication-Results: hop.example.com;") == 1
    assert b"dmarc=pass header.from=example.com" not in headers
    assert b"spf=pass smtp.mailfrom=alice@example.net" in headers
    assert verify_stamp(relayed, b"s" * 20, PREFIX, ["bob@example.com"]).status == "valid"
    assert split_message(relayed)[1] == split_message(raw)[1]


def test_relay_copy_without_secret_no_stamp():
    relayed = relay_copy(make_message(), VERDICT, None, RECIPIENTS, hop_config())

    assert b"Stamp:" not in relayed
    assert b"Authentication-Results" not in relayed
