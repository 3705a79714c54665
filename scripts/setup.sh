#!/usr/bin/env bash
# Idempotent setup for a fresh Debian 12 machine, run as root:
# apt packages (only the missing ones), a virtualenv with the pinned packages, and the
# ebpf mode's programs compiled against the running kernel.
# `setup.sh python` makes only the virtualenv (what `make lint` needs: no root, no clang).
set -euo pipefail
cd "$(dirname "$0")/.."

python_env() {
  local python=${PYTHON:-python3}
  local stamp
  stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
  if [ ! -f "$stamp" ]; then
    [ -x .venv/bin/python ] || "$python" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test]'
    rm -f .venv/.installed-*
    touch "$stamp"
  fi
}

if [ "${1:-}" = python ]; then
  python_env
  exit 0
fi

APT_PACKAGES=(
  iproute2 iptables nftables ipset iperf3 sockperf iputils-ping tcpdump
  ethtool procps openssl make python3-venv nghttp2-client haproxy
  clang bpftool libbpf-dev
  conntrack graphviz curl
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing apt packages (${missing[*]}); run as root to install them" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python_env

bash scripts/build_bpf.sh
