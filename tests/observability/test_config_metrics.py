"""The [metrics] section and its flags."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.cli import _overrides, build_parser
from gateway.config import Address, ConfigError, MetricsSettings, client_config, merge

from ..pkitools import PKI


def _client(pki: PKI, **metrics: Any) -> dict[str, Any]:
    return {
        "client": {"server": "gw.example:3240"},
        "tls": {"cert": str(pki.client_cert), "key": str(pki.client_key), "ca": str(pki.ca_pem)},
        "metrics": metrics,
    }


def test_defaults_are_off_and_unlabelled(pki: PKI) -> None:
    config = client_config(_client(pki))
    assert config.metrics == MetricsSettings()
    assert config.metrics.listen is None
    assert config.metrics.device_label == "none"


def test_metrics_section(pki: PKI) -> None:
    config = client_config(
        _client(
            pki,
            listen="127.0.0.1",
            device_label="vidpid",
            device_label_limit=8,
            enabled=False,
            upstream_check_interval=2.5,
            status=False,
            status_listen="127.0.0.1:9242",
            idle_timeout=1.5,
        )
    )
    assert config.metrics == MetricsSettings(
        listen=Address("127.0.0.1", 9240),
        enabled=False,
        device_label="vidpid",
        device_label_limit=8,
        upstream_check_interval=2.5,
        status=False,
        status_listen=Address("127.0.0.1", 9242),
        idle_timeout=1.5,
    )


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ({"device_label": "serial"}, "metrics.device_label: 'serial' is not one of"),
        ({"enabled": "yes"}, "metrics.enabled: must be true or false"),
        ({"listen": "[::1"}, "metrics.listen:"),
        ({"device_label_limit": 0}, "metrics.device_label_limit: 0 is outside"),
        ({"lisen": "127.0.0.1:9240"}, "metrics.lisen: unknown key"),
        ({"status": "off"}, "metrics.status: must be true or false"),
        ({"idle_timeout": 0}, "metrics.idle_timeout: must be greater than 0"),
    ],
)
def test_errors_name_the_key(pki: PKI, metrics: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        client_config(_client(pki, **metrics))


def test_flags(pki: PKI) -> None:
    args = build_parser().parse_args(
        ["client", "--metrics-listen", "[::1]:9999", "--metrics-device-label", "busid"]
    )
    config = client_config(merge(_client(pki), _overrides("client", args)))
    assert config.metrics.listen == Address("::1", 9999)
    assert config.metrics.device_label == "busid"
    assert config.metrics.status  # on unless asked


def test_status_flags(pki: PKI) -> None:
    args = build_parser().parse_args(
        ["client", "--metrics-no-status", "--metrics-status-listen", "127.0.0.1:9242"]
    )
    config = client_config(merge(_client(pki), _overrides("client", args)))
    assert config.metrics.status is False
    assert config.metrics.status_listen == Address("127.0.0.1", 9242)
