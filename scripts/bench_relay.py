"""Measure the cost of scanning: quishguard as an SMTP hop against a plain relay.

Every *.eml file below the given folders is sent over loopback through two
hops, one after the other, and both relay to the same counting sink that
runs inside this process:

- plain relay: a minimal aiosmtpd server (this script started again with
  `--plain-relay`) that relays each message to the sink with aiosmtplib and
  replies 250 only after the sink accepted it;
- quishguard: `quishguard serve` with `--relay` to the sink, its own
  temporary `--data-dir`, and thresholds of 1000 so that every message is
  relayed instead of quarantined. The figures measure the cost of scanning,
  not of the actions. Its SPF, DKIM and DMARC lookups go to a stub resolver
  in this process on 127.0.0.1 that replies NXDOMAIN to every query.

Each hop is started as a subprocess on a free 127.0.0.1 port, warmed up with
a few messages, then sent the whole set with `--concurrency` clients. Each
message is its own SMTP session (connect, sendmail, quit) with the fixed
envelope bench@example.net -> inbox@example.com. The script prints, for each
hop, the number of messages, messages per second and the p50 and p95 session
latency, then the throughput ratio quishguard/plain and every message that
failed through quishguard but not through the plain relay.

Usage, from the repository root with the project's virtual environment:

    .venv/bin/python scripts/bench_relay.py                  # corpus beside the repo + samples/
    .venv/bin/python scripts/bench_relay.py samples/ --repeat 5 --json bench.json

This is a benchmark, not a test. It opens no URL from the messages, and
every server and client it starts, quishguard's DNS lookups included, uses
127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import email.parser
import email.policy
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run_facts import code_version, machine_facts

try:
    import aiosmtplib
    from aiosmtpd.smtp import SMTP, Envelope, Session
except ImportError as missing:
    sys.exit(f"bench_relay: {missing.name} is not installed for {sys.executable}; run this script "
             "with the project's virtual environment (.venv/bin/python)")

log = logging.getLogger("bench_relay")

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS_DIR = REPO_ROOT.parent / "shared" / "corpus"
SAMPLES_DIR = REPO_ROOT / "samples"

LOOPBACK = "127.0.0.1"
ENVELOPE_FROM = "bench@example.net"
ENVELOPE_TO = "inbox@example.com"
CLIENT_NAME = "bench-client.example.net"
PLAIN_RELAY_NAME = "plain-relay.example.net"
SINK_NAME = "bench-sink.example.net"

# The sink puts this token in its 250 reply. Both hops pass the next hop's
# reply text back to the client, so a 250 without it means the hop accepted
# the message but did not relay it (a quarantine, for instance).
SINK_MARKER = "bench-sink-stored"
SINK_NUMBER = re.compile(re.escape(SINK_MARKER) + r" #(\d+)")

# Some real messages have lines far over RFC 5321's 1,000 octets, and
# aiosmtpd replies `500 Line too long` to them unless the limit is raised.
MAX_LINE_BYTES = 60 * 1024 * 1024
MAX_MESSAGE_BYTES = 60 * 1024 * 1024

# quishguard's verdict headers, with the default `headers.prefix`.
FINDINGS_HEADER = "x-quishguard-findings"
ACTION_HEADER = "x-quishguard-action"
INCOMPLETE_RULE = "SCAN_INCOMPLETE"

BENCH_CONFIG = """\
# Written by scripts/bench_relay.py. Thresholds of 1000 and fail_mode accept
# make every verdict `accept`, so quishguard relays every message and the
# benchmark measures the cost of scanning, not of quarantining.
[smtp]
hostname = "quishguard-bench.example.net"
max_message_size = {max_message_size}

[scan]
workers = {workers}
fail_mode = "accept"

[dns]
servers = ["127.0.0.1:{dns_port}"]

[stamp]
secret = "bench-relay-stamp-secret"

