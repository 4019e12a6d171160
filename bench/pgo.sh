#!/usr/bin/env bash
# A profile-guided release build (docs/benchmarks.md, "Profile-guided builds"): an
# instrumented build runs bench/pgo_train.py's load, then the release build is made with
# that profile. Output: target/pgo/release/tollgate. Usage: bench/pgo.sh [TRAIN_SECONDS]
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
RUSTFLAGS="-Cprofile-generate=$profiles" cargo build --release --quiet --target-dir target/pgo-gen
# Build scripts are instrumented too and leave their own profiles: only the gateway's count.
rm -f "$profiles"/*.profraw
python3 bench/pgo_train.py target/pgo-gen/release/tollgate "${1:-20}"
"$profdata" merge -o "$profiles/merged.profdata" "$profiles"
RUSTFLAGS="-Cprofile-use=$profiles/merged.profdata" cargo build --release --quiet --target-dir target/pgo
echo target/pgo/release/tollgate
