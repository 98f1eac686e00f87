"""Logical lines of tokens into rules, a default, or (for the CLI) device facts."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from .conditions import ATTRIBUTES, Attribute, Condition, Operator, Side, Target
from .errors import PolicyError, PolicyErrors
from .facts import DeviceFacts
from .lexer import Kind, LogicalLine, Token, logical_lines
from .patterns import ClassByte, DeviceId, Glob, InterfaceType, Pattern
from .rules import Rule

_TARGETS = {t.value: t for t in Target}
_OPERATORS = {o.value: o for o in Operator}
_HEX4 = r"[0-9a-fA-F]{4}"
_ID_RE = re.compile(rf"(?:(?P<v>{_HEX4}):(?:(?P<p>{_HEX4})|\*)|\*:\*)")
_BYTE_RE = re.compile(r"[0-9a-fA-F]{2}")
_IFACE_RE = re.compile(r"([0-9a-fA-F]{2}|\*):([0-9a-fA-F]{2}|\*):([0-9a-fA-F]{2}|\*)")
_UNSUPPORTED = {"hash", "parent-hash", "with-connect-type", "if"}


@dataclass(frozen=True, slots=True)
class Parsed:
    rules: tuple[Rule, ...]
    default: Target | None
    default_line: int | None


class _Line:
    """A cursor over one logical line's tokens."""

    def __init__(self, line: LogicalLine, source: str) -> None:
        self.tokens = line.tokens
        self.end = (line.end_line, line.end_column)
        self.source = source
        self.index = 0

    def error(self, message: str, token: Token | None) -> PolicyError:
        line, column = (token.line, token.column) if token else self.end
        return PolicyError(message, line, column, self.source)

    def peek(self) -> Token | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def take(self) -> Token | None:
        token = self.peek()
        if token is not None:
            self.index += 1
        return token

    def text(self, start: int) -> str:
        return " ".join(t.raw for t in self.tokens[start : self.index])


def _describe(token: Token | None) -> str:
    if token is None:
        return "end of line"
    if token.kind is Kind.WORD:
        return f"'{token.raw}'"
    if token.kind is Kind.STRING:
        return f"string {token.raw}"
    return str(token.kind.value)


def _value(attr: Attribute, token: Token | None, cur: _Line, where: str) -> Pattern:
    """One value for `attr`; `where` is "after 'id'" or "in the 'id' set"."""
    raw = token.raw if token is not None and token.kind is Kind.WORD else None
    name = attr.name
    if name == "id":
        match = _ID_RE.fullmatch(raw or "")
        if match is None:
            raise cur.error(f"expected VID:PID {where}, got {_describe(token)}", token)
        vendor, product = match.group("v"), match.group("p")
        return DeviceId(
            None if vendor is None else int(vendor, 16),
            None if product is None else int(product, 16),
        )
    if name == "class":
        if raw is None or not _BYTE_RE.fullmatch(raw):
            raise cur.error(
                f"expected a hex class byte like 03 {where}, got {_describe(token)}", token
            )
        return ClassByte(int(raw, 16))
    if name == "with-interface":
        match = _IFACE_RE.fullmatch(raw or "")
        if match is None:
            raise cur.error(f"expected CC:SS:PP {where}, got {_describe(token)}", token)
        a, b, c = (None if g == "*" else int(g, 16) for g in match.groups())
        return InterfaceType((a, b, c))
    fold = name == "client-dns"
    if token is not None and token.kind is Kind.STRING:
        return Glob(token.parts, token.raw, fold_case=fold)
    if attr.side is Side.BUSID and raw is not None:
        # Bus ids are also accepted unquoted (1-1.2), with '*' still a wildcard.
        parts: list[str | None] = []
        for index, piece in enumerate(raw.split("*")):
            if index:
                parts.append(None)
            if piece:
                parts.append(piece)
        return Glob(tuple(parts) or ("",), raw)
    raise cur.error(f"expected a quoted string {where}, got {_describe(token)}", token)


