"""The hop end to end: real SMTP sessions on loopback, DNS from the loopback server, verdicts and added headers."""

from __future__ import annotations

import json
import re

import dkim
import pytest
import pytest_asyncio

from quishguard.dns_resolver import DnsResolver
from quishguard.milter.smtp import start_server
from quishguard.pipeline import Scanner
from quishguard.quarantine import QuarantineStore
from quishguard.stamp import split_message, verify_stamp

from .conftest import make_config
from .dns_server import LoopbackDns, Zone
from .factories import make_message, qr_png
from .smtp_client import send
from .test_auth import KEY, KEY_RECORD

SECRET = "hop stamp secret 0123456789"
HARVEST_URL = "https://login.example.net/o365/verify"
INTRANET_URL = "https://intranet.example.com/canteen/menu"


@pytest.fixture(scope="module")
def dns_server():
    zone = Zone()
    zone.add("example.com", "TXT", "v=spf1 ip4:192.0.2.0/24 -all")
    zone.add("sel._domainkey.example.com", "TXT", KEY_RECORD)
    zone.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject")
    server = LoopbackDns(zone)
    server.start()
    yield server
    server.stop()


@pytest_asyncio.fixture
async def hop(pool, next_hop, tmp_path, dns_server):
    # 127.0.0.1 is outside the trusted networks here, as an internet client would be.
    config = make_config(tmp_path, org={"domains": ["example.com"], "trusted_networks": ["10.0.0.0/8"]},
                         dns={"servers": [dns_server.address], "timeout_seconds": 0.5, "budget_seconds": 2.0},
                         auth={"authserv_id": "hop.example.com"}, stamp={"secret": SECRET})
    store = QuarantineStore(config.data_dir)
    scanner = Scanner(config, pool, resolver=DnsResolver.from_config(config))
    server = await start_server(config, scanner, store, ("127.0.0.1", next_hop.port), ("127.0.0.1", 0))
    yield server.sockets[0].getsockname()[1]
    server.close()


def qr_message(sender: str, url: str, **fields) -> bytes:
    # Enough text that the body is not "image-only".
    text = "Hello,\n\nthe canteen menu for next week is online. " * 6 + "\nScan the code below.\n"
    return make_message(sender=sender, subject="Action required", text=text,
                        images=[("code.png", qr_png(url))], **fields)


async def test_hop_quarantines_spoofed_qr(hop, next_hop):
    _rcpt, (code, text) = await send(hop, qr_message("ceo@example.com", HARVEST_URL), mail_from="ceo@example.com")

    assert code == 250
    assert "quarantine" in text
    assert next_hop.messages == []


async def test_hop_relays_signed_internal_qr(hop, next_hop):
    raw = qr_message("it@example.com", INTRANET_URL,
                     headers={"Authentication-Results": "hop.example.com; dmarc=pass header.from=example.net"})
    raw = dkim.sign(raw, b"sel", b"example.com", KEY, include_headers=[b"from", b"to", b"subject", b"date"]) + raw

    _rcpt, (code, text) = await send(hop, raw, mail_from="it@example.com")
    relayed = next_hop.messages[0].data
    headers = re.sub(rb"\r\n[ \t]+", b" ", split_message(relayed)[0])

    assert code == 250
    assert b"X-Quishguard-Action: accept" in headers
    assert headers.count(b"Authentication-Results: hop.example.com;") == 1
    assert b"dkim=pass" in headers
    assert re.search(rb"dmarc=pass \([^)]*\) header.from=example.com", headers)
    assert b"header.from=example.net" not in headers
    assert verify_stamp(relayed, SECRET.encode(), "X-Quishguard-", ["bob@example.com"]).status == "valid"


@pytest.mark.parametrize(("flags", "evidence"), [(["--dns"], "dmarc=fail (p=reject)"), ([], "no DNS checks")])
def test_scan_dns_flag(tmp_path, capsys, dns_server, flags, evidence):
    from quishguard.cli import main

    config = tmp_path / "quishguard.toml"
    config.write_text(f'[org]\ndomains = ["example.com"]\n\n[dns]\nservers = ["{dns_server.address}"]\n'
                      'timeout_seconds = 0.5\n')
    message = tmp_path / "spoof.eml"
    received = "Received: from mail.attacker.test (mail.attacker.test [203.0.113.45]) by mx.example.com; " \
               "Mon, 2 Nov 2026 09:30:00 +0000\r\n"
    message.write_bytes(received.encode() + make_message(sender="ceo@example.com"))

    code = main(["scan", "--config", str(config), "--format", "json", *flags, str(message)])
    record = json.loads(capsys.readouterr().out)
    details = {finding["rule"]: finding["detail"] for finding in record["findings"]}

    assert code == 0
    assert evidence in details["SENDER_DIRECT_SEND"]
