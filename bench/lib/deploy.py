#!/usr/bin/env python3
"""Submits an OpenAPI file to a Portico control plane and rolls it out, the way
`gcloud endpoints services deploy` does (configs:submit, then rollouts). Prints the config id.

usage: deploy.py CONTROL_PLANE_URL ADMIN_TOKEN_FILE SERVICE OPENAPI_FILE
"""
import base64
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

base, token_file, service, openapi = sys.argv[1:5]
token = open(token_file).read().strip()


def call(method, path, body=None):
    req = urllib.request.Request(
        base.rstrip("/") + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        sys.exit(f"{method} {path}: HTTP {e.code}: {e.read().decode(errors='replace')}")


def wait(op):
    deadline = time.time() + 60
    while not op.get("done"):
        if time.time() > deadline:
            sys.exit(f"operation {op.get('name')} did not finish")
        time.sleep(0.2)
        op_id = op["name"].split("/", 1)[1]
        op = call("GET", "/v1/operations/" + urllib.parse.quote(op_id, safe=""))
    if "error" in op:
        sys.exit(f"operation failed: {op['error']}")
    return op.get("response", {})


contents = base64.urlsafe_b64encode(open(openapi, "rb").read()).decode()
resp = wait(
    call(
        "POST",
        f"/v1/services/{service}/configs:submit",
        {
            "configSource": {
                "files": [{"fileContents": contents, "filePath": "openapi.yaml", "fileType": "OPEN_API_YAML"}]
            },
            "validateOnly": False,
        },
    )
)
config_id = resp["serviceConfig"]["id"]
wait(
    call(
        "POST",
        f"/v1/services/{service}/rollouts",
        {"serviceName": service, "trafficPercentStrategy": {"percentages": {config_id: 100.0}}},
    )
)
print(config_id)
