"""Every construct of the rule language, and every parse error with its line and column."""

from __future__ import annotations

import pytest

from gateway.policy import Operator, Policy, Target
from gateway.policy.patterns import ClassByte, DeviceId, Glob, InterfaceType

from .helpers import error

EXAMPLE = """\
# lab policy
allow id 1d6b:0002 serial "0000:00:14.0" name "xHCI Host Controller" \\
      with-interface { 09:00:00 }          # the root hub, as USBGuard would print it
block id 046d:* label "logitech"
reject with-interface one-of { 03:*:* }

default block
"""


def test_rules_default_lines_and_text() -> None:
    policy = Policy.parse(EXAMPLE, "lab.rules")
    assert [(r.line, r.target) for r in policy.rules] == [
        (2, Target.ALLOW),
        (4, Target.BLOCK),
        (5, Target.REJECT),
    ]
    assert policy.rules[0].text == (
        'allow id 1d6b:0002 serial "0000:00:14.0" name "xHCI Host Controller" '
        "with-interface { 09:00:00 }"
    )
    assert policy.rules[1].label == "logitech"
    assert policy.rules[1].text == 'block id 046d:* label "logitech"'
    assert (policy.default, policy.default_line, policy.source) == (Target.BLOCK, 7, "lab.rules")


def test_condition_attributes_operators_and_positions() -> None:
    [rule] = Policy.parse(
        'allow id 1d6b:0002 serial "s*" busid 1-1.2 class 03 \\\n'
        " with-interface all-of { 08:*:* 03:01:01 }"
    ).rules
    summary = [(c.attribute.name, c.operator, c.line, c.column, c.text) for c in rule.conditions]
    assert summary == [
        ("id", Operator.EQUALS, 1, 7, "id 1d6b:0002"),
        ("serial", Operator.EQUALS, 1, 20, 'serial "s*"'),
        ("busid", Operator.EQUALS, 1, 32, "busid 1-1.2"),
        ("class", Operator.EQUALS, 1, 44, "class 03"),
        ("with-interface", Operator.ALL_OF, 2, 2, "with-interface all-of { 08:*:* 03:01:01 }"),
    ]
    assert rule.conditions[0].patterns == (DeviceId(0x1D6B, 0x0002),)
    assert rule.conditions[1].patterns == (Glob(("s", None), '"s*"'),)
    assert rule.conditions[3].patterns == (ClassByte(3),)
    assert rule.conditions[4].patterns == (
        InterfaceType((8, None, None)),
        InterfaceType((3, 1, 1)),
    )


def test_target_alone_matches_everything() -> None:
    [rule] = Policy.parse("block").rules
    assert rule.conditions == ()


@pytest.mark.parametrize(
    ("written", "vendor", "product"),
    [("*:*", None, None), ("046d:*", 0x046D, None), ("046D:C52B", 0x046D, 0xC52B)],
)
def test_device_id_forms(written: str, vendor: int | None, product: int | None) -> None:
    [rule] = Policy.parse(f"allow id {written}").rules
    assert rule.conditions[0].patterns == (DeviceId(vendor, product),)


def test_interface_wildcards_per_byte() -> None:
    [rule] = Policy.parse("allow with-interface { *:*:* 08:*:50 ff:00:* }").rules
    assert [p.text for p in rule.conditions[0].patterns] == ["*:*:*", "08:*:50", "ff:00:*"]


@pytest.mark.parametrize("op", [o.value for o in Operator])
def test_every_operator_parses(op: str) -> None:
    [rule] = Policy.parse(f'allow client-uri {op} {{ "a" "b" }}').rules
    assert rule.conditions[0].operator is Operator(op)
    assert len(rule.conditions[0].patterns) == 2


@pytest.mark.parametrize(
    ("condition", "operator"),
    [
        ("id 046d:*", Operator.EQUALS),  # USBGuard: a single value is `equals { value }`
        ("with-interface 08:*:*", Operator.EQUALS),
        ("with-interface { 08:*:* }", Operator.EQUALS),  # USBGuard: a bare set is `equals`
        ('client-uri "u"', Operator.ONE_OF),  # any of the certificate's values
        ('client-dns "d"', Operator.ONE_OF),
        ('client-cn "c"', Operator.ONE_OF),
        ('client-uri { "u" }', Operator.EQUALS),
    ],
)
def test_operator_without_keyword(condition: str, operator: Operator) -> None:
    [rule] = Policy.parse(f"allow {condition}").rules
    assert rule.conditions[0].operator is operator