[thresholds]
tag = 1000.0
quarantine = 1000.0
"""

PLAIN_RELAY_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
LOG_TAIL_LINES = 20


class BenchError(Exception):
    """A failed set-up step; the message names the step and the fix."""


@dataclasses.dataclass(frozen=True)
class Message:
    name: str
    data: bytes


@dataclasses.dataclass(frozen=True)
class Outcome:
    name: str
    seconds: float
    reply: str
    delivered: bool
    sink_number: int | None


@dataclasses.dataclass(frozen=True)
class SinkRecord:
    """Verdict facts the sink read from one relayed copy."""

    action: str | None
    scan_incomplete: bool


@dataclasses.dataclass
class PathFigures:
    """Figures of one hop over the timed run."""

    label: str
    messages: int
    delivered: int
    failed: int
    sink_received: int
    seconds: float
    messages_per_second: float
    latency_p50_ms: float
    latency_p95_ms: float
    latency_mean_ms: float
    latency_max_ms: float
    dns_queries: int
    server_cpu_seconds: float
    server_cpu_ms_per_message: float
    sink_actions: dict[str, int]
    scan_incomplete: list[str]


# The counting sink.

class LongLineSMTP(SMTP):
    line_length_limit = MAX_LINE_BYTES


class CountingSink:
    """aiosmtpd handler that counts what it receives and reads quishguard's verdict headers."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.received = 0
        self.records: dict[int, SinkRecord] = {}

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.received += 1
        headers = _verdict_headers(envelope.original_content or b"")
        self.records[self.received] = SinkRecord(
            headers.get(ACTION_HEADER), INCOMPLETE_RULE in headers.get(FINDINGS_HEADER, ""))
        return f"250 2.0.0 Ok: {SINK_MARKER} #{self.received}"


def _verdict_headers(data: bytes) -> dict[str, str]:
    """Return quishguard's Action and Findings header values of a relayed message, lower-case keys."""
    # quishguard prepends its headers, so the first 64 KiB hold them.
    parsed = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(
        data[:65536], headersonly=True)
    values = {}
    for name in (ACTION_HEADER, FINDINGS_HEADER):
        value = parsed.get(name)
        if value is not None:
            values[name] = " ".join(str(value).split())
    return values


async def start_sink(sink: CountingSink) -> tuple[asyncio.AbstractServer, int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: LongLineSMTP(sink, hostname=SINK_NAME, data_size_limit=MAX_MESSAGE_BYTES,
                             enable_SMTPUTF8=True, loop=loop),
        host=LOOPBACK, port=0)
    return server, server.sockets[0].getsockname()[1]


# The DNS stub.

def nxdomain_reply(query: bytes) -> bytes | None:
    """Build an NXDOMAIN response to a one-question DNS query (RFC 1035, section 4.1).

    Return None for anything else, which the stub ignores.
    """
    if len(query) < 12:
        return None
    ident, flags, question_count = struct.unpack("!HHH", query[:6])
    if flags & 0x8000 or question_count != 1:
        return None

    end = 12
    while True:
        if end >= len(query):
            return None
        length = query[end]
        if length == 0:
            end += 1
            break
        # A question name has no compression pointers, so a set high bit means a malformed query.
        if length & 0xC0:
            return None
        end += 1 + length
    end += 4
    if end > len(query):
        return None

    # QR and RA set, opcode and RD copied from the query, RCODE 3 (NXDOMAIN).
    reply_flags = 0x8000 | (flags & 0x7900) | 0x0080 | 3
    return struct.pack("!HHHHHH", ident, reply_flags, 1, 0, 0, 0) + query[12:end]


class DnsStub(asyncio.DatagramProtocol):
    """UDP resolver on loopback that replies NXDOMAIN to every query at once.

    quishguard's hop checks SPF, DKIM and DMARC through DNS. The stub keeps
    those queries on this machine and makes them cost one loopback round trip,
    as a local caching resolver would, but it finds no records, so the checks
    take their shortest path.
    """

    def __init__(self) -> None:
        self.queries = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, address: tuple[str, int]) -> None:
        reply = nxdomain_reply(data)
        if reply is None or self.transport is None:
            return
        self.queries += 1
        self.transport.sendto(reply, address)


async def start_dns_stub() -> tuple[asyncio.DatagramTransport, DnsStub, int]:
    loop = asyncio.get_running_loop()
    transport, stub = await loop.create_datagram_endpoint(DnsStub, local_addr=(LOOPBACK, 0))
    return transport, stub, transport.get_extra_info("sockname")[1]


# The plain relay, run in its own process with --plain-relay.

def _first_line(text: str) -> str:
    return (text.splitlines() or [""])[0].strip()


