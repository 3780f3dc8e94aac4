# Sourced by bench/grpc_callgrind.sh after lib/common.sh: the Service Control stub (nginx
# answering every call with `{}`), the service config (GetShelf, allow-unregistered, reported)
# and the framed GetShelfRequest{shelf: 100} it measures with. Needs SC and PKG set; writes
# into $WORK and appends nginx's pid to PIDS (lib/common.sh's start_nginx).
grpc_setup() {
    start_nginx sc 1 "server { listen 127.0.0.1:$SC; location / { default_type application/json; return 200 '{}'; } }"
    cat > "$WORK/service.json" <<JSON
{"name": "bench-grpc.example.com", "id": "bench-1",
 "apis": [{"name": "$PKG", "methods": [{"name": "GetShelf"}]}],
 "usage": {"rules": [{"selector": "$PKG.GetShelf", "allowUnregisteredCalls": true}]},
 "control": {"environment": "http://127.0.0.1:$SC"}}
JSON
    # GetShelfRequest{shelf: 100}, framed: flag 0, length 2, field 1 varint 100.
    printf '\x00\x00\x00\x00\x02\x08\x64' > "$WORK/body.bin"
}
