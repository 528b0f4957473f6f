"""Threshold tuning: scan a labelled corpus and suggest `[thresholds]` for a target false-positive rate.

`run_tune` scans every labelled message through the pipeline's worker pool
(`pipeline.scan_files`, one worker per core by default), scores it with the
current rule weights and writes a report folder:

    index.html          the tables and charts on one static page (no scripts, no links)
    histogram.png       score distribution of phish and ham
    histogram.txt       the same as text
    precision-recall.png precision, recall and false-positive rate over thresholds
    thresholds.tsv      the precision/recall table behind the chart
    rules.tsv           hits of each rule by label
    messages.tsv        score, action and rules of each message
    thresholds.toml     the suggested thresholds as a config snippet
    summary.json        the numbers above for scripts

Decoding is the slow part and depends only on the message bytes, the
decoder limits and the organisation settings, so each message's
`MessageFacts` are pickled in a cache folder under a key of those inputs and
the quishguard version. A run after a weight change rescores the cached
facts with `scoring.verdict.evaluate` and decodes nothing again.

A message's label comes from a TSV (`file` and `label` columns, paths
relative to the TSV) or else from the name of its nearest parent folder
(`phish` or `ham`). Phish is the positive class: recall is the share of
phish at or above a threshold, and the false-positive rate (FPR) is the share
of ham at or above it.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import html
import json
import logging
import math
import os
import pickle
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from . import __version__
from .config import Config
from .errors import QuishguardError
from .model import MessageFacts, Verdict
from .pipeline import envelope_from_headers, org_policy, scan_files, scan_limits, scan_paths
from .scoring.verdict import evaluate

log = logging.getLogger(__name__)

LABELS = ("phish", "ham")

# Score step of the threshold grid. Suggestions are multiples of it, which
# keeps the TOML readable; scores between grid points change no suggestion.
THRESHOLD_STEP = 0.5

# Bump when the pickled layout or the key inputs change, so old entries miss.
CACHE_FORMAT = 1

# Messages listed per table of misses in the HTML page.
MAX_LISTED_MISSES = 25


class TuneError(QuishguardError):
    """The corpus or the options cannot be tuned on."""


@dataclass(frozen=True)
class TuneOptions:
    """Arguments of one tuning run; `tag_fpr` None means 10 x `target_fpr`."""

    paths: list[Path]
    labels: Path | None = None
    out: Path = Path("tune-report")
    cache_dir: Path | None = None
    target_fpr: float = 0.001
    tag_fpr: float | None = None
    step: float = THRESHOLD_STEP


@dataclass(frozen=True)
class Sample:
    """One labelled message and its scan facts."""

    path: Path
    label: str
    facts: MessageFacts


@dataclass(frozen=True)
class Scored:
    path: Path
    label: str
    verdict: Verdict


@dataclass(frozen=True)
class ThresholdRow:
    """Counts at one threshold: a message counts as flagged when its score >= threshold."""

    threshold: float
    true_positives: int
    false_positives: int
    phish: int
    ham: int

    @property
    def recall(self) -> float:
        return self.true_positives / self.phish if self.phish else 0.0

    @property
    def fpr(self) -> float:
        return self.false_positives / self.ham if self.ham else 0.0

    @property
    def precision(self) -> float:
        flagged = self.true_positives + self.false_positives
        # With nothing flagged there is no false positive, so precision is 1.
        return self.true_positives / flagged if flagged else 1.0


@dataclass
class TuneReport:
    """The numbers of one run; `write_report` turns them into files."""

    scored: list[Scored]
    rows: list[ThresholdRow]
    tag: ThresholdRow
    quarantine: ThresholdRow
    target_fpr: float
    tag_fpr: float
    configured: dict[str, float | None]
    scanned: int
    cached: int
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0
    out: Path = Path("tune-report")

    def count(self, label: str) -> int:
        return sum(1 for item in self.scored if item.label == label)

    def summary_lines(self) -> list[str]:
        """Return the lines the CLI prints after a run."""
        return [
            f"messages: {self.count('phish')} phish, {self.count('ham')} ham "
            f"({self.scanned} scanned, {self.cached} from cache, {len(self.skipped)} skipped) "
            f"in {self.seconds:.1f} s",
            f"suggested tag = {self.tag.threshold:g}: recall {self.tag.recall:.1%}, "
            f"false-positive rate {self.tag.fpr:.2%}",
            f"suggested quarantine = {self.quarantine.threshold:g}: recall {self.quarantine.recall:.1%}, "
            f"false-positive rate {self.quarantine.fpr:.2%}",
            f"report: {self.out / 'index.html'}",
        ]


Progress = Callable[[int, int], None]


class ProgressBar:
    """Draws `done/total` on a terminal stream; on a pipe, prints a line every 10 %."""

    def __init__(self, stream: IO[str], width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.tty = stream.isatty()
        self.last_decile = -1

    def __call__(self, done: int, total: int) -> None:
        if total <= 0:
            return
        if self.tty:
            filled = self.width * done // total
            bar = "#" * filled + "." * (self.width - filled)
            end = "\n" if done == total else ""
            self.stream.write(f"\rtune: [{bar}] {done}/{total}{end}")
            self.stream.flush()
            return

        decile = 10 * done // total
        if decile != self.last_decile:
            self.last_decile = decile
            self.stream.write(f"tune: {done}/{total} messages\n")
            self.stream.flush()


# -- labels ----------------------------------------------------------------

def read_labels(labels_file: Path) -> dict[Path, str]:
    """Read a TSV with a header row naming `file` and `label`; return resolved path -> label."""
    try:
        with open(labels_file, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter="\t")
            columns = reader.fieldnames or []
            if "file" not in columns or "label" not in columns:
                raise TuneError(f"labels file {labels_file} needs a header row with the columns "
                                f"file and label; found {', '.join(columns) or 'no header'}")
            base = labels_file.parent
            labels = {}
            for line, row in enumerate(reader, start=2):
                label = (row["label"] or "").strip().lower()
                name = (row["file"] or "").strip()
                if not name:
                    continue
                if label not in LABELS:
                    raise TuneError(f"{labels_file} line {line}: invalid label {row['label']!r}; "
                                    f"allowed: {', '.join(LABELS)}")
                labels[(base / name).resolve()] = label
            return labels
    except OSError as error:
        raise TuneError(f"cannot read labels file {labels_file}: {error.strerror}") from error


def label_from_folders(path: Path) -> str | None:
    """Return the name of the nearest parent folder called phish or ham, if any."""
    for parent in path.resolve().parents:
        if parent.name.lower() in LABELS:
            return parent.name.lower()
    return None


def collect_labelled(paths: list[Path], labels_file: Path | None
                     ) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """Expand `paths` into (file, label) pairs; return them and the skipped files with reasons."""
    files, skipped = scan_paths(paths)
    labels = read_labels(labels_file) if labels_file else None

    labelled = []
    for path in files:
        label = labels.get(path.resolve()) if labels is not None else label_from_folders(path)
        if label is None:
            skipped.append((path, "no label"))
            continue
        labelled.append((path, label))
    return labelled, skipped


# -- cache -----------------------------------------------------------------

def decoder_fingerprint(config: Config) -> str:
    """Return the settings that change decoded facts, as canonical JSON."""
    org = org_policy(config)
    settings = {
        "format": CACHE_FORMAT,
        "version": __version__,
        "limits": dataclasses.asdict(scan_limits(config)),
        "budget_seconds": config["scan.budget_seconds"],
        "org": {"domains": list(org.domains), "authserv_ids": list(org.authserv_ids),
                "trusted_networks": [str(n) for n in org.trusted_networks]},
    }
    return json.dumps(settings, sort_keys=True)


class FactsCache:
    """Pickled `MessageFacts` under `root/<key[:2]>/<key>.pickle`.

    The key is SHA-256 over the decoder fingerprint and the message bytes.
    The folder is created mode 0700 and entries are written atomically with
    mode 0600, because unpickling a file someone else wrote can run code:
    keep the cache folder private.
    """

    def __init__(self, root: Path, fingerprint: str) -> None:
        self.root = root
        self.fingerprint = fingerprint.encode("utf-8")
        root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def key(self, raw: bytes) -> str:
        digest = hashlib.sha256(self.fingerprint)
        digest.update(b"\0")
        digest.update(raw)
        return digest.hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.pickle"

    def load(self, key: str) -> MessageFacts | None:
        try:
            with open(self._path(key), "rb") as handle:
                facts = pickle.load(handle)
        except FileNotFoundError:
            return None
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError) as error:
            # An entry from an older layout or a torn write is scanned again.
            log.warning("event=tune_cache_unreadable key=%s error=%s", key, type(error).__name__)
            return None
        return facts if isinstance(facts, MessageFacts) else None

    def store(self, key: str, facts: MessageFacts) -> None:
        folder = self._path(key).parent
        folder.mkdir(exist_ok=True, mode=0o700)
        fd, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                pickle.dump(facts, handle, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(temporary, self._path(key))
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def _cacheable(facts: MessageFacts) -> bool:
    # A scan cut short by the budget or a crash may finish next time, for
    # example on a less busy machine, so only complete scans are kept.
    return not any(problem.kind == "incomplete" for problem in facts.problems)


async def gather_facts(labelled: list[tuple[Path, str]], config: Config, cache: FactsCache,
                       progress: Progress | None = None
                       ) -> tuple[list[Sample], int, int, list[tuple[Path, str]]]:
    """Return the facts of each message, the counts scanned and from the cache, and the failures."""
    samples: list[Sample] = []
    failures: list[tuple[Path, str]] = []
    pending: dict[Path, tuple[str, str]] = {}
    total = len(labelled)

    for path, label in labelled:
        try:
            raw = path.read_bytes()
        except OSError as error:
            failures.append((path, f"cannot read: {error.strerror}"))
            continue
        key = cache.key(raw)
        facts = cache.load(key)
        if facts is None:
            pending[path] = (label, key)
        else:
            samples.append(Sample(path, label, facts))
    cached = len(samples)
    done = len(samples) + len(failures)
    if progress:
        progress(done, total)

    if pending:
        async for path, result in scan_files(list(pending), config):
            label, key = pending[path]
            done += 1
            if isinstance(result, str):
                failures.append((path, result))
            else:
                samples.append(Sample(path, label, result.facts))
                if _cacheable(result.facts):
                    cache.store(key, result.facts)
            if progress:
                progress(done, total)
    return samples, len(pending), cached, failures


# -- numbers ---------------------------------------------------------------

def score_samples(samples: list[Sample], config: Config) -> list[Scored]:
    """Weigh every message's facts with the rule scores of `config`."""
    scored = []
    for sample in samples:
        envelope = envelope_from_headers(sample.facts)
        scored.append(Scored(sample.path, sample.label, evaluate(sample.facts, envelope, config)))
    return scored


