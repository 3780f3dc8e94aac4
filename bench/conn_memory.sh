#!/usr/bin/env bash
# Memory per keep-alive connection of `portico esp` without Service Control.
#
# Starts a backend (nginx, 1 worker, fixed body) and `portico esp` (passthrough fixture,
# --access_log=off), then reads the proxy's VmRSS (/proc/PID/status):
#   start       after one request
#   busy        while `wrk -t2 -c$CONNS -d${DURATION}s` holds $CONNS keep-alive connections
#   after_busy  2 s after wrk stops (connections closed)
#   idle        while a Python client holds $CONNS connections open after one request each
#               (per-connection cost without request churn)
#   after_idle  2 s after those sockets close
# and how many connections the proxy holds open to the backend while busy and while idle.
# Usage: bench/conn_memory.sh [extra `portico esp` flags...]
#   env: BIN (default target/release/portico), CONNS (1000), DURATION (10), ROUNDS (1),
#        PORTICO_ENV (e.g. "MIMALLOC_PURGE_DELAY=0") passed to the proxy only.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/portico}
CONNS=${CONNS:-1000}
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-1}
# shellcheck source=lib/common.sh
source bench/lib/common.sh
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

rss_mib() { awk '/^VmRSS:/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }

BACKEND_PORT=$(free_port)
start_nginx backend 1 "$(backend_server "$BACKEND_PORT")"
wait_http "http://127.0.0.1:$BACKEND_PORT/" 200

PORT=$(free_port)
STATUS=$(free_port)
env ${PORTICO_ENV:-} "$BIN" esp --service_json_path=crates/proxy/tests/fixtures/passthrough.json \
    --http_port="$PORT" --status_port="$STATUS" --backend="127.0.0.1:$BACKEND_PORT" \
    --access_log=off "$@" >"$WORK/esp.log" 2>&1 &
ESP=$!
PIDS+=($ESP)
wait_http "http://127.0.0.1:$PORT/known" 200

cat >"$WORK/idle.py" <<'PY'
import socket, sys, time
port, n, hold = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
req = b"GET /known HTTP/1.1\r\nHost: bench\r\n\r\n"
socks = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(req)
    socks.append(s)
for s in socks:
    s.settimeout(10)
    got = b""
    while b"hello world" not in got:
        chunk = s.recv(4096)
        if not chunk:
            sys.exit("connection closed before the response")
        got += chunk
print("ready", flush=True)
time.sleep(hold)
PY

echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg); flags: ${*:-none}; env: ${PORTICO_ENV:-none}"
echo "round start busy after_busy idle after_idle (MiB VmRSS) | upstream connections busy/idle | wrk"
for r in $(seq 1 "$ROUNDS"); do
    start=$(rss_mib "$ESP")
    wrk -t2 -c"$CONNS" -d"${DURATION}s" "http://127.0.0.1:$PORT/known" >"$WORK/wrk.txt" 2>&1 &
    WRK=$!
    sleep $((DURATION * 7 / 10))
    busy=$(rss_mib "$ESP")
    up_busy=$(ss -Htn state established "( dport = :$BACKEND_PORT )" | wc -l)
    wait "$WRK"
    sleep 2
    after_busy=$(rss_mib "$ESP")
    python3 "$WORK/idle.py" "$PORT" "$CONNS" 4 >"$WORK/idle.txt" &
    IDLE=$!
    for _ in $(seq 1 300); do grep -q ready "$WORK/idle.txt" 2>/dev/null && break; sleep 0.1; done
    sleep 1
    idle=$(rss_mib "$ESP")
    up_idle=$(ss -Htn state established "( dport = :$BACKEND_PORT )" | wc -l)
    wait "$IDLE"
    sleep 2
    after_idle=$(rss_mib "$ESP")
    echo "$r $start $busy $after_busy $idle $after_idle | $up_busy/$up_idle | $(grep -E 'Requests/sec' "$WORK/wrk.txt" | tr -s ' ')"
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
