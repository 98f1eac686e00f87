"""The packages import one way: each may use only the layers below it (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

GATEWAY = Path(__file__).resolve().parent.parent / "gateway"

# What each package may import from the project ("__init__" is the version string).
ALLOWED: dict[str, set[str]] = {
    "protocol": set(),
    "pki": set(),
    "transport": {"config", "protocol"},  # the Address type; a codec's read loop
    "usbip": {"protocol", "transport"},
    "accounting": {"config", "protocol"},  # config: the GatewayRole type
    "policy": {"protocol", "transport"},  # the identity a rule names (transport.identity)
    "config": {"policy", "protocol"},
    "logs": set(),
    "relay": {"accounting", "logs", "protocol", "transport"},
    "observability": {"__init__", "accounting", "config", "protocol", "transport"},
    "edges": {
        "accounting",
        "config",
        "logs",
        "observability",
        "policy",
        "protocol",
        "relay",
        "transport",
        "usbip",
    },
    "companions": {"__init__", "config", "edges", "policy", "protocol", "transport", "usbip"},
    "sim": {"config", "edges", "protocol", "transport"},  # edges: the sysfs layout it fakes
    # The NMOS Node beside a gateway: its HTTP endpoint, routes and device list.
    "nmos": {
        "config",
        "edges",
        "observability",
        "policy",
        "protocol",
        "transport",
        "usbip",
    },
}


def _imports(path: Path) -> set[str]:
    """The project packages (or top-level modules) `path` imports."""
    found: set[str] = set()
    package = path.relative_to(GATEWAY).parts[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.startswith("gateway"):
                parts = node.module.split(".")
                found.add(parts[1] if len(parts) > 1 else "__init__")
            elif node.level >= 2:  # from ..x import y, inside a package
                found.add((node.module or "__init__").split(".")[0])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("gateway.")}
    found.discard(package)
    return found


def test_imports_point_down() -> None:
    wrong = []
    for path in sorted(GATEWAY.rglob("*.py")):
        parts = path.relative_to(GATEWAY).parts
        package = parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")
        if package not in ALLOWED:
            continue  # cli, demo, __main__: the top
        for target in sorted(_imports(path) - ALLOWED[package]):
            wrong.append(f"{path.relative_to(GATEWAY.parent)} imports gateway.{target}")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_imports_of_every_form(tmp_path: Path) -> None:
    assert {"protocol", "accounting"} <= _imports(GATEWAY / "relay" / "pumps.py")
    assert "edges" in _imports(GATEWAY / "sim" / "server.py")  # a relative `from ..edges`
    assert not _imports(GATEWAY / "protocol" / "state.py")
