"""Judge who sent a message from its headers and envelope, without DNS.

- From address: the first mailbox of the first `From` header (RFC 5322,
  section 3.6.2), with the domain lowercased.
- Original IP: the first client outside the organisation's trusted
  networks. Postfix's XFORWARD ADDR is believed only when the connecting
  client is trusted. Otherwise the `Received` headers (RFC 5321, section
  4.4) are walked from the top. Each names the client of one hop, and hops
  inside the trusted networks are skipped. Headers below the first
  untrusted hop were written by the sender and are never read.
- Authentication-Results (RFC 8601): a header counts only when its
  authserv-id is one of the organisation's and it sits above the
  `Received` header of the first untrusted hop, so a trusted server added
  it. Any sender can forge the others, which is why RFC 8601, section 5,
  has border MTAs remove incoming copies that claim the local authserv-id.
"""

from __future__ import annotations

import email.header
import email.utils
import ipaddress
import logging
import re

from ..model import Envelope, OrgPolicy, SenderFacts

log = logging.getLogger(__name__)

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# More hops than this means a mail loop: RFC 5321, section 6.3, asks loop
# detection by counting Received headers to use a threshold of at least 100.
MAX_RECEIVED_HEADERS = 100

_COMMENT = re.compile(r"\([^()]*\)")
_HELO_ARGUMENT = re.compile(r"\bhelo\s*=\s*\S+", re.IGNORECASE)
_BRACKETED_IP = re.compile(r"\[(?:ipv6:)?([0-9a-f:.]+)\]", re.IGNORECASE)
_PARENTHESISED_IP = re.compile(r"\(\s*(?:ipv6:)?([0-9a-f:.]+)\s*\)", re.IGNORECASE)
_BARE_IP = re.compile(r"^\s*(?:ipv6:)?([0-9a-f:.]+)\b", re.IGNORECASE)
_FROM_CLAUSE = re.compile(r"^\s*from\s+(.*?)(?:\s+by\s|;|$)", re.IGNORECASE | re.DOTALL)
_DMARC_RESULT = re.compile(r"(?:^|[;\s])dmarc\s*=\s*([a-z]+)", re.IGNORECASE)


def judge_sender(headers: list[tuple[str, str]], envelope: Envelope, org: OrgPolicy) -> SenderFacts:
    """Return the sender's address, original IP and trusted authentication results."""
    from_address, from_domain = _from_address(headers)

    received = [(index, value) for index, (name, value) in enumerate(headers) if name.lower() == "received"]
    boundary, walked_ip = _first_untrusted_hop(received[:MAX_RECEIVED_HEADERS], org)
    original_ip, ip_source = _original_ip(envelope, org, walked_ip)

    # A client outside the trusted networks wrote every header it sent us.
    trusted_limit = 0 if ip_source == "client" else boundary
    trusted_results = _trusted_auth_results(headers, trusted_limit, org)

    return SenderFacts(
        from_address=from_address,
        from_domain=from_domain,
        original_ip=original_ip,
        ip_source=ip_source,
        trusted_dmarc_pass=_dmarc_passes(trusted_results),
        trusted_auth_results=tuple(trusted_results),
        display_name=_display_name(headers),
        reply_to=_reply_to(headers),
    )


def received_client_ip(value: str) -> IpAddress | None:
    """Return the connecting client's IP named in one `Received` header value, or None.

    The TCP-level address is the last bracketed literal of the `from`
    clause (Postfix, Sendmail: "from helo (rdns [IP])"; Exim: "from rdns
    ([IP])"). A HELO argument is chosen by the client, so `helo=` values
    are dropped first. Exchange writes the address unbracketed in
    parentheses: "from host (IP) by ...".
    """
    match = _FROM_CLAUSE.match(value)
    if match is None:
        return None
    clause = _HELO_ARGUMENT.sub("", match.group(1))

    for pattern in (_BRACKETED_IP, _PARENTHESISED_IP):
        for candidate in reversed(pattern.findall(clause)):
            address = parse_ip(candidate)
            if address is not None:
                return address

    bare = _BARE_IP.match(clause)
    return parse_ip(bare.group(1)) if bare else None


