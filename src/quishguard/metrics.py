"""Prometheus metrics of the filter hop, served over HTTP by `quishguard serve`.

`Metrics` listens to the verdict events (see `events.emit_verdict`) and
counts messages by action, findings by rule, relay errors and incomplete
scans, and observes the scan time of each pipeline stage. The quarantine size
and the worker restarts are read when Prometheus scrapes, so they are never
stale. The endpoint serves `/metrics` on `[metrics] listen` in the format
the scraper's Accept header requests (Prometheus text or OpenMetrics); it has
no authentication, so bind it to loopback or a monitoring network only.

Metric names follow the Prometheus naming guide: a `quishguard_` prefix,
base units (seconds), and `_total` on counters.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from .config import Config, parse_host_port
from .events import VerdictEvent, add_listener, remove_listener
from .model import Action
from .web import serve_runner

log = logging.getLogger(__name__)

STAGES = ("decode", "sender", "rules", "total")

# Scan times range from a few milliseconds (plain text) to the scan budget
# (15 s by default) for large PDFs; the buckets cover both ends.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0)


class _LiveValues(Collector):
    """Reads the quarantine size and the worker restarts at scrape time."""

    def __init__(self, held_count: Callable[[], int] | None,
                 worker_restarts: Callable[[], int] | None) -> None:
        self.held_count = held_count
        self.worker_restarts = worker_restarts

    def collect(self) -> Iterator[Metric]:
        if self.held_count is not None:
            try:
                held = self.held_count()
            except Exception:  # noqa: BLE001 - a broken index must not break the scrape
                log.exception("event=metrics_quarantine_count_failed")
            else:
                yield GaugeMetricFamily("quishguard_quarantine_messages",
                                        "Messages held in quarantine now.", value=held)
        if self.worker_restarts is not None:
            yield CounterMetricFamily("quishguard_worker_restarts",
                                      "Decoder worker processes killed or lost and replaced.",
                                      value=self.worker_restarts())


class Metrics:
    """The hop's metrics in their own registry, fed by verdict events."""

    def __init__(self, held_count: Callable[[], int] | None = None,
                 worker_restarts: Callable[[], int] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.messages = Counter("quishguard_messages", "Messages scanned, by the action taken.",
                                ["action"], registry=self.registry)
        self.findings = Counter("quishguard_findings", "Findings, by rule.", ["rule"],
                                registry=self.registry)
        self.scan_duration = Histogram("quishguard_scan_duration_seconds",
                                       "Time spent scanning one message, by pipeline stage.",
                                       ["stage"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.relay_errors = Counter("quishguard_relay_errors",
                                    "Messages to deliver that the next hop did not accept.",
                                    registry=self.registry)
        self.scans_incomplete = Counter("quishguard_scans_incomplete",
                                        "Scans cut short by the scan budget, a crashed decoder "
                                        "or a failed rule.", registry=self.registry)
        self.registry.register(_LiveValues(held_count, worker_restarts))

        # Export every action and stage from the start, so rate() has a 0
        # sample before the first message of a kind.
        for action in Action:
            self.messages.labels(action=action.label)
        for stage in STAGES:
            self.scan_duration.labels(stage=stage)

    def __call__(self, event: VerdictEvent) -> None:
        verdict = event.result.verdict
        self.messages.labels(action=verdict.action.label).inc()
        for finding in verdict.findings:
            self.findings.labels(rule=finding.rule).inc()
        for stage, seconds in event.result.stage_seconds.items():
            self.scan_duration.labels(stage=stage).observe(seconds)
        self.scan_duration.labels(stage="total").observe(event.result.seconds)
        if verdict.scan_incomplete:
            self.scans_incomplete.inc()
        if event.relay_failed:
            self.relay_errors.inc()

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """Return the metrics in the format `accept` (an HTTP Accept header) prefers, and its content type."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type


class MetricsServer:
    """`Metrics` registered as an event listener and served on `/metrics`."""

    def __init__(self, metrics: Metrics, runner: web.AppRunner, address: tuple[str, int]) -> None:
        self.metrics = metrics
        self.runner = runner
        self.address = address

    async def close(self) -> None:
        remove_listener(self.metrics)
        await self.runner.cleanup()


async def start_metrics(config: Config, *, held_count: Callable[[], int] | None = None,
                        worker_restarts: Callable[[], int] | None = None,
                        listen: tuple[str, int] | None = None) -> MetricsServer:
    """Serve the metrics on `listen`, else on `[metrics] listen`, and start counting events."""
    metrics = Metrics(held_count, worker_restarts)

    async def handle_metrics(request: web.Request) -> web.Response:
        # The quarantine count reads SQLite, so the scrape runs off the event loop.
        body, content_type = await asyncio.to_thread(metrics.exposition,
                                                     request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", handle_metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()

    host, port = listen or parse_host_port(config["metrics.listen"])
    bound = await serve_runner(runner, host, port, name="metrics", exposure="no TLS and no login")
    add_listener(metrics)
    return MetricsServer(metrics, runner, bound)
