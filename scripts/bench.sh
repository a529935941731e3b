#!/usr/bin/env bash
# Sets the machine up (scripts/setup.sh, which also installs OpenSSH sshd for the baseline),
# then runs the load harness: benchgate against sshd and the Docker API floor, one run, one
# machine. Prints the table and writes target/load/results.{md,json}. `--smoke` runs a tiny
# version of every figure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo bench --locked --bench load -- "$@"
