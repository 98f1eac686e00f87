"""The one error a policy file or a device spec can raise."""

from __future__ import annotations


class PolicyError(ValueError):
    """A parse error, located: `str()` gives `source:line:column: message`."""

    def __init__(self, message: str, line: int, column: int, source: str = "<policy>") -> None:
        super().__init__(f"{source}:{line}:{column}: {message}")
        self.message = message
        self.line = line
        self.column = column
        self.source = source
