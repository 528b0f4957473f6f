"""The command line: scan output and exit codes, quarantine commands, and the sink."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from quishguard.cli import main
from quishguard.config import build_config
from quishguard.model import Action, Envelope, Finding, QrCode, Verdict
from quishguard.quarantine import QuarantineStore

from .factories import make_message, qr_png
from .smtp_client import send

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
PHISH_URL = "https://login.example.org/a?u=bob@example.com"


@pytest.fixture
def eml_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "mail"
    (folder / "nested").mkdir(parents=True)
    (folder / "clean.eml").write_bytes(make_message())
    (folder / "nested" / "qr.eml").write_bytes(
        make_message(text="Scan", images=[("c.png", qr_png(PHISH_URL))]))
    (folder / "ignored.txt").write_text("not mail")
    return folder


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quishguard", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_scan_json_lines(eml_folder, tmp_path):
    result = run_cli("scan", "--format", "json", str(eml_folder), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["path"]).name for r in records] == ["clean.eml", "qr.eml"]
    assert records[0]["action"] == "accept"
    assert records[0]["findings"] == []
    qr = records[1]
    assert qr["qr"][0]["payload"] == PHISH_URL
    assert qr["qr"][0]["location"].startswith("message > ")
    assert PHISH_URL in qr["urls"]
    assert {"rule", "score", "detail"} <= set(qr["findings"][0])
    assert qr["score"] == round(sum(f["score"] for f in qr["findings"]), 1)


def test_scan_missing_input_exit_2(eml_folder, tmp_path):
    result = run_cli("scan", str(tmp_path / "absent.eml"), str(eml_folder / "clean.eml"), cwd=tmp_path)

    assert result.returncode == 2
    assert "absent.eml" in result.stderr
    assert "no such file" in result.stderr
    assert "clean.eml\t0.0\taccept" in result.stdout


def test_scan_writes_no_state(eml_folder, tmp_path):
    run_cli("scan", str(eml_folder), cwd=tmp_path)

    assert not (tmp_path / "var").exists()


def test_scan_logs_only_to_stderr(eml_folder, tmp_path):
    result = run_cli("scan", "--format", "json", str(eml_folder), cwd=tmp_path)

    assert "INFO" not in result.stdout
    assert "event=workers_started" in result.stderr


def test_scan_invalid_config_exit_2(tmp_path, eml_folder):
    config = tmp_path / "bad.toml"
    config.write_text('[scan]\nfail_mode = "maybe"\n')

    result = run_cli("scan", "--config", str(config), str(eml_folder), cwd=tmp_path)

    assert result.returncode == 2
    assert "scan.fail_mode" in result.stderr
    assert "'maybe'" in result.stderr


def _store_one(data_dir: Path) -> str:
    store = QuarantineStore(data_dir)
    verdict = Verdict(score=9.0, action=Action.QUARANTINE,
                      findings=(Finding("QR_URL", 3.0, "message > part 2: https://x.example.org"),),
                      qr_codes=(QrCode("https://x.example.org", "message > part 2", "inline-image", "zxing"),),
                      urls=("https://x.example.org",))
    return store.store(make_message(subject="Held \x1b[31mred"), Envelope("a@example.net", ("b@example.com",)),
                       verdict, subject="Held \x1b[31mred", from_header="a@example.net", message_id="<m@x>")


def test_quarantine_list_and_show(tmp_path, capsys):
    quarantine_id = _store_one(tmp_path / "data")

    listed = main(["quarantine", "--data-dir", str(tmp_path / "data"), "list"])
    out_list = capsys.readouterr().out
    shown = main(["quarantine", "--data-dir", str(tmp_path / "data"), "show", quarantine_id])
    out_show = capsys.readouterr().out

    assert listed == 0
    assert quarantine_id in out_list
    assert "QR_URL" in out_list
    assert "\x1b" not in out_list
    assert shown == 0
    assert "QR_URL=3.0" in out_show
    assert "hxxps://x.example.org" in out_show
    assert "https://" not in out_show.split("findings:")[1].split("qr:")[1]


def test_quarantine_unknown_id_exit_2(tmp_path, capsys):
    _store_one(tmp_path / "data")

    code = main(["quarantine", "--data-dir", str(tmp_path / "data"), "show", "0" * 28])

    assert code == 2
    assert "quarantine list" in capsys.readouterr().err


def test_quarantine_delete(tmp_path, capsys):
    quarantine_id = _store_one(tmp_path / "data")

    code = main(["quarantine", "--data-dir", str(tmp_path / "data"), "delete", quarantine_id])

    assert code == 0
    assert QuarantineStore(tmp_path / "data").list() == []


def test_quarantine_release_next_hop_down(tmp_path, capsys, unused_tcp_port):
    quarantine_id = _store_one(tmp_path / "data")

    code = main(["quarantine", "--data-dir", str(tmp_path / "data"), "--relay",
                 f"127.0.0.1:{unused_tcp_port}", "release", quarantine_id])

    assert code == 1
    assert "stays in quarantine" in capsys.readouterr().err
    assert QuarantineStore(tmp_path / "data").get(quarantine_id).status == "held"


async def test_sink_stores_message(tmp_path, unused_tcp_port):
    from quishguard.sink import start_sink

    server = await start_sink(tmp_path / "sink", "127.0.0.1", unused_tcp_port, "sink.test", 10_000_000)
    try:
        _, reply = await send(unused_tcp_port, make_message(subject="To the sink"))
    finally:
        server.close()

    files = list((tmp_path / "sink").glob("*.eml"))
    assert reply[0] == 250
    assert len(files) == 1
    assert files[0].stat().st_mode & 0o777 == 0o600
    assert b"Subject: To the sink" in files[0].read_bytes()
    assert files[0].read_bytes().startswith(b"X-Sink-Envelope: from=<alice@example.net> to=<bob@example.com>")


def test_serve_with_local_sink(tmp_path):
    """`quishguard serve` without a relay starts the sink; swaks-style delivery lands in the data dir."""
    import socket

    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    config = tmp_path / "q.toml"
    config.write_text(f'[smtp]\nlisten = "127.0.0.1:{ports[0]}"\n[sink]\nlisten = "127.0.0.1:{ports[1]}"\n'
                      '[scan]\nworkers = 1\n[dns]\nenabled = false\n')
    process = subprocess.Popen([sys.executable, "-m", "quishguard", "serve", "--config", str(config),
                                "--data-dir", str(tmp_path / "data")], cwd=tmp_path,
                               stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stderr:
            if "event=started" in line:
                break
        _, reply = asyncio.run(send(ports[0], make_message(subject="Through serve")))
    finally:
        process.terminate()
        process.wait(timeout=30)

    stored = list((tmp_path / "data" / "sink").glob("*.eml"))
    assert reply[0] == 250
    assert len(stored) == 1
    assert b"X-Quishguard-Action: accept" in stored[0].read_bytes()
    assert process.returncode == 0


def test_quarantine_missing_store_exit_2(tmp_path, capsys):
    code = main(["quarantine", "--data-dir", str(tmp_path / "elsewhere"), "list"])

    assert code == 2
    assert "no quarantine found" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere").exists()
