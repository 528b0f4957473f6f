#!/bin/sh
# Install the system packages and the Python virtual environment that
# quishguard needs on Debian or Ubuntu.
#
#   scripts/setup.sh          what `quishguard serve` needs
#   scripts/setup.sh --test   also what the test suite needs (Postfix,
#                             Chromium, npm and the Python test extras)
#
# Safe to run again: it installs only what is missing, and reinstalls the
# Python packages only when pyproject.toml changed. Needs root (or sudo)
# for apt-get the first time.
set -eu

cd "$(dirname "$0")/.."

MODE=run
if [ "${1:-}" = "--test" ]; then
    MODE=test
fi

# swaks is there to try the filter by hand, as the README shows.
PACKAGES="python3 python3-venv python3-dev libzbar0 swaks"
if [ "$MODE" = test ]; then
    # postfix runs the integration tests; chromium and chromium-driver run
    # the quarantine page browser test.
    PACKAGES="$PACKAGES postfix chromium chromium-driver"
fi

missing=""
for package in $PACKAGES; do
    dpkg -s "$package" >/dev/null 2>&1 || missing="$missing $package"
done
# npm installs the Compose specification schema that the compose file test
# uses. A Node.js from another source (NodeSource) may bring its own npm,
# which conflicts with Debian's package.
if [ "$MODE" = test ]; then
    command -v npm >/dev/null 2>&1 || missing="$missing npm"
fi

if [ -n "$missing" ]; then
    if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
    echo "setup: installing system packages:$missing" >&2
    # "No configuration" keeps the Debian postfix package from creating and
    # starting a system mail server; the tests run private instances.
    echo 'postfix postfix/main_mailer_type select No configuration' | $sudo debconf-set-selections
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq -o DPkg::Lock::Timeout=300 $missing >/dev/null
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi

# A marker named after the mode and the hash of pyproject.toml skips pip
# when nothing changed since the last install.
if [ "$MODE" = test ]; then extras='.[test]'; else extras='.'; fi
marker=".venv/.quishguard-$MODE-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -e "$marker" ] || [ ! -x .venv/bin/quishguard ]; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e "$extras"
    touch "$marker"
fi

if [ "$MODE" = test ]; then
    # The versions are pinned in tests/schemas/package-lock.json.
    if [ ! -d tests/schemas/node_modules ] || [ tests/schemas/package-lock.json -nt tests/schemas/node_modules ]; then
        (cd tests/schemas && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error)
    fi
fi
