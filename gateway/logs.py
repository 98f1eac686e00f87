"""Logging setup: human text or one JSON object per line, both with key=value context.

Peer-controlled text reaches the logs (identities, bus ids, error messages): the text
formatter escapes every argument, so no peer can start a log line of its own.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any


class Escaped(str):
    """Text already made safe for a text log line (what `kv` returns): not escaped again."""

    __slots__ = ()


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    escaped = _ESCAPES.get(ch)
    if escaped is not None:
        return escaped
    if ch.isprintable():
        return ch
    code = ord(ch)  # control, format (e.g. bidi overrides) and line/paragraph separators
    return (
        f"\\x{code:02x}"
        if code < 0x100
        else f"\\u{code:04x}"
        if code < 0x10000
        else f"\\U{code:08x}"
    )


def _unsafe(text: str) -> bool:
    return not text.isprintable() or '"' in text or "\\" in text


def quote(text: str, *, also: str = "") -> str:
    """`text` as it is if it is safe in a log line (and has none of `also`), else in
    double quotes with quotes, backslashes and unprintable characters escaped."""
    if not (_unsafe(text) or any(ch in text for ch in also)):
        return text
    return '"' + "".join(map(_escape, text)) + '"'


def kv(fields: dict[str, Any]) -> Escaped:
    """key=value pairs for text log lines; a value that is empty, has a space,
    or anything `quote` escapes, is quoted, so the pairs split back unambiguously."""
    parts = []
    for key, value in fields.items():
        text = str(value)
        parts.append(f"{key}=" + (quote(text, also=" ") if text else '""'))
    return Escaped(" ".join(parts))


class _Shown:
    """A log argument that formats as escaped text, for `%s` and `%r` alike."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __str__(self) -> str:
        return quote(str(self.value))

    def __repr__(self) -> str:
        return quote(repr(self.value))


def _shown(value: object) -> object:
    # Numbers stay numbers (`%d`, `%x`, `%.3f` need them) and cannot carry a newline.
    if value is None or isinstance(value, int | float | Escaped):
        return value
    return _Shown(value)


class TextFormatter(logging.Formatter):
    """One physical line per record, whatever the arguments hold.

    Every argument of the message (peer identities, bus ids, paths, rule text, error
    messages: anything a peer may have chosen) is escaped here, once for all call sites;
    the message template is the program's own. A traceback still spans several lines,
    each indented, so a line that starts in column 0 always starts a record.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        safe = copy.copy(record)  # other handlers (and the caller's) see the original
        if isinstance(record.args, Mapping):
            safe.args = {key: _shown(value) for key, value in record.args.items()}
        elif record.args:
            safe.args = tuple(_shown(value) for value in record.args)
        elif not isinstance(record.msg, str):  # `log.info(exc)`: the object is the text
            safe.msg, safe.args = "%s", (_shown(record.msg),)
        # Whatever still breaks lines (a traceback, an exception's text in it) gets its
        # continuation lines indented; splitlines() knows every line break there is.
        return "\n    ".join(super().format(safe).splitlines())


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
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
