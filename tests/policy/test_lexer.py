"""Tokens, strings with escapes and wildcards, comments, continuations, lexer errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.policy import Policy, PolicyError
from gateway.policy.lexer import Kind, logical_lines
from gateway.policy.patterns import Glob
from gateway.policy.text import quote

from .helpers import error


def test_words_braces_strings_with_positions() -> None:
    [line] = logical_lines('allow id 1d6b:0002 with-interface { 03:01:01 } name "Key board"')
    assert [(t.kind, t.raw, t.column) for t in line.tokens] == [
        (Kind.WORD, "allow", 1),
        (Kind.WORD, "id", 7),
        (Kind.WORD, "1d6b:0002", 10),
        (Kind.WORD, "with-interface", 20),
        (Kind.LBRACE, "{", 35),
        (Kind.WORD, "03:01:01", 37),
        (Kind.RBRACE, "}", 46),
        (Kind.WORD, "name", 48),
        (Kind.STRING, '"Key board"', 53),
    ]
    assert line.tokens[-1].parts == ("Key board",)


def test_braces_need_no_spaces() -> None:
    [line] = logical_lines("allow with-interface one-of{08:*:* 03:*:*}")
    assert [t.raw for t in line.tokens] == [
        "allow",
        "with-interface",
        "one-of",
        "{",
        "08:*:*",
        "03:*:*",
        "}",
    ]


def test_comments_and_blank_lines_are_dropped() -> None:
    text = '# heading\n\n   \nallow # trailing\n  # indented comment\nblock serial "a#b"\n'
    lines = logical_lines(text)
    assert [(ln.line, [t.raw for t in ln.tokens]) for ln in lines] == [
        (4, ["allow"]),
        (6, ["block", "serial", '"a#b"']),
    ]


def test_backslash_continues_a_line() -> None:
    text = 'allow id 0525:a4a0 \\\n    serial "x" \\  \n  name "y"\nblock\n'
    lines = logical_lines(text)
    assert [t.raw for t in lines[0].tokens] == [
        "allow",
        "id",
        "0525:a4a0",
        "serial",
        '"x"',
        "name",
        '"y"',
    ]
    assert [(t.line, t.column) for t in lines[0].tokens[3:]] == [(2, 5), (2, 12), (3, 3), (3, 8)]
    assert lines[1].line == 4


def test_crlf_line_ends() -> None:
    lines = logical_lines("allow\r\nblock\r\n")
    assert [ln.tokens[0].raw for ln in lines] == ["allow", "block"]


@pytest.mark.parametrize(
    ("raw", "parts"),
    [
        (r'"a\"b"', ('a"b',)),
        (r'"a\\b"', ("a\\b",)),
        (r'"tab\there"', ("tab\there",)),
        (r'"\x41\x42"', ("AB",)),
        (r'"caf\xc3\xa9"', ("café",)),  # USBGuard writes UTF-8 bytes as \x escapes
        (r'"a*b"', ("a", None, "b")),
        (r'"a\*b"', ("a*b",)),
        (r'"*"', (None,)),
        (r'""', ("",)),
        (r'"\*\?\'"', ("*?'",)),
    ],
)
def test_string_escapes_and_wildcards(raw: str, parts: tuple[str | None, ...]) -> None:
    [line] = logical_lines(f"allow serial {raw}")
    assert line.tokens[2].parts == parts


@pytest.mark.parametrize(
    ("text", "line", "column", "message"),
    [
        ('allow serial "abc', 1, 14, "unterminated string"),
        ('allow\nallow serial "abc\n"', 2, 14, "unterminated string"),
        ('allow serial "a\\q"', 1, 16, "unknown escape '\\q'"),
        ('allow serial "\\x4"', 1, 15, "'\\x' needs two hex digits"),
        ('allow serial "\\xzz"', 1, 15, "'\\x' needs two hex digits"),
        ('allow serial "\\xff"', 1, 14, "string is not valid UTF-8"),
        ("allow \\ id 0525:a4a0", 1, 7, "stray '\\'"),
        ("allow id 0525:a4a0 \\", 1, 20, "line continuation '\\' at end of input"),
    ],
)
def test_lexer_errors_are_located(text: str, line: int, column: int, message: str) -> None:
    exc = error(text)
    assert (exc.line, exc.column) == (line, column)
    assert exc.message.startswith(message)
    assert exc.source == "t.rules"
    # The first error; a file with more says how many more (`policy check` lists them).
    assert str(exc).startswith(f"t.rules:{line}:{column}: {exc.message}")


def test_policy_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"^<policy>:1:1: "):
        Policy.parse("permit")
    assert issubclass(PolicyError, ValueError)


@given(st.text())
def test_quote_round_trips_any_string_as_a_literal(value: str) -> None:
    [line] = logical_lines(f"allow serial {quote(value)}")
    token = line.tokens[2]
    assert None not in token.parts
    assert token.literal == value
    assert Glob(token.parts, token.raw).matches(value)
