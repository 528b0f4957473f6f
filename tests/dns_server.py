"""A real DNS server on 127.0.0.1 for the authentication tests, built on dnslib's server (UDP and TCP).

Records are a plain dict from (name, type) to a list of values. Names in
`servfail` are answered with SERVFAIL, names in `silent` are answered only
after `silent_delay` seconds, later than any test's query timeout.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from dnslib import AAAA, MX, PTR, QTYPE, RCODE, RR, TXT, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer

TTL = 60

# A TXT character-string holds at most 255 octets (RFC 1035, section 3.3).
_CHUNK = 255


def _txt(value: str) -> TXT:
    data = value.encode("utf-8")
    return TXT([data[i:i + _CHUNK] for i in range(0, len(data), _CHUNK)] or [b""])


_BUILDERS = {
    "TXT": _txt,
    "A": A,
    "AAAA": AAAA,
    "MX": lambda value: MX(value, 10),
    "PTR": PTR,
}


@dataclass
class Zone:
    """The records served; edit between queries to change answers."""

    records: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    servfail: set[str] = field(default_factory=set)
    silent: set[str] = field(default_factory=set)
    silent_delay: float = 2.0
    queries: list[tuple[str, str]] = field(default_factory=list)

    def add(self, name: str, rdtype: str, *values: str) -> None:
        self.records.setdefault((name.lower().rstrip("."), rdtype), []).extend(values)


class _ZoneResolver(BaseResolver):
    def __init__(self, zone: Zone) -> None:
        self.zone = zone

    def resolve(self, request, handler):
        reply = request.reply()
        name = str(request.q.qname).lower().rstrip(".")
        rdtype = QTYPE[request.q.qtype]
        self.zone.queries.append((name, rdtype))

        if name in self.zone.silent:
            time.sleep(self.zone.silent_delay)
            return reply
        if name in self.zone.servfail:
            reply.header.rcode = RCODE.SERVFAIL
            return reply

        values = self.zone.records.get((name, rdtype))
        if values is None:
            if not any(key[0] == name for key in self.zone.records):
                reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for value in values:
            reply.add_answer(RR(request.q.qname, getattr(QTYPE, rdtype), rdata=_BUILDERS[rdtype](value), ttl=TTL))
        return reply


class LoopbackDns:
    """UDP and TCP DNS servers on one kernel-chosen loopback port, in background threads."""

    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        resolver = _ZoneResolver(zone)
        quiet = DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
        self.udp = DNSServer(resolver, address="127.0.0.1", port=0, logger=quiet)
        self.port = self.udp.server.server_address[1]
        self.tcp = DNSServer(resolver, address="127.0.0.1", port=self.port, tcp=True, logger=quiet)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        for server in (self.udp, self.tcp):
            server.server.daemon_threads = True
            # A delayed answer may be sent after stop(); that is expected, not an error to print.
            server.server.handle_error = lambda request, client_address: None
            thread = threading.Thread(target=server.server.serve_forever, kwargs={"poll_interval": 0.05},
                                      daemon=True)
            thread.start()
            server.thread = thread

    def stop(self) -> None:
        for server in (self.udp, self.tcp):
            server.server.shutdown()
            server.server.server_close()