class PlainRelayHandler:
    """Relay each message to the next hop during DATA and pass its reply back."""

    def __init__(self, next_hop_port: int) -> None:
        self.next_hop_port = next_hop_port

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        client = aiosmtplib.SMTP(hostname=LOOPBACK, port=self.next_hop_port,
                                 local_hostname=PLAIN_RELAY_NAME, timeout=PLAIN_RELAY_TIMEOUT,
                                 start_tls=False)
        try:
            await client.connect()
            _, text = await client.sendmail(envelope.mail_from, envelope.rcpt_tos,
                                            envelope.original_content or b"")
            await client.quit()
        except aiosmtplib.SMTPRecipientsRefused as error:
            refused = error.recipients[0]
            reply = f"{refused.code} {_first_line(refused.message)}"
        except aiosmtplib.SMTPResponseException as error:
            reply = f"{error.code} {_first_line(error.message)}"
        except (aiosmtplib.SMTPException, OSError) as error:
            log.warning("plain relay: next hop 127.0.0.1:%d failed: %s: %s", self.next_hop_port,
                        type(error).__name__, error)
            return "451 4.4.1 Next hop unavailable, try again later"
        else:
            return f"250 2.0.0 Ok: relayed ({_first_line(text)})"
        finally:
            if client.is_connected:
                client.close()

        log.info("plain relay: next hop 127.0.0.1:%d rejected the message: %s", self.next_hop_port,
                 reply)
        return reply



async def run_plain_relay(listen_port: int, next_hop_port: int) -> None:
    """Serve the plain relay on 127.0.0.1:`listen_port` until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    handler = PlainRelayHandler(next_hop_port)
    server = await loop.create_server(
        lambda: LongLineSMTP(handler, hostname=PLAIN_RELAY_NAME, data_size_limit=MAX_MESSAGE_BYTES,
                             enable_SMTPUTF8=True, loop=loop),
        host=LOOPBACK, port=listen_port)

    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("plain relay listening on 127.0.0.1:%d, next hop 127.0.0.1:%d", listen_port,
             next_hop_port)
    await stop.wait()
    server.close()
    await server.wait_closed()


# Subprocesses.

def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def log_tail(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as error:
        return f"(log {path} unreadable: {error.strerror})"
    return "\n".join(lines[-LOG_TAIL_LINES:]) or "(log is empty)"


def start_process(label: str, command: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    log.info("starting %s: %s (log: %s)", label, " ".join(command), log_path)
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, cwd=REPO_ROOT)


def stop_process(label: str, process: subprocess.Popen[bytes]) -> None:
    """Stop `process` with SIGTERM, then SIGKILL after STOP_TIMEOUT seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        log.warning("%s (pid %d) still running %.0f s after SIGTERM; sending SIGKILL", label,
                    process.pid, STOP_TIMEOUT)
        process.kill()
        process.wait()


def _proc_stat_fields(pid: int) -> list[str]:
    """Return the fields of /proc/PID/stat after the command name, which may contain spaces."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
        return stat.read().rsplit(")", 1)[1].split()


def process_tree_cpu_seconds(root: int) -> float:
    """Return the user and system CPU seconds of `root` and its descendants, reaped ones included.

    Unlike wall time, this barely changes when other work shares the CPUs, so it
    is the steadier measure of what a hop costs. quishguard's decoders run in
    child processes, and a replaced decoder's time moves into its parent's
    cutime/cstime once it is reaped.
    """
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(_proc_stat_fields(int(entry.name))[1])
            except (OSError, IndexError, ValueError):
                continue

    tree = {root}
    changed = True
    while changed:
        children = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= children
        changed = bool(children)

    ticks = 0
    for pid in tree:
        try:
            fields = _proc_stat_fields(pid)
        except OSError:
            continue
        # Fields 14 to 17 of proc(5): utime, stime, cutime, cstime, in clock ticks.
        ticks += sum(int(value) for value in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


async def wait_until_ready(label: str, process: subprocess.Popen[bytes], port: int,
                           timeout: float, log_path: Path) -> None:
    """Poll 127.0.0.1:`port` until it sends an SMTP 220 greeting."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise BenchError(f"{label} exited with code {process.returncode} before listening on "
                             f"127.0.0.1:{port}. Last lines of its log:\n{log_tail(log_path)}")
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), 1.0)
        except (OSError, asyncio.TimeoutError):
            greeting = b""
        else:
            try:
                greeting = await asyncio.wait_for(reader.readline(), 5.0)
            except (OSError, asyncio.TimeoutError):
                greeting = b""
            writer.close()
        if greeting.startswith(b"220"):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{label} timed out: no greeting on 127.0.0.1:{port} within "
                             f"{timeout:.0f} s. Raise --startup-timeout if it is still starting. "
                             f"Last lines of its log:\n{log_tail(log_path)}")
        await asyncio.sleep(0.2)


