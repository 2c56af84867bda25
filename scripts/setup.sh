#!/usr/bin/env bash
# Installs everything omni-proxy needs on a Debian 12 machine: build tools, libraries, nginx and
# its module-building tree, load tools, and the pinned npm packages. Idempotent and unattended.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(
  build-essential cmake ninja-build pkg-config git curl ca-certificates
  nginx nginx-dev libpcre3-dev zlib1g-dev libssl-dev
  nlohmann-json3-dev libgtest-dev libgmock-dev libbenchmark-dev
  libboost1.74-dev libboost-system1.74-dev
  libzmq3-dev cppzmq-dev libmsgpack-cxx-dev
  libpcre2-dev libutf8proc-dev
  wrk nghttp2-client
  prometheus
  python3 python3-zmq python3-msgpack
  python3-matplotlib
)
# Node.js: the machine image may ship its own build (which bundles npm and conflicts with
# Debian's npm package), so Debian's are installed only when the commands are missing.
command -v node >/dev/null 2>&1 || DEB_PACKAGES+=(nodejs)
command -v npm >/dev/null 2>&1 || DEB_PACKAGES+=(npm)

SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi

missing=()
for p in "${DEB_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The nginx and prometheus packages enable services the project never uses (it only needs
# their binaries: /usr/sbin/nginx, and promtool to validate metrics).
if command -v systemctl >/dev/null 2>&1; then
  for svc in nginx prometheus; do
    if systemctl is-active --quiet "$svc" 2>/dev/null; then $SUDO systemctl stop "$svc" || true; fi
  done
fi

# npm packages, pinned by the committed package-lock.json.
if [ -f package-lock.json ]; then
  if [ ! -d node_modules ] || ! npm ls --silent >/dev/null 2>&1; then
    echo "setup: installing npm packages from package-lock.json"
    npm ci --no-audit --no-fund --loglevel=error
  fi
fi
echo "setup: ok"
