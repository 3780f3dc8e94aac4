#!/usr/bin/env bash
# Service Control throughput of `portico control-plane`, on SQLite and on PostgreSQL, with wrk.
#
# For each database it starts a control plane on loopback (fresh data dir; fresh PostgreSQL
# schema, dropped afterwards), deploys a small service with a quota limit, enables it for a
# consumer project, creates an API key, then measures:
#   check    POST /v1/services/SVC:check         one operation, consumer api_key:<key>; every
#            call resolves the key, its restrictions and the consumer's activation in the DB.
#   quota    POST /v1/services/SVC:allocateQuota  cost 1 in NORMAL mode against a per-minute
#            limit of 1e6 for one consumer: every call is a conditional upsert of the same counter
#            row (the most contended write there is).
#   report   POST /v1/services/SVC:report        OPS operations per call (ESP batches up to 10),
#            every operation id unique, each with request_count/error_count/latency metrics and
#            one endpoints_log entry; each call is one committed transaction.
# After the report run it reads the rollups back (timeseries API) and prints how many operations
# were stored next to how many wrk completed (stored >= completed: wrk may cut in-flight calls).
# Calls use the admin token (service-account token verification is measured in bench/jwt.sh).
#
# Output lines: `<db> <call> <req/s> req/s (<latency avg>) [<ops/s> ops/s]`.
# Usage: bench/control_plane.sh   (PORTICO=path/to/portico, default target/release/portico)
# Env:   DURATION (6s per run; 6 runs keep the whole thing under 60 s), CONNECTIONS (16),
#        THREADS (2), OPS (10), PG_URL (postgres://postgres@127.0.0.1:5432/test), SKIP_PG=1.
# Needs: wrk, curl, jq, python3 (free port), psql (schema clean-up, optional).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PORTICO="${PORTICO:-$ROOT/target/release/portico}"
DURATION="${DURATION:-6s}"
CONNECTIONS="${CONNECTIONS:-16}"
THREADS="${THREADS:-2}"
OPS="${OPS:-10}"
PG_URL="${PG_URL:-postgres://postgres@127.0.0.1:5432/test}"
SVC="bench-api.endpoints.bench-proj.cloud.goog"
SELECTOR="1.bench_api_endpoints_bench_proj_cloud_goog.Echo"

for tool in wrk curl jq python3; do
  command -v "$tool" >/dev/null || { echo "bench/control_plane.sh: $tool is required" >&2; exit 2; }
done
if [[ ! -x "$PORTICO" ]]; then
  echo "bench/control_plane.sh: $PORTICO not found; build it (cargo build --release) or set PORTICO" >&2
  exit 2
fi

