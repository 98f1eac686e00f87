"""Certificate expiry: the metric from the files in force, the warnings in the log, the
alert rules and the dashboard panel against a real Prometheus."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.config import Address, TLSSettings
from gateway.demo import start_stack
from gateway.edges.expiry import ExpiryWarnings
from gateway.observability.http import serve_http
from gateway.pki.ca import (
    create_ca,
    issue_client_cert,
    issue_server_cert,
    make_crl,
    write_crl,
    write_issued,
)
from gateway.transport.credentials import Expiry, read_revocations
from gateway.transport.identity import PeerIdentity

from .test_prometheus import DASHBOARD, LOOPBACK, eventually, start_prometheus, substitute

METRIC = "usbip_gateway_certificate_expiry_timestamp_seconds"


def _pki(d: Path, *, server_days: int, crl_days: int) -> tuple[TLSSettings, TLSSettings]:
    d.mkdir()
    ca = create_ca()
    write_issued(ca, d / "ca.pem", d / "ca.key")
    server = issue_server_cert(ca, dns_names=["localhost"], days=server_days)
    write_issued(server, d / "server.pem", d / "server.key")
    write_issued(issue_client_cert(ca, common_name="c"), d / "client.pem", d / "client.key")
    write_crl(d, [], days=crl_days)
    return (
        TLSSettings(d / "server.pem", d / "server.key", d / "ca.pem", crl=d / "crl.pem"),
        TLSSettings(d / "client.pem", d / "client.key", d / "ca.pem"),
    )


def _not_after(path: Path) -> float:
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc.timestamp()


def _next_update(path: Path) -> float:
    next_update = x509.load_pem_x509_crl(path.read_bytes()).next_update_utc
    assert next_update is not None
    return next_update.timestamp()


def _samples(exposition: str) -> dict[str, float]:
    found = {}
    for line in exposition.splitlines():
        if line.startswith(METRIC + "{"):
            labels, value = line.rsplit(" ", 1)
            certificate = labels.split('certificate="')[1].split('"')[0]
            found[certificate] = float(value)
    return found


async def test_expiry_is_exported_warned_and_alerted(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    # A server certificate with 5 days left and a CRL with 2: both inside the warning
    # window (14 days), the CRL inside the critical one (3 days).
    server_tls, client_tls = _pki(tmp_path / "pki", server_days=5, crl_days=2)
    with caplog.at_level(logging.WARNING, "gateway.expiry"):
        stack = await start_stack(nursery, server_tls, client_tls)
        await trio.testing.wait_all_tasks_blocked()
    warnings = [r.getMessage() for r in caplog.records if r.name == "gateway.expiry"]
    assert any(
        m.startswith(f"this gateway's certificate {server_tls.cert} expires in 4 days")
        for m in warnings
    ), warnings
    assert any(
        m.startswith(f"the CRL {server_tls.crl} expires in 1 day ")
        and "every client is refused" in m
        for m in warnings
    ), warnings
    assert not any("CA certificate" in m for m in warnings)  # ten years left

    pki = tmp_path / "pki"
    local = _samples(stack.server.metrics.exposition().decode())
    assert local == {
        "own": _not_after(pki / "server.pem"),
        "ca": _not_after(pki / "ca.pem"),
        "crl": _next_update(pki / "crl.pem"),
    }
    assert set(_samples(stack.client.metrics.exposition().decode())) == {"own", "ca"}

    await nursery.start(serve_http, stack.server.metrics, Address(LOOPBACK, 0))
    prometheus = await start_prometheus(nursery, tmp_path, stack.server.metrics.http_addresses)

    async def firing() -> dict[str, set[str]]:
        answer = await prometheus.get("/api/v1/alerts")
        alerts: dict[str, set[str]] = {}
        for alert in answer["data"]["alerts"]:
            if alert["state"] == "firing":
                alerts.setdefault(alert["labels"]["alertname"], set()).add(
                    alert["labels"]["certificate"]
                )
        return alerts

    expected = {
        "UsbipGatewayCertificateExpiresSoon": {"own", "crl"},
        "UsbipGatewayCertificateExpiryImminent": {"crl"},
    }

    async def both_fire() -> bool:
        return await firing() == expected

    await eventually(both_fire, "the expiry alerts to fire")
    # The dashboard panel shows days left for each file.
    [panel] = [
        p for p in json.loads(DASHBOARD.read_text())["panels"] if p["title"].startswith("Cert")
    ]
    result = await prometheus.query(substitute(panel["targets"][0]["expr"]))
    days = {r["metric"]["certificate"]: float(r["value"][1]) for r in result}
    assert set(days) == {"own", "ca", "crl"}
    assert 4.9 < days["own"] < 5.0
    assert 1.9 < days["crl"] < 2.0
    assert days["ca"] > 3000


async def test_a_renewed_crl_is_exported_after_reload(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    server_tls, client_tls = _pki(tmp_path / "pki", server_days=365, crl_days=2)
    stack = await start_stack(nursery, server_tls, client_tls)
    before = _samples(stack.server.metrics.exposition().decode())["crl"]
    write_crl(tmp_path / "pki", [], days=30)
    stack.server.reload()
    after = _samples(stack.server.metrics.exposition().decode())["crl"]
    assert after - before > 27 * 86400


def test_warnings_are_repeated_daily_and_escalated_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    crl = Expiry("crl", "crl.pem", now + dt.timedelta(hours=30))
    warnings = ExpiryWarnings(dt.timedelta(days=14))
    assert warnings.check([crl], now) == [
        "the CRL crl.pem expires in 1 day (2030-01-02 06:00 UTC): renew it "
        "(`usbip-gateway certs crl`); once expired every client is refused"
    ]
    assert warnings.check([crl], now + dt.timedelta(hours=1)) == []  # said an hour ago
    assert len(warnings.check([crl], now + dt.timedelta(hours=25))) == 1  # a day later
    with caplog.at_level(logging.ERROR, "gateway.expiry"):
        [expired] = warnings.check([crl], now + dt.timedelta(hours=31))  # at once
    assert expired.startswith("the CRL crl.pem expired on 2030-01-02 06:00 UTC")
    assert caplog.records[-1].levelno == logging.ERROR
    far = Expiry("own", "own.pem", now + dt.timedelta(days=15))
    assert warnings.check([far], now) == []


def test_a_crl_of_another_ca_revokes_nothing(tmp_path: Path) -> None:
    # The same name, another key: only the signature tells them apart.
    ours, theirs = create_ca("ours"), create_ca("ours")
    client = issue_client_cert(ours, common_name="c")
    identity = PeerIdentity.from_certificate(client.cert)
    (tmp_path / "ca.pem").write_bytes(ours.cert_pem())
    for ca, revokes in ((ours, True), (theirs, False)):
        crl = make_crl(ca, [client.cert.serial_number])
        (tmp_path / "crl.pem").write_bytes(crl.public_bytes(Encoding.PEM))
        assert read_revocations(tmp_path / "crl.pem", tmp_path / "ca.pem").revokes(identity) is (
            revokes
        )
