#!/usr/bin/env bash
# Installs what fusecache needs on a fresh Debian machine: FUSE, s3fs (the OSS
# stand-in's client), tc (iproute2, the stand-in's bandwidth cap), chattr
# (e2fsprogs, a read-only cache-dir test), getfattr (attr, to read the
# user.fusecache.* xattrs), and a venv at .venv with fusecache and its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pkg in fuse3 libfuse3-dev pkg-config s3fs gcc iproute2 e2fsprogs attr; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: missing packages ${need[*]}; run as root or install them" >&2
        exit 1
    fi
    echo "setup: installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating the venv .venv" >&2
    python3 -m venv .venv
fi
echo "setup: installing fusecache and its Python packages (extras: ${EXTRAS:-test}) into .venv;" \
     "a minute or two the first time" >&2
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e ".[${EXTRAS:-test}]"
