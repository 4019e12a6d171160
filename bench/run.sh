#!/usr/bin/env bash
# Core proxy benchmark: direct vs Tollgate vs NGINX on loopback. See docs/benchmarks.md.
# Usage: bench/run.sh [--pgo] [--haproxy] [--rounds N] [--duration SECONDS] [--connections N] [run.py's options]
#   --pgo  also build the profile-guided release binary (bench/pgo.sh, laid out by BOLT
#          unless PGO_BOLT=0) and measure it as `tollgate-pgo` in the same rounds
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
case " $* " in *" --haproxy "*) command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy) ;; esac
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --quiet
args=()
for arg in "$@"; do
  if [ "$arg" = "--pgo" ]; then
    bench/pgo.sh
    args+=(--also "tollgate-pgo=target/pgo/tollgate")
  else
    args+=("$arg")
  fi
done
exec python3 bench/run.py "${args[@]}"
