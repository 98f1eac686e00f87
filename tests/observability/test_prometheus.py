"""The dashboard and the alert rules against a real Prometheus scraping a gateway pair.

Needs Debian's `prometheus` package (the server and promtool); without it these tests
fail, they do not skip. Prometheus runs from the test with its own config and storage in
a temporary directory, scraping both gateways every second.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import ssl
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from gateway.accounting.series import DeviceLabeler
from gateway.config import Address
from gateway.demo import Stack, start_stack
from gateway.observability.http import serve_http
from gateway.observability.metrics import GatewayMetrics
from gateway.protocol import ECONNRESET, Direction, Setup
from gateway.usbip.importer import ImportedDevice, ImportRefused, import_device, list_devices

from ..pkitools import PKI

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "grafana" / "usbip-gateway.json"
ALERTS = ROOT / "grafana" / "alerts.yml"
APT_HINT = "install Debian's package: apt-get install -y --no-install-recommends prometheus"
LOOPBACK = "127.0.0.1"
SOURCE_SINK, LOOPBACK_DEVICE = "1-1", "1-2"
GET_CONFIGURATION = Setup(0x80, 0x06, 0x0200, 0, 4096)
# Grafana's variables, as the dashboard's "All" selection and a short rate window.
VARIABLES = {
    "job": ".*",
    "instance": ".*",
    "role": ".*",
    "device": ".*",
    "transfer_type": ".*",
    "__rate_interval": "1m",
}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: {APT_HINT}")
    return path


def substitute(expr: str) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: VARIABLES[m.group(1)], expr)


def legend_labels(legend: str) -> set[str]:
    return set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(panel title, expression, legend) of every query in the dashboard."""
    found = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            found.append((panel["title"], target["expr"], target.get("legendFormat", "")))
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


class PrometheusAPI:
    def __init__(self, base: str) -> None:
        self.base = base

    async def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)

        def fetch() -> Any:
            try:
                with urllib.request.urlopen(url, timeout=10) as response:
                    body = response.read()
            except urllib.error.HTTPError as exc:
                body = exc.read()
            return json.loads(body) if body.startswith(b"{") else body.decode()

        return await trio.to_thread.run_sync(fetch)

    async def query(self, expr: str) -> list[dict[str, Any]]:
        answer = await self.get("/api/v1/query", query=expr)
        assert answer["status"] == "success", f"{expr}: {answer}"
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    async def value(self, expr: str) -> float | None:
        result = await self.query(expr)
        return float(result[0]["value"][1]) if result else None


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 60) -> None:
    """Poll an outside process (Prometheus) until `check` holds, within `timeout`."""
    with trio.move_on_after(timeout):
        while not await check():
            await trio.sleep(0.2)
        return
    pytest.fail(f"timed out after {timeout:g}s waiting for {what}")


def local_total(metrics: GatewayMetrics, name: str) -> float:
    return sum(
        s.value for family in metrics.registry.collect() for s in family.samples if s.name == name
    )


