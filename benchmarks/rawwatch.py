"""The raw baseline: an httpx stream client on etcd's watch that only timestamps events.

Usage: rawwatch.py ENDPOINT PREFIX OUT_FILE. Each event appends "time value" to OUT_FILE.
"""

from __future__ import annotations

import base64
import json
import sys
import time

import httpx

endpoint, prefix, out_path = sys.argv[1], sys.argv[2].encode(), sys.argv[3]
end = prefix[:-1] + bytes([prefix[-1] + 1])
request = {"create_request": {"key": base64.b64encode(prefix).decode(), "range_end": base64.b64encode(end).decode()}}
with (
    open(out_path, "a", buffering=1) as out,
    httpx.Client(timeout=None) as client,
    client.stream("POST", endpoint + "/v3/watch", json=request) as resp,
):
    for line in resp.iter_lines():
        now = time.time()
        for event in json.loads(line).get("result", {}).get("events", []):
            value = base64.b64decode(event["kv"].get("value", "")).decode()
            out.write(f"{now:.6f} {value}\n")
