#!/usr/bin/env python3
"""Latency of Portico's identity hot paths against a running control plane.

usage: bench/identity_tokens.py KEY_FILE [N]

KEY_FILE is a key file issued by the control plane (`gcloud iam service-accounts keys create`);
its token_uri names the control plane. Measures, sequentially over one keep-alive connection:
  1. N OAuth2 JWT-bearer grants at token_uri (each assertion signed here, unique `jti`);
  2. N authenticated GETs with the issued access token;
  3. N authenticated GETs with an ESP-style self-signed JWT (verified once, then cached).
The GET is /v1/projects/<project>/serviceAccounts, which a service account without a project
role is refused with 403 — the authentication work is the same either way. Prints p50/p99/mean.
Needs python3 `cryptography`. For throughput, feed the printed tokens to wrk.
"""
import base64
import http.client
import json
import statistics
import sys
import time
import urllib.parse
import uuid

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(key, kid: str, claims: dict) -> str:
    header = b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": kid}).encode())
    payload = b64(json.dumps(claims).encode())
    signing_input = f"{header}.{payload}".encode()
    sig = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return f"{header}.{payload}.{b64(sig)}"


def summary(name: str, samples: list) -> None:
    ms = sorted(s * 1000 for s in samples)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    print(f"{name}: n={len(ms)} p50={statistics.median(ms):.2f} ms "
          f"p99={p99:.2f} ms mean={statistics.fmean(ms):.2f} ms")


def main() -> None:
    key_file = json.load(open(sys.argv[1]))
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    key = serialization.load_pem_private_key(key_file["private_key"].encode(), None)
    url = urllib.parse.urlparse(key_file["token_uri"])
    base = f"{url.scheme}://{url.netloc}"
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    email, kid = key_file["client_email"], key_file["private_key_id"]

    grants, token = [], None
    for _ in range(n):
        now = int(time.time())
        assertion = sign(key, kid, {
            "iss": email, "aud": key_file["token_uri"], "iat": now, "exp": now + 600,
            "scope": "https://www.googleapis.com/auth/cloud-platform", "jti": str(uuid.uuid4()),
        })
        body = urllib.parse.urlencode({
            "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion,
        })
        t = time.perf_counter()
        conn.request("POST", url.path, body,
                     {"content-type": "application/x-www-form-urlencoded"})
        resp = conn.getresponse()
        data = resp.read()
        grants.append(time.perf_counter() - t)
        if resp.status != 200:
            sys.exit(f"grant failed: {resp.status} {data!r}")
        token = json.loads(data)["access_token"]
    summary("POST /token (JWT-bearer grant round trip; client signing not timed)", grants)

    path = f"/v1/projects/{key_file['project_id']}/serviceAccounts"
    now = int(time.time())
    self_signed = sign(key, kid, {
        "iss": email, "sub": email, "iat": now, "exp": now + 3600,
        "aud": f"{base}/google.api.servicemanagement.v1.ServiceManager",
    })
    for name, bearer in (("GET with access token", token), ("GET with self-signed JWT", self_signed)):
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            conn.request("GET", path, headers={"authorization": f"Bearer {bearer}"})
            resp = conn.getresponse()
            resp.read()
            samples.append(time.perf_counter() - t)
            if resp.status not in (200, 403):
                sys.exit(f"{name}: unexpected {resp.status}")
        summary(name, samples)
    print(f"ACCESS_TOKEN={token}")
    print(f"SELF_SIGNED={self_signed}")


if __name__ == "__main__":
    main()