# Clients.

async def send_one(port: int, message: Message, timeout: float) -> Outcome:
    """Send `message` in its own SMTP session and return the final reply."""
    started = time.perf_counter()
    client = aiosmtplib.SMTP(hostname=LOOPBACK, port=port, local_hostname=CLIENT_NAME,
                             timeout=timeout, start_tls=False)
    try:
        await client.connect()
        _, text = await client.sendmail(ENVELOPE_FROM, [ENVELOPE_TO], message.data)
        # sendmail raises unless DATA got 250.
        reply = f"250 {_first_line(text)}"
        try:
            await client.quit()
        except (aiosmtplib.SMTPException, OSError):
            # The hop already accepted the message, so a failed QUIT changes no figure.
            pass
    except aiosmtplib.SMTPRecipientsRefused as error:
        refused = error.recipients[0]
        reply = f"{refused.code} {_first_line(refused.message)}"
    except aiosmtplib.SMTPResponseException as error:
        reply = f"{error.code} {_first_line(error.message)}"
    except (aiosmtplib.SMTPException, OSError) as error:
        reply = f"no reply ({type(error).__name__}: {error})"
    finally:
        if client.is_connected:
            client.close()
    seconds = time.perf_counter() - started
    number = SINK_NUMBER.search(reply) if reply.startswith("2") else None
    return Outcome(message.name, seconds, reply, number is not None,
                   int(number.group(1)) if number else None)


async def send_all(port: int, messages: list[Message], concurrency: int,
                   timeout: float) -> tuple[list[Outcome], float]:
    """Send every message with `concurrency` clients at once; return the outcomes and wall seconds."""
    outcomes: list[Outcome | None] = [None] * len(messages)
    indexes = iter(range(len(messages)))

    async def client_loop() -> None:
        # Sharing one iterator is safe because no await separates next() from its use.
        for index in indexes:
            outcomes[index] = await send_one(port, messages[index], timeout)

    started = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return [o for o in outcomes if o is not None], wall


# Figures.

def percentile(sorted_values: list[float], fraction: float) -> float:
    """Return the percentile of sorted values by linear interpolation between ranks."""
    if not sorted_values:
        return float("nan")
    position = (len(sorted_values) - 1) * fraction
    lower = int(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    return sorted_values[lower] + (sorted_values[upper] - sorted_values[lower]) * (position - lower)


def summarise(label: str, outcomes: list[Outcome], wall: float, cpu: float,
              sink: CountingSink, dns_queries: int) -> PathFigures:
    latencies = sorted(o.seconds for o in outcomes)
    delivered = sum(o.delivered for o in outcomes)
    actions: dict[str, int] = {}
    for record in sink.records.values():
        if record.action is not None:
            actions[record.action] = actions.get(record.action, 0) + 1
    incomplete = sorted({o.name for o in outcomes
                         if o.sink_number is not None and sink.records[o.sink_number].scan_incomplete})
    return PathFigures(
        label=label,
        messages=len(outcomes),
        delivered=delivered,
        failed=len(outcomes) - delivered,
        sink_received=sink.received,
        seconds=round(wall, 3),
        messages_per_second=round(len(outcomes) / wall, 2) if wall > 0 else float("nan"),
        latency_p50_ms=round(percentile(latencies, 0.50) * 1000, 1),
        latency_p95_ms=round(percentile(latencies, 0.95) * 1000, 1),
        latency_mean_ms=round(sum(latencies) / len(latencies) * 1000, 1) if latencies else float("nan"),
        latency_max_ms=round(latencies[-1] * 1000, 1) if latencies else float("nan"),
        dns_queries=dns_queries,
        server_cpu_seconds=round(cpu, 2),
        server_cpu_ms_per_message=round(cpu / len(outcomes) * 1000, 2) if outcomes else float("nan"),
        sink_actions=dict(sorted(actions.items())),
        scan_incomplete=incomplete,
    )


def first_failures(outcomes: list[Outcome]) -> dict[str, str]:
    """Map each message name that failed at least once to its first failing reply."""
    failures: dict[str, str] = {}
    for outcome in outcomes:
        if not outcome.delivered:
            failures.setdefault(outcome.name, outcome.reply)
    return failures


# Messages.

def collect_messages(folders: list[Path]) -> list[Message]:
    """Read every *.eml below each path (or the file itself), named `folder/relative path`."""
    messages = []
    for folder in folders:
        if folder.is_file():
            messages.append(Message(folder.name, folder.read_bytes()))
            continue
        for path in sorted(p for p in folder.rglob("*.eml") if p.is_file()):
            name = f"{folder.name}/{path.relative_to(folder)}"
            messages.append(Message(name, path.read_bytes()))
    return messages


def resolve_paths(given: list[str]) -> list[Path]:
    if given:
        paths = [Path(p) for p in given]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise BenchError(f"file or folder not found: {', '.join(missing)}; pass existing paths")
        return paths

    paths = []
    if CORPUS_DIR.is_dir():
        paths.append(CORPUS_DIR)
    else:
        print(f"bench_relay: the labelled corpus folder beside the repository ({CORPUS_DIR}) is "
              "absent; skipping it and sending samples/ only", file=sys.stderr)
    if SAMPLES_DIR.is_dir():
        paths.append(SAMPLES_DIR)
    return paths


# One hop.

async def measure(label: str, process: subprocess.Popen[bytes], port: int,
                  messages: list[Message], warmup: list[Message], sink: CountingSink,
                  dns: DnsStub, args: argparse.Namespace) -> tuple[PathFigures, list[Outcome]]:
    if warmup:
        log.info("%s: warming up with %d messages", label, len(warmup))
        await send_all(port, warmup, args.concurrency, args.timeout)
    sink.reset()
    dns_before = dns.queries

    log.info("%s: sending %d messages with %d clients", label, len(messages), args.concurrency)
    cpu_before = process_tree_cpu_seconds(process.pid)
    outcomes, wall = await send_all(port, messages, args.concurrency, args.timeout)
    cpu = process_tree_cpu_seconds(process.pid) - cpu_before
    figures = summarise(label, outcomes, wall, cpu, sink, dns.queries - dns_before)
    log.info("%s: %d messages in %.1f s", label, figures.messages, figures.seconds)
    return figures, outcomes


async def bench_plain(messages: list[Message], warmup: list[Message], sink: CountingSink,
                      sink_port: int, dns: DnsStub, workdir: Path, args: argparse.Namespace
                      ) -> tuple[PathFigures, list[Outcome]]:
    label = "plain relay"
    port = free_port()
    log_path = workdir / "plain-relay.log"
    command = [sys.executable, str(Path(__file__).resolve()), "--plain-relay", str(port), str(sink_port)]
    process = start_process(label, command, log_path)
    try:
        await wait_until_ready(label, process, port, args.startup_timeout, log_path)
        return await measure(label, process, port, messages, warmup, sink, dns, args)
    finally:
        stop_process(label, process)


async def bench_quishguard(messages: list[Message], warmup: list[Message], sink: CountingSink,
                           sink_port: int, dns: DnsStub, dns_port: int, workdir: Path,
                           args: argparse.Namespace) -> tuple[PathFigures, list[Outcome]]:
    label = "quishguard"
    port = free_port()
    config_path = workdir / "bench.toml"
    # 1 MiB below the sink's limit leaves room for the verdict headers quishguard adds.
    config_path.write_text(BENCH_CONFIG.format(max_message_size=MAX_MESSAGE_BYTES - 1024 * 1024,
                                               workers=args.workers, dns_port=dns_port),
                           encoding="utf-8")
    log_path = workdir / "quishguard.log"
    command = [sys.executable, "-m", "quishguard", "serve", "--config", str(config_path),
               "--listen", f"{LOOPBACK}:{port}", "--relay", f"{LOOPBACK}:{sink_port}",
               "--data-dir", str(workdir / "data"), "--log-level", args.log_level]
    process = start_process(label, command, log_path)
    try:
        await wait_until_ready(label, process, port, args.startup_timeout, log_path)
        return await measure(label, process, port, messages, warmup, sink, dns, args)
    finally:
        stop_process(label, process)


# Report.

def print_report(plain: PathFigures, guarded: PathFigures, ratio: float,
                 only_quishguard: dict[str, str], both: dict[str, str], args: argparse.Namespace,
                 folders: list[Path], unique_messages: int, machine: dict[str, object]) -> None:
    print(f"machine: {machine['cpus']} CPUs ({machine['cpu_model']}), Python {machine['python']}, "
          f"1-minute load average {machine['load_average_1min']} at start")
    print(f"{unique_messages} messages from {', '.join(str(f) for f in folders)}, sent "
          f"{args.repeat} time(s) with {args.concurrency} concurrent clients after a warm-up of "
          f"{args.warmup} messages")
    print("quishguard ran with [thresholds] tag = quarantine = 1000 so that it relays every "
          "message: these figures measure the cost of scanning, not of quarantining.")
    print()
    header = (f"{'hop':<12} {'messages':>8} {'delivered':>9} {'failed':>6} {'sink':>6} "
              f"{'seconds':>8} {'msg/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} "
              f"{'CPU ms/msg':>10}")
    print(header)
    for figures in (plain, guarded):
        print(f"{figures.label:<12} {figures.messages:>8} {figures.delivered:>9} "
              f"{figures.failed:>6} {figures.sink_received:>6} {figures.seconds:>8.2f} "
              f"{figures.messages_per_second:>7.2f} {figures.latency_p50_ms:>8.1f} "
              f"{figures.latency_p95_ms:>8.1f} {figures.latency_max_ms:>8.1f} "
              f"{figures.server_cpu_ms_per_message:>10.2f}")
    print("CPU ms/msg: user and system CPU time of the hop's processes (quishguard with its "
          "decoder workers) per message, which other load on the machine barely changes.")
    print()
    print(f"throughput ratio quishguard/plain: {ratio:.3f}")
    actions = ", ".join(f"{name} {count}" for name, count in guarded.sink_actions.items()) or "none"
    print(f"verdicts on the copies quishguard relayed: {actions}")
    print(f"DNS queries quishguard sent to the NXDOMAIN stub on loopback: {guarded.dns_queries}")
    if guarded.scan_incomplete:
        print(f"relayed with {INCOMPLETE_RULE}, so not every part was decoded "
              f"({len(guarded.scan_incomplete)}): {', '.join(guarded.scan_incomplete)}")
    else:
        print(f"relayed with {INCOMPLETE_RULE}: none")
    print()
    if only_quishguard:
        print(f"failed through quishguard but not through the plain relay ({len(only_quishguard)}):")
        for name, reply in sorted(only_quishguard.items()):
            print(f"  {name}: {reply}")
    else:
        print("failed through quishguard but not through the plain relay: none")
    if both:
        print(f"failed through both hops ({len(both)}):")
        for name, reply in sorted(both.items()):
            print(f"  {name}: {reply}")


def write_json(path: str, plain: PathFigures, guarded: PathFigures, ratio: float,
               only_quishguard: dict[str, str], both: dict[str, str], args: argparse.Namespace,
               folders: list[Path], unique_messages: int, machine: dict[str, object]) -> None:
    figures = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "code_version": code_version(),
        "folders": [str(f) for f in folders],
        "unique_messages": unique_messages,
        "repeat": args.repeat,
        "concurrency": args.concurrency,
        "warmup": args.warmup,
        "quishguard_thresholds": {"tag": 1000.0, "quarantine": 1000.0},
        "hops": {"plain": dataclasses.asdict(plain), "quishguard": dataclasses.asdict(guarded)},
        "throughput_ratio_quishguard_to_plain": round(ratio, 4),
        "failed_only_through_quishguard": [{"message": n, "reply": r}
                                           for n, r in sorted(only_quishguard.items())],
        "failed_through_both": [{"message": n, "reply": r} for n, r in sorted(both.items())],
    }
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(figures, handle, indent=2)
        handle.write("\n")


