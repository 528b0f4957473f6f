"""Display-name matching for the impersonation rules: organisation people and internal services.

Names are compared case-folded, with accents, punctuation and repeated
spaces removed, so "ANN  SMITH", "Smith, Ann" and "Ann Smith (CEO)" all
match the configured person "Ann Smith". A person matches only as whole
words, so "Annette Smithers" does not match "Ann Smith".
"""

from __future__ import annotations

import logging
import re
import unicodedata
from functools import lru_cache
from pathlib import Path

from ..config import Config

log = logging.getLogger(__name__)

# Internal services that credential and payroll lures pose as. "IT" and
# "HR" count only as whole words; "IT" also only in capitals, because the
# lowercase word "it" appears in ordinary display names ("Get it Now").
_SERVICES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("voicemail", re.compile(r"\bvoice\s*-?\s*(?:mail|message)s?\b", re.IGNORECASE)),
    ("fax", re.compile(r"\be-?fax\b", re.IGNORECASE)),
    ("scanner", re.compile(r"\b(?:scanner|scan\s+to\s+(?:e-?mail|pdf|folder)|scanned\s+documents?)\b",
                           re.IGNORECASE)),
    ("payroll", re.compile(r"\bpayroll\b", re.IGNORECASE)),
    ("HR", re.compile(r"\b(?:HR|human\s+resources)\b", re.IGNORECASE)),
    ("IT", re.compile(r"(?<![A-Za-z])IT(?![A-Za-z])")),
)
_HELPDESK = re.compile(r"\b(?:help\s*desk|service\s+desk|it\s+support)\b", re.IGNORECASE)


def _normalise(name: str) -> str:
    decomposed = unicodedata.normalize("NFKD", name)
    letters = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(re.sub(r"[^\w]+", " ", letters.casefold()).split())


@lru_cache(maxsize=8)
def _people_file(path: Path, modified_ns: int) -> tuple[str, ...]:
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    log.info("event=people_file_loaded path=%s names=%d", path, len(names))
    return tuple(names)


def people(config: Config) -> tuple[str, ...]:
    """Return `[org] people` plus the names in `[org] people_file` (re-read when the file changes)."""
    names = config["org.people"]
    path = config["org.people_file"]
    if path is None:
        return names
    try:
        return names + _people_file(path, path.stat().st_mtime_ns)
    except (OSError, UnicodeDecodeError) as error:
        log.error("event=people_file_unreadable path=%s error=%s", path, error)
        return names


def match_person(display_name: str, names: tuple[str, ...]) -> str:
    """Return the configured person whose name `display_name` carries, or ""."""
    if not display_name or not names:
        return ""
    words = _normalise(display_name).split()
    text = f" {' '.join(words)} "
    reversed_text = f" {' '.join(words[1:] + words[:1])} " if len(words) > 1 else text
    for name in names:
        expected = _normalise(name)
        if expected and (f" {expected} " in text or f" {expected} " in reversed_text):
            return name
    return ""


def match_service(display_name: str) -> str:
    """Return the internal service `display_name` poses as (voicemail, fax, scanner, payroll, HR, IT), or ""."""
    if not display_name:
        return ""
    for service, pattern in _SERVICES:
        if pattern.search(display_name):
            return service
    if _HELPDESK.search(display_name):
        return "IT"
    return ""
