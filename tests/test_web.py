"""The quarantine web page over loopback HTTP, and a release driven by headless Chromium."""

from __future__ import annotations

import asyncio
import email
import re
import shutil
from pathlib import Path

import aiohttp
import pytest

from quishguard.errors import ConfigError
from quishguard.web import start_web

from .factories import make_message, qr_png
from .smtp_client import send

TOKEN = "test-token-0123456789abcdef"
LURE = "https://lure.example.test/login?u=Ym9iQGV4YW1wbGUuY29t"
HOSTILE_SUBJECT = '<script>alert("x")</script><img src=x onerror=alert(1)> Pay now'

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000")


async def quarantine_one(start_hop, next_hop, *, subject: str = "Scan to keep your mailbox",
                         html: str | None = None):
    """Start a hop that quarantines everything, send one QR message, return (hop, quarantine id)."""
    hop = await start_hop(thresholds={"tag": 0.0, "quarantine": 0.0},
                          smtp={"relay": f"127.0.0.1:{next_hop.port}"}, web={"token": TOKEN})
    message = make_message(subject=subject, text="Scan the code.\n", html=html,
                           images=[("code.png", qr_png(LURE))])
    _, reply = await send(hop.port, message)
    assert reply[1].startswith("2.0.0 Ok: message held in quarantine as "), reply
    return hop, reply[1].rsplit(" ", 1)[1]


@pytest.fixture
async def web_for():
    started = []

    async def start(hop):
        server = await start_web(hop.config, hop.store, listen=("127.0.0.1", 0))
        started.append(server)
        return f"http://127.0.0.1:{server.address[1]}"

    yield start
    for server in started:
        await server.close()


def browserless() -> aiohttp.ClientSession:
    # aiohttp's default cookie jar ignores cookies from IP addresses.
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def logged_in(session: aiohttp.ClientSession, base: str) -> str:
    """Log in and return the page's CSRF token."""
    async with session.post(f"{base}/login", data={"token": TOKEN}) as response:
        assert response.status == 200
        page = await response.text()
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


async def test_web_requires_login(start_hop, next_hop, web_for):
    hop, _ = await quarantine_one(start_hop, next_hop)
    base = await web_for(hop)

    async with browserless() as session:
        async with session.get(f"{base}/", allow_redirects=False) as response:
            status, location = response.status, response.headers["Location"]
        async with session.get(f"{base}/messages/{'0' * 28}/download", allow_redirects=False) as response:
            download_status = response.status

    assert status == 303
    assert location == "/login"
    assert download_status == 303


async def test_web_wrong_token_rejected(start_hop, next_hop, web_for):
    hop, _ = await quarantine_one(start_hop, next_hop)
    base = await web_for(hop)

    async with browserless() as session:
        async with session.post(f"{base}/login", data={"token": "wrong-token-0123456789"},
                                allow_redirects=False) as response:
            status, location = response.status, response.headers["Location"]
            cookies = response.cookies

    assert status == 303
    assert location == "/login?failed=1"
    assert "quishguard_session" not in cookies


async def test_web_lists_message_escaped(start_hop, next_hop, web_for):
    hop, quarantine_id = await quarantine_one(start_hop, next_hop, subject=HOSTILE_SUBJECT,
                                              html=f'<p>Scan</p><a href="{LURE}">here</a>')
    base = await web_for(hop)

    async with browserless() as session:
        await logged_in(session, base)
        async with session.get(f"{base}/") as response:
            page = await response.text()
            headers = response.headers

    assert f'id="message-{quarantine_id}"' in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "<script" not in page
    assert "<img" not in page
    assert "hxxps://lure.example.test/login" in page
    assert "https://lure.example.test" not in page
    assert "QR_URL" in page
    assert "script-src" not in headers["Content-Security-Policy"]
    assert "default-src 'none'" in headers["Content-Security-Policy"]


async def test_web_post_without_csrf_rejected(start_hop, next_hop, web_for):
    hop, quarantine_id = await quarantine_one(start_hop, next_hop)
    base = await web_for(hop)

    async with browserless() as session:
        await logged_in(session, base)
        async with session.post(f"{base}/messages/{quarantine_id}/release", data={"csrf": "forged"},
                                allow_redirects=False) as response:
            status = response.status

    assert status == 403
    assert hop.store.get(quarantine_id).status == "held"
    assert next_hop.messages == []


