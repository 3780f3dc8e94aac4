#!/usr/bin/env bash
# gRPC unary and HTTP/JSON-transcoded throughput through the proxy, next to the bare Bookstore
# and nginx's grpc_pass, on this machine, loopback only.
#
#   bench/grpc.sh           # BENCH_ROUNDS x 4 targets x BENCH_DURATION s, after a release build
#
# Targets (ports chosen at run time; every one answers GetShelf{shelf: 100}, the Kids shelf):
#   bookstore       h2load → portico bookstore (h2c), the ceiling
#   nginx-grpc      h2load → nginx grpc_pass (h2c listener, upstream keep-alive) → bookstore;
#                   the yardstick a gRPC-aware proxy with no policy reaches here
#   portico-grpc    h2load → portico esp --http2_port --backend=grpc://... → bookstore
#   portico-json    wrk GET /v1/shelves/100 (HTTP/1.1) → the same portico esp's --http_port,
#                   transcoded to GetShelf from the proto's google.api.http rule → bookstore
# The proxy's service config is the one `portico up --grpc` deploys (descriptor set included,
# fetched from its control plane with ?view=FULL), with every method open to unregistered
# callers and Service Control pointed at a stub (nginx answering `{}`), so both Portico targets
# do routing, reporting and (for portico-json) transcoding, and no key check.
# Access logs off. The table gives the median req/s of each target and its ratio to bookstore.
#
# Knobs: BENCH_ROUNDS (3), BENCH_DURATION (8), BENCH_CONNS (50), BENCH_STREAMS (10, h2load -m),
# PORTICO (target/release/portico; BENCH_NO_BUILD=1 skips `cargo build --release`),
# BENCH_KEEP=1 keeps the work directory.
# Nothing is installed: missing tools are named and the script exits 2.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
ROUNDS=${BENCH_ROUNDS:-3}
DURATION=${BENCH_DURATION:-8}
CONNS=${BENCH_CONNS:-50}
STREAMS=${BENCH_STREAMS:-10}
PORTICO=${PORTICO:-$ROOT/target/release/portico}

missing=()
for tool in h2load nginx wrk python3 curl; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
    echo "bench/grpc.sh: missing tools: ${missing[*]} (h2load: apt-get install nghttp2-client)" >&2
    exit 2
fi
if [[ -z "${BENCH_NO_BUILD:-}" && "$PORTICO" == "$ROOT/target/release/portico" ]]; then
    cargo build --release --bin portico --quiet
fi
[[ -x "$PORTICO" ]] || { echo "bench/grpc.sh: $PORTICO not found" >&2; exit 2; }

# shellcheck source=lib/common.sh
source "$ROOT/bench/lib/common.sh"
log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
CORES=$(nproc)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
PKG=endpoints.examples.bookstore.Bookstore

# --- portico up --grpc: the Bookstore and the deployed config ----------------------------------
(cd "$WORK" && exec "$PORTICO" up --grpc --data "$WORK/up" --port 0 --http-port 0 --status-port 0 \
    --backend-port 0 --control-plane-port 0 --access-log off) >"$WORK/up.out" 2>"$WORK/up.err" &
PIDS+=($!)
for _ in $(seq 600); do
    grep -q 'Press Ctrl-C' "$WORK/up.out" 2>/dev/null && break
    kill -0 "${PIDS[-1]}" 2>/dev/null || { cat "$WORK/up.err" >&2; exit 1; }
    sleep 0.1
done
field() { sed -nE "s#$1#\\1#p" "$WORK/up.out" | head -1; }
BOOKS=$(field '^  backend +grpc://127\.0\.0\.1:([0-9]+).*')
CP=$(field '^  control plane +(http://[0-9.:]+).*')
SERVICE=$(field '.*service ([^,]+), config.*')
CONFIG_ID=$(field '.*service [^,]+, config ([^ ]+).*')
TOKEN=$(field '^  admin token +(.*)$')
[[ -n "$BOOKS" && -n "$CP" && -n "$SERVICE" && -n "$CONFIG_ID" && -n "$TOKEN" ]] || {
    echo "bench/grpc.sh: cannot read portico up's output:" >&2
    cat "$WORK/up.out" >&2
    exit 1
}

