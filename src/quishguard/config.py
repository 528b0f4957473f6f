"""Configuration: one TOML file over a table of declared defaults.

Every option is declared once in `OPTIONS` with its type, default, unit and
help text. `load_config` merges the operator's file over those defaults and
validates each value; an invalid value raises `ConfigError` naming the key,
the value and what is allowed. The README's configuration reference is
printed from the same table by `quishguard config --reference`.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .decoders.generators import DEFAULT_QR_GENERATORS, parse_generator
from .errors import ConfigError

MiB = 1024 * 1024


@dataclass(frozen=True)
class Option:
    section: str
    key: str
    default: Any
    unit: str
    help: str
    check: Callable[[str, Any], Any]

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"


def _fail(name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"invalid value for {name}: {value!r}; allowed: {allowed}")


def _number(minimum: float, maximum: float | None = None) -> Callable[[str, Any], float]:
    def check(name: str, value: Any) -> float:
        allowed = f"a number >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(name, value, allowed)
        if value < minimum or (maximum is not None and value > maximum):
            raise _fail(name, value, allowed)
        return float(value)

    return check


def _integer(minimum: int) -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise _fail(name, value, f"an integer >= {minimum}")
        return value

    return check


def _memory_limit(name: str, value: Any) -> int:
    # Below this the decoder libraries alone do not fit and no worker starts.
    minimum = 1024
    if isinstance(value, bool) or not isinstance(value, int) or (value != 0 and value < minimum):
        raise _fail(name, value, f"0 (no limit) or an integer >= {minimum}")
    return value


def _optional_number(name: str, value: Any) -> float | None:
    if value is None or value == "":
        return None
    return _number(0)(name, value)


def _string(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _fail(name, value, "a string")
    return value


def _printable_string(name: str, value: Any) -> str:
    text = _string(name, value)
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise _fail(name, value, "a string without control characters")
    return text


def _header_prefix(name: str, value: Any) -> str:
    text = _string(name, value)
    if not text or not all(33 <= ord(c) <= 126 and c != ":" for c in text):
        raise _fail(name, value, "a non-empty header name prefix of printable ASCII without ':'")
    return text


def _choice(*choices: str) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if value not in choices:
            raise _fail(name, value, ", ".join(choices))
        return value

    return check


def parse_host_port(text: str) -> tuple[str, int]:
    """Split `HOST:PORT` or `[IPV6]:PORT`; raise ValueError when malformed."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _host_port(name: str, value: Any) -> str:
    text = _string(name, value)
    try:
        parse_host_port(text)
    except ValueError:
        raise _fail(name, value, "HOST:PORT such as 127.0.0.1:10025 or [::1]:10025") from None
    return text


def parse_milter_socket(text: str) -> tuple[str, str | int]:
    """Split a milter socket, `inet:HOST:PORT` or `unix:PATH`, into (HOST, PORT) or ("unix", PATH)."""
    kind, sep, rest = text.partition(":")
    if sep and kind == "inet":
        return parse_host_port(rest)
    if sep and kind == "unix" and rest.startswith("/"):
        return "unix", rest
    raise ValueError(f"expected inet:HOST:PORT or unix:/PATH, got {text!r}")


def _milter_socket(name: str, value: Any) -> str:
    text = _string(name, value)
    try:
        parse_milter_socket(text)
    except ValueError:
        raise _fail(name, value, "inet:HOST:PORT such as inet:127.0.0.1:9900, or unix:/ABSOLUTE/PATH") from None
    return text


def _optional_host_port(name: str, value: Any) -> str:
    if value == "":
        return ""
    return _host_port(name, value)


