"""Prometheus metrics: send mail through the hop on loopback, then scrape `/metrics`."""

from __future__ import annotations

import io
import os

import aiohttp
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from quishguard.metrics import start_metrics

from .factories import make_message, qr_png
from .smtp_client import send

QR_URL = "https://lure.example.test/verify"


def samples_by_name(text: str) -> dict[tuple[str, tuple], float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


async def scrape(port: int) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            return response.status, response.headers["Content-Type"], await response.text()


@pytest.fixture
async def metrics_for():
    started = []

    async def start(hop, pool):
        server = await start_metrics(hop.config, held_count=hop.store.count,
                                     worker_restarts=lambda: pool.restarts, listen=("127.0.0.1", 0))
        started.append(server)
        return server

    yield start
    for server in started:
        await server.close()


async def test_metrics_scrape_after_messages(start_hop, next_hop, pool, metrics_for):
    hop = await start_hop(thresholds={"tag": 2.0, "quarantine": 4.0})
    server = await metrics_for(hop, pool)
    qr = make_message(subject="Scan me", text="Scan.\n", images=[("c.png", qr_png(QR_URL))])

    await send(hop.port, make_message(subject="first"))
    await send(hop.port, make_message(subject="second"))
    await send(hop.port, qr)
    status, content_type, text = await scrape(server.address[1])

    values = samples_by_name(text)
    assert status == 200
    assert content_type.startswith("text/plain; version=")
    assert values[("quishguard_messages_total", (("action", "accept"),))] == 2
    assert values[("quishguard_messages_total", (("action", "quarantine"),))] == 1
    assert values[("quishguard_messages_total", (("action", "reject"),))] == 0
    assert values[("quishguard_findings_total", (("rule", "QR_URL"),))] == 1
    assert values[("quishguard_quarantine_messages", ())] == 1
    assert values[("quishguard_relay_errors_total", ())] == 0
    assert values[("quishguard_scans_incomplete_total", ())] == 0
    assert values[("quishguard_worker_restarts_total", ())] == pool.restarts


async def test_metrics_scan_duration_per_stage(start_hop, pool, metrics_for):
    hop = await start_hop()
    server = await metrics_for(hop, pool)

    await send(hop.port, make_message())
    _, _, text = await scrape(server.address[1])

    values = samples_by_name(text)
    for stage in ("decode", "sender", "rules", "total"):
        assert values[("quishguard_scan_duration_seconds_count", (("stage", stage),))] == 1
    assert values[("quishguard_scan_duration_seconds_bucket", (("le", "+Inf"), ("stage", "total")))] == 1


async def test_metrics_relay_error_counted(start_hop, next_hop, pool, metrics_for):
    hop = await start_hop()
    server = await metrics_for(hop, pool)
    next_hop.data_reply = "451 4.3.0 Mailbox busy"

    _, reply = await send(hop.port, make_message())
    _, _, text = await scrape(server.address[1])

    assert reply[0] == 451
    assert samples_by_name(text)[("quishguard_relay_errors_total", ())] == 1


async def test_metrics_openmetrics_negotiated(start_hop, pool, metrics_for):
    hop = await start_hop()
    server = await metrics_for(hop, pool)
    accept = "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"

    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{server.address[1]}/metrics",
                               headers={"Accept": accept}) as response:
            text = await response.text()
            content_type = response.headers["Content-Type"]

    assert content_type.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")


def noise_png(side: int) -> bytes:
    """A random-noise PNG that takes the QR decoders far longer than 0.1 s."""
    buffer = io.BytesIO()
    Image.frombytes("L", (side, side), os.urandom(side * side)).save(buffer, format="PNG")
    return buffer.getvalue()


async def test_metrics_scan_cut_short_counted(start_hop, pool, metrics_for):
    hop = await start_hop(scan={"budget_seconds": 0.1})
    server = await metrics_for(hop, pool)
    restarts = pool.restarts
    slow = make_message(text="see attachment", attachments=[("noise.png", "image/png", noise_png(3000))])

    await send(hop.port, slow)
    _, _, text = await scrape(server.address[1])

    values = samples_by_name(text)
    assert values[("quishguard_scans_incomplete_total", ())] == 1
    assert values[("quishguard_findings_total", (("rule", "SCAN_INCOMPLETE"),))] == 1
    # The worker that overran the budget was killed and replaced.
    assert values[("quishguard_worker_restarts_total", ())] == restarts + 1
