"""Exceptions raised by quishguard.

    QuishguardError
    ├── ConfigError        invalid or unreadable configuration; stops start-up
    ├── QuarantineError    the quarantine store could not read or write
    │   └── NotFoundError  no quarantined message with that id
    └── RelayError         the next hop could not take the message
        ├── RelayTempError the next hop is unreachable, timed out or answered 4xx
        └── RelayPermError the next hop answered 5xx
"""

from __future__ import annotations


class QuishguardError(Exception):
    """Base class of every error quishguard raises on purpose."""


class ConfigError(QuishguardError):
    """A configuration file or value is invalid."""


class QuarantineError(QuishguardError):
    """The quarantine store failed."""


class NotFoundError(QuarantineError):
    """No quarantined message has the requested id."""


class RelayError(QuishguardError):
    """Relaying to the next hop failed; `code` and `text` form the SMTP reply to pass back."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text

    @property
    def reply(self) -> str:
        return f"{self.code} {self.text}"


class RelayTempError(RelayError):
    """The next hop is unreachable, timed out or answered 4xx."""


class RelayPermError(RelayError):
    """The next hop answered 5xx."""
