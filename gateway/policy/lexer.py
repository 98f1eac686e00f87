"""Tokens of the rule language, grouped into logical lines (one rule or directive each).

Words are runs of anything but blanks and `{ } " # \\`; what a word may be is up to the
attribute it follows, so the parser can say what it expected. Strings are double-quoted
with C escapes; an unescaped `*` in a string is kept apart from the literal text so that
patterns can treat it as a wildcard while `\\*` stays a literal asterisk.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .errors import PolicyError

_BLANKS = " \t\r\f\v"
_WORD_STOP = set(_BLANKS) | set('\n{}"#\\')
_SIMPLE_ESCAPES = {
    "n": "\n",
    "t": "\t",
    "r": "\r",
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "v": "\v",
    "0": "\0",
    "\\": "\\",
    '"': '"',
    "'": "'",
    "?": "?",
    "*": "*",
}
_HEX = set("0123456789abcdefABCDEF")


class Kind(enum.Enum):
    WORD = "word"
    STRING = "string"
    LBRACE = "'{'"
    RBRACE = "'}'"


@dataclass(frozen=True, slots=True)
class Token:
    kind: Kind
    raw: str
    line: int
    column: int
    # STRING only: decoded literal chunks, None where an unescaped '*' stood.
    parts: tuple[str | None, ...] = ()

    @property
    def literal(self) -> str:
        """A string token's text with every '*' taken literally (device specs)."""
        return "".join("*" if part is None else part for part in self.parts)


@dataclass(frozen=True, slots=True)
class LogicalLine:
    tokens: tuple[Token, ...]
    end_line: int  # where the line ends, for "expected ... at end of line"
    end_column: int

    @property
    def line(self) -> int:
        return self.tokens[0].line


class _Scanner:
    def __init__(self, text: str, source: str) -> None:
        self.text = text
        self.source = source
        self.pos = 0
        self.line = 1
        self.line_start = 0

    @property
    def column(self) -> int:
        return self.pos - self.line_start + 1

    def error(self, message: str, column: int | None = None) -> PolicyError:
        return PolicyError(message, self.line, column or self.column, self.source)

    def newline(self) -> None:
        self.pos += 1
        self.line += 1
        self.line_start = self.pos

    def lines(self, errors: list[PolicyError] | None = None) -> list[LogicalLine]:
        """The logical lines; with `errors`, an error is added there, its line dropped
        and scanning goes on from the next line (else it is raised)."""
        result: list[LogicalLine] = []
        current: list[Token] = []
        while True:
            try:
                if self.step(current, result):
                    return result
            except PolicyError as exc:
                if errors is None:
                    raise
                errors.append(exc)
                current.clear()
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end

    def step(self, current: list[Token], result: list[LogicalLine]) -> bool:
        """Scan one token, blank, comment or line end; a finished logical line moves
        from `current` to `result`. True at the end of the text."""
        text = self.text
        if self.pos >= len(text) or text[self.pos] == "\n":
            if current:
                result.append(LogicalLine(tuple(current), self.line, self.column))
                current.clear()
            if self.pos >= len(text):
                return True
            self.newline()
            return False
        char = text[self.pos]
        if char in _BLANKS:
            self.pos += 1
        elif char == "#":
            end = text.find("\n", self.pos)
            self.pos = len(text) if end < 0 else end
        elif char == "\\":
            self.continuation()
        elif char in "{}":
            kind = Kind.LBRACE if char == "{" else Kind.RBRACE
            current.append(Token(kind, char, self.line, self.column))
            self.pos += 1
        elif char == '"':
            current.append(self.string())
        else:
            start = self.pos
            while self.pos < len(text) and text[self.pos] not in _WORD_STOP:
                self.pos += 1
            raw = text[start : self.pos]
            current.append(Token(Kind.WORD, raw, self.line, start - self.line_start + 1))
        return False

    def continuation(self) -> None:
        column = self.column
        end = self.pos + 1
        while end < len(self.text) and self.text[end] in _BLANKS:
            end += 1
        if end >= len(self.text):
            raise self.error("line continuation '\\' at end of input", column)
        if self.text[end] != "\n":
            raise self.error("stray '\\' (only allowed at the end of a line, to continue it)")
        self.pos = end
        self.newline()

    def string(self) -> Token:
        text = self.text
        start, column = self.pos, self.column
        parts: list[str | None] = []
        chunk = bytearray()

        def flush() -> None:
            try:
                parts.append(chunk.decode("utf-8"))
            except UnicodeDecodeError:
                raise self.error(
                    "string is not valid UTF-8 (check its \\x escapes)", column
                ) from None
            chunk.clear()

        self.pos += 1
        while True:
            if self.pos >= len(text) or text[self.pos] == "\n":
                raise self.error("unterminated string", column)
            char = text[self.pos]
            if char == '"':
                self.pos += 1
                break
            if char == "*":
                flush()
                parts.append(None)
                self.pos += 1
            elif char == "\\":
                chunk += self.escape()
            else:
                chunk += char.encode("utf-8")
                self.pos += 1
        flush()
        merged = tuple(p for p in parts if p != "")
        return Token(Kind.STRING, text[start : self.pos], self.line, column, merged or ("",))

    def escape(self) -> bytes:
        text = self.text
        column = self.column
        nxt = text[self.pos + 1] if self.pos + 1 < len(text) else "\n"
        if nxt == "\n":
            raise self.error("unterminated string (a string cannot span lines)", column)
        if nxt in _SIMPLE_ESCAPES:
            self.pos += 2
            return _SIMPLE_ESCAPES[nxt].encode("utf-8")
        if nxt == "x":
            digits = text[self.pos + 2 : self.pos + 4]
            if len(digits) != 2 or not set(digits) <= _HEX:
                raise self.error("'\\x' needs two hex digits", column)
            self.pos += 4
            return bytes([int(digits, 16)])
        raise self.error(f"unknown escape '\\{nxt}'", column)


def logical_lines(
    text: str, source: str = "<policy>", errors: list[PolicyError] | None = None
) -> list[LogicalLine]:
    """Split `text` into non-empty logical lines of tokens; comments and blanks dropped.
    With `errors`, every error is collected there instead of the first being raised."""
    return _Scanner(text, source).lines(errors)
