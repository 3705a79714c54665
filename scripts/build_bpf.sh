#!/usr/bin/env bash
# Compile the ebpf mode's tc programs (testbed/redirect/bpf/*.bpf.c) against the running
# kernel's BTF: vmlinux.h comes from /sys/kernel/btf/vmlinux via bpftool, each program is
# built with clang -target bpf into <name>.bpf.o next to its source. Stops with a message
# naming the cause (missing tool, no BTF, compile error) and a non-zero status.
# BPF_DIR builds another folder of sources (the tests use it); CLANG and BTF override tools.
set -euo pipefail
cd "${BPF_DIR:-$(dirname "$0")/../testbed/redirect/bpf}"

fail() {
  echo "build_bpf: $*" >&2
  echo "build_bpf: mode ebpf cannot run until this is fixed" >&2
  exit 1
}

CLANG=${CLANG:-clang}
BTF=${BTF:-/sys/kernel/btf/vmlinux}
command -v "$CLANG" >/dev/null || fail "clang not found (apt-get install clang)"
command -v bpftool >/dev/null || fail "bpftool not found (apt-get install bpftool)"
[ -r "$BTF" ] || fail "no kernel BTF at $BTF (the kernel needs CONFIG_DEBUG_INFO_BTF=y)"
[ -r /usr/include/bpf/bpf_helpers.h ] || fail "libbpf headers missing (apt-get install libbpf-dev)"

# Regenerate vmlinux.h only when the kernel's BTF changed (a new kernel).
if [ ! -s vmlinux.h ] || [ "$BTF" -nt vmlinux.h ]; then
  bpftool btf dump file "$BTF" format c > vmlinux.h.tmp || fail "bpftool could not dump $BTF"
  mv vmlinux.h.tmp vmlinux.h
fi

arch=$(uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')
for src in *.bpf.c; do
  obj=${src%.c}.o
  if [ -f "$obj" ] && [ "$obj" -nt "$src" ] && [ "$obj" -nt vmlinux.h ] \
    && [ -z "$(find . -maxdepth 1 -name '*.h' ! -name vmlinux.h -newer "$obj")" ]; then
    continue
  fi
  "$CLANG" -g -O2 -target bpf -D"__TARGET_ARCH_$arch" -Wall -Werror -I. \
    -c "$src" -o "$obj.tmp" || { rm -f "$obj.tmp" "$obj"; fail "clang could not compile $src (see above)"; }
  mv "$obj.tmp" "$obj"
  echo "build_bpf: built $PWD/$obj"
done
