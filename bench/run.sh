#!/usr/bin/env bash
# Core proxy benchmark: direct vs Tollgate vs NGINX on loopback. See docs/benchmarks.md.
# Usage: bench/run.sh [--rounds N] [--duration SECONDS] [--connections N]
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --quiet
exec python3 bench/run.py "$@"
