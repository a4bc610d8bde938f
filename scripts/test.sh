#!/usr/bin/env bash
# One command runs the whole test suite: installs what the tests need (Debian packages, a virtualenv),
# makes sure a Docker engine answers, then runs lint, type checks and pytest. The tests start their own
# private dockerd, mosquitto and docker-registry on loopback. Extra arguments go to pytest
# (e.g. -m 'not integration' for a fast loop).
source "$(dirname "$0")/lib.sh"
apt_install dockerd:docker.io docker:docker.io mosquitto:mosquitto mosquitto_pub:mosquitto-clients \
    docker-registry:docker-registry busybox:busybox-static protoc:protobuf-compiler htpasswd:apache2-utils \
    unshare:util-linux pg_ctlcluster:postgresql chromium:chromium chromedriver:chromium-driver
# the static busybox is what test images are built from
[ -x /usr/bin/busybox ] && /usr/bin/busybox --help 2>&1 | head -1 | grep -q BusyBox || apt_install x:busybox-static
ensure_dockerd
make_venv "[test]"
cd "$REPO"
echo "==> ruff"
"$VENV/bin/ruff" check agent tests bench
"$VENV/bin/ruff" format --check agent tests bench
echo "==> mypy (strict on agent/)"
"$VENV/bin/mypy" agent
echo "==> pytest"
exec "$VENV/bin/pytest" -p no:cacheprovider "$@"
