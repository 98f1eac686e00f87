"""The `--allow-cn`, `--allow-uri` and `--allow-dns` shorthands (as ghostunnel has them):
the rules they stand for, in the policy language, so they decide exactly as a rule file."""

from __future__ import annotations

from collections.abc import Sequence

from .text import quote

SOURCE = "<--allow-cn/--allow-uri/--allow-dns>"


def _values(values: Sequence[str]) -> str:
    quoted = [quote(v) for v in values]  # exact: a `*` in a value is just a character
    return quoted[0] if len(quoted) == 1 else "one-of { " + " ".join(quoted) + " }"


def shorthand_rules(cn: Sequence[str], uri: Sequence[str], dns: Sequence[str]) -> str:
    """One `allow` rule per kind of identity given; anything else falls to the implicit
    `default reject`. Empty when none is given."""
    rules = [
        f"allow {attribute} {_values(values)}\n"
        for attribute, values in (("client-cn", cn), ("client-uri", uri), ("client-dns", dns))
        if values
    ]
    return "".join(rules)
