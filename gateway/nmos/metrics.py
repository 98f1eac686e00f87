"""The Node's metrics, on the gateway's own registry (served at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from gateway.observability.metrics import PREFIX, GatewayMetrics

# The statuses the APIs refuse with; any other is counted as "other".
REFUSALS = ("400", "404", "405", "413", "423", "500", "other")


class NmosMetrics:
    def __init__(self, metrics: GatewayMetrics) -> None:
        registry, role = metrics.registry, metrics.role
        refused = Counter(
            f"{PREFIX}nmos_requests_refused",
            "NMOS API requests refused, by HTTP status (each also logged with the reason).",
            ["role", "status"],
            registry=registry,
        )
        self._refused = {s: refused.labels(role, s) for s in REFUSALS}
        self.activations = Counter(
            f"{PREFIX}nmos_activations",
            "IS-05 activations of this Node's Sender or Receiver.",
            ["role"],
            registry=registry,
        ).labels(role)
        self.registered = Gauge(
            f"{PREFIX}nmos_registered",
            "1 while the Node is registered with a Registration API.",
            ["role"],
            registry=registry,
        ).labels(role)
        self.registry_failures = Counter(
            f"{PREFIX}nmos_registry_failures",
            "Registration APIs left for the next: no answer, a 5xx, or a refusal.",
            ["role"],
            registry=registry,
        ).labels(role)

    def refused(self, status: int) -> None:
        key = str(status)
        self._refused[key if key in self._refused else "other"].inc()
