#!/usr/bin/env bash
# Performance gate: runs the quick bookinfo canary with meshbench's proxy and with Envoy
# (release build), then compares each report with its baseline in ci/baseline/. Exit 1 on a
# regression beyond the gate's tolerances (defaults sized for noisy shared machines).
# Usage: ci/perf-gate.sh [extra `meshbench gate` flags, e.g. --tolerance throughput=30]
# To refresh a baseline: copy reports/ci/<proxy>/report.json to ci/baseline/.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${MESHBENCH_ENVOY:-}" ] || . ci/envoy.sh
cargo build --release --locked --quiet
status=0
for proxy in meshbench envoy; do
  out=reports/ci/$proxy
  rm -rf "$out"
  target/release/meshbench run scenarios/bookinfo-canary.yaml --quick --proxy "$proxy" --out "$out" || status=1
  target/release/meshbench gate --baseline "ci/baseline/bookinfo-canary-quick-$proxy.json" --current "$out/report.json" "$@" || status=1
done
# The same canary on the docker backend (built images, containers), where an engine answers.
if docker info >/dev/null 2>&1; then
  rm -rf reports/ci/docker
  target/release/meshbench run scenarios/bookinfo-canary.yaml --quick --backend docker --out reports/ci/docker || status=1
fi
exit $status
