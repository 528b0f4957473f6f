"""Scoring: named rules over message facts, weighed into a verdict and an action."""

from __future__ import annotations

from .rules import CHECKS, COMBOS, RULES, Rule
from .verdict import action_for_score, evaluate

__all__ = ["CHECKS", "COMBOS", "RULES", "Rule", "action_for_score", "evaluate"]
