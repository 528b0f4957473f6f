"""evaluate() and action_for_score(): weights, overrides, thresholds and crashing checks."""

from __future__ import annotations

import logging

import pytest

from quishguard.config import build_config
from quishguard.model import Action
from quishguard.scoring import verdict as verdict_module
from quishguard.scoring.rules import RULES_BY_NAME
from quishguard.scoring.verdict import MAX_EVIDENCE, action_for_score, evaluate

from .factories import config, envelope, facts, html, image_only, link, problem, qr

HARVEST_URL = "https://login.example.test/auth"


def findings_of(verdict):
    return {finding.rule: finding for finding in verdict.findings}


def test_score_sums_findings():
    verdict = evaluate(image_only(qr(HARVEST_URL)), envelope(), config())

    expected = RULES_BY_NAME["QR_URL"].score + RULES_BY_NAME["QR_IMAGE_ONLY_BODY"].score
    assert verdict.score == pytest.approx(expected)
    assert set(findings_of(verdict)) == {"QR_URL", "QR_IMAGE_ONLY_BODY"}


def test_override_changes_weight():
    settings = config(rules={"QR_URL": {"score": 7.5}})

    verdict = evaluate(facts(qr_codes=[qr(HARVEST_URL)]), envelope(), settings)

    assert findings_of(verdict)["QR_URL"].score == 7.5
    assert verdict.score == 7.5
    assert verdict.action is Action.TAG


def test_override_can_be_negative():
    settings = config(rules={"QR_IMAGE_ONLY_BODY": {"score": -1.0}})

    verdict = evaluate(image_only(qr(HARVEST_URL)), envelope(), settings)

    assert findings_of(verdict)["QR_IMAGE_ONLY_BODY"].score == -1.0
    assert verdict.score == pytest.approx(RULES_BY_NAME["QR_URL"].score - 1.0)


def test_zero_score_disables_rule():
    settings = config(rules={"QR_URL": {"score": 0}})

    verdict = evaluate(facts(qr_codes=[qr(HARVEST_URL)]), envelope(), settings)

    assert "QR_URL" not in findings_of(verdict)
    assert verdict.score == 0
    assert verdict.action is Action.ACCEPT


def test_disabled_rule_blocks_combo():
    message = facts(html=[html("2", attachment=True, meta_refresh=("https://x.example.test",))])
    settings = config(rules={"REDIRECT_META_REFRESH": {"score": 0}})

    verdict = evaluate(message, envelope(), settings)

    assert "COMBO_HTML_ATTACHMENT_ACTIVE" not in findings_of(verdict)
    assert "HTML_ATTACHMENT" in findings_of(verdict)


@pytest.mark.parametrize(
    ("score", "expected"),
    [
        (0.0, Action.ACCEPT),
        (3.9, Action.ACCEPT),
        (4.0, Action.TAG),
        (7.99, Action.TAG),
        (8.0, Action.QUARANTINE),
        (1000.0, Action.QUARANTINE),
        (-5.0, Action.ACCEPT),
    ],
)
def test_default_thresholds_pick_action(score, expected):
    assert action_for_score(score, config()) is expected


@pytest.mark.parametrize(
    ("score", "expected"),
    [
        (1.9, Action.ACCEPT),
        (2.0, Action.TAG),
        (5.0, Action.QUARANTINE),
        (11.9, Action.QUARANTINE),
        (12.0, Action.REJECT),
    ],
)
def test_configured_thresholds_pick_action(score, expected):
    settings = build_config({"thresholds": {"tag": 2.0, "quarantine": 5.0, "reject": 12.0}})

    assert action_for_score(score, settings) is expected


def test_absent_reject_never_rejects():
    settings = config()

    assert settings["thresholds.reject"] is None
    assert action_for_score(10_000.0, settings) is Action.QUARANTINE


def test_float_noise_reaches_threshold():
    # Three weights of 0.1 sum to 0.30000000000000004 in binary floating point.
    settings = config(thresholds={"tag": 0.3, "quarantine": 8.0},
                      rules={"QR_NON_URL": {"score": 0.1}, "MIME_LIMIT": {"score": 0.1},
                             "SCAN_INCOMPLETE": {"score": 0.1}})
    message = facts(qr_codes=[qr("TKT-1")], problems=[problem("limit"), problem("incomplete")])

    verdict = evaluate(message, envelope(), settings)

    assert verdict.score == 0.3
    assert verdict.action is Action.TAG


