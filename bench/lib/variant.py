#!/usr/bin/env python3
"""Writes one variant of lib/openapi-bench.yaml: variant.py {nopolicy|key|quota} SUFFIX [VERSION]"""
import os
import sys

variant, suffix = sys.argv[1], sys.argv[2]
version = sys.argv[3] if len(sys.argv) > 3 else "1.0.0"
here = os.path.dirname(os.path.abspath(__file__))
text = open(os.path.join(here, "openapi-bench.yaml")).read()
security = "      security:\n        - api_key: []\n" if variant in ("key", "quota") else ""
quota_method = (
    "      x-google-quota:\n        metricCosts:\n          bench-requests: 1\n" if variant == "quota" else ""
)
quota_defs = (
    "x-google-management:\n"
    "  metrics:\n"
    "    - name: bench-requests\n"
    "      displayName: Bench requests\n"
    "      valueType: INT64\n"
    "      metricKind: DELTA\n"
    "  quota:\n"
    "    limits:\n"
    "      - name: bench-limit\n"
    "        metric: bench-requests\n"
    "        unit: 1/min/{project}\n"
    "        values:\n"
    "          STANDARD: 1000000000\n"
    if variant == "quota"
    else ""
)
if variant not in ("nopolicy", "key", "quota"):
    sys.exit(f"unknown variant {variant}")
text = (
    text.replace("HOSTSUFFIX", suffix)
    .replace("#SECURITY#\n", security)
    .replace("#QUOTA_METHOD#\n", quota_method)
    .replace("#QUOTA_DEFS#\n", quota_defs)
    .replace('version: "1.0.0"', f'version: "{version}"')
)
sys.stdout.write(text)
