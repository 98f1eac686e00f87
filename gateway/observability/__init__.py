"""Metrics, health and status: what each gateway tells about itself.

`metrics.GatewayMetrics` holds one gateway's Prometheus registry and live sessions;
`http.serve_http` serves /metrics, /healthz, /readyz and /status from the same Trio
loop. `series` and `rtt` are the per-URB accounting on the relay's hot path.
"""