def threshold_grid(scores: list[float], step: float) -> list[float]:
    """Return multiples of `step` from the lowest score (at most 0) to one step above the highest."""
    low = math.floor(min(scores + [0.0]) / step)
    high = math.ceil(max(scores + [0.0]) / step) + 1
    return [round(i * step, 6) for i in range(low, high + 1)]


def threshold_table(scored: list[Scored], step: float) -> list[ThresholdRow]:
    phish = [s.verdict.score for s in scored if s.label == "phish"]
    ham = [s.verdict.score for s in scored if s.label == "ham"]
    rows = []
    for threshold in threshold_grid(phish + ham, step):
        rows.append(ThresholdRow(threshold, sum(1 for x in phish if x >= threshold),
                                 sum(1 for x in ham if x >= threshold), len(phish), len(ham)))
    return rows


def suggest(rows: list[ThresholdRow], max_fpr: float, step: float) -> ThresholdRow:
    """Return the lowest positive threshold whose false-positive rate is at most `max_fpr`.

    The rate only falls as the threshold rises, so the lowest such threshold
    has the highest recall. Above the highest ham score the rate is 0, so a
    row always qualifies.
    """
    for row in rows:
        if row.threshold >= step and row.fpr <= max_fpr:
            return row
    return rows[-1]


