#!/usr/bin/env bash
# Instructions per gRPC unary request (valgrind's callgrind: counts that contention on a shared
# machine does not change), the bare `portico bookstore` next to `portico esp --http2_port
# --backend=grpc://...`, set up as bench/grpc.sh sets them up. Each process runs under
# callgrind; after 300 warm-up calls its counters are zeroed, N calls (h2load -n, default 2000)
# are made, and the counters are dumped: instructions per request = the dump's `summary` / N.
#
#   bench/grpc_callgrind.sh target/release/portico OUTDIR   # then: grep summary OUTDIR/*.1
#   callgrind_annotate --inclusive=yes OUTDIR/proxy.<pid>.1  # where they go
set -euo pipefail
PORTICO=${1:?usage: bench/grpc_callgrind.sh PORTICO OUTDIR}; OUT=${2:?usage: bench/grpc_callgrind.sh PORTICO OUTDIR}; N=${N:-2000}
missing=()
for tool in valgrind callgrind_control h2load nginx python3; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
    echo "bench/grpc_callgrind.sh: missing tools: ${missing[*]}" >&2
    exit 2
fi
mkdir -p "$OUT"
# shellcheck source=lib/common.sh
source "$(dirname "$0")/lib/common.sh"
BOOKS=$(free_port); SC=$(free_port); PROXY=$(free_port); STATUS=$(free_port)
PKG=endpoints.examples.bookstore.Bookstore
source "$(dirname "$0")/grpc_setup.sh"
grpc_setup
load() { h2load -n "$1" -c 4 -m 10 -t 1 -d "$WORK/body.bin" -H 'content-type: application/grpc' -H 'te: trailers' "http://127.0.0.1:$2/$PKG/GetShelf" | grep -E "requests:|status codes"; }
wait_port() { for _ in $(seq 1 600); do (echo > /dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }
measure() { # name port pid
  local name=$1 port=$2 pid=$3
  load 300 "$port" >/dev/null
  callgrind_control -z "$pid" >/dev/null
  load "$N" "$port"
  callgrind_control -d "$name" "$pid" >/dev/null
  sleep 1
}
# 1: bare bookstore under callgrind
valgrind --tool=callgrind --callgrind-out-file="$OUT/books.%p" "$PORTICO" bookstore --port "$BOOKS" >"$WORK/books.log" 2>&1 & BPID=$!; PIDS+=($BPID)
wait_port "$BOOKS"
measure bare "$BOOKS" "$BPID"
kill "$BPID"; wait "$BPID" 2>/dev/null || true
# 2: the proxy under callgrind, bookstore plain
"$PORTICO" bookstore --port "$BOOKS" >"$WORK/books2.log" 2>&1 & PIDS+=($!)
wait_port "$BOOKS"
valgrind --tool=callgrind --callgrind-out-file="$OUT/proxy.%p" "$PORTICO" esp --service_json_path="$WORK/service.json" --http2_port="$PROXY" --status_port="$STATUS" \
    --backend="grpc://127.0.0.1:$BOOKS" --access_log=off >"$WORK/proxy.log" 2>&1 & PPID2=$!; PIDS+=($PPID2)
wait_port "$PROXY"
measure proxy "$PROXY" "$PPID2"
kill "$PPID2"; wait "$PPID2" 2>/dev/null || true
ls -la "$OUT"
