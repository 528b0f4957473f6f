#!/bin/sh
# Set up (if needed) and run the test suite. Extra arguments go to pytest.
set -eu
cd "$(dirname "$0")/.."
./scripts/setup.sh --test
exec .venv/bin/python -m pytest "$@"
