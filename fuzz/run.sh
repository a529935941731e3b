#!/usr/bin/env bash
# Runs the fuzz targets (all, or those named) one after another, each until FUZZ_SECONDS
# (default 20) or FUZZ_RUNS executions (default: no limit), whichever comes first, starting
# from the committed seeds and the local corpus (fuzz/corpus/, not committed). A crash stops
# the run and leaves its input in fuzz/artifacts/TARGET/. Needs the nightly toolchain and
# cargo-fuzz (`cargo install cargo-fuzz`).
set -euo pipefail
cd "$(dirname "$0")"
seconds=${FUZZ_SECONDS:-20}
runs=${FUZZ_RUNS:--1}
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(cert krl proxy config demux asciicast)
fi
command -v cargo-fuzz >/dev/null || { echo "fuzz: cargo-fuzz is missing: cargo install cargo-fuzz" >&2; exit 1; }
rustup run nightly rustc --version >/dev/null || { echo "fuzz: the nightly toolchain is missing" >&2; exit 1; }
cargo +nightly fuzz build
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target"
    echo "fuzz: $target for ${seconds}s (runs: $runs)"
    log=$(mktemp)
    status=0
    cargo +nightly fuzz run "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -runs="$runs" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1 || status=$?
    grep -E "^(Done |stat::number_of_executed_units|stat::peak_rss|INFO: seed corpus)|cov: .*(DONE|INITED)" "$log" || true
    if [ "$status" -ne 0 ]; then
        grep -E "panicked|==[0-9]+==|SUMMARY|Test unit written|^\s+at " "$log" | head -40 >&2 || true
        echo "fuzz: $target FAILED (exit $status); the input is in fuzz/artifacts/$target/" >&2
        rm -f "$log"
        exit 1
    fi
    rm -f "$log"
done
echo "fuzz: all targets ran clean"
