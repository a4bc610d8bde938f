#!/usr/bin/env bash
# One command on a fresh Debian 12 machine (as root): install what is missing and run the agent.
# Without a config file the embedded default applies: local SQLite state in /var/lib/imageguard, no broker.
# Extra arguments go to `imageguard run` (e.g. --policy deploy/policy.example.json --log-format json).
source "$(dirname "$0")/lib.sh"
ensure_dockerd
make_venv ""
exec "$VENV/bin/imageguard" ${IMAGEGUARD_CONFIG:+--config "$IMAGEGUARD_CONFIG"} run "$@"
