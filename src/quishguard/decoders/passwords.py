"""Find passwords that a message quotes for its own encrypted attachments.

Phishing mail sends a password-protected PDF, so that filters cannot read
it, and prints the password in the body ("Senha PDF: 123", "Password:
4821"). The candidates found here are tried on encrypted PDFs after the
empty password. The keywords cover English, Portuguese, Spanish, French,
German, Italian, Dutch and Polish.
"""

from __future__ import annotations

import re

MAX_CANDIDATES = 8
MAX_PASSWORD_CHARS = 64

_KEYWORDS = (
    r"password|passcode|passwd|pwd|pw|pin|senha|contrase(?:ñ|n)a|clave|mot de passe"
    r"|passwort|kennwort|wachtwoord|has(?:ł|l)o|parola|c(?:ó|o)digo|code"
)

# The keyword, up to 30 characters of label ("de acesso", "for the PDF"),
# then ":" / "=" / "is", then the token.
_CANDIDATE = re.compile(
    rf"\b(?:{_KEYWORDS})\b[^:=\n]{{0,30}}?(?:[:=]|\bis\b)\s*[\"'\u201c\u201d\u00ab\u00bb]?"
    rf"([^\s\"'\u201c\u201d\u00ab\u00bb]{{1,{MAX_PASSWORD_CHARS}}})",
    re.IGNORECASE,
)
_TRAILING = ".,;:!?)]}"


def find_password_candidates(texts: list[str]) -> tuple[str, ...]:
    """Return up to `MAX_CANDIDATES` distinct password candidates quoted in `texts`, in order."""
    found: list[str] = []
    for text in texts:
        for match in _CANDIDATE.finditer(text):
            candidate = match.group(1).rstrip(_TRAILING)
            if candidate and candidate not in found:
                found.append(candidate)
            if len(found) >= MAX_CANDIDATES:
                return tuple(found)
    return tuple(found)
