#!/usr/bin/env bash
# Sets the machine up (scripts/setup.sh), then runs every test: unit, real-client end-to-end
# and command-line tests, then the load harness in its smoke mode (does it still work; no
# figure is judged). Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The daemon's log goes to stderr; keep test output readable unless asked otherwise.
export RUST_LOG="${RUST_LOG:-error}"
cargo test --locked "$@"
cargo test --locked --bench load -- --smoke
