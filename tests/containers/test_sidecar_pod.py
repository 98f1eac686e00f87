"""The chart's server pod run for real by `podman kube play`: the Helm chart rendered (as
tests/deploy/test_helm.py renders it), its DaemonSet's pod template played as a Pod with
the chart's ConfigMaps and a Secret holding test certificates. From the host, a client
gateway with a client certificate lists, imports and streams URBs byte-exact through the
pod's gateway; /metrics and the probes' endpoints are fetched from the pod's address; a
changed policy ConfigMap, re-played, is applied without a restart; a certificate from
another CA is refused; usbipd's port cannot be reached from outside the pod.

The usbipd container runs the simulator (`usbip-gateway sim`) in place of the kernel's
usbipd: this host cannot load kernel modules, so there is no usbip-host to export devices
(the QEMU guest in tests/realkernel/ is where the kernel's usbipd is exercised). It listens
on every address of the pod, as usbipd does; the chart's usbipd-guard init container (the
usbipd image, nft, CAP_NET_ADMIN only) is what keeps it private, and it runs for real.

What `podman kube play` (4.3) cannot express, and what checks it instead:
- DaemonSet (one pod per labelled node: nodeSelector, tolerations, updateStrategy,
  priorityClassName): played as the Pod of its template; the DaemonSet itself is
  schema-checked against several Kubernetes versions in tests/deploy/test_helm.py.
- NetworkPolicy (only the gateway and metrics ports in, no egress): podman has no network
  policies; test_helm.py checks the rendered policy, and here the guard's nftables rule
  (the layer that works under any CNI) is what makes usbipd unreachable.
- livenessProbe/readinessProbe: podman would run them as `curl` inside the image, which
  has none, and only from systemd timers; they are removed and their URLs (/healthz,
  /readyz on the metrics port) fetched from the host, as the kubelet does.
- containerPort without hostPort (metrics): podman 4.3 would publish it on the host's
  port of the same number; dropped, the metrics port is reached at the pod's address.
- restartPolicy: podman 4.3 restarts init containers under Always; the Pod uses OnFailure.
- Secret defaultMode 0440 with fsGroup 10001: podman writes secret and ConfigMap files
  0644 root-owned and ignores fsGroup; test_helm.py checks the rendered defaultMode.
- ServiceAccount, Services, the optional ServiceMonitor/PrometheusRule/Certificate: no
  podman equivalent; rendered and schema-checked by test_helm.py.
- ConfigMap update: the kubelet swaps the mounted files in place; podman rewrites the
  files of the ConfigMap's volume when the manifest is played again (and then refuses to
  make the existing pod again, which leaves it running: see `replay`).
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trustme
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import Address, ClientConfig, TLSSettings
from gateway.demo import self_check
from gateway.edges.client_gateway import ClientGateway
from gateway.transport.names import local_address
from gateway.usbip.importer import list_devices
from tests.pkitools import PKI, write_leaf

from .conftest import timed
from .podman import Podman, decodes_secret_data, free_port, wait_for
from .sidecar import GATEWAY_PORT, METRICS_PORT, USBIPD_PORT, dump, sidecar_pod, tls_secret
from .sidecar import chart_values as values_for

pytestmark = pytest.mark.containers

POLICY = 'allow client-cn "test-client"\ndefault reject\n'
NARROWED = 'allow client-cn "test-client" busid "1-2"\ndefault reject\n'
ALL_DEVICES = ["1-1", "1-2", "1-3"]


@dataclass
class SidecarPod:
    name: str
    host_port: int
    ip: str
    directory: Path
    images: tuple[str, str]
    pki: PKI

    @property
    def pod_name(self) -> str:
        return f"{self.name}-server"  # the DaemonSet's name

    def container(self, name: str) -> str:
        return f"{self.pod_name}-{name}"

    def url(self, path: str) -> str:
        return f"http://{self.ip}:{METRICS_PORT}{path}"

    def manifest(self, policy: str) -> Path:
        """The ConfigMaps and the Pod (the Secret is made once, by create_secret)."""
        values = values_for(self.name, self.host_port, policy, self.images)
        path = self.directory / f"pod-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(dump(sidecar_pod(values, self.images[0])))
        return path


def create_secret(podman: Podman, pod: SidecarPod) -> None:
    """The Secret the chart names (server.tls.secretName), made once so that re-playing the
    pod's manifest does not make it again. Podman 4.3 writes a Secret's `data` into the
    volume still base64-encoded (it checks the encoding when the Secret is played, then
    writes the text as it is): there the same Secret, data in plain text, is stored with
    `podman secret create`, which podman accepts for kube secrets and writes unchanged."""
    files = {
        "tls.crt": pod.pki.server_cert,
        "tls.key": pod.pki.server_key,
        "ca.crt": pod.pki.ca_pem,
    }
    path = pod.directory / "secret.yaml"
    decodes = decodes_secret_data(podman, pod.directory, pod.images[0])
    path.write_text(dump([tls_secret(f"{pod.name}-tls", files, encode=decodes)]))
    if decodes:
        podman.run("kube", "play", str(path))
    else:
        podman.run("secret", "create", f"{pod.name}-tls", str(path))


def http_get(url: str) -> tuple[int, str]:
    """(status, body); status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` carrying `labels`, as Prometheus would read them."""
    return sum(
        float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def pod_ip(podman: Podman, name: str) -> str:
    infra = podman.out("pod", "inspect", "--format={{.InfraContainerID}}", name)
    networks = json.loads(
        podman.out("inspect", "--format={{json .NetworkSettings.Networks}}", infra)
    )
    addresses = [n["IPAddress"] for n in networks.values() if n.get("IPAddress")]
    assert addresses, f"pod {name} has no address: {networks}"
    return str(addresses[0])


def guard_drops(podman: Podman, pod: SidecarPod) -> int:
    """Packets the usbipd-guard rule dropped, read with nft in the pod's network namespace
    (the usbipd image, CAP_NET_ADMIN: what the init container had)."""
    listing = podman.out(
        "run", "--rm", f"--pod={pod.pod_name}", "--cap-drop=all",
        "--cap-add=NET_ADMIN", "--entrypoint=nft", pod.images[1],
        "list", "chain", "inet", "usbipd_guard", "input",
    )  # fmt: skip
    match = re.search(rf"tcp dport {USBIPD_PORT} counter packets (\d+)", listing)
    assert match, listing
    return int(match.group(1))


def started_at(podman: Podman, container: str) -> str:
    return podman.out("inspect", "--format={{.State.StartedAt}} {{.RestartCount}}", container)


@pytest.fixture(scope="module")
def pod(
    podman: Podman,
    images: tuple[str, str],
    container_pki: PKI,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SidecarPod]:
    directory = tmp_path_factory.mktemp("pod")
    name = f"ugw-{uuid.uuid4().hex[:8]}"
    sidecar = SidecarPod(name, free_port(), "", directory, images, container_pki)
    manifest = sidecar.manifest(POLICY)
    started = time.monotonic()
    try:
        create_secret(podman, sidecar)
        podman.run("kube", "play", str(manifest))
        sidecar.ip = pod_ip(podman, sidecar.pod_name)
        wait_for(
            "the pod's gateway to be ready (/readyz 200: usbipd reached on loopback)",
            lambda: http_get(sidecar.url("/readyz"))[0] == 200,
        )
        timed("sidecar pod: kube play until /readyz answers 200", started)
        yield sidecar
    finally:
        logs = podman.run("logs", sidecar.container("gateway"), check=False)
        print(f"--- gateway log\n{logs.stdout[-4000:]}{logs.stderr[-4000:]}")
        # -v: the image's anonymous VOLUME too, which `kube down` leaves behind.
        containers = podman.out(
            "ps", "-a", f"--filter=pod={sidecar.pod_name}", "--format={{.Names}}"
        )
        for container in containers.split():
            podman.run("rm", "-f", "-v", "--time=0", container, check=False)
        podman.run("kube", "down", str(manifest), check=False)
        for volume in podman.out("volume", "ls", "--format={{.Name}}").split():
            if volume.startswith(f"{name}-"):
                podman.run("volume", "rm", "-f", volume, check=False)
        podman.run("secret", "rm", f"{name}-tls", check=False)


@pytest.fixture
async def client(pod: SidecarPod, nursery: trio.Nursery) -> Address:
    """A client gateway on this host (loopback in) to the pod's gateway port."""
    return await start_client(nursery, pod, pod.pki.client_tls())


async def start_client(nursery: trio.Nursery, pod: SidecarPod, tls: TLSSettings) -> Address:
    config = ClientConfig(
        tls=tls,
        server=Address("127.0.0.1", pod.host_port),  # the pod's hostPort
        server_name="localhost",  # the name in the Secret's certificate
        listen=(Address("127.0.0.1", 0),),
    )
    gateway = ClientGateway(config)
    listeners = await nursery.start(gateway.serve)
    return local_address(listeners[0])


async def busids(address: Address) -> list[str]:
    stream = await trio.open_tcp_stream(address.host, address.port)
    return [d.info.busid for d in await list_devices(stream)]


async def scrape(pod: SidecarPod) -> str:
    status, body = await trio.to_thread.run_sync(http_get, pod.url("/metrics"))
    assert status == 200, f"/metrics answered {status}"
    return body


def test_pod_runs_the_charts_containers_locked_down(podman: Podman, pod: SidecarPod) -> None:
    containers = podman.out("ps", f"--filter=pod={pod.pod_name}", "--format={{.Names}}").split()
    assert {pod.container("gateway"), pod.container("usbipd")} <= set(containers)
    # The init container ran (and, being one, is gone) having installed the guard.
    assert pod.container("usbipd-guard") not in containers
    gateway = pod.container("gateway")
    assert podman.out("inspect", "--format={{.HostConfig.ReadonlyRootfs}}", gateway) == "true"
    status = podman.out("exec", gateway, "cat", "/proc/1/status")
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["Uid"].split()[0] == "10001"
    assert fields["CapEff"].strip() == fields["CapBnd"].strip() == "0000000000000000"
    assert http_get(pod.url("/healthz"))[0] == 200


async def test_client_lists_imports_and_streams_through_the_pod(
    pod: SidecarPod, client: Address
) -> None:
    before = await scrape(pod)
    with trio.fail_after(60):
        report = await self_check(client, payload_size=256 * 1024)
    assert report[0].startswith("listed 3 devices"), report
    assert "identical" in report[2], report
    assert "RET_UNLINK -ECONNRESET" in report[3], report
    # /metrics from the pod saw the session and its URBs.
    after = await scrape(pod)
    sessions = "usbip_gateway_sessions_total"
    assert metric(after, sessions, role="server") > metric(before, sessions, role="server")
    relayed = ("usbip_gateway_relayed_bytes_total", {"role": "server", "sender": "client"})
    assert metric(after, relayed[0], **relayed[1]) - metric(before, relayed[0], **relayed[1]) > (
        256 * 1024
    )
    assert metric(after, "usbip_gateway_upstream_up", role="server") == 1.0


async def test_certificate_from_another_ca_is_refused(
    pod: SidecarPod, nursery: trio.Nursery, tmp_path: Path
) -> None:
    other = trustme.CA()
    cert, key = write_leaf(other.issue_cert(common_name="test-client"), tmp_path, "other")
    # It trusts the pod's CA, so only the pod's refusal can stop it.
    intruder = await start_client(nursery, pod, TLSSettings(cert, key, pod.pki.ca_pem))
    failures = "usbip_gateway_tls_handshake_failures_total"
    before = metric(await scrape(pod), failures, role="server", reason="unknown_ca")
    with trio.fail_after(30), pytest.raises((trio.BrokenResourceError, ConnectionError, EOFError)):
        await busids(intruder)
    after = metric(await scrape(pod), failures, role="server", reason="unknown_ca")
    assert after == before + 1


def test_usbipd_port_is_not_reachable_from_outside_the_pod(podman: Podman, pod: SidecarPod) -> None:
    # The control: the gateway's port at the same address answers.
    with socket.create_connection((pod.ip, GATEWAY_PORT), timeout=5):
        pass
    # usbipd (the simulator) listens on every address of the pod, as usbipd does; the
    # guard's rule drops what does not come over loopback: no answer, not even a refusal.
    dropped = guard_drops(podman, pod)
    with pytest.raises(TimeoutError), socket.create_connection((pod.ip, USBIPD_PORT), timeout=3):
        pass
    assert guard_drops(podman, pod) > dropped
    # Published on the host: the gateway's hostPort only.
    published = podman.out(
        "pod", "inspect", "--format={{json .InfraConfig.PortBindings}}", pod.pod_name
    )
    bindings: dict[str, list[dict[str, str]]] = json.loads(published)
    host_ports = {
        port: [b["HostPort"] for b in bound if b.get("HostPort")]
        for port, bound in bindings.items()
    }
    assert f"{USBIPD_PORT}/tcp" not in host_ports
    assert {port: hosts for port, hosts in host_ports.items() if hosts} == {
        f"{GATEWAY_PORT}/tcp": [str(pod.host_port)]
    }, bindings
    # ... and inside the pod the gateway does reach usbipd (over loopback).
    assert http_get(pod.url("/readyz"))[0] == 200


async def test_changed_policy_configmap_is_applied_without_restart(
    podman: Podman, pod: SidecarPod, client: Address
) -> None:
    gateway = pod.container("gateway")
    # podman is run in a thread: the client gateway shares this test's Trio loop.
    before = await trio.to_thread.run_sync(started_at, podman, gateway)
    assert await busids(client) == ALL_DEVICES
    await trio.to_thread.run_sync(replay, podman, pod, NARROWED)
    try:
        with trio.fail_after(30):
            while await busids(client) != ["1-2"]:
                await trio.sleep(0.2)
    finally:
        await trio.to_thread.run_sync(replay, podman, pod, POLICY)
    assert await trio.to_thread.run_sync(started_at, podman, gateway) == before
    with trio.fail_after(30):
        while await busids(client) != ALL_DEVICES:
            await trio.sleep(0.2)


def replay(podman: Podman, pod: SidecarPod, policy: str) -> None:
    """Play the pod's manifest again with a changed policy ConfigMap. Podman (4.3) rewrites
    the files of the ConfigMap's existing volume, as the kubelet updates a mounted
    ConfigMap, then refuses to make the pod again because it exists: the pod is untouched
    (a podman that replaces nothing and says so is as good)."""
    result = podman.run("kube", "play", str(pod.manifest(policy)), check=False)
    assert result.returncode == 0 or "pod already exists" in result.stderr, result.stderr