async def start_prometheus(
    nursery: trio.Nursery, directory: Path, targets: list[Address]
) -> PrometheusAPI:
    binary = tool("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {
                "job_name": "usbip-gateway",
                "static_configs": [{"targets": [str(t) for t in targets]}],
            }
        ],
    }
    (directory / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    log = (directory / "prometheus.log").open("wb")
    command = [
        binary,
        f"--config.file={directory / 'prometheus.yml'}",
        f"--storage.tsdb.path={directory / 'data'}",
        f"--web.listen-address={LOOPBACK}:{port}",
        "--log.level=warn",
    ]
    with log:  # the child has its own copy of the descriptor
        process = await nursery.start(
            partial(trio.run_process, command, stdout=log, stderr=subprocess.STDOUT, check=False)
        )
    api = PrometheusAPI(f"http://{LOOPBACK}:{port}")

    async def ready() -> bool:
        if process.returncode is not None:
            pytest.fail(f"prometheus exited: {(directory / 'prometheus.log').read_text()}")
        try:
            return "Ready" in str(await api.get("/-/ready"))
        except OSError:
            return False

    await eventually(ready, "Prometheus to be ready", timeout=60)
    return api


async def bulk_round(device: ImportedDevice, urbs: int, depth: int = 8) -> None:
    """`urbs` bulk URBs, 64 KiB each, OUT and IN alternately, `depth` in flight."""

    async def worker(n: int) -> None:
        for i in range(n):
            if i % 2:
                done = await device.submit(1, Direction.IN, length=65536)
            else:
                done = await device.submit(1, Direction.OUT, data=bytes(65536))
            assert done.status == 0

    async with trio.open_nursery() as nursery:
        for _ in range(depth):
            nursery.start_soon(worker, urbs // depth)


async def unlink_one(device: ImportedDevice) -> None:
    """A bulk IN on the empty loopback FIFO stays pending until it is unlinked."""
    seqnum = device.next_seqnum()
    statuses: list[int] = []

    async def wait_in() -> None:
        statuses.append((await device.submit(1, Direction.IN, length=512, seqnum=seqnum)).status)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_in)
        await device.sent(seqnum)
        await device.unlink(seqnum)
    assert statuses == [-ECONNRESET]


async def traffic_round(stack: Stack, source: ImportedDevice, loop: ImportedDevice) -> None:
    await list_devices(await trio.open_tcp_stream(LOOPBACK, stack.client_address.port))
    for device in (source, loop):
        assert (await device.control(GET_CONFIGURATION)).status == 0
    await bulk_round(source, 64)
    await unlink_one(loop)


async def refused_handshake(stack: Stack, ca: Path) -> None:
    """A client without a certificate: the server gateway counts no_certificate."""
    context = ssl.create_default_context(cafile=str(ca))
    tcp = await trio.open_tcp_stream(LOOPBACK, stack.server_address.port)
    stream = trio.SSLStream(tcp, context, server_hostname="localhost")
    try:
        await stream.do_handshake()
        await stream.receive_some(100)
    except (trio.BrokenResourceError, ssl.SSLError):
        pass
    finally:
        await trio.aclose_forcefully(stream)
    # The server gateway's task counts the failure after sending its alert: let it run.
    await trio.testing.wait_all_tasks_blocked()


def test_alert_rules_pass_promtool() -> None:
    result = subprocess.run(
        [tool("promtool"), "check", "rules", str(ALERTS)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def refused_import(client: Address, busid: str) -> None:
    """An IMPORT the server gateway's policy refuses, through the client gateway."""
    with pytest.raises(ImportRefused):
        await import_device(await trio.open_tcp_stream(LOOPBACK, client.port), busid)


async def test_dashboard_and_alerts_against_prometheus(
    pki: PKI, nursery: trio.Nursery, tmp_path: Path
) -> None:
    promtool = tool("promtool")
    policy = tmp_path / "policy.rules"
    policy.write_text('reject busid "1-3"\ndefault allow\n')
    stack = await start_stack(nursery, pki.server_tls(), pki.client_tls(), policy=policy)
    for gateway in (stack.server, stack.client):
        gateway.metrics.labeler = DeviceLabeler("busid", 16)  # as metrics.device_label = "busid"
        await nursery.start(serve_http, gateway.metrics, Address(LOOPBACK, 0))
    targets = [stack.server.metrics.http_addresses[0], stack.client.metrics.http_addresses[0]]
    prometheus = await start_prometheus(nursery, tmp_path, targets)

    async def both_up() -> bool:
        return await prometheus.value("sum(up)") == 2

    await eventually(both_up, "both gateways to be scraped")

    client = stack.client_address
    source = await import_device(await trio.open_tcp_stream(LOOPBACK, client.port), SOURCE_SINK)
    loop = await import_device(await trio.open_tcp_stream(LOOPBACK, client.port), LOOPBACK_DEVICE)
    nursery.start_soon(source.serve)
    nursery.start_soon(loop.serve)
    # A real decision: the policy rejects the keyboard.
    await refused_import(client, "1-3")

    # Two rounds, each seen by a scrape: every series then has a rate in the window.
    for round_ in range(2):
        await traffic_round(stack, source, loop)
        if round_:
            await refused_handshake(stack, pki.ca_pem)
            await refused_import(client, "1-3")
        expected = {
            f'sum({name}{{role="{role}"}})': local_total(gateway.metrics, name)
            for role, gateway in (("server", stack.server), ("client", stack.client))
            for name in (
                "usbip_gateway_urbs_total",
                "usbip_gateway_tls_handshake_failures_total",
                "usbip_gateway_policy_decisions_total",
            )
        }

        async def scraped(expected: dict[str, float] = expected) -> bool:
            for query, total in expected.items():
                if (await prometheus.value(query) or 0.0) != total:
                    return False
            return True

        await eventually(scraped, f"Prometheus to see traffic round {round_ + 1}")
    failures = 'usbip_gateway_tls_handshake_failures_total{role="server", reason="no_certificate"}'
    assert await prometheus.value(failures) == 1

    # Every query of the dashboard returns series carrying the labels its legend shows.
    problems = []
    for title, expr, legend in dashboard_targets():
        result = await prometheus.query(substitute(expr))
        if not result:
            problems.append(f"{title}: no data for {expr}")
            continue
        values = [float(r["value"][1]) for r in result]
        if all(math.isnan(v) for v in values):
            problems.append(f"{title}: only NaN for {expr}")
        for r in result:
            missing = legend_labels(legend) - {k for k, v in r["metric"].items() if v}
            if missing:
                problems.append(f"{title}: {sorted(missing)} missing in {r['metric']}")
    # The template variables' label_values() queries.
    for variable in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        if variable["type"] != "query":
            continue
        selector, label = re.fullmatch(
            r"label_values\((.+),\s*(\w+)\)", variable["query"]["query"]
        ).groups()  # type: ignore[union-attr]
        result = await prometheus.query(f"count by ({label}) ({substitute(selector)})")
        if not result or not all(r["metric"].get(label) for r in result):
            problems.append(f"variable {variable['name']}: no {label} values")
    assert not problems, "\n".join(problems)
    devices = await prometheus.query("count by (device) (usbip_gateway_urb_rtt_seconds_count)")
    assert {r["metric"]["device"] for r in devices} == {SOURCE_SINK, LOOPBACK_DEVICE}
    types = await prometheus.query("count by (transfer_type) (usbip_gateway_urbs_total)")
    assert {r["metric"]["transfer_type"] for r in types} == {"bulk", "control"}

    # Prometheus loaded every rule of the file (as read back from its API) ...
    loaded = await prometheus.get("/api/v1/rules")
    rules = [r for g in loaded["data"]["groups"] for r in g["rules"]]
    in_file = re.findall(r"^\s*- alert:\s*(\w+)", ALERTS.read_text(), re.MULTILINE)
    assert sorted(r["name"] for r in rules) == sorted(in_file)
    # ... every alert expression is valid, and its query part returns series with the
    # labels the alert's annotations use.
    for rule in rules:
        expr = " ".join(rule["query"].split())
        await prometheus.query(expr)
        split = re.fullmatch(r"(.+)\s(>|<|>=|<=|==|!=)\s*([-0-9.e]+)", expr)
        assert split is not None, f"{rule['name']}: not '<query> <op> <threshold>': {expr}"
        result = await prometheus.query(split.group(1))
        assert result, f"{rule['name']}: no series for {split.group(1)}"
        used = set(re.findall(r"\$labels\.(\w+)", json.dumps(rule.get("annotations", {}))))
        for r in result:
            assert used <= set(r["metric"]), f"{rule['name']}: {used} not in {r['metric']}"

    async def evaluated() -> bool:
        loaded = await prometheus.get("/api/v1/rules")
        states = [r["health"] for g in loaded["data"]["groups"] for r in g["rules"]]
        return all(h == "ok" for h in states)

    await eventually(evaluated, "every alert rule to be evaluated")

    # promtool's lint of what the gateways expose.
    for address in targets:
        scrape = await PrometheusAPI(f"http://{address}").get("/metrics")
        lint = await trio.run_process(
            [promtool, "check", "metrics"],
            stdin=scrape.encode(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()
    await source.aclose()
    await loop.aclose()