def _networks(name: str, value: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    if not isinstance(value, list):
        raise _fail(name, value, "a list of networks such as [\"127.0.0.0/8\", \"::1/128\"]")
    networks = []
    for item in value:
        try:
            networks.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            raise _fail(name, item, "an IPv4 or IPv6 network in CIDR form") from None
    return tuple(networks)


def _string_list(name: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(name, value, "a list of strings")
    return tuple(v.strip().lower() for v in value if v.strip())


def _path(name: str, value: Any) -> Path:
    return Path(_string(name, value))


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(name, value, "true or false")
    return value


def _name_list(name: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(name, value, "a list of strings")
    return tuple(" ".join(v.split()) for v in value if v.strip())


def _optional_file(name: str, value: Any) -> Path | None:
    text = _string(name, value)
    if not text:
        return None
    path = Path(text)
    if not path.is_file():
        raise _fail(name, value, "an existing file, or an empty string")
    return path


def _dns_servers(name: str, value: Any) -> tuple[str, ...]:
    servers = _string_list(name, value)
    for server in servers:
        try:
            ipaddress.ip_address(server.strip("[]"))
            continue
        except ValueError:
            pass
        try:
            host, _port = parse_host_port(server)
            ipaddress.ip_address(host)
        except ValueError:
            raise _fail(name, server, "an IP address or IP:PORT such as 127.0.0.1:5353 or [::1]:53") from None
    return servers


def _stamp_secret(name: str, value: Any) -> str:
    text = _string(name, value)
    if text and len(text) < 16:
        raise _fail(name, "(hidden)", "a string of at least 16 characters, or an empty string")
    return text


def _qr_generators(name: str, value: Any) -> tuple[str, ...]:
    entries = _string_list(name, value)
    for entry in entries:
        try:
            parse_generator(entry)
        except ValueError as error:
            raise _fail(name, entry, str(error)) from None
    return entries


LOOPBACK = ["127.0.0.0/8", "::1/128"]

OPTIONS: tuple[Option, ...] = (
    Option("smtp", "listen", "127.0.0.1:10025", "HOST:PORT",
           "Address the SMTP proxy listens on.", _host_port),
    Option("smtp", "relay", "", "HOST:PORT",
           "Next hop that receives accepted mail. Empty: `quishguard serve` starts the local "
           "sink on `sink.listen` and relays there.", _optional_host_port),
    Option("smtp", "hostname", "", "name",
           "Name used in the greeting, EHLO and our headers. Empty: the machine's host name "
           "(no DNS lookup).", _printable_string),
    Option("smtp", "client_networks", LOOPBACK, "CIDR list",
           "Clients allowed to connect. Others get 554 at connect time.", _networks),
    Option("smtp", "max_message_size", 50 * MiB, "bytes",
           "Largest message accepted, announced with SIZE. Lines longer than the RFC 5321 "
           "limit are accepted up to this size.", _integer(1024)),
    Option("smtp", "relay_timeout", 60.0, "seconds",
           "Timeout of each command sent to the next hop. A timeout gives the client 451.",
           _number(1)),
    Option("smtp", "session_timeout", 300.0, "seconds",
           "Idle time after which an inbound session is closed.", _number(1)),
    Option("smtp", "max_connections", 100, "connections",
           "Most inbound SMTP connections open at once. Further clients get 421 and are "
           "disconnected, so the sending MTA retries later.", _integer(1)),
    Option("smtp", "tls_cert", "", "path",
           "PEM certificate chain offered with STARTTLS. STARTTLS is offered only when both "
           "tls_cert and tls_key are set.", _string),
    Option("smtp", "tls_key", "", "path",
           "PEM private key of tls_cert.", _string),
    Option("scan", "budget_seconds", 15.0, "seconds",
           "Time allowed to inspect one message. When it runs out the message gets a "
           "SCAN_INCOMPLETE finding and the fail mode applies.", _number(0.1)),
    Option("scan", "fail_mode", "accept", "accept|tempfail",
           "What an incomplete scan does: accept (with the finding) or tempfail (451).",
           _choice("accept", "tempfail")),
    Option("scan", "workers", 0, "processes",
           "Decoder worker processes. 0: one per CPU core.", _integer(0)),
    Option("scan", "worker_memory_mb", 2048, "MiB",
           "Address space limit (RLIMIT_AS) of each decoder worker, including about 650 MiB of "
           "decoder libraries. A part that needs more fails as SCAN_INCOMPLETE. 0: no limit.",
           _memory_limit),
    Option("scan", "max_mime_depth", 10, "levels",
           "Deepest nesting of multipart and message/rfc822 parts inspected.", _integer(1)),
    Option("scan", "max_parts", 200, "parts",
           "Most MIME parts inspected per message.", _integer(1)),
    Option("scan", "max_decoded_bytes", 100 * MiB, "bytes",
           "Most bytes decoded from transfer encodings per message.", _integer(1024)),
    Option("scan", "max_images", 50, "images",
           "Most images decoded per message (attachments, inline parts and data: URIs).",
           _integer(1)),
    Option("scan", "max_image_pixels", 40_000_000, "pixels",
           "Largest image decoded. Larger images are a MIME_LIMIT finding, not decoded.",
           _integer(10_000)),
    Option("scan", "max_pdf_pages", 20, "pages",
           "Most PDF pages rendered per PDF.", _integer(1)),
    Option("scan", "pdf_dpi", 150, "dpi",
           "Resolution of PDF page renders, lowered per page to stay under "
           "max_image_pixels.", _integer(36)),
    Option("scan", "max_urls", 500, "URLs",
           "Most URLs kept per message.", _integer(1)),
    Option("scan", "image_seconds", 2.0, "seconds",
           "Time allowed to decode one image, PDF or archive. Past it the worker is "
           "killed, the part gets a SCAN_INCOMPLETE finding and the message's other "
           "parts are still decoded.", _number(0.1)),
    Option("scan", "qr_generators", list(DEFAULT_QR_GENERATORS), "list",
           "QR-generator services whose image URL carries the payload, as "
           "`host/path-prefix?parameter[&key=value]` (for example "
           "`api.qrserver.com/v1/create-qr-code?data`). The payload is read from the "
           "URL; nothing is fetched.", _qr_generators),
    Option("scan", "open_redirectors", [], "list",
           "Extra open-redirector patterns, as `host/path-prefix` (for example "
           "`redirect.example.com/out`), added to the built-in list.", _string_list),
    Option("headers", "prefix", "X-Quishguard-", "text",
           "Prefix of the verdict headers. Incoming headers with this prefix are removed.",
           _header_prefix),
    Option("headers", "subject_tag", "[SUSPICIOUS] ", "text",
           "Prefix added to the Subject for the tag action. May be empty.", _printable_string),
    Option("thresholds", "tag", 4.0, "score",
           "Score from which a message is tagged.", _number(0)),
    Option("thresholds", "quarantine", 8.0, "score",
           "Score from which a message is quarantined.", _number(0)),
    Option("thresholds", "reject", None, "score",
           "Score from which a message is rejected with 550. Absent: never reject.",
           _optional_number),
    Option("org", "domains", [], "list",
           "The organisation's own mail domains. Mail that claims one of them in From but "
           "arrives from outside without trusted DMARC pass is the Direct Send pattern.",
           _string_list),
    Option("org", "trusted_networks", LOOPBACK, "CIDR list",
           "The organisation's own MTAs. XFORWARD is announced to them, and the Received walk "
           "skips hops inside them.", _networks),
    Option("org", "authserv_ids", [], "list",
           "authserv-ids of Authentication-Results headers that we believe when a trusted "
           "hop added them.", _string_list),
    Option("org", "people", [], "list",
           "Display names of people in the organisation (\"Ann Smith\"). Mail from outside, or "
           "failing authentication, under one of these names is SENDER_DISPLAY_NAME_PERSON.",
           _name_list),
    Option("org", "people_file", "", "path",
           "File with one more display name per line (UTF-8; # starts a comment), added to "
           "`org.people`. Empty: none.", _optional_file),
    Option("org", "remember_senders", True, "true|false",
           "Whether `serve` remembers outside addresses that used a person's display name, in "
           "senders.sqlite3 in the data folder, so the first message of a new one is "
           "SENDER_FIRST_SEEN_PERSON. `scan` never writes this file.", _boolean),
    Option("auth", "authserv_id", "", "name",
           "authserv-id of the Authentication-Results header we add. Incoming headers with "
           "this id are removed. Empty: smtp.hostname.", _printable_string),
    Option("auth", "arc_trusted_sealers", [], "list",
           "Domains (ARC-Seal d=) whose valid ARC chains we believe, such as a mailing list "
           "or a forwarding gateway of the organisation.", _string_list),
    Option("auth", "microsoft_networks", [], "CIDR list",
           "Networks of the Microsoft 365 connector that hands mail to the hop. Microsoft's "
           "AuthAs, antispam and compauth headers count only from these previous hops.",
           _networks),
    Option("dns", "enabled", True, "true|false",
           "Whether `serve` and `milter` look up SPF, DKIM, DMARC and ARC records. false: "
           "sender checks use only the message headers, the hop makes no DNS queries and "
           "adds no Authentication-Results header of its own.",
           _boolean),
    Option("dns", "servers", [], "list",
           "DNS resolvers for SPF, DKIM, DMARC and ARC, as IP or IP:PORT ([IPv6]:PORT). Empty: "
           "the system's resolvers (/etc/resolv.conf).", _dns_servers),
    Option("dns", "timeout_seconds", 2.0, "seconds",
           "Time allowed to one DNS query.", _number(0.1)),
    Option("dns", "budget_seconds", 5.0, "seconds",
           "Time allowed to all DNS queries of one message. Checks still waiting when it runs "
           "out report temperror.", _number(0.1)),
    Option("stamp", "secret", "", "text",
           "HMAC key of the Stamp header added to every relayed message, at least 16 "
           "characters. Empty: no stamp, and `serve` logs a warning at start.", _stamp_secret),
    Option("quarantine", "data_dir", "./var/quishguard", "path",
           "Folder of the quarantine index, stored messages and the local sink, relative to "
           "the working directory.", _path),
    Option("milter", "listen", "inet:127.0.0.1:9900", "socket",
           "Socket that `quishguard milter` listens on for the MTA: inet:HOST:PORT or "
           "unix:/PATH.", _milter_socket),
    Option("milter", "quarantine_mode", "hold", "hold|store",
           "Where the milter puts quarantined mail: hold (the MTA's hold queue, released with "
           "`postsuper -H`) or store (quishguard's quarantine; the MTA discards its copy).",
           _choice("hold", "store")),
    Option("milter", "release_relay", "", "HOST:PORT",
           "Next hop that `quishguard quarantine release` sends released mail to. It must not "
           "pass mail through the milter again, for example a Postfix smtpd with "
           "`-o smtpd_milters=`. Required when quarantine_mode is store.", _optional_host_port),
    Option("milter", "progress_interval", 5.0, "seconds",
           "Time between progress replies while a message is scanned, which keep the MTA from "
           "timing out. Keep it below the MTA's reply timeout (Postfix milter_content_timeout: "
           "300 s; Sendmail T=R: 10 s).", _number(1, 120)),
    Option("milter", "idle_timeout", 600.0, "seconds",
           "Idle time after which an MTA connection is closed. Keep it above the MTA's SMTP "
           "idle timeout (Postfix smtpd_timeout: 300 s).", _number(1)),
    Option("sink", "listen", "127.0.0.1:10026", "HOST:PORT",
           "Address of the local sink that `quishguard sink` (and `serve` without a relay) "
           "runs.", _host_port),
    Option("events", "file", "", "path",
           "File that receives one JSON line per scanned message (appended; reopened when "
           "log rotation moves it). `-` writes to standard output. Empty: off.", _string),
    Option("events", "syslog", "", "HOST:PORT",
           "Syslog collector that receives each event as an RFC 5424 message (facility mail). "
           "Empty: off.", _optional_host_port),
    Option("events", "syslog_transport", "udp", "udp|tcp",
           "Transport to the syslog collector: udp (RFC 5426) or tcp with octet counting "
           "(RFC 6587).", _choice("udp", "tcp")),
    Option("metrics", "listen", "", "HOST:PORT",
           "Address of the Prometheus metrics endpoint (`/metrics`), served by `quishguard "
           "serve`. Use a loopback address. Empty: off.", _optional_host_port),
    Option("web", "listen", "", "HOST:PORT",
           "Address of the quarantine web page, served by `quishguard serve`. Use a loopback "
           "address. Empty: off.", _optional_host_port),
    Option("web", "token", "", "text",
           "Login token of the quarantine web page, at least 16 characters. Required when "
           "`web.listen` is set.", _printable_string),
)

_BY_NAME = {o.name: o for o in OPTIONS}
_SECTIONS = {o.section for o in OPTIONS}


@dataclass(frozen=True)
class Config:
    """Validated settings; `values` maps `section.key` to the checked value."""

    values: dict[str, Any]
    rule_scores: dict[str, float] = field(default_factory=dict)
    source: str = "defaults"

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    @property
    def hostname(self) -> str:
        return self.values["smtp.hostname"] or socket.gethostname()

    @property
    def data_dir(self) -> Path:
        return self.values["quarantine.data_dir"]

    @property
    def workers(self) -> int:
        return self.values["scan.workers"] or (os.cpu_count() or 1)

    def replace(self, **overrides: Any) -> Config:
        """Return a copy with `section.key` values (given as `section_key=`) checked and set."""
        values = dict(self.values)
        for underscored, value in overrides.items():
            section, _, key = underscored.partition("_")
            option = _BY_NAME[f"{section}.{key}"]
            values[option.name] = option.check(option.name, value)
        return Config(values, dict(self.rule_scores), self.source)


def _check_rules(table: Any, known_rules: set[str] | None) -> dict[str, float]:
    if not isinstance(table, dict):
        raise _fail("rules", table, "a table of [rules.NAME] sections")
    scores = {}
    for rule, settings in table.items():
        if known_rules is not None and rule not in known_rules:
            raise ConfigError(f"unknown rule [rules.{rule}]; known rules: {', '.join(sorted(known_rules))}")
        if not isinstance(settings, dict) or set(settings) - {"score"}:
            raise _fail(f"rules.{rule}", settings, "a table with one key, score")
        if "score" in settings:
            scores[rule] = _number(-100, 100)(f"rules.{rule}.score", settings["score"])
    return scores


def build_config(data: dict[str, Any], source: str = "defaults",
                 known_rules: set[str] | None = None) -> Config:
    """Validate parsed TOML `data` over the defaults."""
    values: dict[str, Any] = {}
    for option in OPTIONS:
        values[option.name] = option.check(option.name, option.default)

    rule_scores: dict[str, float] = {}
    for section, table in data.items():
        if section == "rules":
            rule_scores = _check_rules(table, known_rules)
            continue
        if section not in _SECTIONS:
            raise ConfigError(f"unknown section [{section}] in {source}; known sections: "
                              f"{', '.join(sorted(_SECTIONS | {'rules'}))}")
        if not isinstance(table, dict):
            raise _fail(section, table, "a table")
        for key, value in table.items():
            option = _BY_NAME.get(f"{section}.{key}")
            if option is None:
                known = ", ".join(o.key for o in OPTIONS if o.section == section)
                raise ConfigError(f"unknown key {section}.{key} in {source}; known keys: {known}")
            values[option.name] = option.check(option.name, value)

    if values["thresholds.quarantine"] < values["thresholds.tag"]:
        raise ConfigError(f"thresholds.quarantine ({values['thresholds.quarantine']}) must not be "
                          f"below thresholds.tag ({values['thresholds.tag']})")
    # Checks that span two keys, so `quishguard config` finds what would stop
    # `serve` or `milter` at start-up.
    if values["web.listen"] and len(values["web.token"]) < 16:
        raise ConfigError(f"web.token must be at least 16 characters when web.listen is set, got "
                          f"{len(values['web.token'])} in {source}; generate one with "
                          "`python3 -c 'import secrets; print(secrets.token_urlsafe(24))'`")
    if values["milter.quarantine_mode"] == "store" and not values["milter.release_relay"]:
        raise ConfigError(f'milter.quarantine_mode = "store" needs milter.release_relay in {source}: the '
                          "next hop that released mail goes to without passing the milter again")
    reject = values["thresholds.reject"]
    if reject is not None and reject < values["thresholds.quarantine"]:
        raise ConfigError(f"thresholds.reject ({reject}) must not be below "
                          f"thresholds.quarantine ({values['thresholds.quarantine']})")
    return Config(values, rule_scores, source)


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Load and validate a TOML file, or return the defaults when `path` is None."""
    from .scoring.rules import RULES

    known = {rule.name for rule in RULES}
    if path is None:
        return build_config({}, known_rules=known)
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"invalid TOML in config file {path}: {error}") from error
    return build_config(data, str(path), known_rules=known)


def _toml_value(value: Any) -> str:
    """Format a default as it is written in TOML (true, not True)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def reference_markdown() -> str:
    """Return the configuration reference as a Markdown table."""
    lines = ["| key | default | unit | meaning |", "| --- | --- | --- | --- |"]
    for option in OPTIONS:
        default = "(absent)" if option.default is None else _toml_value(option.default)
        default = default.replace("|", "\\|")
        lines.append(f"| `{option.name}` | `{default}` | {option.unit.replace('|', ' or ')} | {option.help} |")
    lines.append("| `rules.NAME.score` | the rule's default | score | "
                 "Weight of rule NAME; 0 disables it. `quishguard rules` lists the rules. |")
    return "\n".join(lines)
