"""What each path of the HTTP endpoint answers: /metrics, /healthz, /readyz, /status.

Independent of HTTP framing (`http.py`), so other front ends and tests can ask directly.
"""

from __future__ import annotations

import json

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from .metrics import GatewayMetrics

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"


async def respond(
    metrics: GatewayMetrics, method: str, target: str, *, status: bool = True
) -> tuple[int, str, bytes]:
    """Status, content type and body for one request; `status=False` hides /status
    (it names client identities and devices) behind a 404."""
    if method not in ("GET", "HEAD"):
        return 405, TEXT, b"GET or HEAD only\n"
    path = target.split("?", 1)[0]
    if path == "/metrics":
        await metrics.check_upstream()  # keeps usbip_gateway_upstream_up current
        return 200, CONTENT_TYPE_PLAIN_0_0_4, metrics.exposition()
    if path == "/healthz":
        return 200, TEXT, b"ok\n"
    if path == "/readyz":
        ready, why = await metrics.ready()
        return (200 if ready else 503), TEXT, f"{why}\n".encode()
    if path == "/status" and status:
        body = json.dumps(metrics.status(), indent=1).encode() + b"\n"
        return 200, JSON, body
    paths = "/metrics, /healthz, /readyz" + (", /status" if status else "")
    return 404, TEXT, f"not found: try {paths}\n".encode()