def rule_hits(scored: list[Scored]) -> list[tuple[str, float, int, int]]:
    """Return (rule, weight, phish hits, ham hits), most hits first."""
    phish: Counter[str] = Counter()
    ham: Counter[str] = Counter()
    weights: dict[str, float] = {}
    for item in scored:
        for finding in item.verdict.findings:
            weights[finding.rule] = finding.score
            (phish if item.label == "phish" else ham)[finding.rule] += 1
    rules = sorted(weights, key=lambda rule: (-(phish[rule] + ham[rule]), rule))
    return [(rule, weights[rule], phish[rule], ham[rule]) for rule in rules]


def histogram_bins(scored: list[Scored], width: float) -> list[tuple[float, int, int]]:
    """Return (bin start, phish count, ham count) for bins [start, start + width)."""
    scores = [s.verdict.score for s in scored]
    low = math.floor(min(scores + [0.0]) / width)
    high = math.floor(max(scores + [0.0]) / width)
    bins = []
    for index in range(low, high + 1):
        start = index * width
        inside = [s for s in scored if start <= s.verdict.score < start + width]
        bins.append((start, sum(1 for s in inside if s.label == "phish"),
                     sum(1 for s in inside if s.label == "ham")))
    return bins


# -- the run ---------------------------------------------------------------

