"""The sample messages: phishing is quarantined, benign mail accepted, with the expected rules.

The samples are scanned through the whole pipeline (decoder workers,
sender judgement, rules) with samples/quishguard.toml, the configuration
samples/README.md gives.
"""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import pytest

from quishguard.config import build_config, load_config
from quishguard.model import Action
from quishguard.pipeline import Scanner

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
SAMPLE_CONFIG = SAMPLES / "quishguard.toml"
SAMPLE_FILES = sorted(SAMPLES.glob("*.eml"))

# Rules each sample must fire and rules it must not fire.
EXPECTED_RULES = {
    "benign-plain": (set(), {"URL_RECIPIENT_EMBEDDED", "SENDER_DIRECT_SEND"}),
    "benign-newsletter-html": ({"QR_URL"}, {"URL_RECIPIENT_EMBEDDED", "QR_IMAGE_ONLY_BODY"}),
    "benign-invoice-payment-qr": ({"QR_NON_URL"}, {"QR_URL", "QR_IN_PDF"}),
    "benign-ticket-qr": ({"QR_NON_URL"}, {"QR_URL", "QR_IMAGE_ONLY_BODY"}),
    "benign-internal-dmarc-pass": (set(), {"SENDER_DIRECT_SEND"}),
    "phish-qr-inline-image": ({"QR_URL", "QR_IMAGE_ONLY_BODY", "QR_RECIPIENT_EMBEDDED"}, {"QR_IN_PDF"}),
    "phish-qr-pdf": ({"QR_URL", "QR_IN_PDF", "QR_RECIPIENT_EMBEDDED"}, {"QR_IMAGE_ONLY_BODY"}),
    "phish-captcha-html-attachment": (
        {"HTML_ATTACHMENT", "CAPTCHA_GATE", "CAPTCHA_IN_ATTACHMENT", "REDIRECT_JS_LOCATION",
         "COMBO_CAPTCHA_REDIRECT"},
        {"QR_URL"},
    ),
    "phish-direct-send": ({"SENDER_DIRECT_SEND", "QR_URL", "COMBO_QR_DIRECT_SEND"}, set()),
}


async def _scan_all(paths: list[Path], config) -> dict:
    scanner = Scanner(config)
    await scanner.start()
    try:
        return {path.stem: await scanner.scan(path.read_bytes(), None, message_ref=path.name) for path in paths}
    finally:
        await scanner.close()


@pytest.fixture(scope="module")
def results():
    return asyncio.run(_scan_all(SAMPLE_FILES, load_config(SAMPLE_CONFIG)))


def test_every_sample_has_expectations():
    assert {path.stem for path in SAMPLE_FILES} == set(EXPECTED_RULES)


@pytest.mark.parametrize("name", sorted(EXPECTED_RULES))
def test_sample_gets_expected_action(results, name):
    verdict = results[name].verdict
    expected = Action.QUARANTINE if name.startswith("phish-") else Action.ACCEPT

    assert verdict.action is expected, [(f.rule, f.score) for f in verdict.findings]
    assert not verdict.scan_incomplete


@pytest.mark.parametrize("name", sorted(EXPECTED_RULES))
def test_sample_fires_expected_rules(results, name):
    fired = {finding.rule for finding in results[name].verdict.findings}
    required, forbidden = EXPECTED_RULES[name]

    assert required - fired == set()
    assert forbidden & fired == set()


def test_internal_mail_needs_authserv_id():
    # Without authserv_ids the MX's Authentication-Results are not believed,
    # so the internal sample looks like Direct Send.
    config = build_config({"org": {"domains": ["example.com"]}})

    result = asyncio.run(_scan_all([SAMPLES / "benign-internal-dmarc-pass.eml"], config))
    fired = {finding.rule for finding in result["benign-internal-dmarc-pass"].verdict.findings}

    assert "SENDER_DIRECT_SEND" in fired


@pytest.fixture(scope="module")
def generator():
    spec = importlib.util.spec_from_file_location("sample_generator", SAMPLES / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda path: path.stem)
def test_sample_matches_generator(generator, path):
    assert generator.render(path.stem) == path.read_bytes()