WORK="$(mktemp -d)"
CP_PID=""
SCHEMA=""
cleanup() {
  if [[ -n "$CP_PID" ]]; then kill "$CP_PID" 2>/dev/null || true; wait "$CP_PID" 2>/dev/null || true; fi
  if [[ -n "$SCHEMA" ]] && command -v psql >/dev/null; then
    psql "$PG_URL" -q -c "DROP SCHEMA IF EXISTS \"$SCHEMA\" CASCADE" >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# start_cp DIR [extra flags...]: starts the control plane, waits (20 s max) until it answers.
start_cp() {
  local dir="$1"; shift
  PORT="$(free_port)"
  BASE="http://127.0.0.1:$PORT"
  # Per-request info logs would measure the log writer, not Service Control.
  RUST_LOG=warn "$PORTICO" control-plane --listen "127.0.0.1:$PORT" --data "$dir" "$@" \
    >"$dir.log" 2>&1 &
  CP_PID=$!
  for _ in $(seq 1 200); do
    if curl -fsS -o /dev/null "$BASE/metrics" 2>/dev/null; then
      ADMIN="$(tr -d '\n' <"$dir/admin-token")"
      return 0
    fi
    if ! kill -0 "$CP_PID" 2>/dev/null; then
      echo "control plane exited:" >&2; cat "$dir.log" >&2; exit 1
    fi
    sleep 0.1
  done
  echo "control plane did not start in 20 s" >&2; cat "$dir.log" >&2; exit 1
}

stop_cp() {
  kill "$CP_PID" 2>/dev/null || true
  wait "$CP_PID" 2>/dev/null || true
  CP_PID=""
}

api() { # api METHOD PATH [JSON]
  local args=(-fsS -X "$1" -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json')
  if [[ $# -ge 3 ]]; then args+=(--data "$3"); fi
  curl "${args[@]}" "$BASE$2"
}

OPENAPI='swagger: "2.0"
info: {title: Bench, version: 1.0.0}
host: "bench-api.endpoints.bench-proj.cloud.goog"
x-google-management:
  metrics:
    - {name: "echo-requests", valueType: INT64, metricKind: DELTA}
  quota:
    limits:
      - {name: "echo-limit", metric: "echo-requests", unit: "1/min/{project}", values: {STANDARD: 1000000}}
paths:
  /echo:
    post:
      operationId: Echo
      x-google-quota: {metricCosts: {echo-requests: 1}}
      responses: {"200": {description: ok}}
security: [{api_key: []}]
securityDefinitions:
  api_key: {type: apiKey, name: key, in: query}
'

setup_service() {
  api POST /v1/services "{\"serviceName\":\"$SVC\",\"producerProjectId\":\"bench-proj\"}" >/dev/null
  local b64 cfg
  b64="$(printf '%s' "$OPENAPI" | base64 -w0)"
  cfg="$(api POST "/v1/services/$SVC/configs:submit" \
    "{\"configSource\":{\"files\":[{\"fileContents\":\"$b64\",\"filePath\":\"openapi.yaml\",\"fileType\":\"OPEN_API_YAML\"}]}}" \
    | jq -r .response.serviceConfig.id)"
  api POST "/v1/services/$SVC/rollouts" \
    "{\"serviceName\":\"$SVC\",\"trafficPercentStrategy\":{\"percentages\":{\"$cfg\":100.0}}}" >/dev/null
  api POST "/v1/projects/consumer-proj/services/$SVC:enable" '{}' >/dev/null
  KEY="$(api POST /v2/projects/consumer-proj/locations/global/keys '{"displayName":"bench"}' \
    | jq -r .response.keyString)"
  # Sanity: the key passes a check before it is measured.
  local errs
  errs="$(api POST "/v1/services/$SVC:check" \
    "{\"operation\":{\"operationId\":\"warm\",\"operationName\":\"$SELECTOR\",\"consumerId\":\"api_key:$KEY\"}}" \
    | jq -c '.checkErrors // empty')"
  if [[ -n "$errs" ]]; then echo "warm-up check failed: $errs" >&2; exit 1; fi
}

write_lua() {
  cat >"$WORK/check.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $ADMIN"
wrk.body = '{"operation":{"operationId":"bench","operationName":"$SELECTOR","consumerId":"api_key:$KEY","labels":{"servicecontrol.googleapis.com/caller_ip":"127.0.0.1"}}}'
LUA
  cat >"$WORK/quota.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $ADMIN"
wrk.body = '{"allocateOperation":{"operationId":"bench","methodName":"$SELECTOR","consumerId":"api_key:$KEY","quotaMode":"NORMAL","quotaMetrics":[{"metricName":"echo-requests","metricValues":[{"int64Value":"1"}]}]}}'
LUA
  local now
  now="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  cat >"$WORK/report.lua" <<LUA
local ops_per_call = $OPS
local run = "$RANDOM$RANDOM"
local next_thread = 0
local op_template = '{"operationId":"OPID","operationName":"$SELECTOR","consumerId":"api_key:$KEY",'
  .. '"startTime":"$now","endTime":"$now",'
  .. '"labels":{"serviceruntime.googleapis.com/api_method":"$SELECTOR","/response_code":"200","/response_code_class":"2xx"},'
  .. '"metricValueSets":['
  .. '{"metricName":"serviceruntime.googleapis.com/api/producer/request_count","metricValues":[{"int64Value":"1"}]},'
  .. '{"metricName":"serviceruntime.googleapis.com/api/producer/error_count","metricValues":[{"int64Value":"0"}]},'
  .. '{"metricName":"serviceruntime.googleapis.com/api/producer/total_latencies","metricValues":[{"distributionValue":'
  .. '{"count":"1","mean":0.003,"minimum":0.003,"maximum":0.003,"bucketCounts":["0","0","0","0","0","0","0","0","0","0","0","0","1","0","0","0","0","0","0","0","0","0","0","0","0","0","0","0","0","0","0"],'
  .. '"exponentialBuckets":{"numFiniteBuckets":29,"growthFactor":2,"scale":1e-6}}}]}],'
  .. '"logEntries":[{"name":"endpoints_log","timestamp":"$now","severity":"INFO",'
  .. '"structPayload":{"http_response_code":200,"api_method":"$SELECTOR","url":"/echo","http_method":"POST"}}]}'
setup = function(thread)
  thread:set("tid", next_thread)
  next_thread = next_thread + 1
end
local counter = 0
request = function()
  counter = counter + 1
  local ops = {}
  for i = 1, ops_per_call do
    ops[i] = string.gsub(op_template, "OPID", run .. "-" .. tid .. "-" .. counter .. "-" .. i)
  end
  return wrk.format("POST", nil, {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer $ADMIN",
  }, '{"operations":[' .. table.concat(ops, ",") .. ']}')
end
LUA
}

# run_wrk DB CALL URL LUA OPS_PER_CALL: prints one result line; fails on non-2xx responses.
run_wrk() {
  local db="$1" call="$2" url="$3" lua="$4" per="$5" out rps lat non2xx total extra=""
  out="$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$lua" "$url")"
  rps="$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")"
  lat="$(awk '/^    Latency/ {print $2}' <<<"$out")"
  total="$(awk '/requests in/ {print $1}' <<<"$out")"
  non2xx="$(awk '/Non-2xx/ {print $5}' <<<"$out")"
  if [[ -n "$non2xx" && "$non2xx" != "0" ]]; then
    echo "$db $call: $non2xx non-2xx responses" >&2; echo "$out" >&2; exit 1
  fi
  if [[ "$per" -gt 1 ]]; then
    extra=" $(awk -v r="$rps" -v p="$per" 'BEGIN {printf "%.0f", r * p}') ops/s"
  fi
  echo "$db $call $rps req/s ($lat avg)$extra"
  LAST_TOTAL="$total"
}

# The counter must hold every acknowledged allocation (wrk's count) and at most the calls wrk cut
# off in flight (one per connection): probed with CHECK_ONLY costs just past each bound.
verify_quota() {
  local db="$1" start_minute="$2" limit=1000000 low high
  if [[ "$(date -u +%H%M)" != "$start_minute" ]]; then
    echo "$db quota: the minute rolled over during the run; counter not verified"
    return 0
  fi
  low="$(quota_probe $((limit - LAST_TOTAL + 1)))"
  high="$(quota_probe $((limit - LAST_TOTAL - CONNECTIONS)))"
  if [[ "$low" != "RESOURCE_EXHAUSTED" || -n "$high" ]]; then
    echo "$db quota: counter does not match $LAST_TOTAL acknowledged allocations ($low/$high)" >&2
    exit 1
  fi
  echo "$db quota counter holds the $LAST_TOTAL acknowledged allocations (+ at most $CONNECTIONS in flight)"
}

quota_probe() { # quota_probe COST → first allocate error code, empty if it would fit
  api POST "/v1/services/$SVC:allocateQuota" \
    "{\"allocateOperation\":{\"operationId\":\"probe\",\"methodName\":\"$SELECTOR\",\"consumerId\":\"api_key:$KEY\",\"quotaMode\":\"CHECK_ONLY\",\"quotaMetrics\":[{\"metricName\":\"echo-requests\",\"metricValues\":[{\"int64Value\":\"$1\"}]}]}}" \
    | jq -r '.allocateErrors[0].code // empty'
}

verify_report() {
  local db="$1" stored expected
  stored="$(api GET "/portico/v1/services/$SVC/timeseries?since=1h" \
    | jq '[.timeSeries[].points[].requestCount | tonumber] | add // 0')"
  expected=$((LAST_TOTAL * OPS))
  echo "$db report stored $stored operations, wrk completed $LAST_TOTAL calls = $expected operations"
  if [[ "$stored" -lt "$expected" ]]; then echo "$db: operations lost" >&2; exit 1; fi
}

bench_db() {
  local db="$1"; shift
  start_cp "$WORK/$db" "$@"
  setup_service
  write_lua
  run_wrk "$db" check "$BASE/v1/services/$SVC:check" "$WORK/check.lua" 1
  local minute
  minute="$(date -u +%H%M)"
  run_wrk "$db" quota "$BASE/v1/services/$SVC:allocateQuota" "$WORK/quota.lua" 1
  verify_quota "$db" "$minute"
  run_wrk "$db" report "$BASE/v1/services/$SVC:report" "$WORK/report.lua" "$OPS"
  verify_report "$db"
  stop_cp
}

echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) $(nproc) cores; wrk -t$THREADS -c$CONNECTIONS -d$DURATION; report batches of $OPS operations"
bench_db sqlite
if [[ "${SKIP_PG:-0}" != "1" ]]; then
  SCHEMA="bench_sc_$$_$RANDOM"
  bench_db postgres --database-url "$PG_URL" --database-schema "$SCHEMA"
fi