def _check_rate(name: str, value: float) -> None:
    if not 0 <= value <= 1 or math.isnan(value):
        raise TuneError(f"invalid {name} {value!r}; give a rate from 0 to 1, for example 0.001 for 0.1 %")


async def run_tune(config: Config, options: TuneOptions, progress: Progress | None = None) -> TuneReport:
    """Scan or load the labelled messages, compute the tables and write the report folder."""
    started = time.monotonic()
    tag_fpr = options.tag_fpr if options.tag_fpr is not None else min(1.0, 10 * options.target_fpr)
    _check_rate("--target-fpr", options.target_fpr)
    _check_rate("--tag-fpr", tag_fpr)
    if tag_fpr < options.target_fpr:
        raise TuneError(f"--tag-fpr ({tag_fpr}) must not be below --target-fpr ({options.target_fpr}), "
                        "because tagging is the milder action")

    labelled, skipped = collect_labelled(options.paths, options.labels)
    counts = Counter(label for _, label in labelled)
    if not counts["phish"] or not counts["ham"]:
        raise TuneError(f"need both phish and ham messages, found {counts['phish']} phish and "
                        f"{counts['ham']} ham in {', '.join(map(str, options.paths))}; label them "
                        "with --labels or with folders named phish and ham")

    cache = FactsCache(options.cache_dir or options.out / "cache", decoder_fingerprint(config))
    samples, scanned, cached, failures = await gather_facts(labelled, config, cache, progress)
    skipped.extend(failures)

    scored = score_samples(samples, config)
    rows = threshold_table(scored, options.step)
    report = TuneReport(
        scored=scored,
        rows=rows,
        tag=suggest(rows, tag_fpr, options.step),
        quarantine=suggest(rows, options.target_fpr, options.step),
        target_fpr=options.target_fpr,
        tag_fpr=tag_fpr,
        configured={"tag": config["thresholds.tag"], "quarantine": config["thresholds.quarantine"],
                    "reject": config["thresholds.reject"]},
        scanned=scanned,
        cached=cached,
        skipped=skipped,
        out=options.out,
    )
    write_report(report, options.step)
    report.seconds = time.monotonic() - started
    log.info("event=tune_done messages=%d scanned=%d cached=%d seconds=%.1f", len(scored), scanned,
             report.cached, report.seconds)
    return report


# -- the report ------------------------------------------------------------

def write_report(report: TuneReport, step: float) -> None:
    """Write every file of the report folder."""
    out = report.out
    out.mkdir(parents=True, exist_ok=True)
    bins = histogram_bins(report.scored, 1.0)

    _write(out / "thresholds.tsv", _thresholds_tsv(report.rows))
    _write(out / "rules.tsv", _rules_tsv(report))
    _write(out / "messages.tsv", _messages_tsv(report))
    _write(out / "histogram.txt", histogram_text(bins, report))
    _write(out / "thresholds.toml", thresholds_toml(report))
    _write(out / "summary.json", json.dumps(_summary(report), indent=2) + "\n")
    draw_histogram(out / "histogram.png", bins, report)
    draw_precision_recall(out / "precision-recall.png", report)
    _write(out / "index.html", report_html(report, bins))


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _thresholds_tsv(rows: list[ThresholdRow]) -> str:
    lines = ["threshold\tphish_flagged\tham_flagged\tprecision\trecall\tfalse_positive_rate"]
    for row in rows:
        lines.append(f"{row.threshold:g}\t{row.true_positives}\t{row.false_positives}\t"
                     f"{row.precision:.4f}\t{row.recall:.4f}\t{row.fpr:.4f}")
    return "\n".join(lines) + "\n"