# --- Service Control stub and nginx grpc_pass ---------------------------------------------------
SC=$(free_port)
start_nginx sc 1 "server { listen 127.0.0.1:$SC; location / { default_type application/json; return 200 '{}'; } }"
NGINX=$(free_port)
# Upstream keep-alive without nginx's default cap of 1,000 calls per backend connection
# (closing one races the calls in flight on it: a rare 502).
start_nginx nginx "$CORES" "upstream bookstore { server 127.0.0.1:$BOOKS; keepalive 512; keepalive_requests 10000000; keepalive_timeout 300s; }
    server { listen 127.0.0.1:$NGINX http2; location / { grpc_pass grpc://bookstore; } }"

# --- the proxy: the deployed config, open to every caller, reporting to the stub -----------------
curl -sf -H "Authorization: Bearer $(cat "$TOKEN")" \
    "$CP/v1/services/$SERVICE/configs/$CONFIG_ID?view=FULL" >"$WORK/deployed.json"
python3 - "$WORK/deployed.json" "$WORK/service.json" "http://127.0.0.1:$SC" <<'EOF'
import json, sys
cfg = json.load(open(sys.argv[1]))
cfg["control"] = {"environment": sys.argv[3]}
# The stored config names every method (its `*` rules were expanded at deploy time).
cfg.setdefault("usage", {})["rules"] = [
    {"selector": f"{api['name']}.{m['name']}", "allowUnregisteredCalls": True}
    for api in cfg.get("apis", []) for m in api.get("methods", [])
]
json.dump(cfg, open(sys.argv[2], "w"))
EOF
PROXY=$(free_port); PROXY_HTTP=$(free_port); STATUS=$(free_port)
"$PORTICO" esp --service_json_path="$WORK/service.json" --http2_port="$PROXY" --http_port="$PROXY_HTTP" \
    --status_port="$STATUS" --backend="grpc://127.0.0.1:$BOOKS" --access_log=off \
    >"$WORK/proxy.log" 2>&1 &
PIDS+=($!)

# GetShelfRequest{shelf: 100}, framed: flag 0, length 2, field 1 varint 100.
printf '\x00\x00\x00\x00\x02\x08\x64' >"$WORK/body.bin"

# One gRPC call; fails unless the answer is HTTP 200, gRPC, status 0 and the Kids shelf.
check_grpc() {
    local port=$1 out
    for _ in $(seq 1 100); do
        out=$(curl -s --http2-prior-knowledge -D - -o "$WORK/resp.bin" \
            -H 'content-type: application/grpc' -H 'te: trailers' --data-binary @"$WORK/body.bin" \
            "http://127.0.0.1:$port/$PKG/GetShelf" 2>/dev/null || true)
        if grep -qi '^HTTP/2 200' <<<"$out" && grep -q Kids "$WORK/resp.bin" 2>/dev/null \
            && grep -qi 'content-type: application/grpc' <<<"$out" \
            && ! grep -qi '^grpc-status: [1-9]' <<<"$out"; then
            return 0
        fi
        sleep 0.1
    done
    echo "bench/grpc.sh: no good gRPC answer on port $port:" >&2
    echo "$out" >&2
    tail -n 20 "$WORK"/*.log "$WORK"/*/error.log >&2 || true
    exit 1
}
check_json() {
    local url=$1 out
    for _ in $(seq 1 100); do
        out=$(curl -s -w ' HTTP=%{http_code}' "$url" 2>/dev/null || true)
        [[ "$out" == *'"theme":"Kids"'*' HTTP=200' ]] && return 0
        sleep 0.1
    done
    echo "bench/grpc.sh: no transcoded answer from $url: $out" >&2
    tail -n 20 "$WORK/proxy.log" >&2
    exit 1
}
check_grpc "$BOOKS"
check_grpc "$NGINX"
check_grpc "$PROXY"
JSON_URL="http://127.0.0.1:$PROXY_HTTP/v1/shelves/100"
check_json "$JSON_URL"
log "bookstore :$BOOKS, nginx-grpc :$NGINX, portico-grpc :$PROXY, portico-json :$PROXY_HTTP"

# req/s of one h2load run; fails on any non-2xx answer or failed request, except through
# nginx: the Bookstore (hyper's HTTP/2 server) resets a few of nginx's upstream connections
# under this load (nginx's log: "recv() failed (104: Connection reset by peer) while reading
# response header from upstream"; a few calls in 10,000, cause not found), so nginx's failed
# calls are counted and printed instead.
run_h2load() {
    local port=$1 out failed non2xx
    out=$(h2load -D "$DURATION" -c "$CONNS" -m "$STREAMS" -t 1 -d "$WORK/body.bin" \
        -H 'content-type: application/grpc' -H 'te: trailers' \
        "http://127.0.0.1:$port/$PKG/GetShelf" 2>&1)
    failed=$(sed -n 's/.* \([0-9]*\) failed.*/\1/p' <<<"$out" | head -1)
    non2xx=$(sed -n 's/^status codes: [0-9]* 2xx, \([0-9]*\) 3xx, \([0-9]*\) 4xx, \([0-9]*\) 5xx.*/\1 \2 \3/p' <<<"$out")
    if [[ "$port" == "$NGINX" ]]; then
        echo "${failed:-0}" >>"$WORK/nginx-failed"
    elif [[ "${failed:-0}" != 0 || "$non2xx" != "0 0 0" ]]; then
        echo "bench/grpc.sh: failures on port $port:" >&2
        echo "$out" >&2
        exit 1
    fi
    sed -n 's/^finished in .*, \([0-9.]*\) req\/s.*/\1/p' <<<"$out"
}
# req/s of one wrk run; fails on any non-2xx answer or socket error.
run_wrk() {
    local out
    out=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" "$1" 2>&1)
    if grep -qE '^ *(Non-2xx|Socket errors)' <<<"$out"; then
        echo "bench/grpc.sh: failures on $1:" >&2
        echo "$out" >&2
        exit 1
    fi
    sed -nE 's/^Requests\/sec: *([0-9.]+).*/\1/p' <<<"$out"
}

# Warm every path.
h2load -n 2000 -c 10 -m 10 -t 1 -d "$WORK/body.bin" -H 'content-type: application/grpc' \
    "http://127.0.0.1:$PROXY/$PKG/GetShelf" >/dev/null 2>&1 || true
wrk -t1 -c10 -d1s "$JSON_URL" >/dev/null

declare -a BARE=() NGX=() PROX=() JSON=()
for r in $(seq 1 "$ROUNDS"); do
    BARE+=("$(run_h2load "$BOOKS")")
    NGX+=("$(run_h2load "$NGINX")")
    PROX+=("$(run_h2load "$PROXY")")
    JSON+=("$(run_wrk "$JSON_URL")")
    log "round $r: bookstore ${BARE[-1]}, nginx-grpc ${NGX[-1]}, portico-grpc ${PROX[-1]}, portico-json ${JSON[-1]} req/s"
done

echo
echo "Portico gRPC benchmark — $(date -u '+%Y-%m-%d %H:%M UTC'), $CORES cores, tree $(git log -1 --format=%h 2>/dev/null || echo unknown)"
echo "load average at start: $LOAD_START, at end: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "${BARE[*]}" "${NGX[*]}" "${PROX[*]}" "${JSON[*]}" "$CONNS" "$STREAMS" "$DURATION" <<'EOF'
import statistics, sys
series = [[float(x) for x in a.split()] for a in sys.argv[1:5]]
conns, streams, duration = sys.argv[5:8]
names = ["bookstore", "nginx-grpc", "portico-grpc", "portico-json"]
how = [f"h2load -c {conns} -m {streams}"] * 3 + [f"wrk -c {conns}, HTTP/1.1"]
bare = statistics.median(series[0])
print(f"GetShelf, {duration} s per run, {len(series[0])} round(s), medians")
print(f"{'target':<14} {'load':<22} {'req/s':>9} {'x bookstore':>12}")
for n, h, s in zip(names, how, series):
    m = statistics.median(s)
    print(f"{n:<14} {h:<22} {m:>9.0f} {m / bare:>12.2f}")
ngx, prox = statistics.median(series[1]), statistics.median(series[2])
print(f"portico-grpc / nginx-grpc: {prox / ngx:.2f}")
EOF
echo "nginx-grpc failed calls (all rounds): $(awk '{s += $1} END {print s + 0}' "$WORK/nginx-failed")"
