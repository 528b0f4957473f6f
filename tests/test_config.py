"""Config loading: defaults, overrides and errors that name the key, value and what is allowed."""

from __future__ import annotations

import pytest

from quishguard.config import build_config, load_config
from quishguard.errors import ConfigError
from quishguard.scoring.rules import RULES

KNOWN = {rule.name for rule in RULES}


def test_defaults_documented_values():
    config = load_config(None)

    assert config["smtp.listen"] == "127.0.0.1:10025"
    assert config["smtp.max_message_size"] == 50 * 1024 * 1024
    assert config["scan.budget_seconds"] == 15.0
    assert config["scan.fail_mode"] == "accept"
    assert config["headers.prefix"] == "X-Quishguard-"
    assert config["headers.subject_tag"] == "[SUSPICIOUS] "
    assert config["thresholds.reject"] is None
    assert str(config.data_dir) == "var/quishguard"


def test_file_overrides_defaults(tmp_path):
    path = tmp_path / "quishguard.toml"
    path.write_text('[smtp]\nrelay = "127.0.0.1:2525"\n[thresholds]\ntag = 3\nreject = 20\n'
                    '[rules.QR_URL]\nscore = 0\n')

    config = load_config(path)

    assert config["smtp.relay"] == "127.0.0.1:2525"
    assert config["thresholds.tag"] == 3.0
    assert config["thresholds.reject"] == 20.0
    assert config.rule_scores == {"QR_URL": 0.0}


@pytest.mark.parametrize("data, words", [
    ({"scan": {"fail_mode": "drop"}}, ["scan.fail_mode", "'drop'", "accept, tempfail"]),
    ({"smtp": {"listen": "localhost"}}, ["smtp.listen", "'localhost'", "HOST:PORT"]),
    ({"smtp": {"client_networks": ["10.0.0.0/33"]}}, ["smtp.client_networks", "10.0.0.0/33", "CIDR"]),
    ({"scan": {"budget_seconds": -1}}, ["scan.budget_seconds", "-1", "a number >= 0.1"]),
    ({"headers": {"prefix": "X-Bad:"}}, ["headers.prefix", "'X-Bad:'"]),
    ({"headers": {"subject_tag": "[A]\r\nBcc: x"}}, ["headers.subject_tag", "control characters"]),
    ({"smtp": {"unknown_key": 1}}, ["smtp.unknown_key", "known keys"]),
    ({"nosuch": {}}, ["[nosuch]", "known sections"]),
    ({"rules": {"NO_SUCH_RULE": {"score": 1}}}, ["NO_SUCH_RULE", "known rules"]),
    ({"rules": {"QR_URL": {"score": "high"}}}, ["rules.QR_URL.score", "'high'"]),
    ({"thresholds": {"tag": 9, "quarantine": 8}}, ["thresholds.quarantine", "thresholds.tag"]),
    ({"web": {"listen": "127.0.0.1:8025", "token": "short"}}, ["web.token", "16 characters"]),
    ({"milter": {"quarantine_mode": "store"}}, ["milter.release_relay"]),
])
def test_invalid_value_names_key(data, words):
    with pytest.raises(ConfigError) as raised:
        build_config(data, "test.toml", known_rules=KNOWN)

    for word in words:
        assert word in str(raised.value)


def test_invalid_toml_names_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[smtp\n")

    with pytest.raises(ConfigError) as raised:
        load_config(path)

    assert str(path) in str(raised.value)


def test_missing_file_names_path(tmp_path):
    with pytest.raises(ConfigError) as raised:
        load_config(tmp_path / "absent.toml")

    assert "absent.toml" in str(raised.value)


def test_replace_checks_values():
    config = load_config(None)

    with pytest.raises(ConfigError):
        config.replace(smtp_relay="nonsense")

    assert config.replace(smtp_relay="[::1]:25")["smtp.relay"] == "[::1]:25"


def test_readme_lists_every_key():
    from pathlib import Path

    from quishguard.config import reference_markdown

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()

    for row in reference_markdown().splitlines()[2:]:
        assert row in readme, f"README.md lacks or differs in: {row}; run scripts/update_readme_config.py"
