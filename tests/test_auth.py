"""SPF, DKIM, DMARC and ARC against a real DNS server on loopback, with keys generated per test run."""

from __future__ import annotations

import base64
import time

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from quishguard.decoders.auth import check_arc, check_dkim, evaluate_auth, microsoft_evidence
from quishguard.decoders.spf import check_spf
from quishguard.dns_resolver import DnsResolver
from quishguard.model import Envelope, OrgPolicy, SenderFacts

from .dns_server import LoopbackDns, Zone

ORG_IP = "192.0.2.10"
OUTSIDE_IP = "203.0.113.45"
QUERY_TIMEOUT = 0.3


def generate_key() -> tuple[bytes, str]:
    """Return a 1024-bit RSA private key (PEM) and its DKIM key record."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode('ascii')}"


KEY, KEY_RECORD = generate_key()
OTHER_KEY, OTHER_KEY_RECORD = generate_key()


def build_zone() -> Zone:
    zone = Zone(silent_delay=1.5)
    # The organisation: SPF for its own network, DKIM, DMARC p=reject.
    zone.add("example.com", "TXT", "v=spf1 ip4:192.0.2.0/24 include:spf.partner.test -all")
    zone.add("spf.partner.test", "TXT", "v=spf1 a:out.partner.test mx -all")
    zone.add("out.partner.test", "A", "198.51.100.20")
    zone.add("spf.partner.test", "MX", "mx.partner.test")
    zone.add("mx.partner.test", "A", "198.51.100.25")
    zone.add("sel._domainkey.example.com", "TXT", KEY_RECORD)
    zone.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject; rua=mailto:dmarc@example.com")
    # Policies of other test domains.
    zone.add("none.test", "TXT", "v=spf1 ip4:192.0.2.0/24 ~all")
    zone.add("_dmarc.none.test", "TXT", "v=DMARC1; p=none")
    zone.add("quarantine.test", "TXT", "v=spf1 ip4:192.0.2.0/24 ?all")
    zone.add("_dmarc.quarantine.test", "TXT", "v=DMARC1; p=quarantine")
    zone.add("softfail.test", "TXT", "v=spf1 ~all")
    zone.add("redirect.test", "TXT", "v=spf1 redirect=example.com")
    zone.add("macro.test", "TXT", "v=spf1 exists:%{i}.allow.macro.test -all")
    zone.add(f"{ORG_IP}.allow.macro.test", "A", "127.0.0.2")
    zone.add("twice.test", "TXT", "v=spf1 -all", "v=spf1 +all")
    zone.add("loop.test", "TXT", "v=spf1 include:loop.test -all")
    zone.add("mail.example.com", "TXT", "v=spf1 a -all")
    zone.add("mail.example.com", "A", ORG_IP)
    # A mailing list that seals with ARC.
    zone.add("arc._domainkey.lists.example.net", "TXT", OTHER_KEY_RECORD)
    zone.servfail.add("broken.test")
    zone.servfail.add("_dmarc.broken.test")
    zone.servfail.add("sel._domainkey.broken.test")
    zone.silent.add("slow.test")
    return zone


@pytest.fixture(scope="module")
def dns_server():
    server = LoopbackDns(build_zone())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def lookup(dns_server):
    return DnsResolver((dns_server.address,), timeout=QUERY_TIMEOUT, budget=3.0).lookup()


# ---- SPF -----------------------------------------------------------------

@pytest.mark.parametrize(
    ("ip", "mail_from", "helo", "expected"),
    [
        (ORG_IP, "alice@example.com", "", "pass"),
        (OUTSIDE_IP, "alice@example.com", "", "fail"),
        ("198.51.100.20", "alice@example.com", "", "pass"),   # include, a mechanism
        ("198.51.100.25", "alice@example.com", "", "pass"),   # include, mx mechanism
        (OUTSIDE_IP, "alice@softfail.test", "", "softfail"),
        (OUTSIDE_IP, "alice@quarantine.test", "", "neutral"),
        (OUTSIDE_IP, "alice@broken.test", "", "temperror"),
        (OUTSIDE_IP, "alice@slow.test", "", "temperror"),
        (OUTSIDE_IP, "alice@nonexistent.test", "", "none"),
        (ORG_IP, "alice@redirect.test", "", "pass"),
        (ORG_IP, "alice@macro.test", "", "pass"),
        (OUTSIDE_IP, "alice@macro.test", "", "fail"),
        (ORG_IP, "alice@twice.test", "", "permerror"),
        (ORG_IP, "alice@loop.test", "", "permerror"),
        (ORG_IP, "", "mail.example.com", "pass"),              # null sender: HELO identity
        (OUTSIDE_IP, "", "mail.example.com", "fail"),
    ],
)
def test_spf_results(lookup, ip, mail_from, helo, expected):
    result = check_spf(ip, mail_from, helo, lookup)

    assert result.result == expected, result.reason


def test_spf_temperror_within_budget(dns_server):
    lookup = DnsResolver((dns_server.address,), timeout=QUERY_TIMEOUT, budget=0.5).lookup()
    started = time.monotonic()

    result = check_spf(OUTSIDE_IP, "alice@slow.test", "", lookup)

    assert result.result == "temperror"
    assert time.monotonic() - started < 1.0


def test_spf_unreachable_resolver_temperror():
    # Port 9 (discard) on loopback: nothing answers, so every query times out.
    lookup = DnsResolver(("127.0.0.1:9",), timeout=0.2, budget=0.4).lookup()

    result = check_spf(OUTSIDE_IP, "alice@example.com", "", lookup)

    assert result.result == "temperror"


# ---- DKIM ----------------------------------------------------------------

BODY = b"Hello Bob,\r\n\r\nthe quarterly report is ready.\r\n"


def message(from_address: str = "alice@example.com", body: bytes = BODY, extra: bytes = b"") -> bytes:
    return (b"From: Alice <" + from_address.encode() + b">\r\nTo: bob@example.org\r\n"
            b"Subject: Quarterly report\r\nDate: Mon, 02 Nov 2026 09:30:00 +0000\r\n"
            b"Message-ID: <q3@example.com>\r\n" + extra + b"\r\n" + body)


def signed(raw: bytes, domain: bytes = b"example.com", length: bool = False) -> bytes:
    signature = dkim.sign(raw, b"sel", domain, KEY, include_headers=[b"from", b"to", b"subject", b"date"],
                          length=length)
    return signature + raw


def test_dkim_valid_signature_passes(lookup):
    results = check_dkim(signed(message()), lookup)

    assert [r.result for r in results] == ["pass"]
    assert dict(results[0].properties)["header.d"] == "example.com"


def test_dkim_altered_body_fails(lookup):
    raw = signed(message()).replace(b"quarterly report", b"payroll update")

    results = check_dkim(raw, lookup)

    assert [r.result for r in results] == ["fail"]


def test_dkim_body_length_partial_not_pass(lookup):
    raw = signed(message(), length=True) + b"\r\nScan the code to keep your mailbox: attacker text\r\n"

    results = check_dkim(raw, lookup)

    assert [r.result for r in results] == ["policy"]
    assert "covers" in results[0].reason


def test_dkim_body_length_whole_body_passes(lookup):
    results = check_dkim(signed(message(), length=True), lookup)

    assert [r.result for r in results] == ["pass"]


def test_dkim_missing_key_permerror(lookup):
    raw = signed(message(from_address="alice@none.test"), domain=b"none.test")

    results = check_dkim(raw, lookup)

    assert [r.result for r in results] == ["permerror"]


def test_dkim_dns_failure_temperror(lookup):
    raw = signed(message(from_address="alice@broken.test"), domain=b"broken.test")

    results = check_dkim(raw, lookup)

    assert [r.result for r in results] == ["temperror"]


def test_dkim_unsigned_message_no_results(lookup):
    assert check_dkim(message(), lookup) == []


# ---- DMARC ---------------------------------------------------------------

def sender_facts(raw_from: str, ip: str) -> SenderFacts:
    return SenderFacts(from_address=raw_from, from_domain=raw_from.rpartition("@")[2], original_ip=ip,
                       ip_source="client")


@pytest.mark.parametrize(
    ("from_address", "ip", "sign_domain", "dmarc", "policy"),
    [
        ("alice@example.com", ORG_IP, None, "pass", "reject"),           # aligned SPF
        ("alice@example.com", OUTSIDE_IP, b"example.com", "pass", "reject"),  # aligned DKIM
        ("alice@example.com", OUTSIDE_IP, None, "fail", "reject"),
        ("alice@none.test", OUTSIDE_IP, None, "fail", "none"),
        ("alice@quarantine.test", OUTSIDE_IP, None, "fail", "quarantine"),
        ("alice@none.test", ORG_IP, None, "pass", "none"),
        ("alice@softfail.test", OUTSIDE_IP, None, "none", None),           # no DMARC record
        ("alice@broken.test", OUTSIDE_IP, None, "temperror", None),
        ("alice@mail.example.com", OUTSIDE_IP, b"example.com", "pass", "reject"),  # relaxed, org record
    ],
)
def test_dmarc_results(lookup, from_address, ip, sign_domain, dmarc, policy):
    raw = message(from_address=from_address)
    if sign_domain:
        raw = signed(raw, domain=sign_domain)
    envelope = Envelope(mail_from=from_address, rcpt_tos=("bob@example.org",), client_ip=ip)

    auth = evaluate_auth(raw, sender_facts(from_address, ip), envelope, OrgPolicy(), lookup)

    assert auth.dmarc == dmarc, auth.checks
    assert auth.dmarc_policy == policy


def test_dmarc_unaligned_dkim_fails(lookup):
    # A valid signature of another domain does not vouch for the From domain.
    raw = signed(message(from_address="alice@quarantine.test"), domain=b"example.com")
    envelope = Envelope(mail_from="bounce@example.net", rcpt_tos=("bob@example.org",), client_ip=OUTSIDE_IP)

    auth = evaluate_auth(raw, sender_facts("alice@quarantine.test", OUTSIDE_IP), envelope, OrgPolicy(), lookup)

    assert auth.dmarc == "fail"
    assert auth.result("dkim").result == "pass"


# ---- ARC -----------------------------------------------------------------

def arc_sealed(raw: bytes, dmarc: str = "pass") -> bytes:
    with_results = b"Authentication-Results: lists.example.net; dmarc=" + dmarc.encode() + \
        b" header.from=example.com\r\n" + raw
    seal = dkim.arc_sign(with_results, b"arc", b"lists.example.net", OTHER_KEY, b"lists.example.net")
    return b"".join(seal) + with_results


TRUSTING = OrgPolicy(arc_trusted_sealers=("lists.example.net",))


def test_arc_trusted_sealer_passes(lookup):
    check, dmarc_pass = check_arc(arc_sealed(message()), TRUSTING, lookup)

    assert check.result == "pass"
    assert dmarc_pass is True


def test_arc_untrusted_sealer_not_believed(lookup):
    check, dmarc_pass = check_arc(arc_sealed(message()), OrgPolicy(), lookup)

    assert check.result == "pass"
    assert dmarc_pass is False
    assert "not in [auth] arc_trusted_sealers" in check.reason


def test_arc_trusted_sealer_reports_fail(lookup):
    check, dmarc_pass = check_arc(arc_sealed(message(), dmarc="fail"), TRUSTING, lookup)

    assert check.result == "pass"
    assert dmarc_pass is False


def test_arc_altered_message_fails(lookup):
    raw = arc_sealed(message()).replace(b"quarterly report", b"payroll update")

    check, dmarc_pass = check_arc(raw, TRUSTING, lookup)

    assert check.result == "fail"
    assert dmarc_pass is False


def test_arc_unsealed_message_none(lookup):
    check, _ = check_arc(message(), TRUSTING, lookup)

    assert check.result == "none"


def test_arc_rescues_forwarded_dmarc(lookup):
    # The list changed the body, so DKIM broke; the trusted seal vouches for the original.
    raw = arc_sealed(signed(message()).replace(b"quarterly report", b"[list] quarterly report"))
    envelope = Envelope(mail_from="list-bounce@lists.example.net", rcpt_tos=("bob@example.org",),
                        client_ip=OUTSIDE_IP)

    auth = evaluate_auth(raw, sender_facts("alice@example.com", OUTSIDE_IP), envelope, TRUSTING, lookup)

    assert auth.dmarc == "fail"
    assert auth.arc_dmarc_pass is True


# ---- Microsoft 365 headers -----------------------------------------------

MICROSOFT_HEADERS = [
    ("Authentication-Results", "spf=fail (sender IP is 203.0.113.45) smtp.mailfrom=example.com; "
                               "dmarc=fail action=none header.from=example.com;compauth=fail reason=601"),
    ("X-MS-Exchange-Organization-AuthAs", "Anonymous"),
    ("X-Forefront-Antispam-Report", "CIP:203.0.113.45;CTRY:;LANG:en;SCL:5;SRV:;IPV:NLI;SFV:SPM;CAT:SPOOF;"),
]
MICROSOFT_NET = OrgPolicy(microsoft_networks=(__import__("ipaddress").ip_network("40.107.0.0/16"),))


def test_microsoft_headers_counted_from_connector():
    facts = microsoft_evidence(MICROSOFT_HEADERS, sender_facts("alice@example.com", "40.107.22.5"), MICROSOFT_NET)

    assert facts.counted is True
    assert facts.auth_as == "anonymous"
    assert facts.category == "spoof"
    assert facts.compauth_reason == "601"
    assert "CAT:SPOOF" in facts.spoof


def test_microsoft_headers_ignored_elsewhere():
    facts = microsoft_evidence(MICROSOFT_HEADERS, sender_facts("alice@example.com", OUTSIDE_IP), MICROSOFT_NET)

    assert facts.counted is False
    assert facts.spoof == ""
    assert OUTSIDE_IP in facts.note


def test_microsoft_headers_absent_none():
    assert microsoft_evidence([("From", "a@example.com")], sender_facts("a@example.com", OUTSIDE_IP),
                              MICROSOFT_NET) is None
