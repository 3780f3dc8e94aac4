#!/usr/bin/env bash
# Portico's proxy next to nginx, on this machine, loopback only.
#
#   bench/run.sh            # ~4 minutes after the release build
#
# What runs (all on 127.0.0.1, ports chosen at run time):
#   backend           nginx, 1 worker, answering every request with a fixed JSON body;
#                     the same backend behind every target
#   nginx             plain proxy_pass with upstream keepalive (the yardstick)
#   portico-nopolicy  portico esp --service_json_path (no Service Control): route + forward
#   portico-key       API key required: check + report through a control plane (portico up)
#   portico-v2-key    the same service, control plane and key behind `portico espv2` (ESPv2's
#                     dialect), tracing at ESPv2's default --tracing_sample_rate=0.001 into the
#                     control plane; the table prints its req/s over portico-key's
#   portico-quota     API key + quota (allocateQuota) + report (a second portico up)
#   portico-v2-notrace  portico-v2-key with --disable_tracing: the table prints portico-v2-key's
#                     req/s over it: what tracing costs when almost no request is sampled
#   baseline-v2-key   only with BENCH_BASELINE_BIN=<an older portico binary>: the same espv2
#                     command from that build, e.g. one from before tracing existed, so "before"
#                     and "after" are measured in one run on one machine
# Access logs are off for nginx and for Portico.
#
# Measured: for BENCH_ROUNDS interleaved rounds x each target x each of BENCH_CONNS connection
# counts, wrk -t1 for BENCH_DURATION seconds; the table gives medians of req/s, p50 and p99 and
# the req/s ratio to nginx in the same run. Then the RSS of portico-quota, portico-nopolicy and
# nginx with 1,000 keep-alive connections open (wrk -c1000), and the time a new rollout takes
# to be served under load with the count of failed requests meanwhile.
#
# Nothing is installed: missing tools are named and the script exits 2.
# Knobs: BENCH_ROUNDS (3), BENCH_DURATION (8), BENCH_CONNS ("50 256"), BENCH_KEEP=1 keeps the
# work directory, BENCH_NO_BUILD=1 uses the existing release binary, BENCH_BASELINE_BIN adds
# the baseline-v2-key target, BENCH_V2_SAMPLE_RATE (0.001) is portico-v2-key's sample rate.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

ROUNDS=${BENCH_ROUNDS:-3}
DURATION=${BENCH_DURATION:-8}
CONNS=${BENCH_CONNS:-"50 256"}

missing=()
for tool in nginx wrk curl python3; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
    echo "bench: missing tools: ${missing[*]}" >&2
    echo "bench: on Debian/Ubuntu: apt-get install -y ${missing[*]}" >&2
    exit 2
fi
# wrk -c1000 and 1,000 proxied connections need more than the usual 1024 descriptors.
ulimit -n 16384 2>/dev/null || ulimit -n 4096 2>/dev/null || true
if (($(ulimit -n) < 2200)); then
    echo "bench: need at least 2200 open files (ulimit -n is $(ulimit -n))" >&2
    exit 2
fi

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [[ -n "${BENCH_NO_BUILD:-}" && -x target/release/portico ]]; then
    log "BENCH_NO_BUILD set: using the existing target/release/portico"
else
    log "building the release binary (cargo build --release --bin portico)"
    cargo build --release --bin portico --quiet
fi
BIN="$ROOT/target/release/portico"
BASELINE_BIN=${BENCH_BASELINE_BIN:-}
# portico-v2-key's --tracing_sample_rate: ESPv2's default; 0 leaves only the unsampled work.
V2_SAMPLE_RATE=${BENCH_V2_SAMPLE_RATE:-0.001}
if [[ -n "$BASELINE_BIN" && ! -x "$BASELINE_BIN" ]]; then
    echo "bench: BENCH_BASELINE_BIN=$BASELINE_BIN is not an executable" >&2
    exit 2
fi

# shellcheck source=lib/common.sh
source "$ROOT/bench/lib/common.sh"

CORES=$(nproc)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

