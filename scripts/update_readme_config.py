"""Rewrite the configuration table in README.md from the declared options.

Run after adding or changing an option in src/quishguard/config.py:

    .venv/bin/python scripts/update_readme_config.py
"""

from __future__ import annotations

import sys
from pathlib import Path

from quishguard.config import reference_markdown

HEADER = "| key | default | unit | meaning |"


def main() -> int:
    readme = Path(__file__).resolve().parent.parent / "README.md"
    lines = readme.read_text().splitlines()
    try:
        start = lines.index(HEADER)
    except ValueError:
        print(f"README.md has no line {HEADER!r}; add the table header where the reference goes",
              file=sys.stderr)
        return 1
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    lines[start:end] = reference_markdown().splitlines()
    readme.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
