"""Facts about the code and the machine that the measurement scripts print beside their figures."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def code_version() -> str | None:
    """Return `git describe --always --dirty` of the repository, or None outside a git checkout."""
    try:
        described = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO_ROOT,
                                   capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return described.stdout.strip() or None


def machine_facts() -> dict[str, object]:
    """Return the CPU count and model, the Python and platform versions and the load average."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        # Other work on the machine slows what is measured; a high value makes the figures suspect.
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