def _condition(attr: Attribute, name_token: Token, cur: _Line) -> Condition:
    start = cur.index - 1
    token = cur.take()
    operator: Operator | None = None
    if token is not None and token.kind is Kind.WORD and token.raw in _OPERATORS:
        operator = _OPERATORS[token.raw]
        brace = cur.take()
        if brace is None or brace.kind is not Kind.LBRACE:
            raise cur.error(f"expected '{{' after '{token.raw}', got {_describe(brace)}", brace)
        token = brace
    if token is not None and token.kind is Kind.LBRACE:
        patterns = [p for _, p in _set_values(attr, token, cur)]
        operator = operator or Operator.EQUALS  # USBGuard: a set without operator is `equals`
    else:
        if token is not None and token.kind is Kind.RBRACE:
            raise cur.error("'}' without a matching '{'", token)
        patterns = [_value(attr, token, cur, f"after '{attr.name}'")]
        operator = attr.single
    return Condition(
        attr, operator, tuple(patterns), cur.text(start), name_token.line, name_token.column
    )


def _set_values(attr: Attribute, brace: Token, cur: _Line) -> Iterator[tuple[Token, Pattern]]:
    count = 0
    while True:
        token = cur.take()
        if token is None:
            raise cur.error(f"expected '}}' to close the set opened at column {brace.column}", None)
        if token.kind is Kind.RBRACE:
            if count == 0:
                raise cur.error(f"empty set for '{attr.name}'", brace)
            return
        if token.kind is Kind.LBRACE:
            raise cur.error("sets cannot be nested", token)
        count += 1
        yield token, _value(attr, token, cur, f"in the '{attr.name}' set")


def _rule(cur: _Line, target: Target) -> Rule:
    conditions: list[Condition] = []
    label: str | None = None
    while (token := cur.take()) is not None:
        if token.kind is not Kind.WORD:
            raise cur.error(f"expected an attribute name, got {_describe(token)}", token)
        if token.raw == "label":
            value = cur.take()
            if value is None or value.kind is not Kind.STRING:
                raise cur.error(
                    f"expected a quoted string after 'label', got {_describe(value)}", value
                )
            label = value.literal
            continue
        attr = ATTRIBUTES.get(token.raw)
        if attr is None:
            hint = (
                " (a USBGuard attribute this gateway does not support)"
                if token.raw in _UNSUPPORTED
                else ""
            )
            raise cur.error(f"unknown attribute '{token.raw}'{hint}", token)
        conditions.append(_condition(attr, token, cur))
    return Rule(target, tuple(conditions), cur.tokens[0].line, cur.text(0), label)


def parse(text: str, source: str = "<policy>") -> Parsed:
    """The rules and default of a file; raises PolicyErrors with every error in it (each
    logical line is read on its own, so one mistake does not hide the next)."""
    rules: list[Rule] = []
    default: Target | None = None
    default_line: int | None = None
    errors: list[PolicyError] = []
    for line in logical_lines(text, source, errors):
        cur = _Line(line, source)
        first = cur.take()
        assert first is not None  # logical lines are never empty
        try:
            if first.kind is Kind.WORD and first.raw == "default":
                target = _default(cur, default_line)
                default, default_line = target, first.line
            elif first.kind is Kind.WORD and first.raw in _TARGETS:
                rules.append(_rule(cur, _TARGETS[first.raw]))
            else:
                raise cur.error(
                    f"expected 'allow', 'block', 'reject' or 'default', got {_describe(first)}",
                    first,
                )
        except PolicyError as exc:
            errors.append(exc)
    if errors:
        errors.sort(key=lambda e: (e.line, e.column))
        raise errors[0] if len(errors) == 1 else PolicyErrors(errors)
    return Parsed(tuple(rules), default, default_line)