async def test_web_cross_origin_post_rejected(start_hop, next_hop, web_for):
    hop, quarantine_id = await quarantine_one(start_hop, next_hop)
    base = await web_for(hop)

    async with browserless() as session:
        csrf = await logged_in(session, base)
        async with session.post(f"{base}/messages/{quarantine_id}/delete", data={"csrf": csrf},
                                headers={"Origin": "http://attacker.example"},
                                allow_redirects=False) as response:
            status = response.status

    assert status == 403
    assert hop.store.get(quarantine_id).status == "held"


async def test_web_delete_marks_deleted(start_hop, next_hop, web_for):
    hop, quarantine_id = await quarantine_one(start_hop, next_hop)
    base = await web_for(hop)

    async with browserless() as session:
        csrf = await logged_in(session, base)
        async with session.post(f"{base}/messages/{quarantine_id}/delete", data={"csrf": csrf}) as response:
            page = await response.text()

    assert f"Deleted {quarantine_id}." in page
    assert f'id="message-{quarantine_id}"' not in page
    assert hop.store.get(quarantine_id).status == "deleted"


async def test_web_download_is_attachment(start_hop, next_hop, web_for):
    hop, quarantine_id = await quarantine_one(start_hop, next_hop)
    base = await web_for(hop)

    async with browserless() as session:
        await logged_in(session, base)
        async with session.get(f"{base}/messages/{quarantine_id}/download") as response:
            body = await response.read()
            headers = response.headers

    assert body == hop.store.read_raw(quarantine_id)
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Content-Disposition"] == f'attachment; filename="{quarantine_id}.eml"'


async def test_web_release_twice_reports_not_held(start_hop, next_hop, web_for):
    hop, quarantine_id = await quarantine_one(start_hop, next_hop)
    base = await web_for(hop)

    async with browserless() as session:
        csrf = await logged_in(session, base)
        for _ in range(2):
            async with session.post(f"{base}/messages/{quarantine_id}/release",
                                    data={"csrf": csrf}) as response:
                page = await response.text()

    assert f"Message {quarantine_id} is not held any more." in page
    assert len(next_hop.messages) == 1


@pytest.mark.parametrize("token", ["", "short-token"])
async def test_web_short_token_rejected(start_hop, next_hop, token):
    hop = await start_hop(web={"token": token})

    with pytest.raises(ConfigError, match="web.token must be at least 16 characters"):
        await start_web(hop.config, hop.store, listen=("127.0.0.1", 0))


def browser_release(base: str, subject: str, profile: Path) -> tuple[str, str]:
    """Log in, find the row with `subject`, click Release; return (row text, notice text)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    # An explicit driver path keeps Selenium Manager from looking for or
    # downloading a driver or a browser.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(20)
        # Each click submits a form; element lookups wait for the next page.
        driver.implicitly_wait(10)
        driver.get(f"{base}/")
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.ID, "login").click()

        row = driver.find_element(By.XPATH, f"//tr[.//b[@class='subject' and text()='{subject}']]")
        row_text = row.text
        row.find_element(By.XPATH, ".//button[text()='Release']").click()
        notice = driver.find_element(By.ID, "notice").text
        return row_text, notice
    finally:
        driver.quit()


@pytest.mark.skipif(not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)),
                    reason="Debian's chromium and chromium-driver are not installed; run scripts/setup.sh")
async def test_web_browser_release_reaches_next_hop(start_hop, next_hop, web_for, tmp_path):
    subject = "Your mailbox is almost full"
    hop, quarantine_id = await quarantine_one(start_hop, next_hop, subject=subject)
    base = await web_for(hop)

    row_text, notice = await asyncio.wait_for(
        asyncio.to_thread(browser_release, base, subject, tmp_path / "chromium-profile"), 90)

    assert "QR_URL" in row_text
    assert "hxxps://lure.example.test/login" in row_text
    assert notice == f"Released {quarantine_id} to the next hop."
    assert len(next_hop.messages) == 1
    relayed = email.message_from_bytes(next_hop.messages[0].data)
    assert relayed["Subject"] == subject
    assert quarantine_id in relayed["X-Quishguard-Released"]
    assert hop.store.get(quarantine_id).status == "released"
