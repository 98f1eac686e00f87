"""The command-line flags of a role, made from the keys that declare one."""

from __future__ import annotations

import argparse
from typing import Any

from gateway.config.keys import Choice, File, HostPort, HostPorts, Integer, Seconds
from gateway.config.schema import Declared, role_keys
from gateway.config.wording import default_text


def _argument(d: Declared) -> dict[str, Any]:
    flag = d.key.flag
    assert flag is not None
    text = flag.help or d.key.help
    if flag.const is not None:
        return {"action": "store_const", "const": flag.const, "help": text}
    kind = d.key.kind
    default = default_text(d)
    options: dict[str, Any] = {
        "help": f"{text} ({'no default' if default == 'required' else f'default: {default}'})"
    }
    if flag.repeat:
        options["action"] = "append"
    if isinstance(kind, Choice):
        options["choices"] = kind.options
    elif isinstance(kind, Seconds):
        options.update(type=float, metavar="SECONDS")
    elif isinstance(kind, Integer):
        options.update(type=int, metavar=kind.unit.upper() or "N")
    elif isinstance(kind, HostPort | HostPorts):
        options["metavar"] = "HOST:PORT"
    else:
        options["metavar"] = flag.metavar or ("FILE" if isinstance(kind, File) else "TEXT")
    return options


def add_flags(parser: argparse.ArgumentParser, role: str) -> None:
    """One flag per key of `role` that declares one."""
    for d in role_keys(role):
        if d.key.flag is not None:
            parser.add_argument(d.key.flag.name, dest=d.key.flag.attribute, **_argument(d))


def overrides(role: str, args: argparse.Namespace) -> dict[str, Any]:
    """The flags given, as dotted keys over the file (None: not given)."""
    return {
        d.dotted: getattr(args, d.key.flag.attribute, None)
        for d in role_keys(role)
        if d.key.flag is not None
    }
