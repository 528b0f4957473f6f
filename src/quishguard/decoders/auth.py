"""Sender authentication at the hop: DKIM, SPF, DMARC, ARC and Microsoft 365 header evidence.

- DKIM (RFC 6376) is verified with dkimpy on the raw bytes as received,
  before the hop edits any header. A signature whose `l=` covers less than
  the canonicalised body is reported as `policy`, not `pass`, because the
  unsigned rest can carry any content (RFC 6376, section 8.2).
- SPF (RFC 7208) is checked for the sending IP as `decoders.sender` found it
  (connecting client, XFORWARD, or the `Received` walk) and the MAIL FROM,
  or the HELO name for a null sender (see `decoders.spf`).
- DMARC (RFC 7489) aligns the SPF and DKIM domains with the From domain.
  Organisational domains come from the public suffix list bundled with the
  `publicsuffixlist` package; nothing is downloaded at run time.
- ARC (RFC 8617) is verified with dkimpy. A passing chain is believed only
  when its last sealer is in `[auth] arc_trusted_sealers`, and then only
  its ARC-Authentication-Results DMARC verdict is used.
- Microsoft 365 headers (X-MS-Exchange-Organization-AuthAs,
  X-MS-Exchange-CrossTenant-AuthAs, X-Forefront-Antispam-Report, compauth)
  count only when the previous hop is in `[auth] microsoft_networks`.

DNS failures become `temperror` results, never exceptions: see `dns_resolver`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from functools import lru_cache

import dkim
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.util import InvalidTagValueList, parse_tag_value

from ..dns_resolver import DnsLookup, DnsTempError
from ..model import AuthCheck, AuthFacts, Envelope, MicrosoftFacts, OrgPolicy, SenderFacts
from .sender import parse_ip
from .spf import check_spf

log = logging.getLogger(__name__)

# Signatures verified per message. Each costs a key lookup and an RSA
# verification; legitimate mail rarely carries more than three.
MAX_DKIM_SIGNATURES = 5

# dkimpy refuses RSA keys below this size, as RFC 8301 requires.
MIN_KEY_BITS = 1024

_COMMENT = re.compile(r"\([^()]*\)")
_DMARC_IN_RESULTS = re.compile(r"(?:^|[;\s])dmarc\s*=\s*([a-z]+)", re.IGNORECASE)
_COMPAUTH = re.compile(r"\bcompauth\s*=\s*([a-z]+)(?:\s+reason\s*=\s*(\d+))?", re.IGNORECASE)
_INSTANCE = re.compile(r"^\s*i\s*=\s*(\d+)\s*;", re.IGNORECASE)

# compauth reasons that mean the message failed composite authentication,
# from Microsoft's "Anti-spam message headers in Microsoft 365" page. 000 is an explicit
# DMARC failure, 001 an implicit failure, 002 a block by organisation policy.
# 010 is a DMARC failure from one of the organisation's accepted domains, and
# 6xx an implicit failure from an accepted domain (intra-organisation spoofing).
# NOTE: no test checks these codes against mail that Microsoft 365 actually delivered.
_COMPAUTH_FAIL_REASONS = frozenset({"000", "001", "002", "010"})

MICROSOFT_HEADERS = (
    "x-ms-exchange-organization-authas",
    "x-ms-exchange-crosstenant-authas",
    "x-forefront-antispam-report",
)


class _DkimpyLog:
    """Route dkimpy's log calls to DEBUG: its "errors" are verdicts on the sender's mail, not ours."""

    def debug(self, message: str, *args: object) -> None:
        log.debug("dkimpy: " + message, *args)

    info = warning = error = debug


@lru_cache(maxsize=1)
def _public_suffixes():
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()


def organizational_domain(domain: str) -> str:
    """Return the organisational domain (RFC 7489, section 3.2) of `domain` from the bundled list."""
    domain = domain.lower().rstrip(".")
    return _public_suffixes().privatesuffix(domain) or domain


def evaluate_auth(raw: bytes, sender: SenderFacts, envelope: Envelope, org: OrgPolicy,
                  dns: DnsLookup) -> AuthFacts:
    """Check SPF, DKIM, DMARC and ARC for one message and return the results."""
    spf = _spf_check(sender, envelope, dns)
    dkim_checks = check_dkim(raw, dns)
    dmarc, policy = check_dmarc(sender.from_domain, spf, dkim_checks, dns)
    arc, arc_dmarc_pass = check_arc(raw, org, dns)

    checks = (spf, *dkim_checks, dmarc, arc)
    temperrors = tuple(f"{check.method}: {check.reason}" for check in checks if check.result == "temperror")
    return AuthFacts(checks=checks, dmarc=dmarc.result, dmarc_policy=policy, arc_dmarc_pass=arc_dmarc_pass,
                     temperrors=temperrors)


def _spf_check(sender: SenderFacts, envelope: Envelope, dns: DnsLookup) -> AuthCheck:
    mail_from = envelope.mail_from.strip().strip("<>")
    # The HELO name belongs to the hop whose IP is checked: the client's
    # own for a direct connection, the one XFORWARD reports otherwise.
    helo = {"client": envelope.helo, "xforward": envelope.xforward_helo}.get(sender.ip_source) or ""
    properties = (("smtp.mailfrom", mail_from),) if mail_from else (("smtp.helo", helo),)
    if sender.original_ip is None:
        return AuthCheck("spf", "none", properties, "no client address outside the trusted networks")

    result = check_spf(sender.original_ip, mail_from, helo, dns)
    reason = f"{sender.original_ip}: {result.reason}"
    if not mail_from:
        return AuthCheck("spf", result.result, (("smtp.helo", result.domain),), reason)
    return AuthCheck("spf", result.result, properties, reason)


def check_dkim(raw: bytes, dns: DnsLookup) -> list[AuthCheck]:
    """Verify up to MAX_DKIM_SIGNATURES DKIM-Signature headers; [] when there are none."""
    try:
        verifier = dkim.DKIM(raw, logger=_DkimpyLog(), minkey=MIN_KEY_BITS)
    except dkim.DKIMException as error:
        return [AuthCheck("dkim", "permerror", (), f"message not parsable: {error}")]

    signatures = [value for name, value in verifier.headers if name.lower() == b"dkim-signature"]
    results = []
    for index, value in enumerate(signatures[:MAX_DKIM_SIGNATURES]):
        results.append(_verify_signature(verifier, index, value, dns))
    return results


def _verify_signature(verifier: dkim.DKIM, index: int, value: bytes, dns: DnsLookup) -> AuthCheck:
    try:
        tags = parse_tag_value(value)
    except InvalidTagValueList as error:
        return AuthCheck("dkim", "permerror", (), f"signature {index + 1} not parsable: {error}")

    domain = tags.get(b"d", b"").decode("ascii", "replace").lower()
    selector = tags.get(b"s", b"").decode("ascii", "replace")
    properties = (("header.d", domain), ("header.s", selector))

    keys_found: list[bool] = []

    def txt_lookup(name: bytes, timeout: float = 0) -> bytes | None:
        # dkimpy's timeout argument is ignored: the lookup session's budget applies.
        records = dns.txt(name.decode("ascii", "replace"))
        keys_found.append(bool(records))
        return records[0].encode("utf-8") if records else None

    try:
        valid = verifier.verify(index, dnsfunc=txt_lookup)
    except DnsTempError as error:
        return AuthCheck("dkim", "temperror", properties, str(error))
    except dkim.ValidationError as error:
        return AuthCheck("dkim", "fail", properties, str(error))
    except dkim.DKIMException as error:
        return AuthCheck("dkim", "permerror", properties, str(error))

    if keys_found and not keys_found[-1]:
        return AuthCheck("dkim", "permerror", properties, f"no key at {selector}._domainkey.{domain}")
    if not valid:
        return AuthCheck("dkim", "fail", properties, "signature did not verify")

    partial = _partial_body(verifier, tags)
    if partial:
        return AuthCheck("dkim", "policy", properties, partial)
    return AuthCheck("dkim", "pass", properties)


def _partial_body(verifier: dkim.DKIM, tags: dict[bytes, bytes]) -> str:
    """Return why `l=` leaves part of the body unsigned, or "" when it covers the whole body."""
    if b"l" not in tags:
        return ""
    try:
        policy = CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
        length = int(tags[b"l"])
    except (InvalidCanonicalizationPolicyError, ValueError):
        return "invalid l= or c= tag"
    body_length = len(policy.canonicalize_body(verifier.body))
    if length >= body_length:
        return ""
    return f"l={length} covers {length} of {body_length} body bytes"


def _dmarc_record(domain: str, dns: DnsLookup) -> str | None:
    records = [r for r in dns.txt(f"_dmarc.{domain}") if re.match(r"v\s*=\s*DMARC1\s*(;|$)", r)]
    # RFC 7489, section 6.6.3: more than one record means no DMARC policy.
    return records[0] if len(records) == 1 else None


def _dmarc_tags(record: str) -> dict[str, str]:
    tags = {}
    for item in record.split(";"):
        name, equals, value = item.partition("=")
        if equals:
            tags[name.strip().lower()] = value.strip()
    return tags


def _aligned(domain: str, from_domain: str, mode: str) -> bool:
    domain = domain.lower().rstrip(".")
    if mode == "s":
        return domain == from_domain
    return bool(domain) and organizational_domain(domain) == organizational_domain(from_domain)


def check_dmarc(from_domain: str | None, spf: AuthCheck, dkim_checks: list[AuthCheck],
                dns: DnsLookup) -> tuple[AuthCheck, str | None]:
    """Return the DMARC result for the From domain and the policy that applies to it (p= or sp=)."""
    if not from_domain:
        return AuthCheck("dmarc", "none", (), "no From domain"), None
    from_domain = from_domain.lower().rstrip(".")
    properties = (("header.from", from_domain),)

    org_domain = organizational_domain(from_domain)
    try:
        record = _dmarc_record(from_domain, dns)
        if record is None and org_domain != from_domain:
            record = _dmarc_record(org_domain, dns)
            at_org = True
        else:
            at_org = False
    except DnsTempError as error:
        return AuthCheck("dmarc", "temperror", properties, str(error)), None
    if record is None:
        return AuthCheck("dmarc", "none", properties, f"no DMARC record for {from_domain}"), None

    tags = _dmarc_tags(record)
    policy = tags.get("p", "").lower()
    if policy not in ("none", "quarantine", "reject"):
        # RFC 7489, section 6.6.3: an invalid p= with a rua= is read as p=none.
        if "rua" not in tags:
            return AuthCheck("dmarc", "none", properties, f"DMARC record for {from_domain} has no valid p="), None
        policy = "none"
    if at_org and tags.get("sp", "").lower() in ("none", "quarantine", "reject"):
        policy = tags["sp"].lower()

    spf_domain = dict(spf.properties).get("smtp.mailfrom", "").rpartition("@")[2] or dict(
        spf.properties).get("smtp.helo", "")
    aligned = []
    if spf.result == "pass" and _aligned(spf_domain, from_domain, tags.get("aspf", "r").lower()):
        aligned.append(f"spf {spf_domain}")
    for check in dkim_checks:
        signing_domain = dict(check.properties).get("header.d", "")
        if check.result == "pass" and _aligned(signing_domain, from_domain, tags.get("adkim", "r").lower()):
            aligned.append(f"dkim {signing_domain}")

    properties = (("header.from", from_domain), ("policy.dmarc", policy))
    if aligned:
        return AuthCheck("dmarc", "pass", properties, "aligned " + ", ".join(aligned)), policy
    if any(check.result == "temperror" for check in (spf, *dkim_checks)):
        return AuthCheck("dmarc", "temperror", properties, "SPF or DKIM could not be checked"), policy
    return AuthCheck("dmarc", "fail", properties, f"no aligned SPF or DKIM pass, p={policy}"), policy


def check_arc(raw: bytes, org: OrgPolicy, dns: DnsLookup) -> tuple[AuthCheck, bool]:
    """Verify the ARC chain; return the result and whether a trusted sealer reports DMARC pass."""

    def txt_lookup(name: bytes, timeout: float = 0) -> bytes | None:
        records = dns.txt(name.decode("ascii", "replace"))
        return records[0].encode("utf-8") if records else None

    try:
        verifier = dkim.ARC(raw, logger=_DkimpyLog(), minkey=MIN_KEY_BITS)
        chain, instances, reason = verifier.verify(dnsfunc=txt_lookup)
    except DnsTempError as error:
        return AuthCheck("arc", "temperror", (), str(error)), False
    except dkim.DKIMException as error:
        return AuthCheck("arc", "fail", (), str(error)), False

    if chain == dkim.CV_None:
        return AuthCheck("arc", "none"), False
    if chain != dkim.CV_Pass or not instances:
        return AuthCheck("arc", "fail", (), str(reason)), False

    latest = instances[0]
    sealer = latest.get("as-domain", b"").decode("ascii", "replace").lower()
    if sealer not in org.arc_trusted_sealers:
        return AuthCheck("arc", "pass", (), f"sealer {sealer} is not in [auth] arc_trusted_sealers"), False

    dmarc = _sealed_dmarc(verifier, latest.get("instance", 0))
    reason = f"trusted sealer {sealer} reports dmarc={dmarc or 'nothing'}"
    return AuthCheck("arc", "pass", (), reason), dmarc == "pass"


def _sealed_dmarc(verifier: dkim.ARC, instance: int) -> str | None:
    """Return the DMARC result in the ARC-Authentication-Results header of `instance`."""
    for name, value in verifier.headers:
        if name.lower() != b"arc-authentication-results":
            continue
        text = value.decode("utf-8", "replace")
        match = _INSTANCE.match(text)
        if match is None or int(match.group(1)) != instance:
            continue
        found = _DMARC_IN_RESULTS.search(_COMMENT.sub(" ", text.split(";", 2)[-1]))
        return found.group(1).lower() if found else None
    return None


def microsoft_evidence(headers: list[tuple[str, str]], sender: SenderFacts,
                       org: OrgPolicy) -> MicrosoftFacts | None:
    """Read Microsoft 365's verdict headers; None when the message has none.

    Exchange Online removes X-MS-Exchange-Organization-* headers that arrive
    from outside, so the topmost copy was written by Microsoft only when
    Microsoft handed us the message. From any other previous hop, every such
    header is text the sender chose.
    """
    values: dict[str, str] = {}
    compauth: tuple[str, str | None] | None = None
    for name, value in headers:
        lowered = name.lower()
        if lowered in MICROSOFT_HEADERS:
            values.setdefault(lowered, value)
        elif lowered == "authentication-results" and compauth is None:
            match = _COMPAUTH.search(value)
            if match:
                compauth = (match.group(1).lower(), match.group(2))
    if not values and compauth is None:
        return None

    previous_hop = parse_ip(sender.original_ip) if sender.original_ip else None
    if previous_hop is None or not any(previous_hop in network for network in org.microsoft_networks):
        where = sender.original_ip or "unknown"
        return MicrosoftFacts(counted=False, note=f"Microsoft 365 headers ignored: previous hop {where} "
                                                  "is not in [auth] microsoft_networks")

    report = _antispam_fields(values.get("x-forefront-antispam-report", ""))
    facts = MicrosoftFacts(
        counted=True,
        auth_as=_lowered(values.get("x-ms-exchange-organization-authas")),
        cross_tenant_auth_as=_lowered(values.get("x-ms-exchange-crosstenant-authas")),
        spam_verdict=report.get("sfv"),
        category=report.get("cat"),
        compauth=compauth[0] if compauth else None,
        compauth_reason=compauth[1] if compauth else None,
        note=f"previous hop {sender.original_ip} is a Microsoft connector network",
    )
    return dataclasses.replace(facts, spoof=_microsoft_spoof(facts))


def _microsoft_spoof(facts: MicrosoftFacts) -> str:
    """Return why Microsoft's headers mark the message as spoofed, or ""."""
    reasons = []
    if facts.category in ("spoof", "gimp"):
        reasons.append(f"CAT:{facts.category.upper()}")
    reason = facts.compauth_reason or ""
    if facts.compauth == "fail" or reason in _COMPAUTH_FAIL_REASONS or reason.startswith("6"):
        reasons.append(f"compauth={facts.compauth or '?'} reason={reason or '?'}")
    return ", ".join(reasons)


def _antispam_fields(value: str) -> dict[str, str]:
    fields = {}
    for item in value.split(";"):
        name, colon, field_value = item.partition(":")
        if colon:
            fields[name.strip().lower()] = field_value.strip().lower()
    return fields


def _lowered(value: str | None) -> str | None:
    return value.strip().lower() if value else None

