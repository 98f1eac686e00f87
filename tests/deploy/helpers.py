"""What the deployment tests share: finding tools, rendering the chart, reading configs."""

from __future__ import annotations

import dataclasses
import importlib
import shutil
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from gateway.config import ClientConfig, ServerConfig, client_config, server_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "usbip-gateway"
CONTAINER = DEPLOY / "container"
SYSTEMD = DEPLOY / "systemd"


def need_tool(name: str, install: str) -> str:
    """The path of a command-line tool, or a failure that says how to get it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: {install}", pytrace=False)
    return path


def need_module(name: str, install: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        pytest.fail(f"Python module {name} is missing ({exc}): {install}", pytrace=False)


def helm() -> Any:
    module = need_module("helm_python", "pip install helm-python-sdk")
    module.disable_logging()
    return module


def render(values: Mapping[str, Any], *, name: str = "usb", namespace: str = "usb") -> str:
    """The chart rendered offline (Helm's own engine) as one multi-document YAML string."""
    sdk = helm()
    with sdk.Chart.load(str(CHART)) as chart:
        manifests: dict[str, str] = chart.render(dict(values), name=name, namespace=namespace)
    return "\n---\n".join(
        text for path, text in sorted(manifests.items()) if not path.endswith("NOTES.txt")
    )


def objects(values: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(render(values)) if doc]


def notes(values: Mapping[str, Any]) -> str:
    sdk = helm()
    with sdk.Chart.load(str(CHART)) as chart:
        manifests: dict[str, str] = chart.render(dict(values), name="usb", namespace="usb")
    return next(text for path, text in manifests.items() if path.endswith("NOTES.txt"))


def find(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, found {len(found)}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def containers(pod_spec: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod_spec.get("initContainers", [])
    yield from pod_spec["containers"]


def container(pod_spec: Mapping[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in containers(pod_spec) if c["name"] == name)


def shutdown_timeout() -> float:
    """The longest default SIGTERM drain of the two gateways."""
    defaults: list[float] = []
    for config in (ServerConfig, ClientConfig):
        default = {f.name: f.default for f in dataclasses.fields(config)}["shutdown_timeout"]
        assert isinstance(default, float)
        defaults.append(default)
    return max(defaults)


def accept(role: str, text: str, tmp_path: Path) -> ServerConfig | ClientConfig:
    """Load a TOML configuration the way the gateway does, with the files it names
    (certificates, policy) replaced by empty files under tmp_path."""
    data = tomllib.loads(text)
    files = {"tls": ("cert", "key", "ca", "crl"), "policy": ("file",)}
    for table, keys in files.items():
        for key in keys:
            if key in data.get(table, {}):
                stand_in = tmp_path / f"{table}-{key}"
                stand_in.touch()
                data[table][key] = str(stand_in)
    return server_config(data) if role == "server" else client_config(data)
