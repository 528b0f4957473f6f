"""Placeholder: the rule table is being written."""
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    name: str
    score: float
    description: str


RULES: tuple[Rule, ...] = ()
