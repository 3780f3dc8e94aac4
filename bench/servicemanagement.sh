#!/usr/bin/env bash
# Service Management latency and throughput of `portico control-plane` (SQLite; PostgreSQL too
# unless SKIP_PG=1), i.e. what `gcloud endpoints services deploy` and a fleet of proxies cost.
#
# For each database: start a control plane on a free loopback port (fresh data dir / schema),
# then measure
#   deploy    wall time of `gcloud endpoints services deploy` (RUNS times, first one creates the
#             service) with the test fixture spec;
#   config    wrk on GET /v1/services/SVC/configs/ID   (what a proxy fetches on a new rollout);
#   rollouts  wrk on GET /v1/services/SVC/rollouts?filter=status=SUCCESS&pageSize=1 (its poll).
# Calls use the admin token. Output: `<db> <what> <figure>`.
# Usage: bench/servicemanagement.sh   (PORTICO=path, default target/release/portico, falling
#        back to target/debug/portico — say which one you measured)
# Env:   DURATION (5s), CONNECTIONS (8), THREADS (2), RUNS (3), SKIP_PG=1,
#        PG_URL (postgres://postgres@127.0.0.1:5432/test).
# Needs: wrk, curl, gcloud, python3, psql (schema clean-up, optional).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PORTICO="${PORTICO:-$ROOT/target/release/portico}"
[[ -x "$PORTICO" ]] || PORTICO="$ROOT/target/debug/portico"
DURATION="${DURATION:-5s}"
CONNECTIONS="${CONNECTIONS:-8}"
THREADS="${THREADS:-2}"
RUNS="${RUNS:-3}"
PG_URL="${PG_URL:-postgres://postgres@127.0.0.1:5432/test}"
SVC="echo-api.endpoints.demo-proj.cloud.goog"
SPEC="$ROOT/tests/fixtures/servicemanagement/echo-openapi.yaml"

for tool in wrk curl gcloud python3; do
  command -v "$tool" >/dev/null || { echo "bench/servicemanagement.sh: $tool is required" >&2; exit 2; }
done
[[ -x "$PORTICO" ]] || { echo "bench/servicemanagement.sh: build portico first" >&2; exit 2; }
echo "# binary: $PORTICO"

WORK="$(mktemp -d)"
CP_PID=""
cleanup() {
  [[ -n "$CP_PID" ]] && kill "$CP_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

run_db() {
  local db="$1"; shift
  local data="$WORK/$db"
  mkdir -p "$data/spec" "$data/gcloud/configurations"
  cp "$SPEC" "$data/spec/openapi.yaml"
  "$PORTICO" control-plane --listen 127.0.0.1:0 --data "$data" "$@" >"$data/out" 2>"$data/log" &
  CP_PID=$!
  local url=""
  for _ in $(seq 1 100); do
    url="$(sed -n 's/^listening on //p' "$data/out")"
    [[ -n "$url" ]] && break
    sleep 0.1
  done
  [[ -n "$url" ]] || { echo "control plane did not start:"; cat "$data/log"; exit 1; }
  local token; token="$(cat "$data/admin-token")"

  export CLOUDSDK_CONFIG="$data/gcloud"
  printf default >"$CLOUDSDK_CONFIG/active_config"
  cat >"$CLOUDSDK_CONFIG/configurations/config_default" <<INI
[core]
disable_prompts = true
project = demo-proj
disable_usage_reporting = true
[component_manager]
disable_update_check = true
[auth]
access_token_file = $data/admin-token
[api_endpoint_overrides]
servicemanagement = $url/
serviceusage = $url/
INI
  for i in $(seq 1 "$RUNS"); do
    local t0 t1
    t0="$(date +%s.%N)"
    (cd "$data/spec" && gcloud endpoints services deploy openapi.yaml >/dev/null 2>&1)
    t1="$(date +%s.%N)"
    echo "$db deploy#$i $(python3 -c "print(f'{$t1-$t0:.2f}')") s"
  done
  local id
  id="$(curl -sf -H "Authorization: Bearer $token" "$url/v1/services/$SVC/configs?pageSize=1" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["serviceConfigs"][0]["id"])')"
  for what in config rollouts; do
    local path
    if [[ "$what" == config ]]; then path="/v1/services/$SVC/configs/$id"
    else path="/v1/services/$SVC/rollouts?filter=status%3DSUCCESS&pageSize=1"; fi
    local out
    out="$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" -H "Authorization: Bearer $token" "$url$path")"
    if grep -q "Non-2xx" <<<"$out"; then echo "$db $what: non-2xx responses"; echo "$out"; exit 1; fi
    echo "$db $what $(awk '/Requests\/sec/ {print $2}' <<<"$out") req/s (latency avg $(awk '/Latency/ {print $2; exit}' <<<"$out"))"
  done
  kill "$CP_PID"; wait "$CP_PID" 2>/dev/null || true; CP_PID=""
}

run_db sqlite
if [[ "${SKIP_PG:-}" != 1 ]]; then
  schema="bench_sm_$$"
  run_db postgres --database-url "$PG_URL" --database-schema "$schema"
  command -v psql >/dev/null && psql "$PG_URL" -qc "DROP SCHEMA IF EXISTS \"$schema\" CASCADE" >/dev/null 2>&1 || true
fi
