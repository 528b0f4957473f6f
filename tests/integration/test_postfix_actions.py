"""Every action end to end: swaks -> Postfix -> quishguard -> Postfix reinjection -> Maildir.

Each test runs once behind an after-queue Postfix (`content_filter`) and once
behind a before-queue Postfix (`smtpd_proxy_filter`).
"""

from __future__ import annotations

import email
import secrets

from ..postfix import PostfixInstance


def token() -> str:
    return f"qg-{secrets.token_hex(6)}"


async def start_behind(start_filter, mta: PostfixInstance, **sections):
    return await start_filter(mta.settings.filter_port, mta.reinject_port, **sections)


async def test_accept_reaches_maildir(start_filter, mta):
    await start_behind(start_filter, mta)
    subject = token()

    sent = await mta.send(subject)
    delivered = await mta.wait_for_mail(subject)

    assert sent.returncode == 0, sent.transcript
    assert len(delivered) == 1
    message = email.message_from_bytes(delivered[0])
    assert message["X-Quishguard-Action"] == "accept"
    assert message["Subject"] == subject
    assert await mta.queue() == []


async def test_tag_reaches_maildir_tagged(start_filter, mta):
    await start_behind(start_filter, mta, thresholds={"tag": 0.0}, headers={"subject_tag": "[CHECK] "})
    subject = token()

    sent = await mta.send(subject)
    delivered = await mta.wait_for_mail(subject)

    assert sent.returncode == 0, sent.transcript
    assert len(delivered) == 1
    message = email.message_from_bytes(delivered[0])
    assert message["X-Quishguard-Action"] == "tag"
    assert message["Subject"] == f"[CHECK] {subject}"


async def test_quarantine_holds_not_delivers(start_filter, mta):
    hop = await start_behind(start_filter, mta, thresholds={"tag": 0.0, "quarantine": 0.0})
    subject = token()

    sent = await mta.send(subject)
    queue = await mta.wait_for_queue(lambda queued: not queued)
    held = [item for item in hop.store.list(status=None) if item.subject == subject]

    assert sent.returncode == 0, sent.transcript
    assert queue == []
    assert len(held) == 1
    assert held[0].status == "held"
    assert mta.mail(subject) == []


async def test_reject_refused_or_bounced(start_filter, mta):
    await start_behind(start_filter, mta, thresholds={"tag": 0.0, "quarantine": 0.0, "reject": 0.0})
    subject = token()

    sent = await mta.send(subject)

    if mta.settings.mode == "before-queue":
        # The client sees quishguard's own reply, and Postfix keeps nothing.
        assert sent.returncode != 0
        assert any(reply.startswith("550 5.7.1 Message rejected as ") for reply in sent.replies())
        assert await mta.queue() == []
        assert mta.mail(subject) == []
        return

    # After the queue, the client got 250 already, so Postfix bounces to the sender.
    assert sent.returncode == 0, sent.transcript
    delivered = await mta.wait_for_mail(subject)
    assert len(delivered) == 1
    bounce = email.message_from_bytes(delivered[0])
    assert bounce["Subject"] == "Undelivered Mail Returned to Sender"
    assert "550 5.7.1 Message rejected as" in delivered[0].decode("utf-8", "replace")
    assert b"X-Quishguard-Action" not in delivered[0].split(b"\n\n", 1)[0]
