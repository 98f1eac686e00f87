"""Logging setup: human text or one JSON object per line, both with key=value context."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


def kv(fields: dict[str, Any]) -> str:
    """key=value pairs, quoting values with spaces, for text log lines."""
    return " ".join(
        f"{k}={v!r}" if isinstance(v, str) and (" " in v or not v) else f"{k}={v}"
        for k, v in fields.items()
    )


class JSONFormatter(logging.Formatter):
    """One JSON object per line; `extra={"fields": {...}}` adds structured context."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is at the time, not what it was at setup (a
    process may swap it; test runners do)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = StderrHandler()
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