def test_findings_sorted_by_score_then_name():
    settings = config(rules={"REDIRECT_META_REFRESH": {"score": 2.5}})
    message = facts(html=[html(meta_refresh=("https://x.example.test",), js_redirects=("https://x.example.test",),
                               uses_atob=True)])

    verdict = evaluate(message, envelope(), settings)

    assert [f.rule for f in verdict.findings] == ["REDIRECT_JS_LOCATION", "REDIRECT_META_REFRESH", "HTML_JS_ATOB"]
    assert verdict.top_rule == "REDIRECT_JS_LOCATION"


def test_repeated_rule_counts_once():
    codes = [qr(f"{HARVEST_URL}/{n}", location=f"1.{n}") for n in range(8)]

    verdict = evaluate(facts(qr_codes=codes), envelope(), config())
    finding = findings_of(verdict)["QR_URL"]

    assert verdict.score == RULES_BY_NAME["QR_URL"].score
    assert finding.detail.count(HARVEST_URL) == MAX_EVIDENCE
    assert finding.detail.endswith(f"and {8 - MAX_EVIDENCE} more")


def check_that_crashes(facts, envelope, config):
    yield "QR_URL", "hit before the crash"
    raise RuntimeError("bug in a rule")


def check_with_unknown_rule(facts, envelope, config):
    yield "NOT_A_RULE", "anything"


def test_crashing_check_becomes_finding(monkeypatch, caplog):
    monkeypatch.setattr(verdict_module, "CHECKS", (check_that_crashes,) + verdict_module.CHECKS)

    with caplog.at_level(logging.ERROR, logger="quishguard.scoring.verdict"):
        verdict = evaluate(facts(links=[link(f"https://www.google.com/url?q={HARVEST_URL}")]), envelope(), config())
    found = findings_of(verdict)

    assert found["SCAN_RULE_FAILED"].detail == "check check_that_crashes failed: RuntimeError"
    assert "URL_OPEN_REDIRECT" in found
    assert "QR_URL" in found
    assert verdict.scan_incomplete
    assert "check_that_crashes" in caplog.text
    assert caplog.records[0].exc_info is not None


def test_undeclared_rule_becomes_finding(monkeypatch):
    monkeypatch.setattr(verdict_module, "CHECKS", (check_with_unknown_rule,))

    verdict = evaluate(facts(), envelope(), config())

    assert [f.rule for f in verdict.findings] == ["SCAN_RULE_FAILED"]
    assert verdict.scan_incomplete


def test_incomplete_problem_marks_verdict():
    verdict = evaluate(facts(problems=[problem("incomplete")]), envelope(), config())

    assert verdict.scan_incomplete
    assert findings_of(verdict)["SCAN_INCOMPLETE"].detail == "1.2: decoder timed out"


def test_limit_problem_keeps_verdict_complete():
    verdict = evaluate(facts(problems=[problem("limit", reason="more than 200 parts")]), envelope(), config())

    assert not verdict.scan_incomplete
    assert "MIME_LIMIT" in findings_of(verdict)


def test_clean_message_is_accepted():
    verdict = evaluate(facts(links=[link("https://www.example.org/news")]), envelope(), config())

    assert verdict.findings == ()
    assert verdict.score == 0
    assert verdict.action is Action.ACCEPT
    assert not verdict.scan_incomplete


def test_urls_are_distinct_and_capped():
    message = facts(
        qr_codes=[qr(HARVEST_URL), qr("TKT-1")],
        links=[link(HARVEST_URL), link("https://a.example.org/"), link("https://b.example.org/")],
    )

    verdict = evaluate(message, envelope(), config(scan={"max_urls": 2}))

    assert verdict.urls == (HARVEST_URL, "https://a.example.org/")


def test_verdict_keeps_qr_codes():
    codes = [qr(HARVEST_URL), qr("TKT-1")]

    verdict = evaluate(facts(qr_codes=codes), envelope(), config())

    assert verdict.qr_codes == tuple(codes)
