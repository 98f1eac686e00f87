"""The text log formatter: one physical line per record whatever its arguments hold."""

from __future__ import annotations

import logging

import pytest

from gateway.logs import TextFormatter, kv


def record(msg: object, *args: object, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("gateway.test", logging.INFO, __file__, 1, msg, args, exc_info)


def body(line: str) -> str:
    return line.split(" gateway.test: ", 1)[1]


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("1-1", "1-1"),  # nothing to escape: as it was
        ("two words", "two words"),
        ("a\nb", '"a\\nb"'),
        ("a\r\nb", '"a\\r\\nb"'),
        ('say "x=1"', '"say \\"x=1\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("\x1b[31mred", '"\\x1b[31mred"'),  # a terminal escape
        ("line\u2028separator", '"line\\u2028separator"'),
        ("\u202eevil", '"\\u202eevil"'),  # a bidi override
        ("nel\x85", '"nel\\x85"'),
    ],
)
def test_a_string_argument_is_escaped_only_when_it_must_be(value: str, shown: str) -> None:
    line = TextFormatter().format(record("device %s refused", value))
    assert body(line) == f"device {shown} refused"
    assert len(line.splitlines()) == 1


def test_any_argument_type_and_mapping_arguments_are_escaped() -> None:
    class Named:
        def __str__(self) -> str:
            return "x\ny"

        def __repr__(self) -> str:
            return "Named(\n)"

    formatter = TextFormatter()
    assert body(formatter.format(record("%s %r %d %.1f", Named(), Named(), 7, 0.25))) == (
        '"x\\ny" "Named(\\n)" 7 0.2'
    )
    assert body(formatter.format(record("%(who)s", {"who": "a\nb"}))) == '"a\\nb"'
    assert body(formatter.format(record(ValueError("bad\nthing")))) == '"bad\\nthing"'


def test_the_original_record_is_left_alone() -> None:
    original = record("%s", "a\nb")
    TextFormatter().format(original)
    assert original.getMessage() == "a\nb"  # other handlers (JSON, pytest) see the text


def fail_with_peer_text() -> None:
    raise ValueError("peer said\n2026-01-01 00:00:00,000 INFO gateway.edges.server_gateway: forged")


def test_a_traceback_keeps_its_lines_indented() -> None:
    try:
        fail_with_peer_text()
    except ValueError as exc:
        line = TextFormatter().format(record("failed: %s", "x", exc=exc))
    first, *rest = line.splitlines()
    assert first.endswith("gateway.test: failed: x")
    assert rest
    assert all(part.startswith("    ") for part in rest)


def test_kv_quotes_what_would_not_split_back() -> None:
    fields = {"peer": "CN=a b", "busid": "", "outcome": "x=y", "n": 3, "bad": 'a\nb"c'}
    assert kv(fields) == 'peer="CN=a b" busid="" outcome=x=y n=3 bad="a\\nb\\"c"'
    line = TextFormatter().format(record("session end %s", kv(fields)))
    assert body(line) == "session end " + kv(fields)  # not escaped a second time
