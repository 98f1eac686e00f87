"""The one error a policy file or a device spec can raise."""

from __future__ import annotations

from collections.abc import Sequence


class PolicyError(ValueError):
    """A parse error, located: `str()` gives `source:line:column: message`."""

    def __init__(self, message: str, line: int, column: int, source: str = "<policy>") -> None:
        super().__init__(f"{source}:{line}:{column}: {message}")
        self.message = message
        self.line = line
        self.column = column
        self.source = source


class PolicyErrors(PolicyError):
    """Every error of a file, in order: located at the first (so code that reads one
    error reads that one); `errors` holds them all, `str()` the first and a count."""

    def __init__(self, errors: Sequence[PolicyError]) -> None:
        first = errors[0]
        super().__init__(first.message, first.line, first.column, first.source)
        self.errors = tuple(errors)
        more = len(errors) - 1
        self.args = (f"{first} (and {more} more error{'s' if more > 1 else ''})",)
