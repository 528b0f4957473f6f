"""Write the sample messages of this folder: phishing lures and benign look-alikes.

Run `python samples/generate.py [FOLDER]` (default: this folder). The output
is deterministic: fixed dates, Message-IDs and MIME boundaries, and no
randomness, so the files only change when this script does. QR codes are
made with segno, images with Pillow, PDFs with PyMuPDF and messages with the
standard `email` package.

Every name and address is reserved for documentation: example.com (the
organisation), example.net and example.org (outside senders), .test hosts
for lure URLs (RFC 2606), and 198.51.100.0/24 and 203.0.113.0/24 for IP
addresses (RFC 5737). No URL here leads anywhere.
"""

from __future__ import annotations

import base64
import io
import sys
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path

import pymupdf
import segno
from PIL import Image, ImageDraw

RECIPIENT = "bob@example.com"
RECIPIENT_HEADER = f"Bob Example <{RECIPIENT}>"
MX = "mx.example.com"

# The recipient address in base64, as credential-harvest kits append it to
# prefill the login form.
RECIPIENT_B64 = base64.b64encode(RECIPIENT.encode("ascii")).decode("ascii")

# The EPC069-12 "SEPA credit transfer" QR payload of a payment slip. The IBAN
# is the example IBAN printed in German banking documentation.
EPC_PAYLOAD = "\n".join([
    "BCD", "002", "1", "SCT", "COBADEFFXXX", "Example Supplies GmbH", "DE89370400440532013000",
    "EUR129.00", "", "", "Invoice INV-2024-0042",
])

TICKET_PAYLOAD = "TICKET:EXAMPLE-ARENA;EVENT=2025-03-14;GATE=C;SEAT=B14;ID=7F3K9Q2M"


def qr_png(payload: str, scale: int = 8) -> bytes:
    """Return a PNG of `payload` as a QR code with the standard four-module quiet zone."""
    buffer = io.BytesIO()
    segno.make(payload, error="m", micro=False).save(buffer, kind="png", scale=scale, border=4)
    return buffer.getvalue()