def _rules_tsv(report: TuneReport) -> str:
    phish, ham = report.count("phish"), report.count("ham")
    lines = ["rule\tweight\tphish_hits\tham_hits\tphish_share\tham_share"]
    for rule, weight, phish_hits, ham_hits in rule_hits(report.scored):
        lines.append(f"{rule}\t{weight:g}\t{phish_hits}\t{ham_hits}\t"
                     f"{phish_hits / phish:.4f}\t{ham_hits / ham:.4f}")
    return "\n".join(lines) + "\n"


def _messages_tsv(report: TuneReport) -> str:
    lines = ["file\tlabel\tscore\taction\trules"]
    for item in sorted(report.scored, key=lambda s: (s.label, -s.verdict.score, str(s.path))):
        rules = ",".join(f.rule for f in item.verdict.findings) or "-"
        lines.append(f"{item.path}\t{item.label}\t{item.verdict.score:g}\t"
                     f"{item.verdict.action.label}\t{rules}")
    return "\n".join(lines) + "\n"


def histogram_text(bins: list[tuple[float, int, int]], report: TuneReport) -> str:
    """Draw the score distribution as text, one row per 1-point bin."""
    biggest = max([max(p, h) for _, p, h in bins] + [1])
    width = 40
    lines = [f"score bins of width 1; # = phish ({report.count('phish')}), "
             f"o = ham ({report.count('ham')}); bars scaled to {biggest} messages", ""]
    for start, phish, ham in bins:
        label = f"[{start:5g}, {start + 1:5g})"
        lines.append(f"{label}  phish {phish:5d} {'#' * math.ceil(width * phish / biggest)}")
        lines.append(f"{'':{len(label)}}  ham   {ham:5d} {'o' * math.ceil(width * ham / biggest)}")
    lines.append("")
    lines.append(f"suggested tag >= {report.tag.threshold:g}, quarantine >= {report.quarantine.threshold:g}")
    return "\n".join(lines) + "\n"


