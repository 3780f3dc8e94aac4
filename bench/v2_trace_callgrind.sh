#!/usr/bin/env bash
# Instructions per request (valgrind's callgrind)
# of `portico espv2` with an API key, as bench/run.sh's portico-v2-key runs it, in three forms:
#   traced     --tracing_sample_rate=RATE (default 0: only the work every untraced request does)
#   notrace    --disable_tracing
#   baseline   only with BASELINE=<an older portico binary>: the same command from that build
# Each proxy runs under callgrind; after 300 warm-up requests its counters are zeroed, N requests
# (h2load --h1 -n N -c CONNS, defaults 3000 and 1) are made, and the counters dumped: instructions per request =
# the dump's `summary` / N. The counts include the reports of those N requests (flushed before
# the dump) and the timers that ran during the window: that part moves with wall time, so run
# it on a quiet machine (two quiet runs agreed within ~100 per request; a run of N=500 beside a
# full build did not) and compare function by function, where the per-request work is exact.
#
#   bench/v2_trace_callgrind.sh target/release/portico OUTDIR
#   callgrind_annotate --inclusive=yes OUTDIR/traced.<pid>.1   # where they go
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BIN=$(realpath "${1:?usage: bench/v2_trace_callgrind.sh PORTICO OUTDIR}")
OUT=$(realpath -m "${2:?usage: bench/v2_trace_callgrind.sh PORTICO OUTDIR}")
N=${N:-3000}
# One connection by default: requests then arrive one at a time, so the count of event-loop
# wake-ups per request (which depends on timing with several) stays the same from run to run.
CONNS=${CONNS:-1}
RATE=${RATE:-0}
BASELINE=${BASELINE:-}
missing=()
for tool in valgrind callgrind_control h2load nginx curl python3; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
    echo "bench/v2_trace_callgrind.sh: missing tools: ${missing[*]}" >&2
    exit 2
fi
mkdir -p "$OUT"
# shellcheck source=lib/common.sh
source "$ROOT/bench/lib/common.sh"
log() { printf '[callgrind %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

BACKEND_PORT=$(free_port)
start_nginx backend 1 "$(backend_server "$BACKEND_PORT")"
wait_http "http://127.0.0.1:$BACKEND_PORT/" 200

start_up key key
KEY=$(field "$WORK/up-key.out" '^API key: (.*)$')
SERVICE=$(field "$WORK/up-key.out" '.*service ([^,]+), config.*')
[[ -n "$KEY" && -n "$SERVICE" ]] || { cat "$WORK/up-key.err" >&2; exit 1; }

load() { # PORT COUNT
    h2load --h1 -n "$2" -c "$CONNS" -t 1 "http://127.0.0.1:$1/bench?key=$KEY" | grep -E "requests:|status codes"
}
measure() { # NAME BINARY EXTRA-FLAGS...
    local name=$1 bin=$2 port pid
    shift 2
    port=$(free_port)
    # shellcheck disable=SC2086 # CALLGRIND_ARGS: extra valgrind flags, split on spaces
    valgrind --tool=callgrind ${CALLGRIND_ARGS:-} --callgrind-out-file="$OUT/$name.%p" "$bin" espv2 \
        --service="$SERVICE" --rollout_strategy=managed --listener_port="$port" \
        --backend="http://127.0.0.1:$BACKEND_PORT" --non_gcp \
        --service_account_key="$WORK/key/service-account-creds.json" "$@" \
        >"$WORK/$name.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_http "http://127.0.0.1:$port/bench?key=$KEY" 200
    load "$port" 300 >/dev/null
    # Reports are flushed every second: wait out the warm-up's before zeroing and the measured
    # requests' before dumping, so that each count holds exactly the N requests' reports.
    sleep 3
    callgrind_control -z "$pid" >/dev/null 2>&1
    log "$name: $N requests"
    load "$port" "$N"
    sleep 3
    callgrind_control -d "$name" "$pid" >/dev/null 2>&1
    sleep 1
    kill -INT "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    local total
    total=$(grep -h '^summary:' "$OUT/$name.$pid".*1 2>/dev/null | head -1 | awk '{print $2}')
    printf '%-9s %12s instructions, %8.0f per request (%s)\n' "$name" "$total" \
        "$(awk "BEGIN { print $total / $N }")" "$*" | tee -a "$OUT/summary.txt"
}
: >"$OUT/summary.txt"
measure traced "$BIN" --tracing_project_id=bench-proj --tracing_sample_rate="$RATE"
measure notrace "$BIN" --disable_tracing
if [[ -n "$BASELINE" ]]; then
    measure baseline "$(realpath "$BASELINE")"
fi
