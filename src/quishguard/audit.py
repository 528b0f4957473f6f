"""Audit delivered mail: did each message pass the hop, and does it claim an organisation sender without authentication?

The hop stamps every message it relays (`stamp.stamp_field`: an HMAC over
Message-ID, Date, From, the envelope recipients, the action and a
timestamp). Mail that reached the mailbox another way, for example by
Microsoft 365 Direct Send straight to the tenant, has no valid stamp. For
each message this reports the stamp (valid, missing or invalid), whether
From claims an organisation domain from outside the trusted networks without
aligned authentication, and the `Received` path it came by.

Inputs: .eml files, folders (every *.eml below, or a Maildir: a folder with
cur/, new/ and tmp/), and mbox files (the first line starts with "From ").
Messages are read and parsed, never opened in a browser or fetched from.
"""

from __future__ import annotations

import logging
import mailbox
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .config import Config
from .decoders.sender import get_addresses, judge_sender, received_client_ip
from .model import Envelope
from .pipeline import org_policy
from .stamp import authserv_id, split_message, verify_stamp

log = logging.getLogger(__name__)

# Delivered copies name their mailbox in one of these (Postfix, Exchange, Dovecot).
_RECIPIENT_HEADERS = ("delivered-to", "x-original-to", "x-ms-exchange-organization-originalenveloperecipients")
_BY_CLAUSE = re.compile(r"\bby\s+([^\s;()]+)", re.IGNORECASE)
_FROM_CLAUSE = re.compile(r"^\s*from\s+([^\s;()]+)", re.IGNORECASE)
_COMMENT = re.compile(r"\([^()]*\)")
_DMARC_PASS = re.compile(r"(?:^|[;\s])dmarc\s*=\s*pass\b", re.IGNORECASE)


@dataclass(frozen=True)
class Hop:
    """One `Received` header: the client name and address, and the receiving host."""

    sender: str
    ip: str | None
    by: str

    def as_json(self) -> dict[str, str | None]:
        return {"from": self.sender, "ip": self.ip, "by": self.by}


@dataclass(frozen=True)
class AuditRecord:
    """The audit of one delivered message, or the error that kept it from being read."""

    path: str
    stamp: str = ""
    stamp_reason: str = ""
    org_sender_unauthenticated: bool = False
    from_address: str | None = None
    received_path: tuple[Hop, ...] = field(default_factory=tuple)
    error: str = ""

    def as_json(self) -> dict:
        return {
            "path": self.path,
            "stamp": self.stamp,
            "stamp_reason": self.stamp_reason,
            "org_sender_unauthenticated": self.org_sender_unauthenticated,
            "from": self.from_address,
            "received_path": [hop.as_json() for hop in self.received_path],
        }


def format_text(record: AuditRecord) -> str:
    """Return one tab-separated line: path, stamp, org sender flag, From, path of hops (oldest first)."""
    hops = " > ".join(f"{hop.sender}[{hop.ip or '?'}]" for hop in reversed(record.received_path)) or "-"
    flag = "org-sender-unauthenticated" if record.org_sender_unauthenticated else "-"
    stamp = record.stamp + (f" ({record.stamp_reason})" if record.stamp_reason else "")
    return f"{record.path}\t{stamp}\t{flag}\t{record.from_address or '-'}\t{hops}"


def audit_paths(paths: list[Path], config: Config) -> Iterator[AuditRecord]:
    """Yield an `AuditRecord` for each message under `paths`, in order."""
    for path in paths:
        yield from _audit_path(path, config)


def _audit_path(path: Path, config: Config) -> Iterator[AuditRecord]:
    if path.is_dir():
        if all((path / sub).is_dir() for sub in ("cur", "new", "tmp")):
            yield from _audit_maildir(path, config)
            return
        files = sorted(p for p in path.rglob("*.eml") if p.is_file())
        for file in files:
            yield from _audit_path(file, config)
        return
    if not path.is_file():
        yield AuditRecord(str(path), error="no such file or folder")
        return

    try:
        with path.open("rb") as handle:
            first_line = handle.readline()
    except OSError as error:
        yield AuditRecord(str(path), error=error.strerror or str(error))
        return
    if first_line.startswith(b"From "):
        yield from _audit_mbox(path, config)
        return
    try:
        raw = path.read_bytes()
    except OSError as error:
        yield AuditRecord(str(path), error=error.strerror or str(error))
        return
    yield audit_message(raw, str(path), config)


