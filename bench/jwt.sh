#!/usr/bin/env bash
# JWT-authenticated requests next to API-key requests through `portico esp`, measured with wrk.
#
# It runs `portico up` (control plane + echo + proxy on loopback, ports picked here) in a temp
# dir, then measures:
#   jwt_cached   GET  /auth/info/googlejwt with one RS256 JWT signed by the up's service-account
#                key (kid = private_key_id, keys from the control plane's
#                /service_accounts/v1/jwk/<email>); after the first request the proxy answers
#                from its verified-token cache, so this is the steady state of a hot token.
#   api_key      POST /echo?key=<API key> (check cached in the proxy).
#   direct_*     the same two requests sent straight to the echo backend (the JWT one with the
#                X-Endpoint-API-UserInfo header the proxy produced), as the no-proxy baseline.
# Each line printed is `<scenario> <requests/s> req/s (<wrk latency avg>)`.
#
# Usage: bench/jwt.sh            (PORTICO=path/to/portico, default target/release/portico)
# Env:   DURATION (10s), CONNECTIONS (32), THREADS (2), PORTICO.
# Needs: wrk, curl, jq, openssl. Everything listens on 127.0.0.1 only.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PORTICO="${PORTICO:-$ROOT/target/release/portico}"
DURATION="${DURATION:-10s}"
CONNECTIONS="${CONNECTIONS:-32}"
THREADS="${THREADS:-2}"

for tool in wrk curl jq openssl; do
  command -v "$tool" >/dev/null || { echo "bench/jwt.sh: $tool is required" >&2; exit 2; }
done
if [[ ! -x "$PORTICO" ]]; then
  echo "bench/jwt.sh: $PORTICO not found; build it (cargo build --release) or set PORTICO" >&2
  exit 2
fi

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

WORK="$(mktemp -d)"
UP_PID=""
cleanup() {
  if [[ -n "$UP_PID" ]] && kill -0 "$UP_PID" 2>/dev/null; then
    kill -TERM "$UP_PID" 2>/dev/null || true
    wait "$UP_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

PROXY_PORT="$(free_port)"
CP_PORT="$(free_port)"
ECHO_PORT="$(free_port)"
STATUS_PORT="$(free_port)"
"$PORTICO" up --data "$WORK/data" --port "$PROXY_PORT" --control-plane-port "$CP_PORT" \
  --backend-port "$ECHO_PORT" --status-port "$STATUS_PORT" >"$WORK/up.out" 2>"$WORK/up.err" &
UP_PID=$!

for _ in $(seq 1 600); do
  grep -q "Portico is up" "$WORK/up.out" 2>/dev/null && break
  kill -0 "$UP_PID" 2>/dev/null || { echo "portico up exited:" >&2; cat "$WORK/up.err" >&2; exit 1; }
  sleep 0.2
done
grep -q "Portico is up" "$WORK/up.out" || { echo "portico up did not come up in 120 s" >&2; exit 1; }

PROXY="http://127.0.0.1:$PROXY_PORT"
CP="http://127.0.0.1:$CP_PORT"
ADMIN="$(cat "$WORK/data/admin-token")"

# The API key `up` created, read back through API Keys v2 (getKeyString).
KEY_NAME="$(jq -r .api_key_name "$WORK/data/state.json")"
API_KEY="$(curl -sf -H "Authorization: Bearer $ADMIN" "$CP/v2/$KEY_NAME/keyString" | jq -r .keyString)"

# A JWT for the sample's google_jwt provider, signed with the up's service-account key.
KEYFILE="$WORK/data/service-account-creds.json"
jq -r .private_key "$KEYFILE" >"$WORK/sa.pem"
KID="$(jq -r .private_key_id "$KEYFILE")"
EMAIL="$(jq -r .client_email "$KEYFILE")"
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
NOW="$(date +%s)"
HEADER="$(printf '{"alg":"RS256","typ":"JWT","kid":"%s"}' "$KID" | b64url)"
PAYLOAD="$(printf '{"iss":"jwt-client.endpoints.sample.google.com","sub":"%s","email":"%s","aud":"echo.endpoints.sample.google.com","iat":%s,"exp":%s}' \
  "$EMAIL" "$EMAIL" "$NOW" "$((NOW + 3600))" | b64url)"
SIG="$(printf '%s.%s' "$HEADER" "$PAYLOAD" | openssl dgst -sha256 -sign "$WORK/sa.pem" | b64url)"
JWT="$HEADER.$PAYLOAD.$SIG"

# Both must succeed before anything is measured.
code="$(curl -s -o "$WORK/jwt.body" -w '%{http_code}' -H "Authorization: Bearer $JWT" "$PROXY/auth/info/googlejwt")"
[[ "$code" == 200 ]] || { echo "JWT request failed: HTTP $code: $(cat "$WORK/jwt.body")" >&2; exit 1; }
code="$(curl -s -o "$WORK/key.body" -w '%{http_code}' -H 'content-type: application/json' \
  --data '{"message":"hello"}' "$PROXY/echo?key=$API_KEY")"
[[ "$code" == 200 ]] || { echo "API-key request failed: HTTP $code: $(cat "$WORK/key.body")" >&2; exit 1; }

cat >"$WORK/post.lua" <<'EOF'
wrk.method = "POST"
wrk.body = '{"message":"hello"}'
wrk.headers["Content-Type"] = "application/json"
EOF

# wrk's non-2xx count is checked so that a run of errors never reads as throughput.
run() {
  local name="$1"; shift
  local out
  out="$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$@")"
  if grep -q "Non-2xx" <<<"$out"; then
    echo "$name: non-2xx responses during the run:" >&2
    echo "$out" >&2
    exit 1
  fi
  local rps lat
  rps="$(awk '/Requests\/sec/ {print $2}' <<<"$out")"
  lat="$(awk '/^ +Latency/ {print $2; exit}' <<<"$out")"
  echo "$name $rps req/s (latency avg $lat)"
}

echo "# $PORTICO (git $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')), wrk -t$THREADS -c$CONNECTIONS -d$DURATION, $(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg)"
# The user info header exactly as the proxy builds it (echo answers with its decoded JSON).
USERINFO="$(jq -cj . "$WORK/jwt.body" | openssl base64 -A | tr '+/' '-_')"
ECHO="http://127.0.0.1:$ECHO_PORT"
run jwt_cached -H "Authorization: Bearer $JWT" "$PROXY/auth/info/googlejwt"
run direct_auth_info -H "X-Endpoint-API-UserInfo: $USERINFO" "$ECHO/auth/info/googlejwt"
run api_key -s "$WORK/post.lua" "$PROXY/echo?key=$API_KEY"
run direct_echo -s "$WORK/post.lua" "$ECHO/echo"
