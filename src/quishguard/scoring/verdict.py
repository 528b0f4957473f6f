"""Turn message facts into a verdict: run the checks, weigh the findings, pick the action.

Weights come from the rule table (`rules.RULES`) unless `[rules.NAME] score`
overrides them; a weight of 0 disables a rule. A rule that fires several
times counts once, with the evidence of each hit. The action follows the
thresholds in `[thresholds]`, like rspamd's actions: accept < tag <
quarantine < reject. The fail mode for incomplete scans is applied by the
pipeline, not here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..config import Config
from ..model import Action, Envelope, Finding, MessageFacts, Verdict
from .rules import CHECKS, COMBOS, RULES_BY_NAME, Check, clip
from .urls import qr_url

logger = logging.getLogger(__name__)

# Evidence entries kept per finding; the rest are counted, so a message with
# hundreds of matching links still gives a header of bounded size.
MAX_EVIDENCE = 5


@dataclass
class _Hits:
    """Evidence collected for one rule during a scan."""

    details: list[str] = field(default_factory=list)
    count: int = 0

    def add(self, detail: str) -> None:
        self.count += 1
        if len(self.details) < MAX_EVIDENCE and detail not in self.details:
            self.details.append(detail)

    def evidence(self) -> str:
        text = "; ".join(self.details)
        extra = self.count - len(self.details)
        return f"{text}; and {extra} more" if extra > 0 else text


def rule_score(rule: str, config: Config) -> float:
    """Return the weight of `rule`: the `[rules.NAME]` override, else its default score."""
    if rule in config.rule_scores:
        return config.rule_scores[rule]
    return RULES_BY_NAME[rule].score


def action_for_score(score: float, config: Config) -> Action:
    """Map a score to an action with `[thresholds]`; without `reject`, never reject."""
    reject = config["thresholds.reject"]
    if reject is not None and score >= reject:
        return Action.REJECT
    if score >= config["thresholds.quarantine"]:
        return Action.QUARANTINE
    if score >= config["thresholds.tag"]:
        return Action.TAG
    return Action.ACCEPT


def _run_check(check: Check, facts: MessageFacts, envelope: Envelope, config: Config,
               hits: dict[str, _Hits]) -> bool:
    """Run one check into `hits`; return False when it crashed.

    A crashing check must not turn into a clean verdict, so its failure
    becomes a SCAN_RULE_FAILED hit. Hits it yielded before crashing are kept.
    """
    name = getattr(check, "__name__", repr(check))
    try:
        for rule, detail in check(facts, envelope, config):
            if rule not in RULES_BY_NAME:
                raise KeyError(f"check {name} yielded undeclared rule {rule!r}")
            hits.setdefault(rule, _Hits()).add(detail)
    except Exception as error:
        logger.exception("rule check %s failed on message %s", name, facts.message_id or "(no Message-ID)")
        hits.setdefault("SCAN_RULE_FAILED", _Hits()).add(f"check {name} failed: {clip(type(error).__name__)}")
        return False
    return True


def _apply_combos(hits: dict[str, _Hits], config: Config) -> None:
    """Add the composite rules whose required rules fired with a non-zero weight."""
    fired = {rule for rule in hits if rule_score(rule, config) != 0}
    for combo in COMBOS:
        matched = []
        for choices in combo.requires:
            present = sorted(choices & fired)
            if not present:
                break
            matched.append(present[0])
        else:
            hits.setdefault(combo.name, _Hits()).add(" + ".join(matched))


def _distinct_urls(facts: MessageFacts, limit: int) -> tuple[str, ...]:
    urls: dict[str, None] = {}
    for code in facts.qr_codes:
        url = qr_url(code.payload)
        if url:
            urls.setdefault(url)
    for link in facts.links:
        urls.setdefault(link.url)
    return tuple(list(urls)[:limit])


def evaluate(facts: MessageFacts, envelope: Envelope, config: Config) -> Verdict:
    """Run every check on `facts` and return the weighed verdict."""
    hits: dict[str, _Hits] = {}
    checks_ok = all([_run_check(check, facts, envelope, config, hits) for check in CHECKS])

    _apply_combos(hits, config)

    findings = []
    for rule, rule_hits in hits.items():
        score = rule_score(rule, config)
        if score == 0:
            logger.debug("rule %s disabled by a score of 0", rule)
            continue
        findings.append(Finding(rule, score, rule_hits.evidence()))
        logger.debug("rule %s fired: %s (%s)", rule, score, rule_hits.evidence())
    findings.sort(key=lambda finding: (-finding.score, finding.rule))

    # Rounding removes float noise such as 0.30000000000000004, which could
    # otherwise put a score a hair below a threshold it equals.
    score = round(sum(finding.score for finding in findings), 6)

    # Problems of an unknown kind are reported as SCAN_INCOMPLETE by the
    # checks, so they count as incomplete here too.
    incomplete = not checks_ok or any(problem.kind != "limit" for problem in facts.problems)
    return Verdict(
        score=score,
        action=action_for_score(score, config),
        findings=tuple(findings),
        qr_codes=tuple(facts.qr_codes),
        urls=_distinct_urls(facts, config["scan.max_urls"]),
        scan_incomplete=incomplete,
    )
