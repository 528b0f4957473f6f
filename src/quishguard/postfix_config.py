"""Render the Postfix configuration that puts Postfix in front of quishguard.

One template pair, `deploy/postfix/main.cf.in` and `master.cf.in`, serves
both the private loopback instances of the integration tests and the compose
deployment. Placeholders are written `@NAME@` (autoconf style) because
Postfix itself uses `$name` for its own parameters. Rendering fails when a
placeholder has no value, so a template edit cannot ship half-filled.

The three deployment modes follow Postfix's FILTER_README, SMTPD_PROXY_README
and MILTER_README:

- `after-queue`: the public smtpd queues the message and a dedicated smtp(8)
  client (`quishguard` in master.cf) delivers it to the filter with
  `content_filter`; the filter relays to the reinjection smtpd.
- `before-queue`: the public smtpd proxies the session to the filter with
  `smtpd_proxy_filter`, so the client sees the filter's reply; the filter
  relays to the reinjection smtpd.
- `milter`: the public smtpd talks the milter protocol to the filter with
  `smtpd_milters`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

MODES = ("after-queue", "before-queue", "milter", "none")

# deploy/postfix/ of a source checkout; an image that copies the templates
# elsewhere passes `template_dir`.
DEFAULT_TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "deploy" / "postfix"

_PLACEHOLDER = re.compile(r"@([A-Z][A-Z0-9_]*)@")


@dataclass(frozen=True)
class PostfixSettings:
    """Values for the template; `public_listen` and the other listens are Postfix `HOST:PORT` service names."""

    mode: str
    queue_directory: str
    data_directory: str
    maildir_base: str
    maillog_file: str
    filter_host: str
    filter_port: int
    public_listen: str
    reinject_listen: str
    maillog_prefixes: str = ""
    myhostname: str = "mx.example.test"
    mydomain: str = "example.test"
    inet_interfaces: str = "127.0.0.1"
    mynetworks: str = "127.0.0.0/8"
    filter_networks: str = "127.0.0.0/8"
    smtp_bind_address: str = ""
    maildir_uid: int = 65534
    maildir_gid: int = 65534
    message_size_limit: int = 52_428_800
    forbid_bare_newline: str = "yes"
    queue_run_delay: str = "300s"
    minimal_backoff_time: str = "300s"
    maximal_backoff_time: str = "4000s"
    proxy_timeout: str = "100s"
    milter_default_action: str = "tempfail"
    filter_process_limit: int = 10
    filter_data_done_timeout: str = "600s"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"invalid Postfix deployment mode {self.mode!r}; allowed: {', '.join(MODES)}")

    @classmethod
    def loopback_test(cls, root: Path, *, mode: str, public_port: int, reinject_port: int,
                      filter_port: int, **overrides: object) -> PostfixSettings:
        """Settings for a private instance under `root` that only listens on 127.0.0.1.

        Retries are seconds apart so a deferred message comes back within a
        test.
        """
        values: dict[str, object] = dict(
            mode=mode,
            queue_directory=str(root / "queue"),
            data_directory=str(root / "data"),
            maildir_base=str(root / "mail"),
            maillog_file=str(root / "log" / "maillog"),
            maillog_prefixes=str(root / "log"),
            filter_host="127.0.0.1",
            filter_port=filter_port,
            public_listen=f"127.0.0.1:{public_port}",
            reinject_listen=f"127.0.0.1:{reinject_port}",
            smtp_bind_address="127.0.0.1",
            queue_run_delay="2s",
            minimal_backoff_time="2s",
            maximal_backoff_time="4s",
            proxy_timeout="30s",
            filter_data_done_timeout="30s",
        )
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    @classmethod
    def compose(cls, *, mode: str, filter_host: str = "quishguard", filter_port: int = 10025,
                network: str = "172.16.0.0/12", **overrides: object) -> PostfixSettings:
        """Settings for a Postfix container in front of a `quishguard` container.

        Postfix listens on every interface of its container (port 25 public,
        10026 for reinjection) and trusts `network`, the compose network, as
        the filter's source. Paths are the Debian package's defaults.
        """
        values: dict[str, object] = dict(
            mode=mode,
            queue_directory="/var/spool/postfix",
            data_directory="/var/lib/postfix",
            maildir_base="/var/mail/vhosts",
            maillog_file="/dev/stdout",
            maillog_prefixes="/dev/stdout",
            filter_host=filter_host,
            filter_port=filter_port,
            public_listen="25",
            reinject_listen="10026",
            inet_interfaces="all",
            mynetworks=f"127.0.0.0/8 {network}",
            filter_networks=f"127.0.0.0/8 {network}",
        )
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


def _public_smtpd_options(settings: PostfixSettings) -> str:
    """Return the master.cf `-o` lines that attach quishguard to the public listener."""
    host, port = settings.filter_host, settings.filter_port
    if settings.mode == "after-queue":
        # Address mappings run once, in the reinjection smtpd after the
        # filter, as FILTER_README recommends.
        return (f"  -o content_filter=quishguard:[{host}]:{port}\n"
                "  -o receive_override_options=no_address_mappings")
    if settings.mode == "before-queue":
        return f"  -o smtpd_proxy_filter={host}:{port}"
    if settings.mode == "milter":
        return f"  -o smtpd_milters=inet:{host}:{port}"
    return ""


def template_values(settings: PostfixSettings) -> dict[str, str]:
    """Return the placeholder values, keyed by placeholder name."""
    values = {field.name.upper(): str(getattr(settings, field.name))
              for field in dataclasses.fields(settings)}
    values["MAILLOG_PREFIXES"] = settings.maillog_prefixes or str(Path(settings.maillog_file).parent)
    values["PUBLIC_SMTPD_OPTIONS"] = _public_smtpd_options(settings)
    return values


def fill_template(text: str, values: dict[str, str], name: str = "template") -> str:
    """Replace every `@NAME@` in `text`; raise ValueError naming the placeholders without a value."""
    missing = sorted({match for match in _PLACEHOLDER.findall(text) if match not in values})
    if missing:
        raise ValueError(f"{name}: no value for placeholder(s) {', '.join('@' + m + '@' for m in missing)}; "
                         "add them to PostfixSettings")
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], text)


def render_postfix_config(settings: PostfixSettings,
                          template_dir: Path = DEFAULT_TEMPLATE_DIR) -> dict[str, str]:
    """Render main.cf and master.cf; return them keyed by file name."""
    values = template_values(settings)
    rendered = {}
    for name in ("main.cf", "master.cf"):
        template = template_dir / f"{name}.in"
        rendered[name] = fill_template(template.read_text(encoding="utf-8"), values, str(template))
    return rendered


def write_postfix_config(settings: PostfixSettings, etc_dir: Path,
                         template_dir: Path = DEFAULT_TEMPLATE_DIR) -> None:
    """Render the configuration into `etc_dir` (created when missing)."""
    etc_dir.mkdir(parents=True, exist_ok=True)
    for name, text in render_postfix_config(settings, template_dir).items():
        (etc_dir / name).write_text(text, encoding="utf-8")
