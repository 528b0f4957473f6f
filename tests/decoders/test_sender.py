from __future__ import annotations

import ipaddress

import pytest

from quishguard.decoders.sender import judge_sender, received_client_ip
from quishguard.model import Envelope, OrgPolicy

ORG = OrgPolicy(
    domains=("example.org",),
    trusted_networks=(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8:aaaa::/48")),
    authserv_ids=("mx.example.org",),
)

# Top to bottom as in a message: our gateway's hop (from a trusted relay),
# the relay's hop (from the outside sender), then a header the sender forged.
RECEIVED_INTERNAL = "from relay.example.org (relay.example.org [10.0.0.5]) by mx.example.org (Postfix) with ESMTP id A1"
RECEIVED_BOUNDARY = "from mail.sender.test (mail.sender.test [198.51.100.7]) by relay.example.org with ESMTPS id B2"
RECEIVED_FORGED = "from forged.test ([203.0.113.99]) by mail.sender.test with SMTP id C3"

AR_TRUSTED = "mx.example.org; spf=pass smtp.mailfrom=sender.test; dmarc=pass header.from=sender.test"
AR_FORGED = "mx.example.org; dmarc=pass header.from=example.org"


def envelope(client_ip: str | None = None, xforward_addr: str | None = None) -> Envelope:
    return Envelope("bounce@sender.test", ("user@example.org",), client_ip=client_ip, xforward_addr=xforward_addr)


def standard_headers() -> list[tuple[str, str]]:
    return [
        ("Authentication-Results", AR_TRUSTED),
        ("Received", RECEIVED_INTERNAL),
        ("Received", RECEIVED_BOUNDARY),
        ("Authentication-Results", AR_FORGED),
        ("Received", RECEIVED_FORGED),
        ("From", "Sender <Someone@Sender.TEST>"),
    ]


@pytest.mark.parametrize(
    ("from_value", "address", "domain"),
    [
        ("Sender <Someone@Sender.TEST>", "Someone@sender.test", "sender.test"),
        ("plain@example.com", "plain@example.com", "example.com"),
        ('"Bank, Inc." <a@bank.example.>, b@other.example', "a@bank.example", "bank.example"),
        ("Undisclosed recipients:;", None, None),
        ("<<<@@@>>>", None, None),
    ],
)
def test_sender_from_address_parsing(from_value, address, domain):
    facts = judge_sender([("From", from_value)], envelope(), ORG)

    assert facts.from_address == address
    assert facts.from_domain == domain


def test_sender_missing_from_header():
    facts = judge_sender([], envelope(), ORG)

    assert (facts.from_address, facts.from_domain) == (None, None)
    assert (facts.original_ip, facts.ip_source) == (None, "unknown")


def test_sender_untrusted_client_is_original():
    facts = judge_sender(standard_headers(), envelope(client_ip="192.0.2.10"), ORG)

    assert (facts.original_ip, facts.ip_source) == ("192.0.2.10", "client")
    assert facts.trusted_auth_results == ()
    assert facts.trusted_dmarc_pass is False


def test_sender_xforward_from_trusted_client():
    facts = judge_sender(standard_headers(), envelope(client_ip="10.0.0.2", xforward_addr="198.51.100.7"), ORG)

    assert (facts.original_ip, facts.ip_source) == ("198.51.100.7", "xforward")
    assert facts.trusted_auth_results == (AR_TRUSTED,)
    assert facts.trusted_dmarc_pass is True


def test_sender_xforward_ipv6_prefix():
    facts = judge_sender([], envelope(client_ip="10.0.0.2", xforward_addr="IPV6:2001:db8:1::5"), ORG)

    assert (facts.original_ip, facts.ip_source) == ("2001:db8:1::5", "xforward")


def test_sender_xforward_ignored_from_untrusted_client():
    facts = judge_sender(standard_headers(), envelope(client_ip="192.0.2.10", xforward_addr="10.9.9.9"), ORG)

    assert (facts.original_ip, facts.ip_source) == ("192.0.2.10", "client")


def test_sender_xforward_unavailable_walks_received():
    facts = judge_sender(standard_headers(), envelope(client_ip="10.0.0.2", xforward_addr="[UNAVAILABLE]"), ORG)

    assert (facts.original_ip, facts.ip_source) == ("198.51.100.7", "received")


def test_sender_received_walk_skips_trusted_hops():
    facts = judge_sender(standard_headers(), envelope(client_ip="10.0.0.2"), ORG)

    assert (facts.original_ip, facts.ip_source) == ("198.51.100.7", "received")
    assert facts.trusted_auth_results == (AR_TRUSTED,)
    assert facts.trusted_dmarc_pass is True


def test_sender_scan_mode_walks_received():
    facts = judge_sender(standard_headers(), envelope(), ORG)

    assert (facts.original_ip, facts.ip_source) == ("198.51.100.7", "received")
    assert facts.trusted_dmarc_pass is True


def test_sender_forged_results_below_boundary_ignored():
    headers = [
        ("Received", RECEIVED_INTERNAL),
        ("Received", RECEIVED_BOUNDARY),
        ("Authentication-Results", AR_FORGED),
        ("Received", RECEIVED_FORGED),
    ]
    facts = judge_sender(headers, envelope(), ORG)

    assert facts.trusted_auth_results == ()
    assert facts.trusted_dmarc_pass is False


def test_sender_foreign_authserv_id_ignored():
    headers = [
        ("Authentication-Results", "mx.other.example; dmarc=pass header.from=sender.test"),
        ("Received", RECEIVED_BOUNDARY),
    ]
    facts = judge_sender(headers, envelope(), ORG)

    assert facts.trusted_auth_results == ()
    assert facts.trusted_dmarc_pass is False


@pytest.mark.parametrize(
    ("value", "passes"),
    [
        ("mx.example.org; dmarc=pass (p=reject) header.from=sender.test", True),
        ("MX.Example.ORG 1; DMARC=Pass header.from=sender.test", True),
        ("mx.example.org (comment); spf=pass; dmarc=fail header.from=sender.test", False),
        ("mx.example.org; spf=pass smtp.mailfrom=sender.test", False),
        ("mx.example.org; arc=pass; dkim=pass (comment dmarc=pass)", False),
    ],
)
def test_sender_trusted_dmarc_results(value, passes):
    headers = [("Authentication-Results", value), ("Received", RECEIVED_BOUNDARY)]
    facts = judge_sender(headers, envelope(), ORG)

    assert facts.trusted_auth_results == (value,)
    assert facts.trusted_dmarc_pass is passes


def test_sender_all_internal_trusts_nothing():
    headers = [("Authentication-Results", AR_TRUSTED), ("Received", RECEIVED_INTERNAL)]
    facts = judge_sender(headers, envelope(), ORG)

    assert (facts.original_ip, facts.ip_source) == (None, "unknown")
    assert facts.trusted_auth_results == ()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("from mail.sender.test (mail.sender.test [198.51.100.7]) by mx.example.org", "198.51.100.7"),
        ("from [203.0.113.1] (unknown [198.51.100.8]) by mx.example.org", "198.51.100.8"),
        ("from rdns.sender.test ([198.51.100.9] helo=[203.0.113.1]) by mx.example.org", "198.51.100.9"),
        ("from [198.51.100.10] (helo=[203.0.113.1]) by mx.example.org with esmtp", "198.51.100.10"),
        ("from AM0PR01MB1.eurprd01.prod.example.com (2001:db8:5::21) by AM0PR01MB2 with Microsoft SMTP", "2001:db8:5::21"),
        ("from mail.sender.test (mail.sender.test [IPv6:2001:db8:7::1]) by mx", "2001:db8:7::1"),
        ("from host ([::ffff:198.51.100.11]) by mx", "198.51.100.11"),
        ("by mx.example.org (Postfix, from userid 1000) id 1", None),
        ("from localhost (localhost) by mx.example.org", None),
        ("from host (host [999.1.1.1]) by mx", None),
    ],
)
def test_received_client_ip_formats(value, expected):
    address = received_client_ip(value)

    assert (str(address) if address else None) == expected
