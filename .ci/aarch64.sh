#!/usr/bin/env bash
# The station on linux/aarch64 by user-mode emulation (issue 30): Debian's arm64 Python 3.11 unpacked
# into a sysroot, the station's aarch64 wheels, then bench/ci_aarch64.py runs `bundle verify`,
# `serve --check` and a tiny bundle's replay under qemu-aarch64 and compares with the x86 run.
#
# Skips (exit 0, "SKIP: why") where QEMU, the arm64 packages or the wheels cannot be had; fails
# (exit 1) when the check ran and the aarch64 station disagrees. Nothing is installed on the host:
# apt runs on a private state under the cache (no dpkg --add-architecture), qemu-user-static's .deb is
# unpacked there too. Cache: $DEFECTSCOPE_AARCH64_CACHE (default ~/.cache/defectscope-aarch64).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
C=${DEFECTSCOPE_AARCH64_CACHE:-$HOME/.cache/defectscope-aarch64}
# The station's runtime dependencies (pyproject [project] dependencies), as aarch64 wheels.
WHEELS="numpy opencv-python-headless onnxruntime pyzmq prometheus-client rich"
DEBS="python3.11-minimal libpython3.11-stdlib libstdc++6 libgomp1"

skip() { echo "SKIP aarch64 check: $*"; exit 0; }
t0=$(date +%s)
[ "$(uname -m)" = x86_64 ] || skip "host is $(uname -m), this check emulates aarch64 on x86_64"
command -v apt-get >/dev/null || skip "no apt-get (the sysroot is built from Debian packages)"
command -v dpkg-deb >/dev/null || skip "no dpkg-deb"
[ -x "$PY" ] || skip "no project python at $PY"
mkdir -p "$C/apt/lists/partial" "$C/apt/cache/archives/partial" "$C/debs"
touch "$C/apt/status"
APT=(-o "Dir::State::Lists=$C/apt/lists" -o "Dir::State::status=$C/apt/status" -o "Dir::Cache=$C/apt/cache"
     -o APT::Architecture=amd64 -o APT::Architectures::=amd64 -o APT::Architectures::=arm64
     -o Debug::NoLocking=1 -o APT::Sandbox::User="$(id -un)" -qq)

# Package lists: refreshed once a day (a stale list names .debs the mirror no longer has).
if [ -z "$(find "$C/apt/lists" -maxdepth 1 -name '*arm64_Packages*' -mtime -1 2>/dev/null)" ]; then
  apt-get "${APT[@]}" update >"$C/apt-update.log" 2>&1 || skip "apt-get update failed (no Debian mirror?): $(tail -1 "$C/apt-update.log")"
fi
grep -q . <(find "$C/apt/lists" -name '*arm64_Packages*') || skip "the Debian mirror has no arm64 package lists"

# qemu-aarch64: the host's, else qemu-user-static's static binary unpacked into the cache.
QEMU=$(command -v qemu-aarch64-static || command -v qemu-aarch64 || true)
if [ -z "$QEMU" ]; then
  if [ ! -x "$C/qemu/usr/bin/qemu-aarch64-static" ]; then
    (cd "$C/debs" && apt-get "${APT[@]}" download qemu-user-static) >/dev/null 2>&1 || skip "cannot download qemu-user-static"
    dpkg-deb -x "$C"/debs/qemu-user-static_*_amd64.deb "$C/qemu"
  fi
  QEMU="$C/qemu/usr/bin/qemu-aarch64-static"
fi
"$QEMU" --version >/dev/null 2>&1 || skip "$QEMU does not run here"

# Sysroot: Debian arm64 Python 3.11 and the libraries it and the wheels link (no perl / dpkg / tar).
SYS="$C/sysroot"
if [ ! -x "$SYS/usr/bin/python3.11" ]; then
  pkgs=$(apt-cache "${APT[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
           --no-replaces --no-enhances $(printf '%s:arm64 ' $DEBS) 2>/dev/null \
         | grep -E '^[a-z0-9].*:arm64$' | grep -vE '^(dpkg|install-info|tar|perl.*|libperl.*):' | sort -u)
  [ -n "$pkgs" ] || skip "cannot resolve the arm64 python3.11 packages"
  (cd "$C/debs" && apt-get "${APT[@]}" download $pkgs) >"$C/download.log" 2>&1 \
    || skip "cannot download the arm64 packages: $(tail -1 "$C/download.log")"
  rm -rf "$SYS.tmp" && mkdir -p "$SYS.tmp"
  for p in $pkgs; do dpkg-deb -x "$C"/debs/"${p%:arm64}"_*_arm64.deb "$SYS.tmp"; done
  # QEMU 7.2 hands the guest the host's /proc/cpuinfo and ONNX Runtime's cpuinfo parser then
  # crashes at import; qemu -L resolves absolute paths under the sysroot first, so an ARM one wins.
  mkdir -p "$SYS.tmp/proc"
  printf 'processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n' >"$SYS.tmp/proc/cpuinfo"
  rm -rf "$SYS" && mv "$SYS.tmp" "$SYS"
fi

# aarch64 wheels of the station's dependencies into a target dir on the guest's PYTHONPATH.
SITE="$C/site"
if [ ! -f "$SITE/.complete" ]; then
  rm -rf "$SITE"
  "$PY" -m pip install -q --no-compile --target "$SITE" --only-binary=:all: --python-version 3.11 \
      --implementation cp --abi cp311 --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 \
      --platform manylinux_2_28_aarch64 --platform manylinux_2_26_aarch64 --platform manylinux_2_27_aarch64 \
      $WHEELS >"$C/pip.log" 2>&1 || skip "cannot install the aarch64 wheels: $(grep -m1 -i error "$C/pip.log")"
  touch "$SITE/.complete"
fi
echo "aarch64 sysroot + wheels ready in $(( $(date +%s) - t0 ))s ($QEMU)"
exec "$PY" bench/ci_aarch64.py --qemu "$QEMU" --sysroot "$SYS" --site "$SITE"