def test_busid_quoted_bare_and_via_port_alias() -> None:
    rules = Policy.parse('allow busid "1-1"\nallow busid 1-*\nallow via-port "2-1"').rules
    patterns = [r.conditions[0].patterns[0] for r in rules]
    assert patterns == [Glob(("1-1",), '"1-1"'), Glob(("1-", None), "1-*"), Glob(("2-1",), '"2-1"')]
    assert rules[2].conditions[0].attribute.name == "busid"


def test_repeated_attributes_all_apply() -> None:
    [rule] = Policy.parse(
        "allow with-interface one-of { 08:*:* } with-interface none-of { 03:*:* }"
    ).rules
    assert [c.operator for c in rule.conditions] == [Operator.ONE_OF, Operator.NONE_OF]


def test_no_default_means_reject() -> None:
    policy = Policy.parse("allow id 0525:*")
    assert (policy.default, policy.default_line) == (Target.REJECT, None)


def test_default_may_come_first() -> None:
    policy = Policy.parse("default allow\nreject id 046d:*")
    assert (policy.default, policy.default_line, len(policy.rules)) == (Target.ALLOW, 1, 1)


def test_empty_policy() -> None:
    policy = Policy.parse("# nothing\n\n")
    assert (policy.rules, policy.default) == ((), Target.REJECT)


@pytest.mark.parametrize(
    ("text", "line", "column", "message"),
    [
        (
            "permit id 0525:a4a0",
            1,
            1,
            "expected 'allow', 'block', 'reject' or 'default', got 'permit'",
        ),
        ('"allow"', 1, 1, "expected 'allow', 'block', 'reject' or 'default', got string \"allow\""),
        ("allow\n\nallow id 0525", 3, 10, "expected VID:PID after 'id', got '0525'"),
        ("allow id", 1, 9, "expected VID:PID after 'id', got end of line"),
        ("allow id *:a4a0", 1, 10, "expected VID:PID after 'id', got '*:a4a0'"),
        ("allow id 525:a4a0", 1, 10, "expected VID:PID after 'id', got '525:a4a0'"),
        ('allow id "0525:a4a0"', 1, 10, "expected VID:PID after 'id', got string \"0525:a4a0\""),
        ("allow id { 0525:a4a0 x }", 1, 22, "expected VID:PID in the 'id' set, got 'x'"),
        ("allow serial abc", 1, 14, "expected a quoted string after 'serial', got 'abc'"),
        ("allow client-uri {", 1, 19, "expected '}' to close the set opened at column 18"),
        ("allow client-uri { }", 1, 18, "empty set for 'client-uri'"),
        ('allow client-uri { { "a" } }', 1, 20, "sets cannot be nested"),
        ("allow client-uri }", 1, 18, "'}' without a matching '{'"),
        ("allow { 08:*:* }", 1, 7, "expected an attribute name, got '{'"),
        ('allow colour "red"', 1, 7, "unknown attribute 'colour'"),
        ('allow hash "abc"', 1, 7, "unknown attribute 'hash' (a USBGuard attribute"),
        ("allow with-interface one-of 08:*:*", 1, 29, "expected '{' after 'one-of', got '08:*:*'"),
        (
            "allow with-interface 08:*",
            1,
            22,
            "expected CC:SS:PP after 'with-interface', got '08:*'",
        ),
        ("allow with-interface 8:0:0", 1, 22, "expected CC:SS:PP after 'with-interface'"),
        ("allow class 3", 1, 13, "expected a hex class byte like 03 after 'class', got '3'"),
        ("allow class ff:00", 1, 13, "expected a hex class byte"),
        ("allow label x", 1, 13, "expected a quoted string after 'label', got 'x'"),
        ("default", 1, 8, "expected 'allow', 'block' or 'reject' after 'default', got end of line"),
        ("default deny", 1, 9, "expected 'allow', 'block' or 'reject' after 'default', got 'deny'"),
        ("default allow id 0525:*", 1, 15, "'default' takes only a target, got 'id'"),
        (
            "default allow\nallow\ndefault block",
            3,
            1,
            "a second 'default' (the first is on line 1)",
        ),
        ("allow serial \\\n  abc", 2, 3, "expected a quoted string after 'serial', got 'abc'"),
    ],
)
def test_parse_errors_are_located(text: str, line: int, column: int, message: str) -> None:
    exc = error(text)
    assert (exc.line, exc.column) == (line, column), str(exc)
    assert exc.message.startswith(message), exc.message
    assert str(exc).startswith(f"t.rules:{line}:{column}: ")
