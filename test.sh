#!/usr/bin/env bash
# The whole test suite. Installs what the tests need when it is missing, then runs them.
set -euo pipefail
cd "$(dirname "$0")"
cargo test --locked --all-targets "$@"
