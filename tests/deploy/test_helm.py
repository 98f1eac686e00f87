"""The Helm chart, rendered offline by Helm's own engine (helm-python-sdk) with several
sets of values: every object valid against the Kubernetes schemas, usbipd never exposed,
probes, mounts and security contexts where they belong, configs the gateway accepts."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import METRICS_PORT, ClientConfig, ServerConfig
from gateway.protocol import DEFAULT_PORT

from .helpers import (
    CHART,
    ROOT,
    accept,
    container,
    containers,
    find,
    helm,
    kinds,
    need_module,
    notes,
    objects,
    render,
    shutdown_timeout,
)

KUBERNETES_VERSIONS = ("1.25.0", "1.30.0", "1.37.0")  # the chart's kubeVersion floor .. now
USBIPD_PORT = 3241
CRD_KINDS = {"Certificate", "ServiceMonitor", "PrometheusRule"}

MINIMAL: dict[str, Any] = {"server": {"tls": {"secretName": "gw-tls"}}}
FULL: dict[str, Any] = {
    "server": {
        "tls": {
            "crl": {"configMap": "lab-crl"},
            "certManager": {
                "enabled": True,
                "issuerRef": {"name": "lab-ca", "kind": "ClusterIssuer"},
                "dnsNames": ["*.usb.example.org"],
                "ipAddresses": ["192.0.2.10"],
            },
        },
        "policy": {"rules": 'allow client-cn "alice"\ndefault reject\n'},
        "usbipd": {"bind": ["1-1.4", "0781:*"]},
        "service": {"enabled": True, "type": "LoadBalancer"},
        "config": {"limits": {"max_transfer_length": 16777216}, "log": {"level": "debug"}},
        "tolerations": [{"key": "usb", "operator": "Exists", "effect": "NoSchedule"}],
    },
    "client": {
        "enabled": True,
        "server": "gw1.usb.example.org:3240",
        "serverName": "gw1.usb.example.org",
        "tls": {
            "certManager": {
                "enabled": True,
                "issuerRef": {"name": "lab-ca", "kind": "ClusterIssuer"},
                "uris": ["spiffe://example.org/ns/lab/sa/alice"],
            }
        },
    },
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "prometheusRule": {"enabled": True},
    "grafanaDashboard": {"enabled": True},
    "metrics": {"deviceLabel": "vidpid"},
    "networkPolicy": {
        "gatewayFrom": [{"ipBlock": {"cidr": "192.0.2.0/24"}}],
        "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
    },
}
LOOSE: dict[str, Any] = {
    "server": {
        "tls": {"secretName": "gw-tls"},
        "hostPort": 0,
        "usbipdGuard": {"enabled": False},
        "usbipd": {"modprobe": False},
        "policy": {"existingConfigMap": "site-policy", "key": "rules.conf"},
        "service": {"enabled": True, "type": "NodePort", "nodePort": 32400},
    },
    "networkPolicy": {"enabled": False},
    "metrics": {"service": {"enabled": False}},
    "image": {"digest": "sha256:" + "ab" * 32},
}
CLIENT_ONLY: dict[str, Any] = {
    "server": {"enabled": False},
    "client": {
        "enabled": True,
        "server": "[2001:db8::10]:3240",
        "tls": {"secretName": "alice-tls", "crl": {"configMap": "lab-crl", "key": "lab.crl"}},
        "loadVhciModule": False,
        "listen": "127.0.0.1:3242",
    },
}
VALUE_SETS = {"minimal": MINIMAL, "full": FULL, "loose": LOOSE, "client-only": CLIENT_ONLY}


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    name: str = request.param
    return name, objects(VALUE_SETS[name])


def server_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = find(docs, "DaemonSet", "-server")["spec"]["template"]["spec"]
    return spec


def client_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = find(docs, "DaemonSet", "-client")["spec"]["template"]["spec"]
    return spec


# ------------------------------------------------------------------ lint and schemas


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint_strict(name: str) -> None:
    report = helm().lint(str(CHART), VALUE_SETS[name], strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"], report
    assert not problems, problems


def test_every_object_is_valid_for_each_kubernetes_version(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    kv = need_module("kubernetes_validate", "pip install kubernetes-validate")
    _, docs = rendered
    checked = 0
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} on {version}: {path}: {exc}")
            checked += 1
    assert checked > 0


def test_custom_resources_have_their_required_fields() -> None:
    docs = objects(FULL)
    server_cert = find(docs, "Certificate", "-server")
    assert server_cert["apiVersion"] == "cert-manager.io/v1"
    assert server_cert["spec"]["secretName"] == "usb-usbip-gateway-server-tls"
    assert server_cert["spec"]["issuerRef"] == {
        "name": "lab-ca",
        "kind": "ClusterIssuer",
        "group": "cert-manager.io",
    }
    assert "server auth" in server_cert["spec"]["usages"]
    assert server_cert["spec"]["dnsNames"] == ["*.usb.example.org"]
    client_cert = find(docs, "Certificate", "-client")
    assert "client auth" in client_cert["spec"]["usages"]
    assert client_cert["spec"]["uris"] == ["spiffe://example.org/ns/lab/sa/alice"]

    monitor = find(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    metrics_service = find(docs, "Service", "-server-metrics")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        metrics_service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}
    ]


def test_prometheus_rule_is_grafana_alerts_unchanged() -> None:
    alerts = ROOT / "grafana" / "alerts.yml"
    if not alerts.is_file():
        pytest.fail(f"{alerts} is missing: the chart's files/alerts.yml links to it")
    rule = find(objects(FULL), "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(alerts.read_text())["groups"]


def test_dashboard_is_the_grafana_one() -> None:
    dashboard = ROOT / "grafana" / "usbip-gateway.json"
    if not dashboard.is_file():
        pytest.fail(f"{dashboard} is missing: the chart's files/dashboard.json links to it")
    config_map = find(objects(FULL), "ConfigMap", "-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["data"]["usbip-gateway.json"] == dashboard.read_text()


# ------------------------------------------------------------------ usbipd is not exposed


def test_usbipd_port_is_in_no_container_port_or_service(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = rendered
    for doc in docs:
        if doc["kind"] == "Service":
            for port in doc["spec"]["ports"]:
                assert port["port"] != USBIPD_PORT
                assert port["targetPort"] in ("gateway", "metrics")
        if doc["kind"] == "DaemonSet":
            for c in containers(doc["spec"]["template"]["spec"]):
                for port in c.get("ports", []):
                    assert port["containerPort"] != USBIPD_PORT, c["name"]
                    assert port.get("hostPort") != USBIPD_PORT, c["name"]


def test_usbipd_container_has_no_ports_and_is_the_only_privileged_one() -> None:
    pod = server_pod(objects(MINIMAL))
    usbipd = container(pod, "usbipd")
    assert "ports" not in usbipd
    assert usbipd["securityContext"]["privileged"] is True
    env = {e["name"]: e["value"] for e in usbipd["env"]}
    assert env["USBIPD_PORT"] == str(USBIPD_PORT)
    privileged = [c["name"] for c in containers(pod) if c["securityContext"].get("privileged")]
    assert privileged == ["usbipd"]
    assert pod["hostNetwork"] is False, "usbipd would listen on the node's interfaces"


def test_server_gateway_talks_to_usbipd_on_loopback(tmp_path: Path) -> None:
    config = find(objects(FULL), "ConfigMap", "-server")["data"]["server.toml"]
    server = accept("server", config, tmp_path)
    assert isinstance(server, ServerConfig)
    assert str(server.upstream) == f"127.0.0.1:{USBIPD_PORT}"


def test_guard_init_container_is_default_on_with_net_admin_only() -> None:
    pod = server_pod(objects(MINIMAL))
    guard = container(pod, "usbipd-guard")
    assert guard in pod["initContainers"]
    assert guard["command"] == ["usbipd-guard"]
    assert {e["name"]: e["value"] for e in guard["env"]} == {"USBIPD_PORT": str(USBIPD_PORT)}
    caps = guard["securityContext"]["capabilities"]
    assert caps == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert guard["securityContext"]["allowPrivilegeEscalation"] is False
    assert "privileged" not in guard["securityContext"]
    # and off only when asked
    assert "initContainers" not in server_pod(objects(LOOSE))
    assert "nftables guard OFF" in notes(LOOSE)


def test_network_policy_admits_only_the_gateway_and_metrics_ports() -> None:
    docs = objects(FULL)
    policy = find(docs, "NetworkPolicy")
    pod_labels = find(docs, "DaemonSet", "-server")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    ports = [p for rule in policy["spec"]["ingress"] for p in rule["ports"]]
    assert ports == [{"port": "gateway", "protocol": "TCP"}, {"port": "metrics", "protocol": "TCP"}]
    assert all("from" in rule for rule in policy["spec"]["ingress"])
    # the named ports are the gateway's, not usbipd's
    gateway = container(server_pod(docs), "gateway")
    named = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert named == {"gateway": DEFAULT_PORT, "metrics": METRICS_PORT}
    # no egress by default: the pod needs none
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"]["egress"] == []
    assert not [d for d in objects(LOOSE) if d["kind"] == "NetworkPolicy"]


# ------------------------------------------------------------------ probes, mounts, security


def test_server_probes_hit_healthz_and_readyz_on_the_metrics_port(tmp_path: Path) -> None:
    docs = objects(MINIMAL)
    gateway = container(server_pod(docs), "gateway")
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    config = accept("server", find(docs, "ConfigMap", "-server")["data"]["server.toml"], tmp_path)
    assert config.metrics.listen is not None
    assert config.metrics.listen.port == METRICS_PORT
    assert config.metrics.listen.host == "0.0.0.0"  # the kubelet probes the pod's address
    # /status (identities, devices) is not on the pod's address: only on its loopback.
    assert config.metrics.status is False
    assert str(config.metrics.status_listen) == "127.0.0.1:9242"


@pytest.mark.parametrize(
    ("values", "status", "status_listen"),
    [
        ({"metrics": {"status": {"exposed": True}}}, True, "127.0.0.1:9242"),
        ({"metrics": {"status": {"loopbackPort": 0}}}, False, None),
    ],
    ids=["exposed", "no-loopback"],
)
def test_server_status_endpoint_follows_the_values(
    tmp_path: Path, values: dict[str, Any], status: bool, status_listen: str | None
) -> None:
    docs = objects(MINIMAL | values)
    config = accept("server", find(docs, "ConfigMap", "-server")["data"]["server.toml"], tmp_path)
    assert config.metrics.status is status
    got = config.metrics.status_listen
    assert (None if got is None else str(got)) == status_listen


def test_client_status_only_while_its_listener_is_on_loopback(tmp_path: Path) -> None:
    moved = CLIENT_ONLY | {
        "client": CLIENT_ONLY["client"] | {"metrics": {"listen": "0.0.0.0:9241"}}
    }
    for values, status in ((CLIENT_ONLY, True), (moved, False)):
        docs = objects(values)
        toml = find(docs, "ConfigMap", "-client")["data"]["client.toml"]
        assert accept("client", toml, tmp_path).metrics.status is status


def test_client_probes_reach_its_loopback_metrics_listener(tmp_path: Path) -> None:
    docs = objects(CLIENT_ONLY)
    pod = client_pod(docs)
    assert pod["hostNetwork"] is True
    gateway = container(pod, "gateway")
    config = accept("client", find(docs, "ConfigMap", "-client")["data"]["client.toml"], tmp_path)
    assert isinstance(config, ClientConfig)
    assert config.metrics.listen is not None
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = gateway[probe]["httpGet"]
        assert (get["host"], get["path"], get["port"]) == ("127.0.0.1", path, "metrics")
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert ports["metrics"] == config.metrics.listen.port
    assert all("hostPort" not in p for p in gateway["ports"])
    # plain USB/IP stays on the node's loopback
    assert [str(a) for a in config.listen] == ["127.0.0.1:3242"]
    assert str(config.server) == "[2001:db8::10]:3240"


def test_secrets_and_config_are_mounted_read_only(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = rendered
    for daemonset in (d for d in docs if d["kind"] == "DaemonSet"):
        pod = daemonset["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["tls"]["secret"]["defaultMode"] == 0o440
        for c in containers(pod):
            for mount in c.get("volumeMounts", []):
                volume = volumes[mount["name"]]
                from_host_or_api = {"secret", "configMap", "hostPath"} & volume.keys()
                if from_host_or_api and mount["mountPath"] != "/dev":  # /dev: usbipd's nodes
                    assert mount.get("readOnly") is True, (c["name"], mount)
                assert "subPath" not in mount, "a subPath mount never sees updates"


def test_gateways_are_non_root_read_only_and_drop_all_capabilities(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = rendered
    gateways = [
        container(d["spec"]["template"]["spec"], "gateway")
        for d in docs
        if d["kind"] == "DaemonSet"
    ]
    assert gateways
    for gateway in gateways:
        sc = gateway["securityContext"]
        assert sc["runAsNonRoot"] is True
        assert sc["runAsUser"] == 10001
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert gateway["resources"]["requests"]
        assert gateway["resources"]["limits"]
        assert {"name": "tmp", "mountPath": "/tmp"} in gateway["volumeMounts"]


def test_no_service_account_token_anywhere(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    for doc in docs:
        if doc["kind"] == "DaemonSet":
            assert doc["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
        if doc["kind"] == "ServiceAccount":
            assert doc["automountServiceAccountToken"] is False


def test_rendered_configs_are_accepted_by_the_gateway(
    rendered: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    _, docs = rendered
    for doc in docs:
        if doc["kind"] != "ConfigMap":
            continue
        for key, text in doc["data"].items():
            if key in ("server.toml", "client.toml"):
                accept(key.removesuffix(".toml"), text, tmp_path)


def test_whole_numbers_stay_integers_in_toml(tmp_path: Path) -> None:
    config = accept(
        "server", find(objects(FULL), "ConfigMap", "-server")["data"]["server.toml"], tmp_path
    )
    assert isinstance(config, ServerConfig)
    assert config.limits.max_transfer_length == 16777216
    assert config.log.level == "debug"
    assert config.metrics.device_label == "vidpid"
    assert config.policy.file is not None
    assert config.audit.path == "-"


def test_policy_is_a_directory_mount_and_its_changes_do_not_restart_pods() -> None:
    base = objects(FULL)
    changed = dict(FULL, server=dict(FULL["server"], policy={"rules": "default allow\n"}))
    pod = server_pod(base)
    mount = next(m for m in container(pod, "gateway")["volumeMounts"] if m["name"] == "policy")
    assert mount["mountPath"] == "/etc/usbip-gateway/policy"
    volume = next(v for v in pod["volumes"] if v["name"] == "policy")
    assert volume["configMap"]["items"] == [{"key": "policy.rules", "path": "policy.rules"}]

    def annotations(docs: list[dict[str, Any]]) -> dict[str, str]:
        found: dict[str, str] = find(docs, "DaemonSet", "-server")["spec"]["template"]["metadata"][
            "annotations"
        ]
        return found

    assert annotations(base) == annotations(objects(changed))
    assert find(objects(changed), "ConfigMap", "-policy")["data"]["policy.rules"] == (
        "default allow\n"
    )
    loose = server_pod(objects(LOOSE))
    loose_volume = next(v for v in loose["volumes"] if v["name"] == "policy")
    assert loose_volume["configMap"] == {
        "name": "site-policy",
        "items": [{"key": "rules.conf", "path": "policy.rules"}],
    }


def test_usbipd_binds_what_the_values_name() -> None:
    usbipd = container(server_pod(objects(FULL)), "usbipd")
    env = {e["name"]: e["value"] for e in usbipd["env"]}
    assert env["USBIPD_BIND"] == "1-1.4 0781:*"
    assert {m["mountPath"] for m in usbipd["volumeMounts"]} == {"/tmp", "/dev", "/lib/modules"}


def test_hostport_service_and_images() -> None:
    minimal = container(server_pod(objects(MINIMAL)), "gateway")
    assert minimal["ports"][0]["hostPort"] == DEFAULT_PORT
    assert minimal["image"] == "usbip-gateway:0.1.0"
    loose_docs = objects(LOOSE)
    loose = container(server_pod(loose_docs), "gateway")
    assert all("hostPort" not in p for p in loose["ports"])
    assert loose["image"] == "usbip-gateway@sha256:" + "ab" * 32
    service = find(loose_docs, "Service", "-server")
    assert service["spec"]["type"] == "NodePort"
    assert service["spec"]["externalTrafficPolicy"] == "Local"
    assert service["spec"]["ports"] == [
        {
            "name": "gateway",
            "port": 3240,
            "targetPort": "gateway",
            "protocol": "TCP",
            "nodePort": 32400,
        }
    ]
    unmetered = [d for d in objects(MINIMAL) if "metrics" not in d["metadata"]["name"]]
    assert "Service" not in kinds(unmetered)


def test_client_loads_vhci_hcd_with_sys_module_only() -> None:
    pod = client_pod(objects(FULL))
    loader = container(pod, "load-vhci-hcd")
    assert loader["command"] == ["modprobe", "vhci-hcd"]
    assert loader["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["SYS_MODULE"]}
    assert "initContainers" not in client_pod(objects(CLIENT_ONLY))


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "server.tls.secretName"),
        ({"server": {"tls": {"secretName": "x"}, "usbipd": {"port": 3240}}}, "must differ"),
        (
            {"server": {"tls": {"certManager": {"enabled": True, "issuerRef": {"name": "ca"}}}}},
            "dnsNames or ipAddresses",
        ),
        ({"server": {"enabled": False}, "client": {"enabled": True}}, "client.server"),
        (
            {"server": {"tls": {"secretName": "x"}}, "metrics": {"status": {"loopbackPort": 9240}}},
            "loopbackPort must differ",
        ),
    ],
)
def test_bad_values_fail_with_a_message(values: dict[str, Any], message: str) -> None:
    sdk = helm()
    with pytest.raises(sdk.HelmError, match=message):
        render(values)


def test_revocation_lists_come_from_a_configmap(tmp_path: Path) -> None:
    for values, kind in ((FULL, "server"), (CLIENT_ONLY, "client")):
        docs = objects(values)
        pod = find(docs, "DaemonSet", f"-{kind}")["spec"]["template"]["spec"]
        volume = next(v for v in pod["volumes"] if v["name"] == "crl")
        key = values[kind]["tls"]["crl"].get("key", "crl.pem")
        assert volume["configMap"] == {
            "name": "lab-crl",
            "items": [{"key": key, "path": "crl.pem"}],
        }
        mount = next(m for m in container(pod, "gateway")["volumeMounts"] if m["name"] == "crl")
        assert mount == {"name": "crl", "mountPath": "/etc/usbip-gateway/crl", "readOnly": True}
        text = find(docs, "ConfigMap", f"-{kind}")["data"][f"{kind}.toml"]
        assert tomllib.loads(text)["tls"]["crl"] == "/etc/usbip-gateway/crl/crl.pem"
        assert accept(kind, text, tmp_path).tls.crl is not None
    assert (
        "crl"
        not in tomllib.loads(find(objects(MINIMAL), "ConfigMap", "-server")["data"]["server.toml"])[
            "tls"
        ]
    )


def test_grace_period_outlasts_the_sigterm_drain() -> None:
    drain = shutdown_timeout()
    for doc in objects(FULL):
        if doc["kind"] == "DaemonSet":
            assert doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain
