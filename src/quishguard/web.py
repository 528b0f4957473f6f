"""The quarantine web page: list held messages, release, delete or download one.

`quishguard serve` runs it on `[web] listen` when that is set; an admin logs
in with `[web] token`. The page shows each held message's envelope, From,
Subject, score, findings and decoded QR destinations, all as escaped text.
It never renders message HTML, and URLs are defanged (`hxxps://`) plain
text, never links. Release relays the message with the same code as
`quishguard quarantine release`.

Security measures, and why:
- A login sets a random session cookie (HttpOnly, SameSite=Strict). Sessions
  live in memory, so a restart logs everyone out.
- Every POST carries the session's CSRF token in a hidden field (the
  synchronizer token pattern of the OWASP CSRF cheat sheet), and a POST whose
  Origin header names another site is rejected.
- Responses carry a Content-Security-Policy without script sources, so even
  an escaping bug could not run script, plus `X-Frame-Options: DENY`,
  `Referrer-Policy: same-origin` and `Cache-Control: no-store`. No page
  links to another site, so no referrer leaves the host anyway.
- A download is sent as `application/octet-stream` with
  `Content-Disposition: attachment`, so the browser saves it and never
  renders it.
- Failed logins wait one second before the reply, which slows guessing.

The page has no TLS: bind it to loopback and reach it through an SSH tunnel
or a TLS reverse proxy.
"""

from __future__ import annotations

import asyncio
import ipaddress
import hmac
import html
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from .config import Config, parse_host_port
from .errors import ConfigError, NotFoundError, QuarantineError, RelayError
from .quarantine import QuarantinedMessage, QuarantineStore, is_valid_id, sanitize_for_terminal
from .stamp import defang

log = logging.getLogger(__name__)

MIN_TOKEN_LENGTH = 16
SESSION_COOKIE = "quishguard_session"
SESSION_SECONDS = 8 * 3600
MAX_SESSIONS = 100
FAILED_LOGIN_DELAY = 1.0

# Rows shown on the page; older held messages are listed by the CLI.
MAX_ROWS = 500
# Findings shown in the row before the "all findings" disclosure.
TOP_FINDINGS = 3
MAX_DETAIL_CHARS = 300

SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; style-src 'unsafe-inline'; img-src 'none'; "
                                "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # Not no-referrer: under that policy Chromium sends `Origin: null` with
    # form posts, which the same-origin check must reject.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