def parse_ip(text: str) -> IpAddress | None:
    """Parse an address as written in mail (optionally bracketed, "IPv6:" prefixed); None if invalid."""
    text = text.strip().strip("[]")
    if text.lower().startswith("ipv6:"):
        text = text[len("ipv6:"):]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None

    # An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def get_addresses(values: list[str]) -> list[tuple[str, str]]:
    """Return the (display name, address) pairs of address header values; [] when they nest too deep.

    `email.utils.getaddresses` recurses once per nested comment and raises
    RecursionError on a few hundred levels, which any sender can write. The
    structure scan reports such headers as a "header-nesting" anomaly.
    """
    try:
        return email.utils.getaddresses(values)
    except RecursionError:
        log.info("event=address_header_too_deep headers=%d", len(values))
        return []


def is_trusted(address: IpAddress, org: OrgPolicy) -> bool:
    return any(address in network for network in org.trusted_networks)


def _from_address(headers: list[tuple[str, str]]) -> tuple[str | None, str | None]:
    value = next((value for name, value in headers if name.lower() == "from"), None)
    if value is None:
        return None, None

    for _display_name, address in get_addresses([value]):
        local, at, domain = address.rpartition("@")
        if at and local and domain:
            domain = domain.strip().rstrip(".").lower()
            return f"{local}@{domain}", domain
    return None, None


def _display_name(headers: list[tuple[str, str]]) -> str:
    """Return the display name of the first From mailbox, RFC 2047 encoded-words decoded."""
    value = next((value for name, value in headers if name.lower() == "from"), None)
    if value is None:
        return ""
    try:
        decoded = str(email.header.make_header(email.header.decode_header(value)))
    except (ValueError, LookupError):
        decoded = value
    pairs = get_addresses([decoded])
    return " ".join(pairs[0][0].split()) if pairs else ""


def _reply_to(headers: list[tuple[str, str]]) -> tuple[str, ...]:
    values = [value for name, value in headers if name.lower() == "reply-to"]
    addresses = [address.strip().lower() for _name, address in get_addresses(values)]
    return tuple(address for address in addresses if "@" in address)


def _first_untrusted_hop(received: list[tuple[int, str]], org: OrgPolicy) -> tuple[int, IpAddress | None]:
    """Walk `Received` headers from the top; return the header index and IP of the first untrusted client.

    Without an untrusted client the index is 0, so no header is trusted.
    """
    for index, value in received:
        address = received_client_ip(value)
        if address is None or is_trusted(address, org):
            continue
        return index, address
    return 0, None


def _original_ip(envelope: Envelope, org: OrgPolicy, walked_ip: IpAddress | None) -> tuple[str | None, str]:
    client = parse_ip(envelope.client_ip) if envelope.client_ip else None

    if client is not None and is_trusted(client, org):
        forwarded = envelope.xforward_addr
        if forwarded and forwarded.strip().upper() != "[UNAVAILABLE]":
            address = parse_ip(forwarded)
            if address is not None:
                return str(address), "xforward"
    elif client is not None:
        return str(client), "client"

    if walked_ip is not None:
        return str(walked_ip), "received"
    return None, "unknown"


def _trusted_auth_results(headers: list[tuple[str, str]], limit: int, org: OrgPolicy) -> list[str]:
    """Return the Authentication-Results values above header index `limit` with one of our authserv-ids."""
    authserv_ids = {authserv_id.lower() for authserv_id in org.authserv_ids}
    trusted: list[str] = []
    for name, value in headers[:limit]:
        if name.lower() != "authentication-results":
            continue
        if _authserv_id(value) in authserv_ids:
            trusted.append(value)
    return trusted


def _authserv_id(value: str) -> str:
    # authserv-id [version] ";" ... with optional comments (RFC 8601, section 2.2).
    head = _COMMENT.sub(" ", value.split(";", 1)[0]).split()
    return head[0].lower() if head else ""


def _dmarc_passes(results: list[str]) -> bool:
    """Tell whether the topmost trusted header with a DMARC result says "pass"."""
    for value in results:
        _authserv, _separator, body = value.partition(";")
        match = _DMARC_RESULT.search(_COMMENT.sub(" ", body))
        if match is not None:
            return match.group(1).lower() == "pass"
    return False
