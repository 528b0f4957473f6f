#!/bin/sh
# Set up (if needed) and run the filter on its embedded defaults: it listens
# on 127.0.0.1:10025 and, unless smtp.relay is configured, relays to a local
# sink on 127.0.0.1:10026 that stores mail in ./var/quishguard/sink/.
# Extra arguments go to `quishguard serve`, for example --config FILE.
set -eu
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/quishguard serve "$@"