# --- backend and nginx ---------------------------------------------------------------------
BACKEND_PORT=$(free_port)
start_nginx backend 1 "$(backend_server "$BACKEND_PORT")"
wait_http "http://127.0.0.1:$BACKEND_PORT/" 200

NGINX_PORT=$(free_port)
# As many workers as Portico has threads (one per core), keep-alive to the backend.
start_nginx nginx "$CORES" "$(nginx_proxy_conf "$BACKEND_PORT" "$NGINX_PORT")"
wait_http "http://127.0.0.1:$NGINX_PORT/bench" 200
log "backend :$BACKEND_PORT, nginx :$NGINX_PORT ($CORES workers)"

# --- Portico without policy ------------------------------------------------------------------
python3 bench/lib/variant.py nopolicy np >"$WORK/nopolicy.yaml"
"$BIN" config validate "$WORK/nopolicy.yaml" 2>/dev/null >"$WORK/nopolicy.full.json"
# Without control.environment the proxy has no Service Control to call.
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); d.pop("control",None); d.setdefault("id","bench-nopolicy"); json.dump(d,open(sys.argv[2],"w"))' \
    "$WORK/nopolicy.full.json" "$WORK/nopolicy.json"
NP_PORT=$(free_port)
NP_STATUS=$(free_port)
"$BIN" esp --service_json_path="$WORK/nopolicy.json" --http_port="$NP_PORT" --status_port="$NP_STATUS" \
    --backend="127.0.0.1:$BACKEND_PORT" --access_log=off >"$WORK/esp-nopolicy.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$NP_PORT/bench" 200

# --- Portico with API key (+ quota): portico up fronting the backend -------------------------
start_up key key
start_up quota quota
KEY_PORT=$(field "$WORK/up-key.out" '^  proxy +http://127\.0\.0\.1:([0-9]+).*')
KEY_STATUS=$(field "$WORK/up-key.out" '^  status +http://127\.0\.0\.1:([0-9]+)/.*')
KEY_CP=$(field "$WORK/up-key.out" '^  control plane +(http://[0-9.:]+).*')
KEY_KEY=$(field "$WORK/up-key.out" '^API key: (.*)$')
KEY_SERVICE=$(field "$WORK/up-key.out" '.*service ([^,]+), config.*')
Q_PORT=$(field "$WORK/up-quota.out" '^  proxy +http://127\.0\.0\.1:([0-9]+).*')
Q_STATUS=$(field "$WORK/up-quota.out" '^  status +http://127\.0\.0\.1:([0-9]+)/.*')
Q_KEY=$(field "$WORK/up-quota.out" '^API key: (.*)$')
wait_http "http://127.0.0.1:$KEY_PORT/bench?key=$KEY_KEY" 200
wait_http "http://127.0.0.1:$Q_PORT/bench?key=$Q_KEY" 200
wait_http "http://127.0.0.1:$KEY_PORT/bench" 401

# --- the same service behind `portico espv2` (ESPv2's dialect), same control plane and key -----
V2_PORT=$(free_port)
"$BIN" espv2 --service="$KEY_SERVICE" --rollout_strategy=managed --listener_port="$V2_PORT" \
    --backend="http://127.0.0.1:$BACKEND_PORT" --non_gcp --tracing_project_id=bench-proj \
    --tracing_sample_rate="$V2_SAMPLE_RATE" \
    --service_account_key="$WORK/key/service-account-creds.json" >"$WORK/espv2-key.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$V2_PORT/bench?key=$KEY_KEY" 200
wait_http "http://127.0.0.1:$V2_PORT/bench" 401
# Tracing's cost for unsampled requests: the same command with tracing off...
V2NT_PORT=$(free_port)
"$BIN" espv2 --service="$KEY_SERVICE" --rollout_strategy=managed --listener_port="$V2NT_PORT" \
    --backend="http://127.0.0.1:$BACKEND_PORT" --non_gcp --disable_tracing \
    --service_account_key="$WORK/key/service-account-creds.json" >"$WORK/espv2-notrace.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$V2NT_PORT/bench?key=$KEY_KEY" 200
