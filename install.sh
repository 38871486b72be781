#!/usr/bin/env bash
# Installs Meridian on a Debian machine: the system packages it runs with
# (etcd for a multi-region cluster, python3-venv) and the Python package in
# ./.venv. With --test, also everything the test suite needs: real clients
# (skopeo, podman, containerd's ctr), CNCF Distribution (the benchmark
# reference), load generators, and the package's test extras, editable.
set -euo pipefail
cd "$(dirname "$0")"

TEST=0
[ "${1:-}" = "--test" ] && TEST=1

export DEBIAN_FRONTEND=noninteractive
SUDO=""
[ "$(id -u)" != 0 ] && SUDO="sudo"

packages=(etcd-server python3-venv ca-certificates)
if [ "$TEST" = 1 ]; then
    packages+=(skopeo podman containerd docker-registry wrk apache2-utils curl)
fi
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null

${PYTHON:-python3} -m venv .venv
.venv/bin/pip install -q --upgrade pip
if [ "$TEST" = 1 ]; then
    .venv/bin/pip install -q -e '.[test]'
else
    .venv/bin/pip install -q .
fi
echo "installed $(.venv/bin/meridian --version) in $(pwd)/.venv"
