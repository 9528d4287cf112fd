#!/usr/bin/env bash
# Quick start (the main job until the scenario harness lands): meshbench pilot loaded with
# fixtures/quickstart/reviews-mesh.yaml, two reviews workloads (v1, v3), and a real Envoy 1.40
# sidecar for a productpage pod. Sends traffic through Envoy, shows the 50/50 split and the
# pilot's view of the proxy, then rolls reviews to 100% v3 and shows the new split.
# Everything it starts is stopped on exit, error or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
. ci/envoy.sh
cargo build --release --quiet
BIN=target/release/meshbench
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

POD_IP=127.0.2.1
$BIN pilot --config fixtures/quickstart/reviews-mesh.yaml 2>"$WORK/pilot.log" & PIDS+=($!)
$BIN workload --service reviews --version v1 --addr 127.0.1.1:9080 2>"$WORK/v1.log" & PIDS+=($!)
$BIN workload --service reviews --version v3 --addr 127.0.1.3:9080 2>"$WORK/v3.log" & PIDS+=($!)
$BIN bootstrap --pod-ip $POD_IP --pod-name productpage-v1-0 --service productpage \
  --label app=productpage --label version=v1 --admin $POD_IP:15000 >"$WORK/envoy.json"
"$MESHBENCH_ENVOY" -c "$WORK/envoy.json" --concurrency 1 --use-dynamic-base-id \
  --log-level warn 2>"$WORK/envoy.log" & PIDS+=($!)

echo "waiting for Envoy to take its config from pilot..."
for _ in $(seq 1 100); do
  code=$(curl -s -o /dev/null -w '%{http_code}' -H 'Host: reviews:9080' http://$POD_IP:15001/ || true)
  [ "$code" = 200 ] && break
  sleep 0.1
done
[ "$code" = 200 ] || { echo "Envoy did not serve; logs in $WORK" >&2; cat "$WORK/envoy.log" "$WORK/pilot.log" >&2; exit 3; }

split() {
  for _ in $(seq 1 200); do
    curl -s -D - -o /dev/null -H 'Host: reviews:9080' http://$POD_IP:15001/reviews/0 | grep -i '^x-meshbench-workload' | tr -d '\r'
  done | sort | uniq -c
}
echo "== 200 requests through Envoy (VirtualService reviews 50/50 v1/v3):"
split
echo "== pilot's view of the proxy (GET /v1/proxies):"
curl -s http://127.0.0.1:15080/v1/proxies | python3 -m json.tool | grep -E '"id"|synced_version|synced_ack_ms'
echo "== rolling reviews to 100% v3 (POST /v1/apply):"
curl -s --data-binary @fixtures/quickstart/reviews-v3.yaml 'http://127.0.0.1:15080/v1/apply?source=reviews-v3.yaml'; echo
sleep 0.3
echo "== 200 requests through Envoy after the rollout:"
split
