"""DNS lookups for the sender authentication checks, with a timeout per query and a budget per message.

SPF (RFC 7208), DKIM key (RFC 6376, section 3.6.2) and DMARC policy
(RFC 7489, section 6.6.3) records are read through dnspython's stub resolver.
Queries go to `[dns] servers` (empty: the system's resolvers from
/etc/resolv.conf). Each query waits at most `[dns] timeout_seconds`, and all
queries for one message share `[dns] budget_seconds`, so a dead resolver costs
a bounded delay and never a stalled session.

A name that does not exist and a name without records of the asked type both
return an empty list (RFC 7208 calls these "void lookups"). Every other failure
(timeout, SERVFAIL, refused, budget exhausted, no resolver configured) raises
`DnsTempError`, which the checks report as `temperror`.
"""

from __future__ import annotations

import ipaddress
import logging
import time

import dns.exception
import dns.name
import dns.nameserver
import dns.resolver
import dns.reversename

from .config import Config, parse_host_port

log = logging.getLogger(__name__)

DNS_PORT = 53

# The query types the checks use; anything else is a bug in the caller.
_RDTYPES = frozenset({"TXT", "A", "AAAA", "MX", "PTR"})


class DnsTempError(Exception):
    """A lookup failed for a reason that may go away: timeout, SERVFAIL, budget exhausted."""


def _nameserver(text: str) -> dns.nameserver.Do53Nameserver:
    """Build a nameserver from `IP` or `IP:PORT` (`[IPV6]:PORT` for IPv6 with a port)."""
    try:
        address = ipaddress.ip_address(text.strip("[]"))
        return dns.nameserver.Do53Nameserver(str(address), DNS_PORT)
    except ValueError:
        pass
    host, port = parse_host_port(text)
    return dns.nameserver.Do53Nameserver(str(ipaddress.ip_address(host)), port)


class DnsResolver:
    """A configured stub resolver; `lookup()` starts the budget of one message.

    Front ends build one with `DnsResolver.from_config(config)` and pass it to
    `pipeline.Scanner`. The resolver keeps no state between messages.
    """

    def __init__(self, servers: tuple[str, ...] = (), timeout: float = 2.0, budget: float = 5.0) -> None:
        self.servers = tuple(servers)
        self.timeout = timeout
        self.budget = budget
        # Parse the servers now, so a typo fails at start and not per message.
        self._nameservers = [_nameserver(server) for server in self.servers]

    @classmethod
    def from_config(cls, config: Config) -> DnsResolver:
        return cls(config["dns.servers"], config["dns.timeout_seconds"], config["dns.budget_seconds"])

    def lookup(self) -> DnsLookup:
        """Return a lookup session whose queries share one budget of `budget` seconds."""
        return DnsLookup(self, time.monotonic() + self.budget)

    def _stub(self) -> dns.resolver.Resolver:
        if self._nameservers:
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = list(self._nameservers)
        else:
            try:
                resolver = dns.resolver.Resolver()
            except dns.resolver.NoResolverConfiguration as error:
                raise DnsTempError("no DNS resolver configured: set [dns] servers or /etc/resolv.conf") from error
        # Answers are cached per message by DnsLookup; across messages the
        # recursive resolver caches, so this stub keeps none.
        resolver.cache = None
        return resolver


class DnsLookup:
    """Queries for one message: answers are cached, and the budget bounds the total time."""

    def __init__(self, resolver: DnsResolver, deadline: float) -> None:
        self._resolver = resolver
        self._deadline = deadline
        self._stub: dns.resolver.Resolver | None = None
        self._cache: dict[tuple[str, str], list[str] | DnsTempError] = {}
        self.queries = 0

    def query(self, name: str, rdtype: str) -> list[str]:
        """Return the records of `rdtype` at `name` as text; [] when none; raise DnsTempError."""
        if rdtype not in _RDTYPES:
            raise ValueError(f"unsupported query type {rdtype!r}")
        key = (name.lower().rstrip("."), rdtype)
        cached = self._cache.get(key)
        if isinstance(cached, DnsTempError):
            raise cached
        if cached is not None:
            return cached

        try:
            records = self._ask(key[0], rdtype)
        except DnsTempError as error:
            self._cache[key] = error
            raise
        self._cache[key] = records
        return records

    def txt(self, name: str) -> list[str]:
        """Return each TXT record at `name` with its character-strings joined (RFC 7208, section 3.3)."""
        return self.query(name, "TXT")

    def ptr(self, address: str) -> list[str]:
        return self.query(dns.reversename.from_address(address).to_text(), "PTR")

    def _ask(self, name: str, rdtype: str) -> list[str]:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise DnsTempError(f"DNS budget of {self._resolver.budget:g} s exhausted before {rdtype} {name}")
        if self._stub is None:
            self._stub = self._resolver._stub()

        self.queries += 1
        try:
            answer = self._stub.resolve(name, rdtype, lifetime=min(self._resolver.timeout, remaining),
                                        search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return []
        except dns.exception.Timeout as error:
            raise DnsTempError(f"{rdtype} {name} timed out") from error
        except dns.resolver.NoNameservers as error:
            raise DnsTempError(f"{rdtype} {name} failed: every server returned an error (SERVFAIL or REFUSED)") from error
        except (dns.name.EmptyLabel, dns.name.LabelTooLong, dns.name.NameTooLong) as error:
            # An invalid name cannot exist in the DNS, so it is a void lookup.
            log.debug("event=dns_invalid_name name=%r error=%s", name, error)
            return []
        except dns.exception.DNSException as error:
            raise DnsTempError(f"{rdtype} {name} failed: {type(error).__name__}") from error

        if answer.rrset is None:
            return []
        if rdtype == "TXT":
            return [b"".join(record.strings).decode("utf-8", "replace") for record in answer.rrset]
        if rdtype == "MX":
            ordered = sorted(answer.rrset, key=lambda record: record.preference)
            return [record.exchange.to_text(omit_final_dot=True) for record in ordered]
        if rdtype == "PTR":
            return [record.target.to_text(omit_final_dot=True) for record in answer.rrset]
        return [record.to_text() for record in answer.rrset]
