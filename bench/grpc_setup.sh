# Sourced by bench/grpc.sh and bench/grpc_callgrind.sh: the Service Control stub (nginx answering
# every call with `{}`), the service config (GetShelf, allow-unregistered, reported) and the
# framed GetShelfRequest{shelf: 100} both measure with. Needs DIR, SC and PKG set and a PIDS
# array; appends nginx's pid to PIDS.
grpc_setup() {
    mkdir -p "$DIR/nginx/logs"
    cat > "$DIR/nginx/nginx.conf" <<NGINX
worker_processes 1;
pid $DIR/nginx/nginx.pid;
error_log $DIR/nginx/logs/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $DIR/nginx/body; proxy_temp_path $DIR/nginx/proxy;
  fastcgi_temp_path $DIR/nginx/fcgi; uwsgi_temp_path $DIR/nginx/uwsgi; scgi_temp_path $DIR/nginx/scgi;
  server { listen 127.0.0.1:$SC; location / { default_type application/json; return 200 "{}"; } }
}
NGINX
    nginx -p "$DIR/nginx" -c "$DIR/nginx/nginx.conf" -g 'daemon off;' &
    PIDS+=($!)
    cat > "$DIR/service.json" <<JSON
{"name": "bench-grpc.example.com", "id": "bench-1",
 "apis": [{"name": "$PKG", "methods": [{"name": "GetShelf"}]}],
 "usage": {"rules": [{"selector": "$PKG.GetShelf", "allowUnregisteredCalls": true}]},
 "control": {"environment": "http://127.0.0.1:$SC"}}
JSON
    # GetShelfRequest{shelf: 100}, framed: flag 0, length 2, field 1 varint 100.
    printf '\x00\x00\x00\x00\x02\x08\x64' > "$DIR/body.bin"
}