# Notices shown after a redirect; the query names one of these keys, so no
# text from the request is ever shown as a notice.
NOTICES = {
    "released": "Released {id} to the next hop.",
    "deleted": "Deleted {id}.",
    "not_found": "No held message has id {id}.",
    "not_held": "Message {id} is not held any more.",
    "relay_failed": "The next hop did not accept {id}; it stays in quarantine.",
    "store_failed": "The quarantine could not be updated for {id}; see the server log.",
    "logged_out": "Logged out.",
}

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #ccc; padding: .4em; text-align: left; vertical-align: top; }
th { background: #eee; }
code, .mono { font-family: monospace; word-break: break-all; }
.score { font-weight: bold; text-align: right; }
.notice { background: #eef6ee; border: 1px solid #9c9; padding: .5em; }
.error { background: #fbeeee; border: 1px solid #c99; padding: .5em; }
form.inline { display: inline; }
ul { margin: 0; padding-left: 1.2em; }
"""


def text(value: object) -> str:
    """Escape `value` for HTML text and attributes, defanging URLs and showing hidden control characters.

    Finding details, subjects and QR payloads all may hold URLs, and none of
    them may be copied from the page as a working link.
    """
    return html.escape(sanitize_for_terminal(defang(str(value))), quote=True)


@dataclass
class _Session:
    csrf: str
    expires: float


class QuarantinePage:
    """The aiohttp handlers of the page, over one quarantine store."""

    def __init__(self, config: Config, store: QuarantineStore) -> None:
        token = config["web.token"]
        if len(token) < MIN_TOKEN_LENGTH:
            raise ConfigError(f"web.token must be at least {MIN_TOKEN_LENGTH} characters when "
                              f"web.listen is set, got {len(token)}; generate one with "
                              "`python3 -c 'import secrets; print(secrets.token_urlsafe(24))'`")
        self.config = config
        self.store = store
        self.token = token.encode("utf-8")
        self.sessions: OrderedDict[str, _Session] = OrderedDict()

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._security_headers], client_max_size=64 * 1024)
        app.router.add_get("/", self.index)
        app.router.add_get("/login", self.login_form)
        app.router.add_post("/login", self.login)
        app.router.add_post("/logout", self.logout)
        app.router.add_get("/messages/{id}/download", self.download)
        app.router.add_post("/messages/{id}/release", self.release)
        app.router.add_post("/messages/{id}/delete", self.delete)
        return app

    @web.middleware
    async def _security_headers(self, request: web.Request, handler) -> web.StreamResponse:
        # Redirects and errors are raised as HTTPException, which is a
        # response too, so they get the headers as well.
        try:
            response = await handler(request)
        except web.HTTPException as error:
            for name, value in SECURITY_HEADERS.items():
                error.headers.setdefault(name, value)
            raise
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    # -- sessions ---------------------------------------------------------

    def _session(self, request: web.Request) -> _Session | None:
        key = request.cookies.get(SESSION_COOKIE, "")
        session = self.sessions.get(key)
        if session is None:
            return None
        if session.expires < time.monotonic():
            del self.sessions[key]
            return None
        return session

    def _new_session(self) -> str:
        key = secrets.token_urlsafe(32)
        self.sessions[key] = _Session(secrets.token_urlsafe(32), time.monotonic() + SESSION_SECONDS)
        while len(self.sessions) > MAX_SESSIONS:
            self.sessions.popitem(last=False)
        return key

    @staticmethod
    def _same_origin(request: web.Request) -> bool:
        # Browsers send Origin on every cross-site POST; a missing header
        # comes from a non-browser client, which has no cookie to abuse.
        origin = request.headers.get("Origin")
        if origin is None:
            return True
        return urlsplit(origin).netloc == request.host

    async def _checked_post(self, request: web.Request) -> _Session:
        """Return the session of a valid POST, or raise the HTTP error to send."""
        session = self._session(request)
        if session is None:
            raise web.HTTPSeeOther("/login")
        form = await request.post()
        sent = str(form.get("csrf", ""))
        if not self._same_origin(request) or not hmac.compare_digest(sent, session.csrf):
            log.warning("event=web_csrf_rejected client=%s path=%s", request.remote, request.path)
            raise web.HTTPForbidden(text="Invalid or missing form token; reload the page and try again.")
        return session

    # -- pages ------------------------------------------------------------

    async def login_form(self, request: web.Request) -> web.Response:
        failed = request.query.get("failed") == "1"
        message = '<p class="error">Invalid token.</p>' if failed else ""
        body = (f"<h1>quishguard quarantine</h1>{message}"
                '<form method="post" action="/login">'
                '<label>Token <input type="password" name="token" id="token" autocomplete="off" '
                'required></label> <button type="submit" id="login">Log in</button></form>')
        return _page("Log in", body)

    async def login(self, request: web.Request) -> web.Response:
        if not self._same_origin(request):
            raise web.HTTPForbidden(text="Cross-site login rejected.")
        form = await request.post()
        sent = str(form.get("token", "")).encode("utf-8")
        if not hmac.compare_digest(sent, self.token):
            log.warning("event=web_login_failed client=%s", request.remote)
            await asyncio.sleep(FAILED_LOGIN_DELAY)
            raise web.HTTPSeeOther("/login?failed=1")

        log.info("event=web_login client=%s", request.remote)
        response = web.HTTPSeeOther("/")
        response.set_cookie(SESSION_COOKIE, self._new_session(), httponly=True, samesite="Strict",
                            path="/", max_age=SESSION_SECONDS)
        raise response

    async def logout(self, request: web.Request) -> web.Response:
        await self._checked_post(request)
        self.sessions.pop(request.cookies.get(SESSION_COOKIE, ""), None)
        response = web.HTTPSeeOther("/login")
        response.del_cookie(SESSION_COOKIE, path="/")
        raise response

    async def index(self, request: web.Request) -> web.Response:
        session = self._session(request)
        if session is None:
            raise web.HTTPSeeOther("/login")

        messages = await asyncio.to_thread(self.store.list, "held", MAX_ROWS)
        held = await asyncio.to_thread(self.store.count, "held")

        parts = ["<h1>quishguard quarantine</h1>", _notice(request)]
        parts.append(f'<form class="inline" method="post" action="/logout">'
                     f'<input type="hidden" name="csrf" value="{text(session.csrf)}">'
                     f'<button type="submit">Log out</button></form>')
        shown = f"the newest {len(messages)} of " if held > len(messages) else ""
        noun = "message" if held == 1 else "messages"
        parts.append(f"<p>Showing {shown}{held} held {noun}.</p>")
        if messages:
            parts.append("<table><thead><tr><th>Received (UTC)</th><th>Envelope</th>"
                         "<th>From / Subject</th><th>Score</th><th>Findings</th>"
                         "<th>QR destinations (defanged)</th><th>Actions</th></tr></thead><tbody>")
            parts.extend(_row(message, session.csrf) for message in messages)
            parts.append("</tbody></table>")
        return _page("Quarantine", "".join(parts))

    # -- actions ----------------------------------------------------------

    async def download(self, request: web.Request) -> web.Response:
        if self._session(request) is None:
            raise web.HTTPSeeOther("/login")
        quarantine_id = request.match_info["id"]
        if not is_valid_id(quarantine_id):
            raise web.HTTPNotFound(text="No such message.")
        try:
            raw = await asyncio.to_thread(self.store.read_raw, quarantine_id)
        except NotFoundError:
            raise web.HTTPNotFound(text="No such message.") from None

        log.info("event=web_download quarantine_id=%s client=%s", quarantine_id, request.remote)
        return web.Response(body=raw, headers={
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'attachment; filename="{quarantine_id}.eml"',
            "Content-Security-Policy": "sandbox; default-src 'none'",
        })

    async def release(self, request: web.Request) -> web.Response:
        await self._checked_post(request)
        quarantine_id = request.match_info["id"]
        notice = await self._release(quarantine_id, request.remote)
        raise web.HTTPSeeOther(_notice_url(notice, quarantine_id))

    async def _release(self, quarantine_id: str, client: str | None) -> str:
        # The CLI module holds the release code so that `quishguard quarantine
        # release` and this page relay with the same headers.
        from .cli import release

        if not is_valid_id(quarantine_id):
            return "not_found"
        try:
            reply = await release(self.store, quarantine_id, self.config)
        except NotFoundError:
            return "not_found"
        except RelayError as error:
            log.warning("event=web_release_failed quarantine_id=%s client=%s reply=%r",
                        quarantine_id, client, error.reply)
            return "relay_failed"
        except QuarantineError as error:
            log.warning("event=web_release_refused quarantine_id=%s client=%s error=%s",
                        quarantine_id, client, error)
            return "not_held"
        log.info("event=web_release quarantine_id=%s client=%s reply=%r", quarantine_id, client, reply)
        return "released"

    async def delete(self, request: web.Request) -> web.Response:
        await self._checked_post(request)
        quarantine_id = request.match_info["id"]
        if not is_valid_id(quarantine_id):
            raise web.HTTPSeeOther(_notice_url("not_found", quarantine_id))
        try:
            await asyncio.to_thread(self.store.delete, quarantine_id)
        except NotFoundError:
            raise web.HTTPSeeOther(_notice_url("not_found", quarantine_id)) from None
        except QuarantineError as error:
            log.error("event=web_delete_failed quarantine_id=%s error=%s", quarantine_id, error)
            raise web.HTTPSeeOther(_notice_url("store_failed", quarantine_id)) from None
        log.info("event=web_delete quarantine_id=%s client=%s", quarantine_id, request.remote)
        raise web.HTTPSeeOther(_notice_url("deleted", quarantine_id))


def _notice_url(notice: str, quarantine_id: str) -> str:
    shown = quarantine_id if is_valid_id(quarantine_id) else "-"
    return f"/?notice={notice}&id={shown}"


def _notice(request: web.Request) -> str:
    template = NOTICES.get(request.query.get("notice", ""))
    if template is None:
        return ""
    quarantine_id = request.query.get("id", "")
    shown = quarantine_id if is_valid_id(quarantine_id) else "-"
    css = "notice" if request.query.get("notice") in ("released", "deleted", "logged_out") else "error"
    return f'<p class="{css}" id="notice">{text(template.format(id=shown))}</p>'


def _finding_items(findings, limit: int | None) -> str:
    chosen = findings if limit is None else findings[:limit]
    items = []
    for finding in chosen:
        detail = finding.detail[:MAX_DETAIL_CHARS]
        items.append(f"<li><code>{text(finding.rule)}</code> {finding.score:+.1f}"
                     f"<br><span class=\"mono\">{text(detail)}</span></li>")
    return "<ul>" + "".join(items) + "</ul>"


def _row(message: QuarantinedMessage, csrf: str) -> str:
    quarantine_id = message.id
    ranked = sorted(message.findings, key=lambda finding: -finding.score)
    findings = _finding_items(ranked, TOP_FINDINGS)
    if len(ranked) > TOP_FINDINGS:
        findings += (f"<details><summary>all {len(ranked)} findings</summary>"
                     f"{_finding_items(ranked, None)}</details>")

    destinations = "".join(f'<li class="mono">{text(code.payload)}</li>' for code in message.qr_codes)
    destinations = f"<ul>{destinations}</ul>" if destinations else "-"

    hidden = f'<input type="hidden" name="csrf" value="{text(csrf)}">'
    actions = (
        f'<form class="inline" method="post" action="/messages/{quarantine_id}/release">{hidden}'
        f'<button type="submit" name="release" id="release-{quarantine_id}">Release</button></form> '
        f'<form class="inline" method="post" action="/messages/{quarantine_id}/delete">{hidden}'
        f'<button type="submit" name="delete" id="delete-{quarantine_id}">Delete</button></form> '
        f'<a href="/messages/{quarantine_id}/download" id="download-{quarantine_id}">Download</a>'
    )
    recipients = ", ".join(message.rcpt_tos)
    return (
        f'<tr id="message-{quarantine_id}">'
        f'<td>{text(message.received_at.strftime("%Y-%m-%d %H:%M:%S"))}<br>'
        f'<code>{quarantine_id}</code></td>'
        f'<td class="mono">{text(message.mail_from or "<>")} &rarr; {text(recipients)}'
        f'<br>client {text(message.client_ip or "-")}</td>'
        f'<td>{text(message.from_header)}<br><b class="subject">{text(message.subject)}</b></td>'
        f'<td class="score">{message.score:.1f}</td>'
        f"<td>{findings}</td><td>{destinations}</td><td>{actions}</td></tr>"
    )


def _page(title: str, body: str) -> web.Response:
    document = ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
                f"<title>{text(title)} - quishguard</title><style>{STYLE}</style></head>"
                f"<body>{body}</body></html>")
    return web.Response(text=document, content_type="text/html", charset="utf-8")


class WebServer:
    """The running page; `close()` stops it."""

    def __init__(self, runner: web.AppRunner, address: tuple[str, int]) -> None:
        self.runner = runner
        self.address = address

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_web(config: Config, store: QuarantineStore,
                    listen: tuple[str, int] | None = None) -> WebServer:
    """Serve the page on `listen`, else on `[web] listen`; raise ConfigError without a usable token."""
    page = QuarantinePage(config, store)
    runner = web.AppRunner(page.application(), access_log=None)
    await runner.setup()

    host, port = listen or parse_host_port(config["web.listen"])
    bound = await serve_runner(runner, host, port, name="web", exposure="no TLS and a token login")
    return WebServer(runner, bound)


async def serve_runner(runner: web.AppRunner, host: str, port: int, *, name: str,
                       exposure: str) -> tuple[str, int]:
    """Listen on `host:port` with a set-up aiohttp runner and return the bound address.

    A host outside loopback is logged as a warning that names `exposure`,
    because these pages have no TLS.
    """
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    if not _is_loopback(host):
        log.warning("event=%s_not_loopback address=%s:%d reason=%s", name, host, port,
                    f"{exposure}; bind to loopback unless a firewall or a container network "
                    "limits who can connect")
    log.info("event=%s_listening address=%s:%d", name, bound[0], bound[1])
    return bound[0], bound[1]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
