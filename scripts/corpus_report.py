"""Report quishguard's detection figures on a labelled corpus of real mail.

Runs `quishguard scan --format json` over a corpus folder, joins the verdicts
with the folder's `labels.tsv` (tab-separated columns: file, label (phish or
ham), source, features as a comma-separated list) and prints:

- message, phish and ham counts;
- phish at quarantine or worse, and at tag or worse;
- the featured phish (features `qr_*`, `redirect_js_location`, `js_atob`,
  `html_attachment`, `open_redirect_known_service`) at tag or worse, against
  the project's goal of at least 90 %;
- ham at tag or worse, against the goal of at most 1 %, with file names and
  top rules;
- QR payloads decoded, per-rule hit counts by label, the wall time of the
  scan, and the messages whose scan reported SCAN_INCOMPLETE.

Usage, from the repository root with the project's virtual environment:

    .venv/bin/python scripts/corpus_report.py                    # the corpus beside the repo
    .venv/bin/python scripts/corpus_report.py --misses --json report.json
    .venv/bin/python scripts/corpus_report.py /path/to/corpus --config tuned.toml

This script opens no URL: it only reads the scan's JSON output, and it prints
finding details with `http` schemes defanged to `hxxp`. The JSON file contains
figures, file names, features and rule names, never text from the messages.
Exit status: 0 after a report, 1 when the scan failed, 2 when the corpus
folder or its labels are missing or invalid.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import importlib.util
import json
import os
import re
import resource
import subprocess
import sys
import time
import urllib.parse
from collections import Counter
from pathlib import Path

from run_facts import code_version, machine_facts

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS_DIR = REPO_ROOT.parent / "shared" / "corpus"
LABELS_FILE = "labels.tsv"

PHISH = "phish"
HAM = "ham"

TAG_OR_WORSE = frozenset({"tag", "quarantine", "reject"})
QUARANTINE_OR_WORSE = frozenset({"quarantine", "reject"})

FEATURE_PREFIXES = ("qr_",)
FEATURE_NAMES = frozenset({"redirect_js_location", "js_atob", "html_attachment",
                           "open_redirect_known_service"})

FEATURED_GOAL = 0.90
HAM_GOAL = 0.01
INCOMPLETE_RULE = "SCAN_INCOMPLETE"
TOP_RULES = 3
MISS_URL_PREFIXES = 8
# The text report names at most this many incomplete scans; --json lists all of them.
MAX_LISTED_INCOMPLETE = 50

_SCHEME = re.compile(r"\b(h)tt(ps?)(?=:)", re.IGNORECASE)


class ReportError(Exception):
    """Invalid input or a failed scan; the message names the value and the fix."""


@dataclasses.dataclass(frozen=True)
class Label:
    file: str
    label: str
    features: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ScanRecord:
    """One line of `quishguard scan --format json` output, keyed by the path relative to the corpus."""

    file: str
    score: float
    action: str
    findings: tuple[tuple[str, float, str], ...]
    qr_payloads: int
    seconds: float
    urls: tuple[str, ...]

    @property
    def rules(self) -> list[str]:
        return list(dict.fromkeys(rule for rule, _, _ in self.findings))

    def top_rules(self, count: int = TOP_RULES) -> list[str]:
        ranked = sorted(self.findings, key=lambda finding: finding[1], reverse=True)
        names = list(dict.fromkeys(f"{rule}={score:.1f}" for rule, score, _ in ranked))
        return names[:count]


def defang(text: str) -> str:
    """Turn `http`/`https` schemes into `hxxp`/`hxxps` so a terminal shows no live link."""
    return _SCHEME.sub(lambda match: f"{match.group(1)}xx{match.group(2)}", text)


def url_prefixes(urls: tuple[str, ...]) -> list[str]:
    """Return the distinct `host/first-path-segment` of `urls`, the form open-redirector patterns take."""
    prefixes: list[str] = []
    for url in urls:
        try:
            parts = urllib.parse.urlsplit(url)
        except ValueError:
            continue
        if not parts.hostname:
            continue
        segment = parts.path.strip("/").split("/", 1)[0]
        prefix = f"{parts.hostname}/{segment}" if segment else parts.hostname
        if prefix not in prefixes:
            prefixes.append(prefix)
    return prefixes


def is_featured(features: tuple[str, ...]) -> bool:
    return any(f.startswith(FEATURE_PREFIXES) or f in FEATURE_NAMES for f in features)


def share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def percent(part: int, whole: int) -> str:
    value = share(part, whole)
    return "n/a" if value is None else f"{value * 100:.1f} %"


# Input.

def read_labels(path: Path) -> dict[str, Label]:
    """Read labels.tsv; raise ReportError on a missing column or an unknown label."""
    try:
        handle = open(path, encoding="utf-8", newline="")
    except OSError as error:
        raise ReportError(f"cannot read the labels file {path}: {error.strerror}") from error
    with handle:
        reader = csv.DictReader(handle, delimiter="\t")
        missing = {"file", "label", "features"} - set(reader.fieldnames or ())
        if missing:
            raise ReportError(f"{path} is missing the column(s) {', '.join(sorted(missing))}. Expected "
                              "tab-separated columns file, label, source, features")
        labels = {}
        for line_number, row in enumerate(reader, start=2):
            label = (row["label"] or "").strip()
            if label not in (PHISH, HAM):
                raise ReportError(f"{path} line {line_number}: invalid label {label!r}, "
                                  f"expected {PHISH} or {HAM}")
            features = tuple(f.strip() for f in (row["features"] or "").split(",") if f.strip())
            labels[row["file"]] = Label(row["file"], label, features)
    return labels


def parse_verdict(line: str, corpus: Path) -> ScanRecord:
    record = json.loads(line)
    file = Path(os.path.relpath(record["path"], corpus)).as_posix()
    findings = tuple((f["rule"], float(f["score"]), str(f.get("detail", "")))
                     for f in record.get("findings", []))
    return ScanRecord(file, float(record["score"]), record["action"], findings,
                   len(record.get("qr", [])), float(record.get("seconds", 0.0)),
                   tuple(str(u) for u in record.get("urls", [])))


@dataclasses.dataclass(frozen=True)
class ScanRun:
    verdicts: list[ScanRecord]
    wall_seconds: float
    cpu_seconds: float
    returncode: int


def run_scan(corpus: Path, config: str | None, timeout: float) -> ScanRun:
    """Run `quishguard scan` on `corpus` and collect its verdicts, wall time and CPU time."""
    # Without --dns the scan makes no DNS lookup, so no query leaves the machine.
    command = [sys.executable, "-m", "quishguard", "scan", "--format", "json",
               "--log-level", "warning"]
    if config:
        command += ["--config", config]
    command.append(str(corpus))

    started = time.perf_counter()
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        completed = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   text=True, encoding="utf-8", timeout=timeout, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired as error:
        raise ReportError(f"quishguard scan timed out after {timeout:.0f} s. Raise --timeout "
                          "or scan fewer messages") from error
    wall = time.perf_counter() - started
    # The decoder workers are reaped by quishguard, so their CPU time is in its children's usage.
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (usage.ru_utime - usage_before.ru_utime) + (usage.ru_stime - usage_before.ru_stime)

    verdicts = []
    for line in completed.stdout.splitlines():
        if not line.strip():
            continue
        try:
            verdicts.append(parse_verdict(line, corpus))
        except (ValueError, KeyError, TypeError) as error:
            print(f"corpus_report: skipping an unreadable scan output line ({type(error).__name__}: "
                  f"{error}): {line[:120]!r}", file=sys.stderr)
    return ScanRun(verdicts, wall, cpu, completed.returncode)


# Figures.

def percentile(sorted_values: list[float], fraction: float) -> float | None:
    """Return the percentile of sorted values by linear interpolation between ranks."""
    if not sorted_values:
        return None
    position = (len(sorted_values) - 1) * fraction
    lower = int(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    return sorted_values[lower] + (sorted_values[upper] - sorted_values[lower]) * (position - lower)


def build_figures(labels: dict[str, Label], run: ScanRun, corpus: Path, config: str | None,
                  machine: dict[str, object]) -> dict[str, object]:
    verdicts = run.verdicts
    by_file = {v.file: v for v in verdicts}
    scanned = [(labels[v.file], v) for v in verdicts if v.file in labels]
    phish = [(label, v) for label, v in scanned if label.label == PHISH]
    ham = [(label, v) for label, v in scanned if label.label == HAM]
    featured = [(label, v) for label, v in phish if is_featured(label.features)]
    featured_hits = [(label, v) for label, v in featured if v.action in TAG_OR_WORSE]
    ham_hits = [(label, v) for label, v in ham if v.action in TAG_OR_WORSE]

    feature_table: dict[str, dict[str, int]] = {}
    for label, verdict in featured:
        for feature in label.features:
            if feature.startswith(FEATURE_PREFIXES) or feature in FEATURE_NAMES:
                row = feature_table.setdefault(feature, {"phish": 0, "tag_or_worse": 0})
                row["phish"] += 1
                row["tag_or_worse"] += verdict.action in TAG_OR_WORSE

    rule_table: dict[str, dict[str, int]] = {}
    for label, verdict in scanned:
        for rule in verdict.rules:
            row = rule_table.setdefault(rule, {PHISH: 0, HAM: 0})
            row[label.label] += 1
    rules_sorted = dict(sorted(rule_table.items(), key=lambda item: (-item[1][PHISH], item[1][HAM], item[0])))

    seconds = sorted(v.seconds for v in verdicts)
    actions = {name: dict(sorted(Counter(v.action for _, v in group).items()))
               for name, group in ((PHISH, phish), (HAM, ham))}

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "corpus": str(corpus),
        "config": config,
        "code_version": code_version(),
        "machine": machine,
        "messages": len(verdicts),
        "phish": len(phish),
        "ham": len(ham),
        "actions_by_label": actions,
        "not_scanned": sorted(set(labels) - set(by_file)),
        "unlabelled": sorted(set(by_file) - set(labels)),
        "phish_quarantine_or_worse": sum(v.action in QUARANTINE_OR_WORSE for _, v in phish),
        "phish_tag_or_worse": sum(v.action in TAG_OR_WORSE for _, v in phish),
        "featured_phish": {
            "features": sorted(FEATURE_NAMES) + [f"{p}*" for p in FEATURE_PREFIXES],
            "count": len(featured),
            "tag_or_worse": len(featured_hits),
            "share": share(len(featured_hits), len(featured)),
            "goal_min_share": FEATURED_GOAL,
            "by_feature": dict(sorted(feature_table.items())),
        },
        "ham_tag_or_worse": {
            "count": len(ham_hits),
            "share": share(len(ham_hits), len(ham)),
            "goal_max_share": HAM_GOAL,
            "messages": [{"file": label.file, "action": v.action, "score": v.score,
                          "top_rules": v.top_rules()} for label, v in ham_hits],
        },
        "qr": {"payloads": sum(v.qr_payloads for v in verdicts),
               "messages": sum(v.qr_payloads > 0 for v in verdicts)},
        "rules": rules_sorted,
        "scan_wall_seconds": round(run.wall_seconds, 2),
        "scan_cpu_seconds": round(run.cpu_seconds, 2),
        "scan_seconds_per_message": {
            "p50": _rounded(percentile(seconds, 0.50)),
            "p95": _rounded(percentile(seconds, 0.95)),
            "max": _rounded(seconds[-1] if seconds else None),
        },
        "scan_incomplete": sorted(v.file for v in verdicts
                                  if any(rule == INCOMPLETE_RULE for rule, _, _ in v.findings)),
        "featured_misses": [{"file": label.file, "score": v.score, "action": v.action,
                             "features": list(label.features), "rules": v.rules}
                            for label, v in featured if v.action not in TAG_OR_WORSE],
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# Output.

def goal_text(value: float | None, goal: float, at_least: bool) -> str:
    if value is None:
        return "no messages"
    met = value >= goal if at_least else value <= goal
    sign = ">=" if at_least else "<="
    return f"goal {sign} {goal * 100:.0f} %: {'met' if met else 'NOT met'}"


def print_report(figures: dict, verdicts: list[ScanRecord], labels: dict[str, Label],
                 show_misses: bool) -> None:
    phish, ham = figures["phish"], figures["ham"]
    featured = figures["featured_phish"]
    ham_hits = figures["ham_tag_or_worse"]

    machine = figures["machine"]
    print(f"corpus: {figures['corpus']}  config: {figures['config'] or 'built-in defaults'}")
    print(f"machine: {machine['cpus']} CPUs ({machine['cpu_model']}), Python {machine['python']}, "
          f"1-minute load average {machine['load_average_1min']} before the scan")
    print(f"messages scanned: {figures['messages']} (phish {phish}, ham {ham})")
    if figures["not_scanned"]:
        print(f"labelled but without a verdict ({len(figures['not_scanned'])}): "
              f"{', '.join(figures['not_scanned'])}")
    if figures["unlabelled"]:
        print(f"scanned but not in {LABELS_FILE} ({len(figures['unlabelled'])}): "
              f"{', '.join(figures['unlabelled'])}")
    for label in (PHISH, HAM):
        counts = ", ".join(f"{a} {n}" for a, n in figures["actions_by_label"][label].items()) or "none"
        print(f"actions on {label}: {counts}")
    print()

    print(f"phish at quarantine or worse: {figures['phish_quarantine_or_worse']} / {phish} "
          f"({percent(figures['phish_quarantine_or_worse'], phish)})")
    print(f"phish at tag or worse:        {figures['phish_tag_or_worse']} / {phish} "
          f"({percent(figures['phish_tag_or_worse'], phish)})")
    print(f"featured phish at tag or worse: {featured['tag_or_worse']} / {featured['count']} "
          f"({percent(featured['tag_or_worse'], featured['count'])}; "
          f"{goal_text(featured['share'], FEATURED_GOAL, at_least=True)})")
    for feature, row in featured["by_feature"].items():
        print(f"  {feature:<32} {row['tag_or_worse']:>4} / {row['phish']:<4} "
              f"({percent(row['tag_or_worse'], row['phish'])})")
    print(f"ham at tag or worse: {ham_hits['count']} / {ham} ({percent(ham_hits['count'], ham)}; "
          f"{goal_text(ham_hits['share'], HAM_GOAL, at_least=False)})")
    for item in ham_hits["messages"]:
        print(f"  {item['file']}  {item['action']}  score {item['score']:.1f}  "
              f"{', '.join(item['top_rules'])}")
    print()

    print(f"QR payloads decoded: {figures['qr']['payloads']} in {figures['qr']['messages']} message(s)")
    timing = figures["scan_seconds_per_message"]
    print(f"scan wall time: {figures['scan_wall_seconds']:.1f} s for {figures['messages']} messages, "
          f"including worker start-up (per message p50 {_seconds(timing['p50'])}, "
          f"p95 {_seconds(timing['p95'])}, max {_seconds(timing['max'])})")
    print(f"scan CPU time (user + system, quishguard and its decoder workers): "
          f"{figures['scan_cpu_seconds']:.1f} s")
    incomplete = figures["scan_incomplete"]
    listed = ", ".join(incomplete[:MAX_LISTED_INCOMPLETE]) or "none"
    hidden = len(incomplete) - MAX_LISTED_INCOMPLETE
    more = f" and {hidden} more (--json FILE lists them all)" if hidden > 0 else ""
    print(f"messages with {INCOMPLETE_RULE} ({len(incomplete)}): {listed}{more}")
    print()

    print(f"{'rule':<36} {'phish':>6} {'ham':>6}")
    for rule, row in figures["rules"].items():
        print(f"{rule:<36} {row[PHISH]:>6} {row[HAM]:>6}")

    if show_misses:
        print_misses(verdicts, labels)


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f} s"


def print_misses(verdicts: list[ScanRecord], labels: dict[str, Label]) -> None:
    misses = [(labels[v.file], v) for v in verdicts
              if v.file in labels and labels[v.file].label == PHISH
              and is_featured(labels[v.file].features) and v.action not in TAG_OR_WORSE]
    print()
    print(f"featured phish below tag ({len(misses)}); details have http schemes defanged, "
          "URLs are shown as host/first path segment only:")
    for label, verdict in sorted(misses, key=lambda item: (-item[1].score, item[0].file)):
        print(f"{label.file}  score {verdict.score:.1f}  {verdict.action}  "
              f"features: {', '.join(label.features)}")
        prefixes = url_prefixes(verdict.urls)
        if prefixes:
            hidden = len(prefixes) - MISS_URL_PREFIXES
            more = f" and {hidden} more" if hidden > 0 else ""
            print(f"    {len(verdict.urls)} URL(s), host/path starts: "
                  f"{', '.join(prefixes[:MISS_URL_PREFIXES])}{more}")
        if not verdict.findings:
            print("    no findings")
        for rule, score, detail in verdict.findings:
            print(f"    {rule}={score:.1f}  {defang(detail)[:300]}")


# Main.

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Scan a labelled corpus with quishguard and report detection and false "
                    "positive figures.")
    parser.add_argument("corpus", nargs="?", default=str(CORPUS_DIR),
                        help="corpus folder with *.eml files and labels.tsv; default: the "
                             f"labelled corpus folder beside the repository ({CORPUS_DIR})")
    parser.add_argument("--config", metavar="FILE",
                        help="quishguard TOML configuration to scan with (default: built-in defaults)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    parser.add_argument("--misses", action="store_true",
                        help="list the featured phish below tag with their features and findings")
    parser.add_argument("--timeout", type=float, default=1800.0, metavar="SECONDS",
                        help="seconds the whole scan may take before it is stopped (default: 1800)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    corpus = Path(args.corpus)
    if not corpus.is_dir():
        print(f"corpus_report: corpus folder {corpus} not found; pass the folder of labelled "
              ".eml files as the first argument", file=sys.stderr)
        return 2
    if importlib.util.find_spec("quishguard") is None:
        print(f"corpus_report: the quishguard package is not importable by {sys.executable}; "
              "run this script with the project's virtual environment (.venv/bin/python)",
              file=sys.stderr)
        return 2
    if args.timeout <= 0:
        print(f"corpus_report: invalid --timeout {args.timeout}; expected seconds > 0",
              file=sys.stderr)
        return 2

    try:
        labels = read_labels(corpus / LABELS_FILE)
    except ReportError as error:
        print(f"corpus_report: {error}", file=sys.stderr)
        return 2

    machine = machine_facts()
    try:
        run = run_scan(corpus, args.config, args.timeout)
    except ReportError as error:
        print(f"corpus_report: {error}", file=sys.stderr)
        return 1
    # `quishguard scan` exits 2 when some files could not be read but the others were scanned.
    if run.returncode not in (0, 2) or not run.verdicts:
        print(f"corpus_report: quishguard scan failed with exit code {run.returncode} and "
              f"{len(run.verdicts)} verdicts; see its messages above", file=sys.stderr)
        return 1

    figures = build_figures(labels, run, corpus, args.config, machine)
    print_report(figures, run.verdicts, labels, args.misses)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(figures, handle, indent=2)
            handle.write("\n")
        print(f"corpus_report: figures written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