def banner_png(text: str) -> bytes:
    """Return a plain banner image (no QR code), as newsletters carry."""
    image = Image.new("RGB", (480, 80), (32, 80, 140))
    draw = ImageDraw.Draw(image)
    draw.text((20, 30), text, fill=(255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def pdf_with_qr(title: str, lines: list[str], qr_payload: str) -> bytes:
    """Return a one-page PDF with a heading, text lines and a QR code image."""
    document = pymupdf.open()
    page = document.new_page(width=595, height=842)  # A4 in points

    page.insert_text((56, 80), title, fontsize=18)
    y = 120
    for line in lines:
        page.insert_text((56, y), line, fontsize=11)
        y += 18

    qr_top = y + 20
    page.insert_image(pymupdf.Rect(56, qr_top, 256, qr_top + 200), stream=qr_png(qr_payload))

    # Fixed metadata and no new file ID keep the bytes identical between runs.
    fixed_date = "D:20241203091500+00'00'"
    document.set_metadata({"title": title, "creator": "quishguard samples", "producer": "PyMuPDF",
                           "creationDate": fixed_date, "modDate": fixed_date})
    data = document.tobytes(garbage=3, deflate=True, no_new_id=True)
    document.close()
    return data


def new_message(*, sender: str, subject: str, message_id: str, trace: list[tuple[str, str]]) -> EmailMessage:
    """Start a message with trace headers (top first), then the usual header fields."""
    message = EmailMessage()
    for name, value in trace:
        message[name] = value
    message["From"] = sender
    message["To"] = RECIPIENT_HEADER
    message["Subject"] = subject
    message["Date"] = "Tue, 03 Dec 2024 09:15:00 +0000"
    message["Message-ID"] = message_id
    return message


def received_from_outside(helo: str, ip: str, queue_id: str) -> tuple[str, str]:
    return ("Received", f"from {helo} ({helo} [{ip}]) by {MX} (Postfix) with ESMTPS id {queue_id} "
                        f"for <{RECIPIENT}>; Tue, 03 Dec 2024 09:15:02 +0000")


def fix_boundaries(message: EmailMessage, name: str) -> None:
    """Give every multipart part a fixed boundary, because `email` picks random ones."""
    for index, part in enumerate(message.walk()):
        if part.is_multipart():
            part.set_boundary(f"=_quishguard-sample-{name}-{index}")


def benign_plain() -> EmailMessage:
    message = new_message(
        sender="Alice Partner <alice@example.net>",
        subject="Agenda for Thursday's planning meeting",
        message_id="<20241203091500.plain@mail.example.net>",
        trace=[received_from_outside("mail.example.net", "198.51.100.7", "4Y2T0B1a")],
    )
    message.set_content(
        "Hi Bob,\n\n"
        "here is the agenda for Thursday's planning meeting at 10:00 in room 2.14:\n\n"
        "1. Review of the November delivery figures\n"
        "2. Staffing for the January release\n"
        "3. Budget request for the new test lab\n\n"
        "The slides are on the project page: https://www.example.org/projects/planning\n"
        "Please send me any extra points by Wednesday noon.\n\n"
        "Best regards,\nAlice\n"
    )
    return message


def benign_newsletter_html() -> EmailMessage:
    message = new_message(
        sender="Example Outdoor News <news@example.net>",
        subject="December news: winter routes, store events and our new app",
        message_id="<20241203091500.newsletter@news.example.net>",
        trace=[received_from_outside("news.example.net", "198.51.100.20", "4Y2T0B2b")],
    )
    paragraphs = [
        "Winter is here, and with it the best season for quiet forest walks. Our rangers picked five "
        "routes that stay passable after snowfall, each with parking and a warm cafe at the end.",
        "Our stores host free workshops every Saturday in December: waxing cross-country skis, "
        "layering for cold days and first aid on the trail. Places are limited, so book early.",
        "Members save ten percent on all insulated jackets until the end of the month. The offer "
        "applies in stores and online, and you can combine it with your loyalty points.",
        "Our new app shows the routes offline, records your walks and reminds you of workshops. "
        "Scan the code below with your phone or find it in your app store.",
    ]
    text = "\n\n".join(paragraphs)
    html_paragraphs = "".join(f"<p>{p}</p>" for p in paragraphs)
    message.set_content(
        f"{text}\n\nRoutes: https://www.example.org/routes/winter\n"
        f"Unsubscribe: https://news.example.net/unsubscribe?email={RECIPIENT}\n"
    )
    message.add_alternative(
        "<html><body>"
        '<img src="cid:banner@news.example.net" alt="Example Outdoor">'
        f"{html_paragraphs}"
        '<p><a href="https://www.example.org/routes/winter">See the winter routes</a> | '
        '<a href="https://www.example.org/events">Store events</a></p>'
        '<p><img src="cid:app-qr@news.example.net" alt="QR code: download our app"></p>'
        f'<p><small><a href="https://news.example.net/unsubscribe?email={RECIPIENT}">Unsubscribe</a></small></p>'
        "</body></html>",
        subtype="html",
    )
    html_part = message.get_payload()[1]
    html_part.add_related(banner_png("Example Outdoor News"), "image", "png", cid="<banner@news.example.net>")
    html_part.add_related(qr_png("https://www.example.org/app"), "image", "png", cid="<app-qr@news.example.net>")
    return message


def phish_qr_inline_image() -> EmailMessage:
    message = new_message(
        sender="Mailbox Administrator <it-support@example.net>",
        subject="Action required: mailbox storage full",
        message_id="<20241203091500.qr-inline@mail.example.net>",
        trace=[received_from_outside("mail.example.net", "198.51.100.31", "4Y2T0B3c")],
    )
    lure = f"https://mailbox-verify.example.test/auth/session#{RECIPIENT_B64}"
    message.set_content(
        "<html><body><p>Scan to keep receiving mail.</p>"
        '<img src="cid:notice@mail.example.net" alt=""></body></html>',
        subtype="html",
    )
    message.add_related(qr_png(lure), "image", "png", cid="<notice@mail.example.net>")
    return message


def phish_qr_pdf() -> EmailMessage:
    message = new_message(
        sender="Document Center <share@example.net>",
        subject="Shared document: Q4 salary adjustment",
        message_id="<20241203091500.qr-pdf@mail.example.net>",
        trace=[received_from_outside("mail.example.net", "198.51.100.32", "4Y2T0B4d")],
    )
    lure = f"https://docs-share.example.test/view?id={RECIPIENT_B64}"
    message.set_content("A document has been shared with you. See the attached PDF.\n")
    document = pdf_with_qr(
        "Secure Document Delivery",
        ["A document about your Q4 salary adjustment is waiting for you.",
         "Scan the QR code with your phone camera to open it.",
         "The link expires in 24 hours."],
        lure,
    )
    message.add_attachment(document, maintype="application", subtype="pdf", filename="Salary_Adjustment_Q4.pdf")
    return message


def phish_captcha_html_attachment() -> EmailMessage:
    message = new_message(
        sender="Accounts Payable <ap@example.net>",
        subject="Remittance advice for payment 2024-11-0917",
        message_id="<20241203091500.captcha@mail.example.net>",
        trace=[received_from_outside("mail.example.net", "198.51.100.33", "4Y2T0B5e")],
    )
    message.set_content("Please find the remittance advice attached.\n")
    page = (
        "<!DOCTYPE html><html><head><title>Remittance Advice</title>"
        '<script src="https://challenges.cloudflare.com/turnstile/v0/api.js" async defer></script>'
        "</head><body>"
        "<h1>Verify you are human</h1>"
        "<p>Complete the check below to view your document.</p>"
        '<div class="cf-turnstile" data-sitekey="0x4AAAAAAAexample" data-callback="onPass"></div>'
        "<script>function onPass(token) {"
        ' window.location.href = "https://remit-portal.example.test/view";'
        "}</script>"
        "</body></html>"
    )
    message.add_attachment(page.encode("utf-8"), maintype="text", subtype="html",
                           filename="Remittance_Advice.html")
    return message


def phish_direct_send() -> EmailMessage:
    # Sent straight to the organisation's MX from outside, with the
    # organisation's own From address and no Authentication-Results.
    message = new_message(
        sender="Voicemail Service <voicemail@example.com>",
        subject="New voicemail from +1 555 0100 (0:42)",
        message_id="<20241203091500.direct-send@example.com>",
        trace=[("Received", f"from [203.0.113.45] (unknown [203.0.113.45]) by {MX} (Postfix) with ESMTP "
                            f"id 4Y2T0B6f for <{RECIPIENT}>; Tue, 03 Dec 2024 09:15:02 +0000")],
    )
    lure = "https://voicemail-portal.example.test/listen?m=7731"
    message.set_content(
        "<html><body><p>You have a new voicemail (0:42). Scan the code to listen.</p>"
        '<img src="cid:voicemail@example.com" alt=""></body></html>',
        subtype="html",
    )
    message.add_related(qr_png(lure), "image", "png", cid="<voicemail@example.com>")
    return message


def benign_invoice_payment_qr() -> EmailMessage:
    message = new_message(
        sender="Example Supplies Billing <billing@example.net>",
        subject="Invoice INV-2024-0042",
        message_id="<20241203091500.invoice@billing.example.net>",
        trace=[received_from_outside("billing.example.net", "198.51.100.40", "4Y2T0B7g")],
    )
    message.set_content(
        "Dear customer,\n\n"
        "attached is invoice INV-2024-0042 for your order of 28 November (printer paper, toner and "
        "binders). The amount of EUR 129.00 is due by 17 December 2024.\n\n"
        "You can pay by bank transfer to DE89 3704 0044 0532 0130 00, or scan the payment code on "
        "the invoice with your banking app, which fills in all details for you.\n\n"
        "Thank you for your order.\nExample Supplies GmbH, Accounts Receivable\n"
    )
    document = pdf_with_qr(
        "Invoice INV-2024-0042",
        ["Example Supplies GmbH, Example Street 1, 10115 Berlin",
         "Printer paper A4, 10 reams ........ EUR 45.00",
         "Toner cartridge, black ............ EUR 62.00",
         "Binders, 12 pieces ................ EUR 22.00",
         "Total due by 17 December 2024 ..... EUR 129.00",
         "Pay with your banking app: scan the code below."],
        EPC_PAYLOAD,
    )
    message.add_attachment(document, maintype="application", subtype="pdf", filename="INV-2024-0042.pdf")
    return message


def benign_ticket_qr() -> EmailMessage:
    message = new_message(
        sender="Example Arena Tickets <tickets@example.org>",
        subject="Your ticket for 14 March 2025",
        message_id="<20241203091500.ticket@tickets.example.org>",
        trace=[received_from_outside("tickets.example.org", "198.51.100.50", "4Y2T0B8h")],
    )
    message.set_content(
        "<html><body><p>Your ticket: gate C, seat B14. Show this code at the entrance.</p>"
        '<img src="cid:ticket@tickets.example.org" alt="Ticket code"></body></html>',
        subtype="html",
    )
    message.add_related(qr_png(TICKET_PAYLOAD), "image", "png", cid="<ticket@tickets.example.org>")
    return message


def benign_internal_dmarc_pass() -> EmailMessage:
    # The organisation's MX checked DMARC and added Authentication-Results;
    # the loopback hop above the MX's own Received header is trusted by
    # default, so the header counts.
    message = new_message(
        sender="Carol Colleague <carol@example.com>",
        subject="Lunch on Friday?",
        message_id="<20241203091500.internal@example.com>",
        trace=[
            ("Authentication-Results", f"{MX}; spf=pass smtp.mailfrom=example.com; "
                                       "dkim=pass header.d=example.com; dmarc=pass header.from=example.com"),
            ("Received", f"from localhost (localhost [127.0.0.1]) by {MX} (Postfix) with ESMTP id 4Y2T0B9j; "
                         "Tue, 03 Dec 2024 09:15:03 +0000"),
            received_from_outside("mail-out.example.com", "198.51.100.25", "4Y2T0B9i"),
        ],
    )
    message.set_content(
        "Hi Bob,\n\nshall we try the new place on Example Street on Friday at 12:30?\n"
        "The menu is here: https://www.example.org/menu\n\nCarol\n"
    )
    return message


SAMPLES = {
    "benign-plain": benign_plain,
    "benign-newsletter-html": benign_newsletter_html,
    "benign-invoice-payment-qr": benign_invoice_payment_qr,
    "benign-ticket-qr": benign_ticket_qr,
    "benign-internal-dmarc-pass": benign_internal_dmarc_pass,
    "phish-qr-inline-image": phish_qr_inline_image,
    "phish-qr-pdf": phish_qr_pdf,
    "phish-captcha-html-attachment": phish_captcha_html_attachment,
    "phish-direct-send": phish_direct_send,
}


def render(name: str) -> bytes:
    """Return the bytes of sample `name`."""
    message = SAMPLES[name]()
    fix_boundaries(message, name)
    return message.as_bytes(policy=default_policy)


def main(argv: list[str]) -> int:
    folder = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    for name in SAMPLES:
        path = folder / f"{name}.eml"
        path.write_bytes(render(name))
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