def _audit_maildir(path: Path, config: Config) -> Iterator[AuditRecord]:
    try:
        box = mailbox.Maildir(path, factory=None, create=False)
        keys = sorted(box.keys())
    except OSError as error:
        yield AuditRecord(str(path), error=error.strerror or str(error))
        return
    for key in keys:
        try:
            raw = box.get_bytes(key)
        except (OSError, KeyError) as error:
            yield AuditRecord(f"{path}:{key}", error=str(error))
            continue
        yield audit_message(raw, f"{path}:{key}", config)


def _audit_mbox(path: Path, config: Config) -> Iterator[AuditRecord]:
    try:
        box = mailbox.mbox(path, factory=None, create=False)
        keys = list(box.keys())
    except (OSError, mailbox.Error) as error:
        yield AuditRecord(str(path), error=str(error))
        return
    for number, key in enumerate(keys, start=1):
        try:
            raw = box.get_bytes(key)
        except (OSError, KeyError) as error:
            yield AuditRecord(f"{path}#{number}", error=str(error))
            continue
        yield audit_message(raw, f"{path}#{number}", config)


def _headers(raw: bytes) -> list[tuple[str, str]]:
    block, _body = split_message(raw)
    headers: list[tuple[str, str]] = []
    for line in block.decode("utf-8", "replace").splitlines():
        if line[:1] in (" ", "\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, value + " " + line.strip())
        elif ":" in line:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
    return headers


def _hops(headers: list[tuple[str, str]]) -> tuple[Hop, ...]:
    hops = []
    for name, value in headers:
        if name.lower() != "received":
            continue
        sender = _FROM_CLAUSE.match(value)
        by = _BY_CLAUSE.search(_COMMENT.sub(" ", value))
        ip = received_client_ip(value)
        hops.append(Hop(sender.group(1) if sender else "-", str(ip) if ip else None, by.group(1) if by else "-"))
    return tuple(hops)


def audit_message(raw: bytes, where: str, config: Config) -> AuditRecord:
    """Audit one delivered message."""
    headers = _headers(raw)
    recipients = [address for name, value in headers if name.lower() in _RECIPIENT_HEADERS
                  for _display, address in get_addresses([value]) if "@" in address]
    secret = config["stamp.secret"].encode("utf-8")
    check = verify_stamp(raw, secret, config["headers.prefix"], recipients)

    org = org_policy(config)
    sender = judge_sender(headers, Envelope(mail_from="", rcpt_tos=()), org)
    domain = (sender.from_domain or "").rstrip(".")
    in_org = any(domain == org_domain or domain.endswith("." + org_domain) for org_domain in org.domains)
    from_outside = sender.original_ip is not None
    authenticated = sender.trusted_dmarc_pass or (check.status == "valid" and _hop_dmarc_pass(headers, config))

    return AuditRecord(
        path=where,
        stamp=check.status,
        stamp_reason=check.reason,
        org_sender_unauthenticated=bool(in_org and from_outside and not authenticated),
        from_address=sender.from_address,
        received_path=_hops(headers),
    )


def _hop_dmarc_pass(headers: list[tuple[str, str]], config: Config) -> bool:
    """Tell whether the hop's own Authentication-Results (the topmost with its authserv-id) reports dmarc=pass.

    Only called for a valid stamp: the hop removes copies of its id that
    arrive from elsewhere, so the topmost one is its own.
    """
    our_id = authserv_id(config).lower()
    for name, value in headers:
        if name.lower() != "authentication-results":
            continue
        words = _COMMENT.sub(" ", value.split(";", 1)[0]).split()
        if words and words[0].lower() == our_id:
            return bool(_DMARC_PASS.search(value.split(";", 1)[-1]))
    return False
