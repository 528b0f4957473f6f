"""SPF evaluation: RFC 7208 `check_host()` on dnspython through `DnsLookup`.

pyspf 2.0.14 (the last release, 2020) calls the deprecated
`dns.resolver.query` and resolves through one module-global function. So it
can neither use `[dns] servers` per scanner nor share the per-message DNS
budget, and this module implements the evaluation instead.

Covered: every mechanism (all, include, a, mx, ptr, ip4, ip6, exists), the
redirect modifier, macros (section 7, with transformers and delimiters), the
limit of 10 DNS-querying terms (section 4.6.4), 10 names per mx or ptr, and
2 void lookups. `exp=` explanations are parsed but not fetched, because the
hop never sends the explanation to anyone.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from dataclasses import dataclass

from ..dns_resolver import DnsLookup, DnsTempError

MAX_DNS_TERMS = 10
MAX_VOID_LOOKUPS = 2
MAX_NAMES_PER_TERM = 10

_QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_MECHANISMS = frozenset({"all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists"})
_MACRO = re.compile(r"%\{([slodiphcrtv])(\d*)(r?)([.\-+,/_=]*)\}|%%|%_|%-|%", re.IGNORECASE)
_DOMAIN_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$", re.IGNORECASE)
_CIDR = re.compile(r"^(.*?)(?:/(\d+))?(?://(\d+))?$")


@dataclass(frozen=True)
class SpfResult:
    """The outcome of `check_host()`: result, the domain checked and why."""

    result: str
    domain: str
    reason: str = ""


class _PermError(Exception):
    pass


class _Done(Exception):
    """A qualifier matched; `result` is its result."""

    def __init__(self, result: str, reason: str) -> None:
        super().__init__(result)
        self.result = result
        self.reason = reason


def check_spf(ip: str, mail_from: str, helo: str, dns: DnsLookup) -> SpfResult:
    """Evaluate SPF for the client `ip` and MAIL FROM, or for the HELO name when MAIL FROM is empty.

    RFC 7208, section 2.4: a null reverse-path is checked as
    postmaster@HELO.
    """
    mail_from = mail_from.strip().strip("<>")
    local, at, domain = mail_from.rpartition("@")
    if not at or not domain:
        domain = helo.strip().rstrip(".")
        local = "postmaster"
    domain = domain.lower().rstrip(".")
    if not local:
        local = "postmaster"

    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return SpfResult("none", domain, f"invalid client address {ip!r}")
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped

    evaluation = _Evaluation(address, f"{local}@{domain}", helo or "unknown", dns)
    try:
        result, reason = evaluation.check_host(domain)
    except DnsTempError as error:
        return SpfResult("temperror", domain, str(error))
    except _PermError as error:
        return SpfResult("permerror", domain, str(error))
    return SpfResult(result, domain, reason)


def _valid_domain(domain: str) -> bool:
    labels = domain.rstrip(".").split(".")
    return len(labels) >= 2 and len(domain) <= 253 and all(_DOMAIN_LABEL.match(label) for label in labels)


class _Evaluation:
    """State shared across one check_host() and its includes: the term and void lookup counters."""

    def __init__(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address, sender: str, helo: str,
                 dns: DnsLookup) -> None:
        self.address = address
        self.sender = sender
        self.helo = helo
        self.dns = dns
        self.dns_terms = 0
        self.void_lookups = 0

    def check_host(self, domain: str, depth: int = 0) -> tuple[str, str]:
        if not _valid_domain(domain):
            return "none", f"{domain!r} is not a valid domain"

        records = [r for r in self.dns.txt(domain) if r.lower() == "v=spf1" or r.lower().startswith("v=spf1 ")]
        if not records:
            return "none", f"no SPF record at {domain}"
        if len(records) > 1:
            raise _PermError(f"{len(records)} SPF records at {domain}")

        terms = records[0].split()[1:]
        redirect = None
        modifiers_seen: set[str] = set()
        directives = []
        for term in terms:
            name, equals, value = term.partition("=")
            if equals and re.fullmatch(r"[a-z][a-z0-9_.-]*", name, re.IGNORECASE):
                name = name.lower()
                if name in ("redirect", "exp"):
                    if name in modifiers_seen:
                        raise _PermError(f"{name}= appears twice at {domain}")
                    modifiers_seen.add(name)
                if name == "redirect":
                    redirect = value
                continue
            directives.append(term)

        try:
            for term in directives:
                self._directive(term, domain, depth)
        except _Done as done:
            return done.result, done.reason

        if redirect is None:
            return "neutral", f"no mechanism matched at {domain}"
        self._count_dns_term()
        target = self._expand(redirect, domain)
        result, reason = self.check_host(target, depth + 1)
        if result == "none":
            raise _PermError(f"redirect target {target} has no SPF record")
        return result, reason

    def _count_dns_term(self) -> None:
        self.dns_terms += 1
        if self.dns_terms > MAX_DNS_TERMS:
            raise _PermError(f"more than {MAX_DNS_TERMS} DNS-querying terms")

    def _lookup(self, name: str, rdtype: str) -> list[str]:
        records = self.dns.query(name, rdtype)
        if not records:
            self.void_lookups += 1
            if self.void_lookups > MAX_VOID_LOOKUPS:
                raise _PermError(f"more than {MAX_VOID_LOOKUPS} void lookups")
        return records

    def _directive(self, term: str, domain: str, depth: int) -> None:
        qualifier = "+"
        if term[:1] in _QUALIFIERS:
            qualifier, term = term[0], term[1:]
        mechanism, _, argument = term.partition(":")
        if "/" in mechanism:
            mechanism, slash, cidr = mechanism.partition("/")
            argument = argument + slash + cidr if argument else slash + cidr
        mechanism = mechanism.lower()
        if mechanism not in _MECHANISMS:
            raise _PermError(f"unknown mechanism {mechanism!r} at {domain}")

        if self._matches(mechanism, argument, domain, depth):
            raise _Done(_QUALIFIERS[qualifier], f"matched {qualifier if qualifier != '+' else ''}{term} at {domain}")

    def _matches(self, mechanism: str, argument: str, domain: str, depth: int) -> bool:
        if mechanism == "all":
            return True
        if mechanism in ("ip4", "ip6"):
            return self._ip_matches(mechanism, argument, domain)
        if mechanism == "include":
            return self._include(argument, domain, depth)
        if mechanism == "exists":
            self._count_dns_term()
            return bool(self._lookup(self._expand(argument, domain), "A"))

        self._count_dns_term()
        target, cidr4, cidr6 = self._target_and_cidr(argument, domain)
        if mechanism == "a":
            return self._any_address_matches([target], cidr4, cidr6)
        if mechanism == "mx":
            hosts = self._lookup(target, "MX")
            if len(hosts) > MAX_NAMES_PER_TERM:
                raise _PermError(f"more than {MAX_NAMES_PER_TERM} MX names at {target}")
            return self._any_address_matches(hosts, cidr4, cidr6)
        return self._ptr_matches(target)

    def _ip_matches(self, mechanism: str, argument: str, domain: str) -> bool:
        try:
            network = ipaddress.ip_network(argument, strict=False)
        except ValueError:
            raise _PermError(f"invalid {mechanism}:{argument} at {domain}") from None
        if (mechanism == "ip4") != (network.version == 4):
            raise _PermError(f"invalid {mechanism}:{argument} at {domain}")
        return network.version == self.address.version and self.address in network

    def _include(self, argument: str, domain: str, depth: int) -> bool:
        if not argument:
            raise _PermError(f"include without a domain at {domain}")
        self._count_dns_term()
        result, _reason = self.check_host(self._expand(argument, domain), depth + 1)
        if result == "pass":
            return True
        if result in ("fail", "softfail", "neutral"):
            return False
        if result == "temperror":
            raise DnsTempError(f"include:{argument} returned temperror")
        raise _PermError(f"include:{argument} returned {result}")

    def _target_and_cidr(self, argument: str, domain: str) -> tuple[str, int, int]:
        match = _CIDR.match(argument)
        spec, cidr4, cidr6 = match.group(1), match.group(2), match.group(3)
        target = self._expand(spec, domain) if spec else domain
        length4 = int(cidr4) if cidr4 else 32
        length6 = int(cidr6) if cidr6 else 128
        if length4 > 32 or length6 > 128:
            raise _PermError(f"invalid prefix length in {argument!r} at {domain}")
        return target, length4, length6

    def _any_address_matches(self, hosts: list[str], cidr4: int, cidr6: int) -> bool:
        rdtype = "A" if self.address.version == 4 else "AAAA"
        length = cidr4 if self.address.version == 4 else cidr6
        for host in hosts:
            for text in self._lookup(host, rdtype):
                network = ipaddress.ip_network(f"{text}/{length}", strict=False)
                if self.address in network:
                    return True
        return False

    def _ptr_matches(self, target: str) -> bool:
        # RFC 7208, section 5.5: validated names are those whose forward
        # lookup returns the client address; only 10 PTR names are tried.
        names = self.dns.ptr(str(self.address))[:MAX_NAMES_PER_TERM]
        rdtype = "A" if self.address.version == 4 else "AAAA"
        target = target.lower().rstrip(".")
        for name in names:
            name = name.lower().rstrip(".")
            if name != target and not name.endswith("." + target):
                continue
            try:
                addresses = self.dns.query(name, rdtype)
            except DnsTempError:
                continue
            if str(self.address) in {str(ipaddress.ip_address(a)) for a in addresses}:
                return True
        return False

    def _expand(self, spec: str, domain: str) -> str:
        """Expand the macros of a domain-spec (RFC 7208, section 7)."""

        def replace(match: re.Match[str]) -> str:
            token = match.group(0)
            if token == "%%":
                return "%"
            if token == "%_":
                return " "
            if token == "%-":
                return "%20"
            if token == "%":
                raise _PermError(f"invalid macro in {spec!r}")
            letter, digits, reverse, delimiters = match.groups()
            value = self._macro_value(letter.lower(), domain)
            parts = re.split("[" + re.escape(delimiters or ".") + "]", value)
            if reverse:
                parts.reverse()
            if digits:
                if int(digits) == 0:
                    raise _PermError(f"invalid macro in {spec!r}")
                parts = parts[-int(digits):]
            expanded = ".".join(parts)
            return urllib.parse.quote(expanded, safe="") if letter.isupper() else expanded

        expanded = _MACRO.sub(replace, spec).rstrip(".")
        # RFC 7208, section 7.3: drop left-hand labels until the name fits 253 characters.
        while len(expanded) > 253 and "." in expanded:
            expanded = expanded.split(".", 1)[1]
        return expanded.lower()

    def _macro_value(self, letter: str, domain: str) -> str:
        local, _, sender_domain = self.sender.rpartition("@")
        if letter == "s":
            return self.sender
        if letter == "l":
            return local
        if letter == "o":
            return sender_domain
        if letter == "d":
            return domain
        if letter == "i":
            if self.address.version == 4:
                return str(self.address)
            return ".".join(self.address.exploded.replace(":", ""))
        if letter == "v":
            return "in-addr" if self.address.version == 4 else "ip6"
        if letter == "h":
            return self.helo
        if letter == "p":
            # Validating the PTR name costs lookups for no security gain; the
            # RFC allows "unknown" (section 7.3).
            return "unknown"
        raise _PermError(f"macro %{{{letter}}} is only allowed in exp=")
