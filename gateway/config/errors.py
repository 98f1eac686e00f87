"""The one error a configuration problem raises: it names the key it is about."""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration value is missing, of the wrong type, or out of range."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem
