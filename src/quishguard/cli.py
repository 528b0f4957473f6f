"""Command-line interface: parses arguments, builds the config and calls the library."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import logging
import signal
import sys
import time
from pathlib import Path

from . import __version__
from .config import Config, load_config, parse_host_port, reference_markdown
from .errors import ConfigError, QuarantineError, RelayError

log = logging.getLogger("quishguard")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INPUT = 2


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # aiosmtpd logs every SMTP command, with envelope addresses, at INFO on
    # "mail.log"; keep that for --log-level debug.
    if level.lower() != "debug":
        logging.getLogger("mail.log").setLevel(logging.WARNING)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file (default: built-in defaults)")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="folder of the quarantine and the local sink (overrides quarantine.data_dir)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="log verbosity on stderr (default: info)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quishguard",
        description="Inline mail filter: decodes QR codes in images and PDFs, reads HTML, checks the "
                    "sender, and relays, tags, quarantines or rejects each message.")
    parser.add_argument("--version", action="version", version=f"quishguard {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the SMTP filter hop")
    _common(serve)
    serve.add_argument("--listen", metavar="HOST:PORT", help="listen address (overrides smtp.listen)")
    serve.add_argument("--relay", metavar="HOST:PORT", help="next hop (overrides smtp.relay)")

    scan = commands.add_parser("scan", help="scan .eml files or folders and print verdicts")
    _common(scan)
    scan.add_argument("--format", choices=["text", "json"], default="text",
                      help="text: one line per message; json: JSON Lines with findings, QR codes and URLs")
    scan.add_argument("--dns", action="store_true",
                      help="check SPF, DKIM, DMARC and ARC with DNS lookups to [dns] servers (default: no lookups)")
    scan.add_argument("paths", nargs="+", metavar="PATH", help=".eml file or folder (every *.eml below)")

    audit = commands.add_parser("audit", help="check delivered mail for the hop's stamp and unauthenticated "
                                              "organisation senders")
    audit.add_argument("--config", metavar="FILE", help="TOML configuration file with [stamp] secret and [org]")
    audit.add_argument("--format", choices=["text", "json"], default="text",
                       help="text: one line per message; json: JSON Lines")
    audit.add_argument("paths", nargs="+", metavar="PATH",
                       help=".eml file, folder of .eml files, mbox file or Maildir folder")

    quarantine = commands.add_parser("quarantine", help="list, show, release or delete quarantined mail")
    _common(quarantine)
    quarantine.add_argument("--relay", metavar="HOST:PORT", help="next hop for release (overrides smtp.relay)")
    actions = quarantine.add_subparsers(dest="quarantine_command", required=True)
    listing = actions.add_parser("list", help="one line per held message")
    listing.add_argument("--all", action="store_true", help="include released and deleted messages")
    for name, text in (("show", "print the verdict and findings"),
                       ("release", "relay the message to the next hop and mark it released"),
                       ("delete", "delete the message")):
        sub = actions.add_parser(name, help=text)
        sub.add_argument("id", help="quarantine id from `quishguard quarantine list`")

    milter = commands.add_parser("milter", help="run the milter for Postfix or Sendmail")
    _common(milter)
    milter.add_argument("--listen", metavar="SOCKET",
                        help="inet:HOST:PORT or unix:/PATH (overrides milter.listen)")

    sink = commands.add_parser("sink", help="run the local sink that stores received mail as files")
    _common(sink)
    sink.add_argument("--listen", metavar="HOST:PORT", help="listen address (overrides sink.listen)")

    tune = commands.add_parser("tune", help="scan a labelled corpus and suggest thresholds")
    _common(tune)
    tune.add_argument("paths", nargs="+", metavar="PATH",
                      help="folder or .eml file; without --labels, each file's label is the name "
                           "of its nearest parent folder called phish or ham")
    tune.add_argument("--labels", metavar="FILE",
                      help="TSV with a header row and columns file and label (phish or ham); "
                           "file paths are relative to the TSV's folder")
    tune.add_argument("--out", metavar="DIR", default="tune-report",
                      help="report folder, created if missing (default: ./tune-report)")
    tune.add_argument("--target-fpr", metavar="RATE", type=float, default=0.001,
                      help="highest share of ham to quarantine, 0 to 1 (default: 0.001)")
    tune.add_argument("--tag-fpr", metavar="RATE", type=float, default=None,
                      help="highest share of ham to tag, 0 to 1 (default: 10 times --target-fpr)")
    tune.add_argument("--cache-dir", metavar="DIR",
                      help="folder of cached scan facts (default: DIR/cache inside --out); "
                           "a later run rescores cached messages without decoding them again")

    commands.add_parser("rules", help="list the rules with their default scores")

    config = commands.add_parser("config", help="check a config file or print the reference")
    config.add_argument("--config", metavar="FILE", help="TOML file to check")
    config.add_argument("--reference", action="store_true", help="print every key as a Markdown table")
    return parser


def _load(args: argparse.Namespace) -> Config:
    config = load_config(getattr(args, "config", None))
    overrides = {}
    if getattr(args, "data_dir", None):
        overrides["quarantine_data_dir"] = args.data_dir
    if getattr(args, "listen", None):
        listen_option = {"sink": "sink_listen", "milter": "milter_listen"}.get(args.command, "smtp_listen")
        overrides[listen_option] = args.listen
    if getattr(args, "relay", None):
        overrides["smtp_relay"] = args.relay
        if args.command == "quarantine":
            # An explicit release target wins over milter.release_relay too.
            overrides["milter_release_relay"] = args.relay
    return config.replace(**overrides) if overrides else config


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "log_level", "info"))
    try:
        if args.command == "rules":
            return _rules()
        config = _load(args)
        if args.command == "config":
            print(reference_markdown() if args.reference else f"{config.source}: valid")
            return EXIT_OK
        if args.command == "serve":
            return asyncio.run(_serve(config))
        if args.command == "milter":
            return asyncio.run(_milter(config))
        if args.command == "sink":
            return asyncio.run(_sink(config))
        if args.command == "scan":
            return asyncio.run(_scan(config, [Path(p) for p in args.paths], args.format,
                                     dns=args.dns))
        if args.command == "audit":
            return _audit(config, [Path(p) for p in args.paths], args.format)
        if args.command == "tune":
            return _tune(config, args)
        if args.command == "quarantine":
            return _quarantine(config, args)
    except ConfigError as error:
        print(f"quishguard: {error}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except BrokenPipeError:
        # The reader of stdout went away (`quishguard rules | head`); point
        # stdout at /dev/null so the interpreter's final flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    return EXIT_FAILURE


def _audit(config: Config, paths: list[Path], output_format: str) -> int:
    from .audit import audit_paths, format_text

    secret = config["stamp.secret"]
    if not secret:
        print("quishguard: audit needs [stamp] secret, the key the hop stamps with; pass --config FILE",
              file=sys.stderr)
        return EXIT_INPUT

    passed_all = True
    unreadable = False
    for record in audit_paths(paths, config):
        if record.error:
            unreadable = True
            print(f"quishguard: cannot audit {record.path}: {record.error}", file=sys.stderr)
            continue
        passed_all = passed_all and record.stamp == "valid"
        if output_format == "json":
            print(json.dumps(record.as_json(), ensure_ascii=False, separators=(",", ":")))
        else:
            print(format_text(record))
        sys.stdout.flush()
    if unreadable:
        return EXIT_INPUT
    return EXIT_OK if passed_all else EXIT_FAILURE


def _rules() -> int:
    from .scoring.rules import RULES

    for rule in RULES:
        print(f"{rule.name:32} {rule.score:5.1f}  {rule.description}")
    return EXIT_OK


async def _wait_for_stop() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


async def _serve(config: Config) -> int:
    from .milter.smtp import start_server
    from .pipeline import Scanner
    from .quarantine import QuarantineStore
    from .sink import start_sink

    store = QuarantineStore(config.data_dir)
    servers = []
    relay = config["smtp.relay"]
    if not relay:
        sink_host, sink_port = parse_host_port(config["sink.listen"])
        servers.append(await start_sink(config.data_dir / "sink", sink_host, sink_port,
                                        config.hostname, config["smtp.max_message_size"]))
        relay = config["sink.listen"]
        log.info("event=no_next_hop_configured using=local_sink folder=%s", config.data_dir / "sink")

    scanner = Scanner.for_hop(config)
    await scanner.start()
    operations: list = []
    try:
        operations = await start_operations(config, store, scanner.pool)
        servers.append(await start_server(config, scanner, store, parse_host_port(relay),
                                          parse_host_port(config["smtp.listen"])))
        log.info("event=started version=%s config=%s data_dir=%s", __version__, config.source,
                 config.data_dir)
        await _wait_for_stop()
        log.info("event=stopping")
    finally:
        for server in servers:
            server.close()
        await stop_operations(operations)
        await scanner.close()
    return EXIT_OK


async def start_operations(config: Config, store, pool) -> list:
    """Start the event log, the metrics endpoint and the quarantine page that config enables.

    Returns the started services for `stop_operations`; when one fails to
    start, the ones started before it are stopped and the error is raised.
    """
    from .events import EventLog
    from .metrics import start_metrics
    from .web import start_web

    started: list = []
    try:
        event_log = EventLog.from_config(config)
        if event_log.enabled:
            event_log.start()
            started.append(event_log)
        if config["metrics.listen"]:
            started.append(await start_metrics(config, held_count=store.count,
                                               worker_restarts=lambda: pool.restarts))
        if config["web.listen"]:
            started.append(await start_web(config, store))
    except BaseException:
        await stop_operations(started)
        raise
    return started


async def stop_operations(started: list) -> None:
    """Stop what `start_operations` started, newest first."""
    for service in reversed(started):
        result = service.close()
        if asyncio.iscoroutine(result):
            await result


async def _milter(config: Config) -> int:
    from .milter.server import start_milter_server
    from .pipeline import Scanner
    from .quarantine import QuarantineStore

    store = QuarantineStore(config.data_dir)
    scanner = Scanner.for_hop(config)
    await scanner.start()
    operations: list = []
    try:
        operations = await start_operations(config, store, scanner.pool)
        server = await start_milter_server(config, scanner, store)
        log.info("event=started version=%s mode=milter config=%s data_dir=%s", __version__,
                 config.source, config.data_dir)
        await _wait_for_stop()
        log.info("event=stopping")
        server.close()
    finally:
        await stop_operations(operations)
        await scanner.close()
    return EXIT_OK


async def _sink(config: Config) -> int:
    from .sink import start_sink

    host, port = parse_host_port(config["sink.listen"])
    server = await start_sink(config.data_dir / "sink", host, port, config.hostname,
                              config["smtp.max_message_size"])
    await _wait_for_stop()
    server.close()
    return EXIT_OK


def scan_record(path: Path, result) -> dict:
    verdict = result.verdict
    return {
        "path": str(path),
        "score": float(round(verdict.score, 1)),
        "action": verdict.action.label,
        "findings": [{"rule": f.rule, "score": f.score, "detail": f.detail} for f in verdict.findings],
        "qr": [{"payload": q.payload, "location": q.location, "hidden_as": q.hidden_as}
               for q in verdict.qr_codes],
        "urls": list(verdict.urls),
        "seconds": round(result.seconds, 3),
    }


async def _scan(config: Config, paths: list[Path], output_format: str, dns: bool = False) -> int:
    from .dns_resolver import DnsResolver
    from .pipeline import scan_files, scan_paths

    files, errors = scan_paths(paths)
    if not files and not errors:
        print("quishguard: no .eml files found in " + ", ".join(str(p) for p in paths), file=sys.stderr)
    for path, reason in errors:
        print(f"quishguard: cannot scan {path}: {reason}", file=sys.stderr)

    resolver = DnsResolver.from_config(config) if dns else None
    async for path, result in scan_files(files, config, resolver=resolver):
        if isinstance(result, str):
            errors.append((path, result))
            print(f"quishguard: {result}", file=sys.stderr)
            continue
        if output_format == "json":
            print(json.dumps(scan_record(path, result), ensure_ascii=False, separators=(",", ":")))
        else:
            rules = ", ".join(f"{f.rule}={f.score:.1f}" for f in result.verdict.findings) or "-"
            print(f"{path}\t{result.verdict.score:.1f}\t{result.verdict.action.label}\t{rules}")
        sys.stdout.flush()
    return EXIT_INPUT if errors else EXIT_OK


def _tune(config: Config, args: argparse.Namespace) -> int:
    from .tune import ProgressBar, TuneError, TuneOptions, run_tune

    options = TuneOptions(
        paths=[Path(p) for p in args.paths],
        labels=Path(args.labels) if args.labels else None,
        out=Path(args.out),
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        target_fpr=args.target_fpr,
        tag_fpr=args.tag_fpr,
    )
    try:
        report = asyncio.run(run_tune(config, options, progress=ProgressBar(sys.stderr)))
    except TuneError as error:
        print(f"quishguard: {error}", file=sys.stderr)
        return EXIT_INPUT
    for line in report.summary_lines():
        print(line)
    return EXIT_OK


def _quarantine(config: Config, args: argparse.Namespace) -> int:
    from .quarantine import QuarantineStore, sanitize_for_terminal as printable
    from .stamp import defang

    # data_dir is relative to the working directory by default; opening the
    # store would create an empty quarantine where the admin expected theirs.
    index = config.data_dir / "quarantine" / "index.sqlite3"
    if not index.exists():
        print(f"quishguard: no quarantine found in {config.data_dir.resolve()}; pass --data-dir or "
              "--config with the quarantine.data_dir that `serve` uses", file=sys.stderr)
        return EXIT_INPUT
    store = QuarantineStore(config.data_dir)
    command = args.quarantine_command
    try:
        if command == "list":
            for item in store.list(status=None if args.all else "held"):
                print("\t".join([item.id, item.received_at.isoformat(timespec="seconds"),
                                 f"{item.score:.1f}", item.action.label,
                                 ",".join(item.top_rules) or "-", printable(item.from_header),
                                 printable(item.subject), item.status]))
            return EXIT_OK
        if command == "show":
            item = store.get(args.id)
            print(f"id:         {item.id}\nreceived:   {item.received_at.isoformat(timespec='seconds')}\n"
                  f"status:     {item.status}\n"
                  f"score:      {item.score:.1f}\naction:     {item.action.label}\n"
                  f"from:       {printable(item.from_header)}\nsubject:    {printable(item.subject)}\n"
                  f"envelope:   <{printable(item.mail_from)}> -> "
                  f"{', '.join('<' + printable(r) + '>' for r in item.rcpt_tos)}\nfindings:")
            for finding in item.findings:
                print(f"  {finding.rule}={finding.score:.1f}  {printable(defang(finding.detail))}")
            for code in item.qr_codes:
                print(f"  qr: {printable(defang(code.payload))}  at {printable(code.location)}")
            return EXIT_OK
        if command == "delete":
            store.delete(args.id)
            print(f"deleted {args.id}")
            return EXIT_OK
        if command == "release":
            reply = asyncio.run(release(store, args.id, config))
            print(f"released {args.id}: next hop replied {reply}")
            return EXIT_OK
    except QuarantineError as error:
        print(f"quishguard: {error}", file=sys.stderr)
        return EXIT_INPUT
    except RelayError as error:
        print(f"quishguard: release of {args.id} failed, the next hop replied {error.reply}; "
              "the message stays in quarantine", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_FAILURE


async def release(store, quarantine_id: str, config: Config) -> str:
    """Relay a held message to the next hop with the verdict and Released headers, then mark it released."""
    from .milter.relay import relay_message
    from .stamp import edit_message, stamp_field, stamp_secret, verdict_headers

    item = store.get(quarantine_id)
    if item.status != "held":
        raise QuarantineError(f"quarantine id {quarantine_id} is {item.status}, not held; "
                              "only held messages can be released")
    raw = store.read_raw(quarantine_id)
    # Mail the milter quarantined must not pass through the milter again.
    relay = config["milter.release_relay"] or config["smtp.relay"] or config["sink.listen"]
    host, port = parse_host_port(relay)
    prefix = config["headers.prefix"]
    stamp_time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    added = verdict_headers(item.verdict, prefix) + [
        f"{prefix}Released: {stamp_time} quarantine id {quarantine_id}\r\n".encode("ascii"),
    ]
    secret = stamp_secret(config)
    if secret is not None:
        added.append(stamp_field(raw, item.rcpt_tos, item.verdict.action.label, secret, prefix))
    message = edit_message(raw, prefix=prefix, added=added)
    code, text = await relay_message(host, port, item.mail_from, list(item.rcpt_tos), message,
                                     timeout=config["smtp.relay_timeout"],
                                     local_hostname=config.hostname)
    store.mark_released(quarantine_id)
    log.info("event=released quarantine_id=%s next_hop=%s reply=%r", quarantine_id, relay, f"{code} {text}")
    return f"{code} {text}"
