#!/usr/bin/env bash
# CPU time per proxied request: nginx (proxy_pass, keepalive, 2 workers) vs `portico esp`
# without Service Control vs the floor (crates/proxy/examples/floor_proxy.rs: hyper's HTTP/1
# server and Portico's backend pool, nothing else), in front of the same backend (nginx,
# 1 worker, fixed body).
#
# For each of ROUNDS rounds and each proxy: wrk -t1 -c$CONNS for $DURATION s, and the proxy's
# utime+stime (/proc/PID/stat, all its processes/threads) over the run divided by the requests
# served (and the user-space part of it). Unlike req/s, this barely depends on what else the
# machine is doing, so it is the figure to compare when tuning the request path. Minor page faults per request are printed
# too: freed memory the allocator gave back and the next request faulted in again.
# Usage: bench/cpu_per_request.sh [extra `portico esp` flags...]
#   env: BIN (target/release/portico), CONNS (50), DURATION (6), ROUNDS (2),
#        PORTICO_ENV (e.g. "MIMALLOC_PURGE_DELAY=0") for the proxy only.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/portico}
CONNS=${CONNS:-50}
DURATION=${DURATION:-6}
ROUNDS=${ROUNDS:-2}
for tool in nginx wrk curl python3; do
    command -v "$tool" >/dev/null 2>&1 || { echo "bench: missing $tool (apt-get install -y nginx wrk curl python3)" >&2; exit 2; }
done
[[ -x "$BIN" ]] || { echo "bench: no $BIN; run cargo build --release --bin portico" >&2; exit 2; }
FLOOR=${FLOOR:-target/release/examples/floor_proxy}
if [[ ! -x "$FLOOR" ]]; then
    echo "bench: building the floor proxy (cargo build --release -p portico-proxy --example floor_proxy)" >&2
    cargo build --release --quiet -p portico-proxy --example floor_proxy
fi
# shellcheck source=lib/common.sh
source bench/lib/common.sh

# Clock ticks of a process tree (the process and its direct children, nginx's workers): user +
# system, or with a second argument only user time ("user") or minor faults ("faults").
ticks() {
    local root=$1 total=0 p
    for p in $root $(awk -v m="$root" '$4 == m {print $1}' /proc/[0-9]*/stat 2>/dev/null); do
        total=$((total + $(awk -v f="${2:-}" '{print f == "faults" ? $10 : (f == "user" ? $14 : $14 + $15)}' "/proc/$p/stat")))
    done
    echo "$total"
}

BACKEND=$(free_port)
start_nginx backend 1 "$(backend_server "$BACKEND")"
NGINX=$(free_port)
start_nginx proxy "$(nproc)" "$(nginx_proxy_conf "$BACKEND" "$NGINX")"
PORT=$(free_port)
env ${PORTICO_ENV:-} "$BIN" esp --service_json_path=crates/proxy/tests/fixtures/passthrough.json \
    --http_port="$PORT" --status_port=0 --backend="127.0.0.1:$BACKEND" --access_log=off "$@" \
    >"$WORK/esp.log" 2>&1 &
ESP=$!
PIDS+=($ESP)
FLOOR_PORT=$(free_port)
"$FLOOR" "127.0.0.1:$FLOOR_PORT" "127.0.0.1:$BACKEND" >"$WORK/floor.log" 2>&1 &
FLOOR_PID=$!
PIDS+=($FLOOR_PID)
wait_http "http://127.0.0.1:$NGINX/known" 200
wait_http "http://127.0.0.1:$PORT/known" 200
wait_http "http://127.0.0.1:$FLOOR_PORT/known" 200
NGINX_MASTER=$(cat "$WORK/proxy/nginx.pid")
HZ=$(getconf CLK_TCK)

echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg); wrk -t1 -c$CONNS -d${DURATION}s; flags: ${*:-none}; env: ${PORTICO_ENV:-none}"
printf '%-8s %-8s %10s %9s %14s %13s %12s\n' round proxy req/s p99 "cpu µs/req" "of it user" "faults/req"
for r in $(seq 1 "$ROUNDS"); do
    for t in nginx portico floor; do
        case $t in
            nginx) url="http://127.0.0.1:$NGINX/known"; pid=$NGINX_MASTER ;;
            portico) url="http://127.0.0.1:$PORT/known"; pid=$ESP ;;
            floor) url="http://127.0.0.1:$FLOOR_PORT/known"; pid=$FLOOR_PID ;;
        esac
        before=$(ticks "$pid")
        user_before=$(ticks "$pid" user)
        faults_before=$(ticks "$pid" faults)
        out=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "$url")
        after=$(ticks "$pid")
        user_after=$(ticks "$pid" user)
        faults_after=$(ticks "$pid" faults)
        n=$(sed -nE 's/^ *([0-9]+) requests in.*/\1/p' <<<"$out")
        rps=$(sed -nE 's/^Requests\/sec: *([0-9.]+)/\1/p' <<<"$out")
        p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
        printf '%-8s %-8s %10s %9s %14s %13s %12s\n' "$r" "$t" "$rps" "$p99" \
            "$(awk -v a="$after" -v b="$before" -v n="$n" -v hz="$HZ" 'BEGIN { printf "%.1f", (a - b) * 1e6 / hz / n }')" \
            "$(awk -v a="$user_after" -v b="$user_before" -v n="$n" -v hz="$HZ" 'BEGIN { printf "%.1f", (a - b) * 1e6 / hz / n }')" \
            "$(awk -v a="$faults_after" -v b="$faults_before" -v n="$n" 'BEGIN { printf "%.3f", (a - b) / n }')"
    done
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
