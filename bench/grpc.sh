#!/usr/bin/env bash
# gRPC unary throughput through the proxy next to the bare Bookstore, on this machine, loopback
# only. h2load (Debian's nghttp2-client) POSTs a framed GetShelfRequest{shelf: 100} with
# content-type application/grpc; every answer is HTTP 200 with the shelf and grpc-status 0
# (checked once per target before measuring).
#
#   bench/grpc.sh           # BENCH_ROUNDS x 2 targets x BENCH_DURATION s, after a release build
#
# Targets (ports chosen at run time):
#   bookstore       h2load → portico bookstore (h2c), the ceiling
#   portico-grpc    h2load → portico esp --http2_port --backend=grpc://... → bookstore; the
#                   method is matched on its gRPC path (allow-unregistered) and reported to a
#                   Service Control stub (nginx answering `:report` with `{}`)
# Access log off. The table gives the median req/s of each target and the ratio portico/bare.
#
# Knobs: BENCH_ROUNDS (3), BENCH_DURATION (8), BENCH_CONNS (50), BENCH_STREAMS (10, h2load -m),
# PORTICO (target/release/portico; BENCH_NO_BUILD=1 skips `cargo build --release`).
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
for tool in h2load nginx python3 curl; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
    echo "bench/grpc.sh: missing tools: ${missing[*]} (h2load: apt-get install nghttp2-client)" >&2
    exit 2
fi
if [[ -z "${BENCH_NO_BUILD:-}" && "$PORTICO" == "$ROOT/target/release/portico" ]]; then
    cargo build --release --quiet
fi
[[ -x "$PORTICO" ]] || { echo "bench/grpc.sh: $PORTICO not found" >&2; exit 2; }

DIR=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [[ -n "${BENCH_KEEP:-}" ]] && echo "kept $DIR" || rm -rf "$DIR"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
BOOKS=$(free_port); SC=$(free_port); PROXY=$(free_port); STATUS=$(free_port)
PKG=endpoints.examples.bookstore.Bookstore

# Service Control stub, service config, request body.
source "$ROOT/bench/grpc_setup.sh"
grpc_setup

"$PORTICO" bookstore --port "$BOOKS" >"$DIR/bookstore.log" 2>&1 &
PIDS+=($!)

"$PORTICO" esp --service_json_path="$DIR/service.json" --http2_port="$PROXY" --status_port="$STATUS" \
    --backend="grpc://127.0.0.1:$BOOKS" --access_log=off >"$DIR/proxy.log" 2>&1 &
PIDS+=($!)


# One call; fails unless the answer is HTTP 200, gRPC, status 0 and the Kids shelf.
check() {
    local port=$1 out
    for _ in $(seq 1 100); do
        out=$(curl -s --http2-prior-knowledge -D - -o "$DIR/resp.bin" \
            -H 'content-type: application/grpc' -H 'te: trailers' --data-binary @"$DIR/body.bin" \
            "http://127.0.0.1:$port/$PKG/GetShelf" 2>/dev/null || true)
        if grep -qi '^HTTP/2 200' <<<"$out" && grep -q Kids "$DIR/resp.bin" 2>/dev/null \
            && grep -qi 'content-type: application/grpc' <<<"$out"; then
            return 0
        fi
        sleep 0.1
    done
    echo "bench/grpc.sh: no good answer on port $port:" >&2
    echo "$out" >&2
    tail -n 20 "$DIR"/*.log >&2
    exit 1
}
check "$BOOKS"
check "$PROXY"

# req/s of one h2load run; fails on any non-2xx answer or failed request.
run() {
    local port=$1 out
    out=$(h2load -D "$DURATION" -c "$CONNS" -m "$STREAMS" -t 1 -d "$DIR/body.bin" \
        -H 'content-type: application/grpc' -H 'te: trailers' \
        "http://127.0.0.1:$port/$PKG/GetShelf" 2>&1)
    local failed non2xx
    failed=$(sed -n 's/.* \([0-9]*\) failed.*/\1/p' <<<"$out" | head -1)
    non2xx=$(sed -n 's/^status codes: [0-9]* 2xx, \([0-9]*\) 3xx, \([0-9]*\) 4xx, \([0-9]*\) 5xx.*/\1 \2 \3/p' <<<"$out")
    if [[ "${failed:-0}" != 0 || "$non2xx" != "0 0 0" ]]; then
        echo "bench/grpc.sh: failures on port $port:" >&2
        echo "$out" >&2
        exit 1
    fi
    sed -n 's/^finished in .*, \([0-9.]*\) req\/s.*/\1/p' <<<"$out"
}

declare -a BARE=() PROX=()
for r in $(seq 1 "$ROUNDS"); do
    BARE+=("$(run "$BOOKS")")
    PROX+=("$(run "$PROXY")")
    echo "round $r: bookstore ${BARE[-1]} req/s, portico-grpc ${PROX[-1]} req/s" >&2
done

python3 - "${BARE[*]}" "${PROX[*]}" "$CONNS" "$STREAMS" "$DURATION" "$(nproc)" <<'EOF'
import statistics, sys
bare = [float(x) for x in sys.argv[1].split()]
prox = [float(x) for x in sys.argv[2].split()]
conns, streams, duration, cores = sys.argv[3:7]
b, p = statistics.median(bare), statistics.median(prox)
print(f"gRPC unary GetShelf, h2load -c {conns} -m {streams} -t 1 -D {duration}, {len(bare)} round(s), {cores} cores")
print(f"{'target':<14} {'req/s (median)':>15}")
print(f"{'bookstore':<14} {b:>15.0f}")
print(f"{'portico-grpc':<14} {p:>15.0f}")
print(f"ratio portico-grpc / bookstore: {p / b:.2f}")
EOF
