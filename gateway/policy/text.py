"""Rendering strings back into the rule language's quoted form."""

from __future__ import annotations

_ESCAPES = {"\\": "\\\\", '"': '\\"', "*": "\\*", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def quote(value: str) -> str:
    """`value` as a rule-language string matching exactly itself (`*` escaped)."""
    out: list[str] = []
    for char in value:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif char.isprintable():
            out.append(char)
        else:
            out.extend(f"\\x{byte:02x}" for byte in char.encode("utf-8"))
    return '"' + "".join(out) + '"'
