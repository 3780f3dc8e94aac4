#!/usr/bin/env bash
# `portico esp` next to nginx as a reverse proxy, measured with wrk on loopback.
#
# Scenarios (each line printed: `<scenario> <requests/s> req/s (<wrk latency avg>)`):
#   backend_direct   wrk → backend (an nginx `return 200`), the ceiling
#   nginx_proxy      wrk → nginx proxy_pass (keepalive upstream) → backend: the yardstick
#   portico_plain    wrk → portico esp, config without Service Control/auth (ESP declines:
#                    proxied untouched) → backend
#   portico_managed  wrk → portico esp, GET /shelves matched (allow-unregistered), reported to a
#                    Service Control peer (an nginx location answering `:report` with `{}`) → backend
# Access log off for portico (nginx's access_log off too), one worker thread/process per core.
#
# Usage: bench/proxy.sh    (PORTICO=path/to/portico, default target/release/portico)
# Env:   DURATION (10s), CONNECTIONS (50), THREADS (2).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PORTICO="${PORTICO:-$ROOT/target/release/portico}"
DURATION="${DURATION:-10s}"
CONNECTIONS="${CONNECTIONS:-50}"
THREADS="${THREADS:-2}"
for tool in wrk curl nginx python3; do
  command -v "$tool" >/dev/null || { echo "bench/proxy.sh: $tool is required" >&2; exit 2; }
done
[[ -x "$PORTICO" ]] || { echo "bench/proxy.sh: $PORTICO not found (cargo build --release)" >&2; exit 2; }

DIR="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$DIR"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
BACKEND=$(free_port); NGINX_PROXY=$(free_port); SC=$(free_port)
P_PLAIN=$(free_port); S_PLAIN=$(free_port); P_MANAGED=$(free_port); S_MANAGED=$(free_port)
CORES=$(nproc)

mkdir -p "$DIR/nginx/logs"
cat > "$DIR/nginx/nginx.conf" <<EOF
worker_processes $CORES;
pid $DIR/nginx/nginx.pid;
error_log $DIR/nginx/logs/error.log warn;
events { worker_connections 10240; }
http {
  access_log off;
  client_body_temp_path $DIR/nginx/body; proxy_temp_path $DIR/nginx/proxy;
  fastcgi_temp_path $DIR/nginx/fcgi; uwsgi_temp_path $DIR/nginx/uwsgi; scgi_temp_path $DIR/nginx/scgi;
  upstream backend { server 127.0.0.1:$BACKEND; keepalive 128; }
  server { listen 127.0.0.1:$BACKEND; location / { return 200 "ok\n"; } }
  server { listen 127.0.0.1:$SC; location / { default_type application/json; return 200 "{}"; } }
  server {
    listen 127.0.0.1:$NGINX_PROXY;
    location / {
      proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header Host \$host; proxy_set_header X-Real-IP \$remote_addr;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    }
  }
}
EOF
nginx -p "$DIR/nginx" -c "$DIR/nginx/nginx.conf" -g 'daemon off;' &
PIDS+=($!)

cat > "$DIR/plain.json" <<EOF
{"name": "bench.example.com", "id": "bench-1", "http": {"rules": [{"selector": "b.List", "get": "/shelves"}]}}
EOF
cat > "$DIR/managed.json" <<EOF
{"name": "bench.example.com", "id": "bench-1",
 "http": {"rules": [{"selector": "b.List", "get": "/shelves"}]},
 "usage": {"rules": [{"selector": "b.List", "allowUnregisteredCalls": true}]},
 "control": {"environment": "http://127.0.0.1:$SC"}}
EOF
"$PORTICO" esp --service_json_path="$DIR/plain.json" --http_port="$P_PLAIN" --status_port="$S_PLAIN" \
  --backend="127.0.0.1:$BACKEND" --access_log=off 2>"$DIR/plain.log" &
PIDS+=($!)
"$PORTICO" esp --service_json_path="$DIR/managed.json" --http_port="$P_MANAGED" --status_port="$S_MANAGED" \
  --backend="127.0.0.1:$BACKEND" --access_log=off 2>"$DIR/managed.log" &
PIDS+=($!)

wait_up() {
  for _ in $(seq 1 100); do curl -fs -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "bench/proxy.sh: $1 never came up" >&2; cat "$DIR"/*.log >&2; exit 1
}
wait_up "http://127.0.0.1:$BACKEND/"
wait_up "http://127.0.0.1:$NGINX_PROXY/"
wait_up "http://127.0.0.1:$S_PLAIN/healthz"
wait_up "http://127.0.0.1:$S_MANAGED/healthz"
wait_up "http://127.0.0.1:$P_MANAGED/shelves"

run() {
  local name=$1 url=$2 out
  out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$url")
  local rps lat
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  lat=$(awk '/^    Latency/ {print $2; exit}' <<<"$out")
  local errs
  errs=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
  echo "$name $rps req/s ($lat) $errs"
}
run backend_direct "http://127.0.0.1:$BACKEND/shelves"
run nginx_proxy "http://127.0.0.1:$NGINX_PROXY/shelves"
run portico_plain "http://127.0.0.1:$P_PLAIN/shelves"
run portico_managed "http://127.0.0.1:$P_MANAGED/shelves"
echo "reports: $(curl -s "http://127.0.0.1:$S_MANAGED/metrics" | grep -E '^portico_proxy_service_control_report_(calls|requests|operations)_total' | tr '\n' ' ')"
