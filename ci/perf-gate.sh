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
# The load generator against wrk on a simple origin: medians of 5 alternating 2 s runs per
# connection count must agree within 20% (p50, p99; CPU per request at most 20% above wrk's).
# A shared machine's noise can move one set of medians: a second set decides.
target/release/meshbench bench generator --rounds 5 --duration 2s --out reports/ci/generator.json \
  || target/release/meshbench bench generator --rounds 5 --duration 2s --out reports/ci/generator.json \
  || status=1
# Control-plane scale in its reduced form (a tenth of the proxies and endpoints, half the
# time): the churn scenario (SotW, then delta) and the capacity sweep. Reports only; the
# figures of the full runs are in the session notes.
rm -rf reports/ci/churn reports/ci/sweep
target/release/meshbench run scenarios/endpoint-churn-10k.yaml --quick --out reports/ci/churn || status=1
target/release/meshbench sweep scenarios/sweeps/capacity.yaml --quick --out reports/ci/sweep || status=1
# Tenant scoping in its reduced form (a tenth of the services and proxies): report only.
rm -rf reports/ci/scoping
target/release/meshbench bench scoping --quick --out reports/ci/scoping || status=1
# The same canary on the docker backend (built images, containers), where an engine answers.
if docker info >/dev/null 2>&1; then
  rm -rf reports/ci/docker
  target/release/meshbench run scenarios/bookinfo-canary.yaml --quick --backend docker --out reports/ci/docker || status=1
  rm -rf reports/ci/tenants
  target/release/meshbench run scenarios/tenants.yaml --quick --backend docker --out reports/ci/tenants || status=1
fi
exit $status