def _default(cur: _Line, earlier: int | None) -> Target:
    """The target of a `default` line (its word already taken)."""
    first_token = cur.tokens[0]
    token = cur.take()
    if token is None or token.kind is not Kind.WORD or token.raw not in _TARGETS:
        got = _describe(token)
        raise cur.error(f"expected 'allow', 'block' or 'reject' after 'default', got {got}", token)
    extra = cur.peek()
    if extra is not None:
        raise cur.error(f"'default' takes only a target, got {_describe(extra)}", extra)
    if earlier is not None:
        raise cur.error(f"a second 'default' (the first is on line {earlier})", first_token)
    return _TARGETS[token.raw]


_SPEC_ATTRIBUTES = ("id", "busid", "serial", "name", "manufacturer", "class", "with-interface")
_SPEC_STRINGS = {"serial": "serial", "name": "product", "manufacturer": "manufacturer"}


def parse_device_spec(text: str, source: str = "<device>") -> DeviceFacts:
    """Concrete device facts written as rule attributes: `id 0525:a4a0 busid 1-1 ...`.

    Values are facts, not patterns: no wildcards (a `*` in a string is just a character)
    and no operators; `with-interface` takes one value or a `{ ... }` list in the
    device's interface order.
    """
    lines = logical_lines(text, source)
    if not lines:
        raise PolicyError("empty device spec; it needs at least 'id VID:PID'", 1, 1, source)
    if len(lines) > 1:
        raise PolicyError("a device spec is one line", lines[1].line, 1, source)
    cur = _Line(lines[0], source)
    seen: set[str] = set()
    ident: tuple[int, int] | None = None
    busid = ""
    device_class: int | None = None
    interfaces: tuple[tuple[int, int, int], ...] = ()
    strings: dict[str, str] = {}
    while (name := cur.take()) is not None:
        if name.kind is not Kind.WORD or name.raw not in _SPEC_ATTRIBUTES:
            raise cur.error(
                f"expected one of {', '.join(_SPEC_ATTRIBUTES)}, got {_describe(name)}", name
            )
        if name.raw in seen:
            raise cur.error(f"'{name.raw}' given twice", name)
        seen.add(name.raw)
        attr = ATTRIBUTES[name.raw]
        if (
            name.raw == "with-interface"
            and (brace := cur.peek()) is not None
            and brace.kind is Kind.LBRACE
        ):
            cur.take()
            interfaces = tuple(_interface(p, t, cur) for t, p in _set_values(attr, brace, cur))
            continue
        token = cur.take()
        pattern = _value(attr, token, cur, f"after '{name.raw}'")
        assert token is not None  # _value raised otherwise
        if isinstance(pattern, DeviceId):
            if pattern.vendor is None or pattern.product is None:
                raise cur.error(f"a device spec takes no wildcards: {pattern.text}", token)
            ident = (pattern.vendor, pattern.product)
        elif isinstance(pattern, InterfaceType):
            interfaces = (_interface(pattern, token, cur),)
        elif isinstance(pattern, ClassByte):
            device_class = pattern.value
        else:
            literal = token.literal if token.kind is Kind.STRING else token.raw
            if name.raw in _SPEC_STRINGS:
                strings[_SPEC_STRINGS[name.raw]] = literal
            else:
                busid = literal
    if ident is None:
        raise PolicyError("a device spec needs 'id VID:PID'", cur.end[0], cur.end[1], source)
    return DeviceFacts(
        busid=busid,
        vendor_id=ident[0],
        product_id=ident[1],
        device_class=device_class,
        interfaces=interfaces,
        serial=strings.get("serial"),
        product=strings.get("product"),
        manufacturer=strings.get("manufacturer"),
    )


def _interface(pattern: Pattern, token: Token, cur: _Line) -> tuple[int, int, int]:
    assert isinstance(pattern, InterfaceType)
    a, b, c = pattern.fields
    if a is None or b is None or c is None:
        raise cur.error(f"a device spec takes no wildcards: {pattern.text}", token)
    return (a, b, c)
