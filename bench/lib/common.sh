# Shell helpers shared by the proxy benchmarks (sourced, not run). Sourcing creates WORK (a
# scratch directory) and PIDS (processes to stop on exit), and stops them and removes WORK on
# exit (BENCH_KEEP=1 keeps WORK).

WORK=$(mktemp -d "${TMPDIR:-/tmp}/portico-bench.XXXXXX")
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do
        kill -INT "$p" 2>/dev/null || true
    done
    for p in "${PIDS[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$p" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$p" 2>/dev/null || true
    done
    if [[ -z "${BENCH_KEEP:-}" ]]; then rm -rf "$WORK"; else echo "bench: kept $WORK" >&2; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_http() { # URL [expected status] — until the URL answers (any status unless given)
    local url=$1 want=${2:-} code
    for _ in $(seq 300); do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url" || true)
        if [[ "$code" != 000 && ( -z "$want" || "$code" == "$want" ) ]]; then return 0; fi
        sleep 0.1
    done
    echo "bench: $url did not answer${want:+ $want} in 30 s" >&2
    return 1
}

start_nginx() { # NAME WORKERS HTTP_BODY (the http{} contents); runs in $WORK/NAME
    local dir="$WORK/$1"
    mkdir -p "$dir/tmp"
    cat >"$dir/nginx.conf" <<NGX
worker_processes $2;
error_log $dir/error.log warn;
pid $dir/nginx.pid;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    keepalive_requests 10000000;
    $3
}
NGX
    nginx -p "$dir" -c "$dir/nginx.conf" -g 'daemon off;' &
    PIDS+=($!)
}

backend_server() { # PORT — the fixed-body backend every proxy benchmark stands in front of
    printf "server { listen 127.0.0.1:%s; location / { default_type application/json; return 200 '{\"message\":\"hello world\"}\\\\n'; } }" "$1"
}

nginx_proxy_conf() { # BACKEND_PORT LISTEN_PORT — plain proxy_pass with upstream keep-alive
    printf 'upstream backend { server 127.0.0.1:%s; keepalive 512; }
    server { listen 127.0.0.1:%s; location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; } }' "$1" "$2"
}

start_up() { # NAME VARIANT — `portico up` (BIN) with lib/variant.py's VARIANT in front of
    # BACKEND_PORT; its banner lands in $WORK/up-NAME.out (read it with `field`)
    local name=$1 variant=$2
    python3 "$(dirname "${BASH_SOURCE[0]}")/variant.py" "$variant" "$name" >"$WORK/$name.yaml"
    (cd "$WORK" && exec "$BIN" up --data "$WORK/$name" --project bench-proj \
        --openapi "$WORK/$name.yaml" --backend "127.0.0.1:$BACKEND_PORT" \
        --port 0 --status-port 0 --control-plane-port 0 --access-log off) \
        >"$WORK/up-$name.out" 2>"$WORK/up-$name.err" &
    PIDS+=($!)
    for _ in $(seq 600); do
        grep -q 'Press Ctrl-C' "$WORK/up-$name.out" 2>/dev/null && return 0
        if ! kill -0 "${PIDS[-1]}" 2>/dev/null; then break; fi
        sleep 0.1
    done
    echo "bench: portico up ($name) did not start:" >&2
    cat "$WORK/up-$name.err" >&2
    return 1
}

field() { # FILE REGEX — first capture group
    sed -nE "s#$2#\\1#p" "$1" | head -1
}
