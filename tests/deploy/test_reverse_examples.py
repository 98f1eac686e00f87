"""Reverse mode as deployed: the example configurations, the documentation's snippets and
the Helm chart's server.reverse values give configurations the gateway accepts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from gateway.config import Address, ClientConfig, ServerConfig

from .helpers import ROOT, accept, find, objects

DOC = ROOT / "docs" / "reverse-connections.md"
TLS = '[tls]\ncert = "c.pem"\nkey = "c.key"\nca = "ca.pem"\n'


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), re.DOTALL)


def test_the_example_files_are_accepted(tmp_path: Path) -> None:
    server = accept("server", (ROOT / "deploy/config/server-reverse.toml").read_text(), tmp_path)
    assert isinstance(server, ServerConfig)
    assert server.reverse.dial == (Address("bench.lab.example", 3250),)
    assert server.reverse.name == "bench.lab.example"
    client = accept("client", (ROOT / "deploy/config/client-reverse.toml").read_text(), tmp_path)
    assert isinstance(client, ClientConfig)
    assert client.reverse.listen == Address("0.0.0.0", 3250)
    assert dict(client.reverse.servers)["device1.lab.example"] == Address("127.0.0.1", 3245)


def test_the_documented_snippets_are_accepted(tmp_path: Path) -> None:
    server_toml, client_toml = _blocks("toml")
    server = accept("server", server_toml, tmp_path)
    assert isinstance(server, ServerConfig)
    assert server.reverse.pool == 2
    client = accept("client", '[client]\nserver = "h:1"\n' + client_toml + TLS, tmp_path)
    assert isinstance(client, ClientConfig)
    assert [name for name, _ in client.reverse.servers] == [
        "device1.lab.example",
        "device2.lab.example",
    ]


def test_the_chart_dials_out_and_its_certificate_can_be_a_tls_client(tmp_path: Path) -> None:
    values: dict[str, Any] = yaml.safe_load(_blocks("yaml")[0])
    docs = objects(values)
    config = accept("server", find(docs, "ConfigMap", "-server")["data"]["server.toml"], tmp_path)
    assert isinstance(config, ServerConfig)
    assert config.reverse.dial == (Address("bench.lab.example", 3250),)
    assert config.reverse.name == "bench.lab.example"
    certificate = find(docs, "Certificate", "-server")
    assert certificate["spec"]["usages"] == ["digital signature", "server auth", "client auth"]
    # Without reverse mode: no dialing, and the usual server-only usage.
    plain = objects({"server": values["server"] | {"reverse": {"dial": []}}})
    usual = accept("server", find(plain, "ConfigMap", "-server")["data"]["server.toml"], tmp_path)
    assert usual.reverse.dial == ()  # type: ignore[union-attr]
    assert find(plain, "Certificate", "-server")["spec"]["usages"] == [
        "digital signature",
        "server auth",
    ]
