"""The chart's server DaemonSet turned into what `podman kube play` runs: its pod template
as a Pod, with the chart's ConfigMaps and a Secret of test certificates.

Every change made to the rendered objects is here, each with the reason; the test's
docstring lists what they leave unchecked and which offline check covers it."""

from __future__ import annotations

import base64
import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.helpers import find, objects

USBIPD_PORT = 3241  # the chart's default server.usbipd.port
GATEWAY_PORT = 3240
METRICS_PORT = 9240
GATEWAY_UID = 10001


def chart_values(name: str, host_port: int, policy: str, images: tuple[str, str]) -> dict[str, Any]:
    gateway, usbipd = (image.rsplit(":", 1) for image in images)
    return {
        "fullnameOverride": name,
        "image": {"repository": gateway[0], "tag": gateway[1]},
        "usbipdImage": {"repository": usbipd[0], "tag": usbipd[1]},
        "server": {
            "tls": {"secretName": f"{name}-tls"},
            "hostPort": host_port,
            "policy": {"rules": policy, "watchInterval": 0.5},
            # The simulator's devices are in no sysfs: the gateway learns their endpoint
            # layout in the session (as `demo` does).
            "config": {"policy": {"sysfs": ""}, "log": {"format": "text"}},
            # No kernel modules on this host (see the simulator below).
            "usbipd": {"modprobe": False, "privileged": False},
        },
    }


def tls_secret(name: str, files: Mapping[str, Path], *, encode: bool = True) -> dict[str, Any]:
    """A kubernetes.io/tls Secret; `encode=False`: its data as plain text (see
    test_sidecar_pod.create_secret for the podman that needs it)."""
    data = {
        key: base64.b64encode(path.read_bytes()).decode() if encode else path.read_text()
        for key, path in files.items()
    }
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "type": "kubernetes.io/tls",
        "data": data,
    }


def sim_container(usbipd: dict[str, Any], gateway_image: str) -> dict[str, Any]:
    """The chart's usbipd container running the simulator in place of the kernel's usbipd:
    no kernel modules can be loaded here, so there is no usbip-host to hand sockets to. It
    listens on every address, as usbipd does (it has no bind option), on usbipd's port."""
    sim = copy.deepcopy(usbipd)
    sim["image"] = gateway_image
    sim["args"] = ["sim", "--listen", f"0.0.0.0:{USBIPD_PORT}"]
    # Without usbip-host nothing needs root, /dev or privileges.
    sim["securityContext"] = {
        "runAsUser": GATEWAY_UID,
        "runAsGroup": GATEWAY_UID,
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    sim["volumeMounts"] = [m for m in sim["volumeMounts"] if m["name"] != "dev"]
    return sim


def sidecar_pod(values: Mapping[str, Any], gateway_image: str) -> list[dict[str, Any]]:
    """The ConfigMaps and the server Pod (not yet the Secret) from the rendered chart."""
    docs = objects(values)
    daemonset = find(docs, "DaemonSet", "-server")
    name: str = daemonset["metadata"]["name"]
    template = copy.deepcopy(daemonset["spec"]["template"])
    spec: dict[str, Any] = template["spec"]
    spec["containers"] = [
        sim_container(c, gateway_image) if c["name"] == "usbipd" else c for c in spec["containers"]
    ]
    for container in spec["containers"]:
        # Podman runs httpGet probes as `curl` inside the container, which the image has
        # not; the test fetches /healthz and /readyz from the host as the kubelet does.
        container.pop("livenessProbe", None)
        container.pop("readinessProbe", None)
        # Podman 4.3 publishes a containerPort without hostPort on the host's same port
        # (Kubernetes publishes nothing): the metrics port is reached at the pod's address.
        ports = [p for p in container.get("ports", []) if p.get("hostPort")]
        if "ports" in container:
            container["ports"] = ports
    volumes = []
    for volume in spec["volumes"]:
        if volume["name"] == "dev":
            continue  # only usbipd used it
        source = volume.get("secret") or volume.get("configMap")
        if source is not None:
            # Podman 4.3 dereferences `optional` without checking it is set.
            source["optional"] = False
        if "emptyDir" in volume:
            # Podman names an emptyDir's volume after it, shared by every pod: keep this
            # pod's own.
            renamed = f"{name}-{volume['name']}"
            for container in spec["containers"]:
                for mount in container.get("volumeMounts", []):
                    if mount["name"] == volume["name"]:
                        mount["name"] = renamed
            volume["name"] = renamed
        volumes.append(volume)
    spec["volumes"] = volumes
    # Kubernetes runs init containers once; podman 4.3 applies the pod's restart policy
    # to them too, so with Always the guard would be restarted for ever.
    spec["restartPolicy"] = "OnFailure"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": template["metadata"]["labels"]},
        "spec": spec,
    }
    configmaps = [d for d in docs if d["kind"] == "ConfigMap"]
    return [*configmaps, pod]


def dump(docs: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)
