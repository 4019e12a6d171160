#!/usr/bin/env bash
# A profile-guided release build (docs/benchmarks.md, "Profile-guided builds"): an
# instrumented build runs bench/pgo_train.py's load, then the release build is made with
# that profile. Then LLVM's post-link optimizer, BOLT, lays that binary's code out by a
# second profile of the same load (docs/benchmarks.md, "Code laid out by a profile").
# Output, the binary to ship: target/pgo/tollgate (`PGO_BOLT=0`: profile-guided only).
# Usage: bench/pgo.sh [TRAIN_SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi
sysroot="$(rustc --print sysroot)"
profdata="$(find "$sysroot" -name llvm-profdata -type f | head -n1)"
if [ -z "$profdata" ]; then
  rustup component add llvm-tools >/dev/null
  profdata="$(find "$sysroot" -name llvm-profdata -type f | head -n1)"
fi
profiles="$PWD/target/pgo-profiles"
rm -rf "$profiles"
mkdir -p "$profiles"
RUSTFLAGS="-Cprofile-generate=$profiles" cargo build --release --locked --quiet --target-dir target/pgo-gen
# Build scripts are instrumented too and leave their own profiles: only the gateway's count.
rm -f "$profiles"/*.profraw
python3 bench/pgo_train.py target/pgo-gen/release/tollgate "${1:-20}"
"$profdata" merge -o "$profiles/merged.profdata" "$profiles"
# Relocations kept in the binary let BOLT move whole functions, not only blocks within them.
RUSTFLAGS="-Cprofile-use=$profiles/merged.profdata -Clink-arg=-Wl,--emit-relocs" \
  cargo build --release --locked --quiet --target-dir target/pgo
if [ "${PGO_BOLT:-1}" = 0 ]; then
  cp target/pgo/release/tollgate target/pgo/tollgate
  exit 0
fi
# BOLT from LLVM 16 (Debian's bolt-16). Its instrumentation counts branches itself, so no
# hardware counters are needed (a VM often has none).
bolt="$(command -v llvm-bolt || command -v llvm-bolt-16 || true)"
if [ -z "$bolt" ]; then
  apt-get update -qq && apt-get install -y -qq bolt-16 >/dev/null
  bolt="$(command -v llvm-bolt-16)"
fi
runtime="$(dirname "$(readlink -f "$bolt")")/../lib/libbolt_rt_instr.a"
# This BOLT reads the runtime's path as relative to /usr/lib.
runtime="$(realpath --relative-to=/usr/lib "$runtime")"
"$bolt" target/pgo/release/tollgate -instrument -o target/pgo/tollgate.instrumented \
  -runtime-instrumentation-lib="$runtime" -instrumentation-file="$profiles/bolt.fdata" >/dev/null
python3 bench/pgo_train.py target/pgo/tollgate.instrumented "${1:-20}"
"$bolt" target/pgo/release/tollgate -o target/pgo/tollgate -data="$profiles/bolt.fdata" \
  -reorder-blocks=ext-tsp -reorder-functions=hfsort -split-functions -split-all-cold \
  -icf=1 -use-gnu-stack >/dev/null
rm -f target/pgo/tollgate.instrumented
