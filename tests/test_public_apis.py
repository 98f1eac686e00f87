"""The gateway uses other libraries through their public APIs only.

A private attribute (Trio's TLS state, a socket's `_sock`) can change or vanish in any
release, and code that borrows one works until the day it silently does not. Flagged,
in gateway/:

- `getattr`/`setattr`/`hasattr`/`delattr` with a literal name starting with `_`;
- `x._name` where `x` is not `self` or `cls` and the gateway defines no `_name` itself,
  and always the names below (private state of trio.SSLStream and trio's socket);
- imports of a private module (`trio._core`, `from ssl import _x`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

GATEWAY = Path(__file__).resolve().parent.parent / "gateway"
ALWAYS = frozenset(
    {"_ssl_object", "_incoming", "_outgoing", "_handshook", "_state", "_delayed_outgoing", "_sock"}
)
REFLECTION = frozenset({"getattr", "setattr", "hasattr", "delattr"})


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _own_names(trees: dict[Path, ast.Module]) -> set[str]:
    """Private names the gateway defines: its own `self._x`, methods, class and module
    names, slots."""
    names: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value)  # __slots__ entries (non-names are never looked up)
    return {n for n in names if _private(n)}


def _is_own_module(module: str | None, level: int) -> bool:
    return level > 0 or module is None or module == "gateway" or module.startswith("gateway.")


def private_uses(root: Path) -> list[str]:
    """Every use of another library's private names under `root`, as `file:line: what`."""
    trees = {path: ast.parse(path.read_text(), str(path)) for path in sorted(root.rglob("*.py"))}
    own = _own_names(trees)
    found: list[str] = []
    for path, tree in trees.items():
        where = path.relative_to(root.parent)
        for node in ast.walk(tree):
            what = _check(node, own)
            if what:
                found.append(f"{where}:{getattr(node, 'lineno', 0)}: {what}")
    return found


def _check(node: ast.AST, own: set[str]) -> str:
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in REFLECTION
        and len(node.args) >= 2
    ):
        name = node.args[1]
        if isinstance(name, ast.Constant) and isinstance(name.value, str) and _private(name.value):
            return f'{node.func.id}(..., "{name.value}")'
    if isinstance(node, ast.Attribute) and _private(node.attr):
        receiver = node.value
        if isinstance(receiver, ast.Name) and receiver.id in {"self", "cls"}:
            return ""
        if node.attr in ALWAYS or node.attr not in own:
            return f".{node.attr}"
    if isinstance(node, ast.ImportFrom) and not _is_own_module(node.module, node.level):
        if any(_private(part) for part in (node.module or "").split(".")):
            return f"from {node.module} import"
        if any(_private(alias.name) for alias in node.names):
            return f"from {node.module} import {', '.join(a.name for a in node.names)}"
    if isinstance(node, ast.Import):
        for alias in node.names:
            if not _is_own_module(alias.name, 0) and any(
                _private(part) for part in alias.name.split(".")
            ):
                return f"import {alias.name}"
    return ""


def test_the_gateway_uses_no_private_names_of_other_libraries() -> None:
    assert private_uses(GATEWAY) == []


@pytest.mark.parametrize(
    ("source", "flagged"),
    [
        ('ssl_object = getattr(tls, "_ssl_object", None)', 'getattr(..., "_ssl_object")'),
        ("sock = stream.socket._sock", "._sock"),
        ("stream._delayed_outgoing = None", "._delayed_outgoing"),
        ("state = stream._state", "._state"),
        ("x = trio._core.current_task()", "._core"),
        ("from trio._core import RunVar", "from trio._core import"),
        ("import trio._ssl", "import trio._ssl"),
        ("from ssl import _ASN1Object", "from ssl import _ASN1Object"),
    ],
)
def test_the_check_finds_what_the_old_data_plane_did(
    tmp_path: Path, source: str, flagged: str
) -> None:
    package = tmp_path / "gateway"
    package.mkdir()
    (package / "m.py").write_text(source + "\n")
    assert private_uses(package) == [f"gateway/m.py:1: {flagged}"]


def test_own_private_names_and_self_are_not_flagged(tmp_path: Path) -> None:
    package = tmp_path / "gateway"
    package.mkdir()
    (package / "m.py").write_text(
        "class A:\n"
        "    __slots__ = ('_held',)\n"
        "    def __init__(self) -> None:\n"
        "        self._held = 0\n"
        "        self._sock = None\n"
        "    def take(self, other: 'A') -> int:\n"
        "        return other._held\n"
        "from .n import _helper\n"
    )
    assert private_uses(package) == []