# ...and, when asked, the same command from an older build.
if [[ -n "$BASELINE_BIN" ]]; then
    BASE_PORT=$(free_port)
    "$BASELINE_BIN" espv2 --service="$KEY_SERVICE" --rollout_strategy=managed --listener_port="$BASE_PORT" \
        --backend="http://127.0.0.1:$BACKEND_PORT" --non_gcp \
        --service_account_key="$WORK/key/service-account-creds.json" >"$WORK/espv2-baseline.log" 2>&1 &
    PIDS+=($!)
    wait_http "http://127.0.0.1:$BASE_PORT/bench?key=$KEY_KEY" 200
    wait_http "http://127.0.0.1:$BASE_PORT/bench" 401
    log "baseline espv2 ($BASELINE_BIN, $("$BASELINE_BIN" --version 2>/dev/null | head -1)) :$BASE_PORT"
fi
log "portico: nopolicy :$NP_PORT, key :$KEY_PORT, quota :$Q_PORT, espv2 key :$V2_PORT, espv2 no tracing :$V2NT_PORT"

declare -A URL=(
    [nginx]="http://127.0.0.1:$NGINX_PORT/bench"
    [portico-nopolicy]="http://127.0.0.1:$NP_PORT/bench"
    [portico-key]="http://127.0.0.1:$KEY_PORT/bench?key=$KEY_KEY"
    [portico-quota]="http://127.0.0.1:$Q_PORT/bench?key=$Q_KEY"
    [portico-v2-key]="http://127.0.0.1:$V2_PORT/bench?key=$KEY_KEY"
    [portico-v2-notrace]="http://127.0.0.1:$V2NT_PORT/bench?key=$KEY_KEY"
)
TARGETS=(nginx portico-nopolicy portico-key portico-v2-key portico-v2-notrace portico-quota)
if [[ -n "$BASELINE_BIN" ]]; then
    URL[baseline-v2-key]="http://127.0.0.1:$BASE_PORT/bench?key=$KEY_KEY"
    TARGETS+=(baseline-v2-key)
fi

# Warm every path (connections, check caches, JWKS-free) before measuring.
for t in "${TARGETS[@]}"; do
    wrk -t1 -c50 -d2s "${URL[$t]}" >/dev/null
done

# --- throughput and latency, interleaved ------------------------------------------------------
mkdir -p "$WORK/wrk"
for round in $(seq "$ROUNDS"); do
    for c in $CONNS; do
        for t in "${TARGETS[@]}"; do
            log "round $round/$ROUNDS: $t, $c connections, ${DURATION}s"
            wrk -t1 -c"$c" -d"${DURATION}s" --latency "${URL[$t]}" >"$WORK/wrk/$round.$t.$c.txt"
        done
    done
done

# --- memory at 1,000 keep-alive connections ---------------------------------------------------
status_pid() { # STATUS_PORT -> the proxy's pid from /endpoints_status
    curl -s --max-time 5 "http://127.0.0.1:$1/endpoints_status" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["processes"][0]["processId"])'
}
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
nginx_rss_kib() { # master + workers
    local master total=0 p
    master=$(cat "$WORK/nginx/nginx.pid")
    for p in $master $(awk -v m="$master" '$4 == m {print $1}' /proc/[0-9]*/stat 2>/dev/null); do
        total=$((total + $(rss_kib "$p")))
    done
    echo "$total"
}
Q_PID=$(status_pid "$Q_STATUS")
NP_PID=$(status_pid "$NP_STATUS")
log "RSS at 1,000 connections (portico-quota pid $Q_PID, portico-nopolicy pid $NP_PID, nginx)"
busy_rss() { # TARGET COMMAND... — COMMAND's output (KiB) 4 s into wrk -t2 -c1000 on TARGET
    local target=$1 wrk_pid out
    shift
    wrk -t2 -c1000 -d6s "${URL[$target]}" >"$WORK/rss-$target.txt" &
    wrk_pid=$!
    sleep 4
    out=$("$@")
    wait "$wrk_pid"
    echo "$out"
}
RSS_IDLE=$(rss_kib "$Q_PID")
RSS_1K=$(busy_rss portico-quota rss_kib "$Q_PID")
NP_RSS_IDLE=$(rss_kib "$NP_PID")
NP_RSS_1K=$(busy_rss portico-nopolicy rss_kib "$NP_PID")
NGINX_RSS_1K=$(busy_rss nginx nginx_rss_kib)

# --- a new rollout under load -------------------------------------------------------------------
log "rollout under load (portico-key, wrk -c50 for 20 s; new config deployed at t=4 s)"
python3 bench/lib/variant.py key key 1.0.1 >"$WORK/key-v2.yaml"
wrk -t1 -c50 -d20s --latency "${URL[portico-key]}" >"$WORK/rollout-wrk.txt" &
WRK=$!
sleep 4
T0=$(date +%s.%N)
NEW_ID=$(python3 bench/lib/deploy.py "$KEY_CP" "$WORK/key/admin-token" "$KEY_SERVICE" "$WORK/key-v2.yaml")
T_DEPLOYED=$(date +%s.%N)
SERVED=""
for _ in $(seq 300); do
    if curl -s --max-time 2 "http://127.0.0.1:$KEY_STATUS/endpoints_status" | grep -q "\"$NEW_ID\""; then
        SERVED=$(date +%s.%N)
        break
    fi
    sleep 0.05
done
wait "$WRK"

# --- report -------------------------------------------------------------------------------------
echo
echo "Portico proxy benchmark — $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), $(uname -sr)"
echo "wrk -t1 -d${DURATION}s --latency, ${ROUNDS} interleaved rounds, connections: $CONNS; backend: nginx fixed body"
echo "load average at start: $LOAD_START, at end: $(cut -d' ' -f1-3 /proc/loadavg); tree at run time: $(git log -1 --format=%h 2>/dev/null || echo unknown)"
echo
python3 bench/lib/wrk_summary.py "$WORK/wrk"
echo
printf 'RSS with 1,000 keep-alive connections (wrk -t2 -c1000):\n'
calc() { awk "BEGIN { printf \"%.2f\", $1 }"; }
printf '  portico-quota     %d KiB (%s MiB); idle before: %d KiB\n' "$RSS_1K" "$(calc "$RSS_1K/1024")" "$RSS_IDLE"
printf '  portico-nopolicy  %d KiB (%s MiB); idle before: %d KiB\n' "$NP_RSS_1K" "$(calc "$NP_RSS_1K/1024")" "$NP_RSS_IDLE"
printf '  nginx             %d KiB (%s MiB, master + %d workers)\n' "$NGINX_RSS_1K" "$(calc "$NGINX_RSS_1K/1024")" "$CORES"
echo
ROLL_FAILED=$(python3 - "$WORK/rollout-wrk.txt" <<'EOF'
import re, sys
n = 0
for line in open(sys.argv[1]):
    if line.startswith("Non-2xx or 3xx responses:"):
        n += int(line.split(":")[1])
    elif line.strip().startswith("Socket errors:"):
        n += sum(int(x) for x in re.findall(r"\d+", line))
print(n)
EOF
)
ROLL_TOTAL=$(sed -nE 's/^ *([0-9]+) requests in.*/\1/p' "$WORK/rollout-wrk.txt")
if [[ -n "$SERVED" ]]; then
    printf 'Rollout under load: config %s served %s s after the deploy call returned (deploy call %s s); %s failed of %s requests\n' \
        "$NEW_ID" "$(calc "$SERVED - $T_DEPLOYED")" "$(calc "$T_DEPLOYED - $T0")" "$ROLL_FAILED" "$ROLL_TOTAL"
else
    printf 'Rollout under load: config %s NOT served within 15 s; %s failed of %s requests\n' "$NEW_ID" "$ROLL_FAILED" "$ROLL_TOTAL"
fi
