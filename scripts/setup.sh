#!/bin/sh
# Install the system packages and the Python virtual environment that
# quishguard needs on Debian or Ubuntu. Safe to run again: it installs only
# what is missing. Needs root (or sudo) for apt-get on the first run.
set -eu

cd "$(dirname "$0")/.."

# chromium and chromium-driver run the quarantine page browser test.
PACKAGES="python3 python3-venv python3-dev libzbar0 swaks postfix chromium chromium-driver"

missing=""
for package in $PACKAGES; do
    dpkg -s "$package" >/dev/null 2>&1 || missing="$missing $package"
done
# npm installs the Compose specification schema that the compose file test
# uses. A Node.js from another source (NodeSource) may bring its own npm,
# which conflicts with Debian's package.
command -v npm >/dev/null 2>&1 || missing="$missing npm"

# A pyenv or other interpreter on PATH may already provide venv support.
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
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'

# The versions are pinned in tests/schemas/package-lock.json.
(cd tests/schemas && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error)