async def run_benchmark(args: argparse.Namespace, folders: list[Path], unique: list[Message]) -> int:
    messages = unique * args.repeat
    warmup = unique[:args.warmup]

    machine = machine_facts()
    sink = CountingSink()
    sink_server, sink_port = await start_sink(sink)
    dns_transport, dns, dns_port = await start_dns_stub()
    workdir = Path(tempfile.mkdtemp(prefix="quishguard-bench-"))
    try:
        plain, plain_outcomes = await bench_plain(messages, warmup, sink, sink_port, dns, workdir,
                                                  args)
        guarded, guarded_outcomes = await bench_quishguard(messages, warmup, sink, sink_port, dns,
                                                           dns_port, workdir, args)
    finally:
        sink_server.close()
        dns_transport.close()
        if args.keep_logs:
            for log_path in workdir.glob("*.log"):
                shutil.copyfile(log_path, Path(args.keep_logs) / log_path.name)
        shutil.rmtree(workdir, ignore_errors=True)

    ratio = (guarded.messages_per_second / plain.messages_per_second
             if plain.messages_per_second else float("nan"))
    plain_failures = first_failures(plain_outcomes)
    guarded_failures = first_failures(guarded_outcomes)
    only_quishguard = {n: r for n, r in guarded_failures.items() if n not in plain_failures}
    both = {n: r for n, r in guarded_failures.items() if n in plain_failures}

    print_report(plain, guarded, ratio, only_quishguard, both, args, folders, len(unique), machine)
    if args.json:
        write_json(args.json, plain, guarded, ratio, only_quishguard, both, args, folders,
                   len(unique), machine)
        log.info("figures written to %s", args.json)
    return 0


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Send a folder of .eml messages through quishguard and through a plain relay "
                    "on loopback, and compare throughput and latency.")
    parser.add_argument("paths", nargs="*", metavar="PATH",
                        help="folder (every *.eml below) or .eml file; default: the labelled "
                             f"corpus folder beside the repository ({CORPUS_DIR}), if present, "
                             "and samples/")
    parser.add_argument("--concurrency", type=positive_int, default=8, metavar="N",
                        help="SMTP sessions in flight at once (default: 8)")
    parser.add_argument("--repeat", type=positive_int, default=1, metavar="N",
                        help="times the whole set is sent through each hop (default: 1)")
    parser.add_argument("--warmup", type=int, default=5, metavar="N",
                        help="messages sent through each hop before timing starts (default: 5)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                        help="client timeout per SMTP command, in seconds (default: 120)")
    parser.add_argument("--startup-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="seconds to wait for each hop to greet on its port; quishguard "
                             "starts decoder processes first (default: 60)")
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="quishguard decoder worker processes (scan.workers). 0 means one per "
                             "CPU core (default: 0)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="log level of `quishguard serve`, whose log goes to a temporary file "
                             "(default: info, as in production)")
    parser.add_argument("--keep-logs", metavar="DIR",
                        help="copy the logs of both hops into this existing folder when the run ends")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    parser.add_argument("--plain-relay", nargs=2, type=int, metavar=("LISTEN_PORT", "NEXT_HOP_PORT"),
                        help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    # aiosmtpd logs every SMTP command at INFO, which would slow the sink and
    # the plain relay and flood stderr.
    logging.getLogger("mail.log").setLevel(logging.WARNING)

    if args.plain_relay:
        listen_port, next_hop_port = args.plain_relay
        asyncio.run(run_plain_relay(listen_port, next_hop_port))
        return 0

    minimums = (("--warmup", args.warmup, 0), ("--workers", args.workers, 0),
                ("--timeout", args.timeout, 1), ("--startup-timeout", args.startup_timeout, 1))
    for option, value, minimum in minimums:
        if value < minimum:
            print(f"bench_relay: invalid {option} {value}, expected a number >= {minimum}",
                  file=sys.stderr)
            return 2
    if args.keep_logs and not Path(args.keep_logs).is_dir():
        print(f"bench_relay: --keep-logs folder {args.keep_logs} does not exist; create it first",
              file=sys.stderr)
        return 2
    try:
        folders = resolve_paths(args.paths)
        unique = collect_messages(folders)
    except (BenchError, OSError) as error:
        print(f"bench_relay: {error}", file=sys.stderr)
        return 2
    if not unique:
        print(f"bench_relay: no *.eml files below {', '.join(str(f) for f in folders) or 'any folder'}; "
              "pass a folder of messages", file=sys.stderr)
        return 2

    try:
        return asyncio.run(run_benchmark(args, folders, unique))
    except BenchError as error:
        print(f"bench_relay: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
