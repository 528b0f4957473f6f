"""Render the compose stack's Postfix configuration from deploy/postfix/*.in.

Run from anywhere after changing the templates or the settings below, and
commit the result:

    .venv/bin/python deploy/compose/render_postfix.py

`--check` writes nothing and exits 1 when deploy/compose/postfix/main.cf or
master.cf differ from a fresh rendering; tests/test_compose.py runs it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from quishguard.postfix_config import PostfixSettings, render_postfix_config

OUT_DIR = Path(__file__).resolve().parent / "postfix"

# Docker's default address pools, from which the compose network is taken.
# Comma-separated, because master.cf splits `-o name=value` at whitespace.
DOCKER_NETWORKS = "172.16.0.0/12,192.168.0.0/16"

SETTINGS = PostfixSettings.compose(
    mode="after-queue",
    filter_host="quishguard",
    filter_port=10025,
    network=DOCKER_NETWORKS,
    filter_networks=f"127.0.0.0/8,{DOCKER_NETWORKS}",
)


def rendered() -> dict[str, str]:
    """Return main.cf and master.cf of the compose stack, keyed by file name."""
    return render_postfix_config(SETTINGS)


def main(argv: list[str]) -> int:
    files = rendered()
    if "--check" in argv:
        stale = [name for name, text in files.items()
                 if not (OUT_DIR / name).is_file() or (OUT_DIR / name).read_text(encoding="utf-8") != text]
        for name in stale:
            print(f"{OUT_DIR / name} differs from the template output; run {Path(__file__).name}",
                  file=sys.stderr)
        return 1 if stale else 0

    for name, text in files.items():
        (OUT_DIR / name).write_text(text, encoding="utf-8")
        print(f"wrote {OUT_DIR / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
