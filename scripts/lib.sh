# Shared by run-agent.sh and test.sh: install what is missing, idempotently.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${IMAGEGUARD_VENV:-$REPO/.venv}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

apt_install() {
    # install only the Debian packages whose command is missing: "cmd:package ..."
    local missing=()
    for pair in "$@"; do
        local cmd="${pair%%:*}" pkg="${pair##*:}"
        command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "==> installing Debian packages: ${missing[*]}"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

python_ok() {
    python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

make_venv() {
    local extras="$1"
    if ! python_ok; then apt_install python3:python3; python_ok || apt_install x:python3-venv; fi
    python_ok || { echo "ImageGuard needs Python 3.11+ with venv (Debian 12: apt-get install python3-venv)" >&2; exit 2; }
    if [ ! -x "$VENV/bin/python" ]; then
        echo "==> creating virtualenv $VENV"
        python3 -m venv "$VENV"
    fi
    local stamp="$VENV/.imageguard-installed$extras"
    if [ ! -f "$stamp" ] || [ "$REPO/pyproject.toml" -nt "$stamp" ]; then
        echo "==> installing ImageGuard and its dependencies into $VENV"
        "$VENV/bin/pip" install -q --disable-pip-version-check -e "$REPO$extras" 2>&1 | grep -v "^WARNING: Location" || true
        "$VENV/bin/python" -c "import agent, docker, paho.mqtt, cryptography, jsonschema" || {
            echo "installing Python dependencies failed" >&2; exit 2; }
        touch "$stamp"
    fi
    # an editable install is not byte-compiled: do it, or every start compiles (and keeps) the ASTs in memory
    "$VENV/bin/python" -m compileall -q -j 0 "$REPO/agent" >/dev/null
}

engine_answers() {
    local host="${DOCKER_HOST:-unix:///var/run/docker.sock}"
    [ -S "${host#unix://}" ] && timeout 5 docker -H "$host" version >/dev/null 2>&1
}

ensure_dockerd() {
    apt_install dockerd:docker.io
    command -v docker >/dev/null 2>&1 || apt_install docker:docker.io
    if ! engine_answers; then
        echo "==> starting dockerd"
        if command -v systemctl >/dev/null 2>&1 && systemctl is-system-running >/dev/null 2>&1; then
            $SUDO systemctl start docker
        else
            $SUDO sh -c 'nohup dockerd >/var/log/dockerd.log 2>&1 &'
        fi
        for _ in $(seq 1 60); do engine_answers && return 0; sleep 0.5; done
        echo "dockerd did not start; see /var/log/dockerd.log or 'journalctl -u docker'" >&2
        exit 2
    fi
}