def thresholds_toml(report: TuneReport) -> str:
    """Return the `[thresholds]` snippet with the suggestions and their measured rates."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    tag, quarantine = report.tag, report.quarantine
    lines = [
        f"# Suggested by quishguard tune on {when} from {report.count('phish')} phish and "
        f"{report.count('ham')} ham messages.",
        f"# Target false-positive rates: tag {report.tag_fpr:g}, quarantine {report.target_fpr:g}.",
        "[thresholds]",
        f"tag = {tag.threshold:.1f}  # recall {tag.recall:.1%}, false-positive rate {tag.fpr:.2%}",
        f"quarantine = {quarantine.threshold:.1f}  # recall {quarantine.recall:.1%}, "
        f"false-positive rate {quarantine.fpr:.2%}",
    ]
    if report.configured.get("reject") is not None:
        reject = max(float(report.configured["reject"]), quarantine.threshold)
        lines.append(f"reject = {reject:.1f}  # kept from the current config")
    return "\n".join(lines) + "\n"


def _resolution_note(report: TuneReport) -> str:
    ham = report.count("ham")
    if not ham:
        return ""
    # The "rule of three": when none of n samples fails, the 95 % upper
    # confidence bound of the failure rate is about 3/n.
    note = (f"With {ham} ham messages, a measured false-positive rate of 0 only shows that the "
            f"true rate is below about {3 / ham:.2%} (95 % confidence). ")
    if report.target_fpr < 1 / ham:
        note += (f"The smallest measurable rate is {1 / ham:.2%}, so a target of "
                 f"{report.target_fpr:g} means no ham at or above the threshold. ")
    return note + "Add ham from your own mail to measure lower rates."


def _summary(report: TuneReport) -> dict:
    def row(item: ThresholdRow) -> dict:
        return {"threshold": item.threshold, "precision": round(item.precision, 6),
                "recall": round(item.recall, 6), "false_positive_rate": round(item.fpr, 6)}

    return {
        "version": __version__,
        "phish": report.count("phish"),
        "ham": report.count("ham"),
        "scanned": report.scanned,
        "cached": report.cached,
        "skipped": len(report.skipped),
        "target_fpr": report.target_fpr,
        "tag_fpr": report.tag_fpr,
        "suggested": {"tag": row(report.tag), "quarantine": row(report.quarantine)},
        "configured": report.configured,
    }


# -- charts ----------------------------------------------------------------

COLORS = {"phish": "#c0392b", "ham": "#2e86c1"}


def _figure(width: float, height: float):
    # The object API with the Agg canvas draws without pyplot's global state
    # and without a display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def draw_histogram(path: Path, bins: list[tuple[float, int, int]], report: TuneReport) -> None:
    """Draw the score histogram of both labels side by side, with the suggested thresholds."""
    figure = _figure(8, 4.5)
    axes = figure.add_subplot()
    starts = [start for start, _, _ in bins]
    axes.bar([s + 0.3 for s in starts], [p for _, p, _ in bins], width=0.4, align="center",
             color=COLORS["phish"], label=f"phish ({report.count('phish')})")
    axes.bar([s + 0.7 for s in starts], [h for _, _, h in bins], width=0.4, align="center",
             color=COLORS["ham"], label=f"ham ({report.count('ham')})")
    for row, name, style in ((report.tag, "tag", "--"), (report.quarantine, "quarantine", "-")):
        axes.axvline(row.threshold, color="black", linestyle=style, linewidth=1.2,
                     label=f"suggested {name} >= {row.threshold:g}")
    axes.set_xlabel("score (bins of width 1)")
    # Most ham scores 0, so a linear axis would hide the few messages that
    # matter; symlog stays linear from 0 to 1 and logarithmic above.
    axes.set_yscale("symlog", linthresh=1)
    axes.set_ylabel("messages (log scale)")
    axes.set_title("Score distribution by label")
    axes.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path, format="png")


def draw_precision_recall(path: Path, report: TuneReport) -> None:
    """Draw precision, recall and FPR over thresholds, and the precision-recall curve."""
    figure = _figure(11, 4.5)
    over, curve = figure.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    thresholds = [row.threshold for row in report.rows]
    over.plot(thresholds, [row.precision for row in report.rows], color="#1e8449", label="precision",
              drawstyle="steps-post")
    over.plot(thresholds, [row.recall for row in report.rows], color=COLORS["phish"],
              label="recall (phish flagged)", drawstyle="steps-post")
    over.plot(thresholds, [row.fpr for row in report.rows], color=COLORS["ham"],
              label="false-positive rate (ham flagged)", drawstyle="steps-post")
    for row, name, style in ((report.tag, "tag", "--"), (report.quarantine, "quarantine", "-")):
        over.axvline(row.threshold, color="black", linestyle=style, linewidth=1.2,
                     label=f"suggested {name} >= {row.threshold:g}")
    over.set_xlabel("threshold (score >= threshold is flagged)")
    over.set_ylabel("rate")
    over.set_ylim(-0.02, 1.02)
    over.set_title("Rates over thresholds")
    over.legend(loc="center right", fontsize="small")

    curve.plot([row.recall for row in report.rows], [row.precision for row in report.rows],
               color="#555555", marker=".")
    for row, name, marker in ((report.tag, "tag", "s"), (report.quarantine, "quarantine", "D")):
        curve.plot([row.recall], [row.precision], marker=marker, color="black", linestyle="none",
                   label=f"{name} {row.threshold:g}")
    curve.set_xlabel("recall")
    curve.set_ylabel("precision")
    curve.set_xlim(-0.02, 1.02)
    curve.set_ylim(-0.02, 1.02)
    curve.set_title("Precision-recall curve")
    curve.legend(loc="lower left", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, format="png")


# -- HTML ------------------------------------------------------------------

def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _table(header: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{_e(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _misses(report: TuneReport) -> str:
    ham_flagged = sorted((s for s in report.scored
                          if s.label == "ham" and s.verdict.score >= report.tag.threshold),
                         key=lambda s: -s.verdict.score)
    phish_missed = sorted((s for s in report.scored
                           if s.label == "phish" and s.verdict.score < report.tag.threshold),
                          key=lambda s: s.verdict.score)

    def rows(items: list[Scored]) -> list[list[object]]:
        return [[item.path.name, f"{item.verdict.score:g}",
                 ", ".join(f"{f.rule} {f.score:g}" for f in item.verdict.findings) or "-"]
                for item in items[:MAX_LISTED_MISSES]]

    return (f"<h2>Ham at or above the suggested tag threshold ({len(ham_flagged)})</h2>"
            + _table(["file", "score", "rules"], rows(ham_flagged))
            + f"<h2>Phish below the suggested tag threshold ({len(phish_missed)})</h2>"
            + _table(["file", "score", "rules"], rows(phish_missed))
            + f"<p>Each list shows at most {MAX_LISTED_MISSES} messages; messages.tsv has all.</p>")


def report_html(report: TuneReport, bins: list[tuple[float, int, int]]) -> str:
    """Build the static report page: inline styles, no scripts, no links."""
    phish, ham = report.count("phish"), report.count("ham")
    configured = [[name, "-" if value is None else f"{value:g}"] for name, value in report.configured.items()]
    suggestions = [
        [name, f"{row.threshold:g}", f"{target:g}", f"{row.precision:.1%}", f"{row.recall:.1%}",
         f"{row.fpr:.2%}", row.false_positives]
        for name, row, target in (("tag", report.tag, report.tag_fpr),
                                  ("quarantine", report.quarantine, report.target_fpr))
    ]
    threshold_rows = [[f"{row.threshold:g}", row.true_positives, row.false_positives,
                       f"{row.precision:.3f}", f"{row.recall:.3f}", f"{row.fpr:.4f}"]
                      for row in report.rows]
    rules = [[rule, f"{weight:g}", p, f"{p / phish:.1%}", h, f"{h / ham:.1%}"]
             for rule, weight, p, h in rule_hits(report.scored)]
    skipped = [[path.name, reason] for path, reason in report.skipped[:MAX_LISTED_MISSES]]
    note = _resolution_note(report)

    body = "".join([
        "<h1>quishguard threshold tuning</h1>",
        f"<p>{phish} phish and {ham} ham messages; {report.scanned} scanned, {report.cached} from "
        f"the cache, {len(report.skipped)} skipped. quishguard {_e(__version__)}, "
        f"{_e(datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))}.</p>",
        "<h2>Suggested thresholds</h2>",
        _table(["action", "threshold", "target FPR", "precision", "recall", "FPR", "ham flagged"],
               suggestions),
        f"<p>{_e(note)}</p>" if note else "",
        "<p>Config snippet (thresholds.toml):</p>",
        f"<pre>{_e(thresholds_toml(report))}</pre>",
        "<h3>Current config</h3>",
        _table(["threshold", "value"], configured),
        "<h2>Score distribution</h2>",
        '<img src="histogram.png" alt="Histogram of scores, phish and ham side by side, with the '
        'suggested thresholds as vertical lines" width="800" height="450">',
        f"<pre>{_e(histogram_text(bins, report))}</pre>",
        "<h2>Precision and recall over thresholds</h2>",
        '<img src="precision-recall.png" alt="Precision, recall and false-positive rate over '
        'thresholds, and the precision-recall curve" width="1100" height="450">',
        _table(["threshold", "phish flagged", "ham flagged", "precision", "recall", "FPR"],
               threshold_rows),
        "<h2>Rule hits by label</h2>",
        "<p>Rules with a weight of 0 do not fire and are not listed.</p>",
        _table(["rule", "weight", "phish hits", "of phish", "ham hits", "of ham"], rules),
        _misses(report),
        "<h2>Skipped files</h2>" + _table(["file", "reason"], skipped) if skipped else "",
    ])
    style = ("body{font-family:sans-serif;margin:1.5em;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}"
             "th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left}"
             "th{background:#eee}pre{background:#f6f6f6;padding:.5em}")
    return ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            '<meta http-equiv="Content-Security-Policy" content="script-src \'none\'; '
            'object-src \'none\'; base-uri \'none\'; form-action \'none\'">'
            f"<title>quishguard tune report</title><style>{style}</style></head>"
            f"<body>{body}</body></html>\n")
