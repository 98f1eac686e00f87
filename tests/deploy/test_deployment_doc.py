"""docs/deployment.md is followed by people copying its commands: every `usbip-gateway`
command in it parses, every file it installs exists, its TOML is accepted by the gateway
and its Helm values render."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.cli import build_parser
from gateway.config import ServerConfig

from .helpers import ROOT, accept, find, objects

DOC = ROOT / "docs" / "deployment.md"


def blocks(language: str) -> list[str]:
    text = DOC.read_text()
    found = re.findall(rf"^( *)```{language}\n(.*?)^\1```", text, flags=re.S | re.M)
    return [
        "\n".join(line.removeprefix(indent) for line in body.splitlines()) for indent, body in found
    ]


def shell_lines() -> list[str]:
    joined = "\n".join(blocks("sh")).replace("\\\n", " ")
    return [line.split(" #", 1)[0].strip() for line in joined.splitlines() if line.strip()]


def test_the_doc_has_what_it_promises() -> None:
    assert len(blocks("sh")) >= 8
    assert len(blocks("toml")) == 1
    assert len(blocks("yaml")) == 1


def test_every_gateway_command_parses() -> None:
    commands = [line for line in shell_lines() if line.startswith("usbip-gateway ")]
    assert len(commands) >= 5
    parser = build_parser()
    for line in commands:
        argv = shlex.split(line)[1:]
        if argv == ["--version"]:
            continue
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"docs/deployment.md: {line!r} does not parse")


def test_every_installed_file_exists() -> None:
    named = {
        word for line in shell_lines() for word in shlex.split(line) if word.startswith("deploy/")
    }
    assert len(named) >= 8
    for path in named:
        assert (ROOT / path).exists(), path


def test_the_server_additions_are_accepted_with_the_example(tmp_path: Path) -> None:
    example = (ROOT / "deploy" / "config" / "server.toml").read_text()
    config = accept("server", example + "\n" + blocks("toml")[0], tmp_path)
    assert isinstance(config, ServerConfig)
    assert str(config.upstream) == "127.0.0.1:3241"
    assert config.metrics.listen is not None
    assert config.audit.path == "/var/log/usbip-gateway/audit.jsonl"


def test_the_values_render(tmp_path: Path) -> None:
    values: dict[str, Any] = yaml.safe_load(blocks("yaml")[0])
    docs = objects(values)
    server = find(docs, "DaemonSet", "-server")["spec"]["template"]["spec"]
    assert server["containers"][1]["image"] == "registry.example.org/usbip-gateway:0.1.0"
    client_toml = find(docs, "ConfigMap", "-client")["data"]["client.toml"]
    client = tomllib.loads(client_toml)
    assert client["client"]["server"] == "usb-node-1.example.org:3240"
    accept("client", client_toml, tmp_path)
    policy = find(docs, "ConfigMap", "-policy")["data"]["policy.rules"]
    assert policy.endswith("default reject\n")
