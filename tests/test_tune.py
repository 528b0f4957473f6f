"""Threshold tuning over the samples: labels, the cache, the numbers and the report files."""

from __future__ import annotations

import html.parser
import json
import shutil
import struct
import tomllib
from pathlib import Path

import pytest

from quishguard.config import build_config
from quishguard.scoring.rules import RULES
from quishguard.tune import (ThresholdRow, TuneError, TuneOptions, read_labels, run_tune, suggest,
                             threshold_grid)

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
KNOWN_RULES = {rule.name for rule in RULES}
SAMPLE_SETTINGS = {"org": {"domains": ["example.com"], "authserv_ids": ["mx.example.com"]}}


def sample_config(**sections):
    data = json.loads(json.dumps(SAMPLE_SETTINGS))
    data.update(sections)
    return build_config(data, "test", known_rules=KNOWN_RULES)


@pytest.fixture
def corpus(tmp_path) -> Path:
    """The samples sorted into phish/ and ham/ folders."""
    root = tmp_path / "corpus"
    for label, pattern in (("phish", "phish-*.eml"), ("ham", "benign-*.eml")):
        (root / label).mkdir(parents=True)
        for path in SAMPLES.glob(pattern):
            shutil.copy(path, root / label / path.name)
    return root


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


class TagCollector(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


async def test_tune_folder_labels_report(corpus, tmp_path):
    out = tmp_path / "report"

    report = await run_tune(sample_config(), TuneOptions(paths=[corpus], out=out))

    assert report.count("phish") == len(list(SAMPLES.glob("phish-*.eml")))
    assert report.count("ham") == len(list(SAMPLES.glob("benign-*.eml")))
    assert report.scanned == report.count("phish") + report.count("ham")
    assert report.cached == 0
    for name in ("index.html", "histogram.png", "histogram.txt", "precision-recall.png",
                 "thresholds.tsv", "rules.tsv", "messages.tsv", "thresholds.toml", "summary.json"):
        assert (out / name).is_file(), name


async def test_tune_suggests_separating_thresholds(corpus, tmp_path):
    report = await run_tune(sample_config(), TuneOptions(paths=[corpus], out=tmp_path / "r"))

    ham_max = max(s.verdict.score for s in report.scored if s.label == "ham")
    phish_min = min(s.verdict.score for s in report.scored if s.label == "phish")
    assert ham_max < report.quarantine.threshold <= phish_min
    assert report.quarantine.recall == 1.0
    assert report.quarantine.fpr == 0.0
    assert report.tag.threshold <= report.quarantine.threshold


async def test_tune_toml_snippet_loads(corpus, tmp_path):
    report = await run_tune(sample_config(), TuneOptions(paths=[corpus], out=tmp_path / "r"))

    snippet = tomllib.loads((tmp_path / "r" / "thresholds.toml").read_text())
    config = build_config(snippet, "snippet", known_rules=KNOWN_RULES)
    assert config["thresholds.tag"] == report.tag.threshold
    assert config["thresholds.quarantine"] == report.quarantine.threshold


async def test_tune_rescore_from_cache(corpus, tmp_path):
    out = tmp_path / "r"
    first = await run_tune(sample_config(), TuneOptions(paths=[corpus], out=out))

    heavier = sample_config(rules={"QR_URL": {"score": 10.0}})
    second = await run_tune(heavier, TuneOptions(paths=[corpus], out=out))

    assert second.scanned == 0
    assert second.cached == first.scanned
    before = {s.path.name: s.verdict.score for s in first.scored}
    after = {s.path.name: s.verdict.score for s in second.scored}
    qr_files = {s.path.name for s in first.scored if any(f.rule == "QR_URL" for f in s.verdict.findings)}
    assert qr_files
    for name in qr_files:
        assert after[name] == pytest.approx(before[name] + 7.0)
    for name in set(before) - qr_files:
        assert after[name] == before[name]


async def test_tune_cache_misses_after_limit_change(corpus, tmp_path):
    out = tmp_path / "r"
    await run_tune(sample_config(), TuneOptions(paths=[corpus], out=out))

    changed = sample_config(scan={"max_pdf_pages": 3})
    report = await run_tune(changed, TuneOptions(paths=[corpus], out=out))

    assert report.cached == 0


async def test_tune_labels_from_tsv(tmp_path):
    labels = tmp_path / "labels.tsv"
    rows = ["file\tlabel\tsource"]
    for path in sorted(SAMPLES.glob("*.eml")):
        label = "phish" if path.name.startswith("phish-") else "ham"
        # An absolute path stays as it is when joined to the TSV's folder.
        rows.append(f"{path}\t{label}\tsamples")
    labels.write_text("\n".join(rows) + "\n")

    report = await run_tune(sample_config(), TuneOptions(paths=[SAMPLES], labels=labels,
                                                         out=tmp_path / "r"))

    assert report.count("phish") == len(list(SAMPLES.glob("phish-*.eml")))
    assert report.count("ham") == len(list(SAMPLES.glob("benign-*.eml")))
    assert report.skipped == []


def test_read_labels_rejects_unknown_label(tmp_path):
    labels = tmp_path / "labels.tsv"
    labels.write_text("file\tlabel\na.eml\tspam\n")

    with pytest.raises(TuneError, match=r"line 2: invalid label 'spam'; allowed: phish, ham"):
        read_labels(labels)


async def test_tune_needs_both_labels(corpus, tmp_path):
    shutil.rmtree(corpus / "ham")

    with pytest.raises(TuneError, match="need both phish and ham messages"):
        await run_tune(sample_config(), TuneOptions(paths=[corpus], out=tmp_path / "r"))


async def test_tune_html_static_and_escaped(corpus, tmp_path):
    # A phish-labelled message that scores 0 is listed by file name as a miss.
    hostile = corpus / "phish" / "<b>x&y<b>.eml"
    shutil.copy(SAMPLES / "benign-plain.eml", hostile)

    await run_tune(sample_config(), TuneOptions(paths=[corpus], out=tmp_path / "r"))

    page = (tmp_path / "r" / "index.html").read_text()
    parser = TagCollector()
    parser.feed(page)
    tags = {tag for tag, _ in parser.tags}
    images = sorted(attrs["src"] for tag, attrs in parser.tags if tag == "img")
    assert "script" not in tags
    assert "a" not in tags
    assert images == ["histogram.png", "precision-recall.png"]
    assert "<b>x&y<b>" not in page
    assert "&lt;b&gt;x&amp;y&lt;b&gt;.eml" in page


async def test_tune_images_are_png(corpus, tmp_path):
    await run_tune(sample_config(), TuneOptions(paths=[corpus], out=tmp_path / "r"))

    assert png_size(tmp_path / "r" / "histogram.png") == (800, 450)
    assert png_size(tmp_path / "r" / "precision-recall.png") == (1100, 450)


def test_threshold_grid_covers_scores():
    assert threshold_grid([0.0, 1.2, 3.0], 0.5) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]
    assert threshold_grid([-1.0, 0.4], 0.5)[0] == -1.0


@pytest.mark.parametrize("max_fpr, expected", [(0.0, 4.0), (0.25, 2.0), (1.0, 1.0)])
def test_suggest_lowest_threshold_within_rate(max_fpr, expected):
    # Four ham messages: flagged counts fall 3, 1, 0 as the threshold rises.
    rows = [ThresholdRow(0.0, 4, 4, 4, 4), ThresholdRow(1.0, 4, 3, 4, 4), ThresholdRow(2.0, 4, 1, 4, 4),
            ThresholdRow(4.0, 3, 0, 4, 4)]

    assert suggest(rows, max_fpr, 1.0).threshold == expected


@pytest.mark.parametrize("options, message", [
    ({"target_fpr": 1.5}, "invalid --target-fpr 1.5"),
    ({"target_fpr": 0.1, "tag_fpr": 0.01}, "--tag-fpr .* must not be below --target-fpr"),
])
async def test_tune_rejects_bad_rates(corpus, tmp_path, options, message):
    with pytest.raises(TuneError, match=message):
        await run_tune(sample_config(), TuneOptions(paths=[corpus], out=tmp_path / "r", **options))
