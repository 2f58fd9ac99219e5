#!/usr/bin/env bash
# The README's first command: the streaming demo, on a fresh Debian machine. Installs the
# system packages the build needs when they are missing (librdkafka's bundled build needs cmake
# and curl's headers; the demo fetches a pinned nats-server into a venv when none is on the
# PATH), then runs the demo example.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v dpkg >/dev/null 2>&1; then
    need=()
    for pkg in cmake libcurl4-openssl-dev libssl-dev zlib1g-dev pkg-config python3-venv; do
        dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
    done
    if [ ${#need[@]} -gt 0 ]; then
        sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        echo "installing ${need[*]} (needed to build scorestream)" >&2
        $sudo apt-get update -qq
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
fi

exec cargo run --release --example nats_demo -- "$@"
