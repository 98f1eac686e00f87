"""How a declared default reads, in flag help and in docs/configuration.md."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from gateway.config.address import Address
from gateway.config.schema import Declared


def _value(value: Any, unit: str) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path | Address):
        return f'"{value}"'
    if isinstance(value, tuple):
        items = [_value(item, unit) for item in value]
        return (
            items[0]
            if len(items) == 1 and isinstance(value[0], Address)
            else f"[{', '.join(items)}]"
        )
    if unit == "bytes" and isinstance(value, int) and value % (1024 * 1024) == 0:
        return f"{value // (1024 * 1024)} MiB"
    return f"{value:g} {unit}".strip() if isinstance(value, float) else f"{value} {unit}".strip()


def default_text(d: Declared) -> str:
    if d.key.default_text is not None:
        return d.key.default_text
    if d.default is dataclasses.MISSING:
        return "required"
    return _value(d.default, d.key.kind.unit)
