"""docs/configuration.md, generated from the declarations.

`python3 -m gateway.config.reference` rewrites it; tests/config/test_reference.py fails
when it is out of date.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gateway.config.environment import variable
from gateway.config.schema import ROLES, Declared, role_keys
from gateway.config.wording import default_text

DOCUMENT = Path(__file__).resolve().parent.parent.parent / "docs" / "configuration.md"

_INTRO = """\
# Configuration reference

<!-- Generated from gateway/config/settings.py by `python3 -m gateway.config.reference`;
     edit the declarations there, not this file. -->

One TOML file per role (`usbip-gateway server --config FILE`, `usbip-gateway client
--config FILE`); environment variables override the file, and flags override both. Every
key has a default except the TLS files and the client's `server`. Relative paths are
relative to the file. An error names the key and the problem (`tls.cert: file not found:
…`, `server.lisen: unknown key`) and exits with status 2. Full examples:
[deploy/config/server.toml](../deploy/config/server.toml),
[deploy/config/client.toml](../deploy/config/client.toml).

**Environment** (for containers): each key's variable is `USBIP_GATEWAY_`, its table and
its name in capitals (`[tls] cert` is `USBIP_GATEWAY_TLS_CERT`, `[server] listen` is
`USBIP_GATEWAY_SERVER_LISTEN`), listed below. Numbers and `true`/`false` are written as
in TOML; a list is a TOML array (`["a", "b"]`) or, for addresses and strings, items
separated by commas. A `USBIP_GATEWAY_` variable that names no key is an error, so a typo
is not silently ignored.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _row(d: Declared) -> str:
    flag = f"`{d.key.flag.name}`" if d.key.flag is not None else ""
    default = default_text(d)
    if default.startswith(('"', "[")) or default in ("true", "false"):
        default = f"`{default}`"  # a TOML value as written
    cells = (
        f"`{d.name}`",
        flag,
        f"`{variable(d)}`",
        _cell(default),
        _cell(d.key.kind.describe()),
        _cell(d.key.help),
    )
    return "| " + " | ".join(cells) + " |"


def reference() -> str:
    tables: dict[str, dict[str, Declared]] = {}
    roles: dict[str, list[str]] = {}
    for role in ROLES:
        for d in role_keys(role):
            tables.setdefault(d.table, {}).setdefault(d.name, d)
            if role not in roles.setdefault(d.table, []):
                roles[d.table].append(role)
    parts = [_INTRO]
    order = [*ROLES, *(table for table in tables if table not in ROLES)]
    for table in order:
        keys = tables[table]
        parts.append(f"\n## `[{table}]` ({' and '.join(roles[table])})\n\n")
        parts.append(
            "| key | flag | environment | default | value | meaning |\n|---|---|---|---|---|---|\n"
        )
        parts.extend(_row(d) + "\n" for d in keys.values())
    return "".join(parts)


def main() -> int:
    DOCUMENT.write_text(reference())
    print(f"wrote {DOCUMENT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
