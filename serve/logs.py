"""The server's log on stderr, as an operator reads it beside other services' logs: every
line says when (UTC), and the server's own steps (start, warm-up, settings, drain) are
logged without -v. Text lines, or one JSON object per line for a log pipeline
(``LogFormat.JSON``).

    with server_log(verbose=False, log_format=LogFormat.JSON):
        run(cfg)
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from enum import Enum

from quantgate.errors import QuantgateError, exit_code


class LogFormat(str, Enum):
    TEXT = "text"
    JSON = "json"


class _UTC(logging.Formatter):
    converter = time.gmtime  # type: ignore[assignment]  # (typeshed: gmtime is overloaded)


# What every LogRecord has; anything else on a record came from `extra=` (the access log's).
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class _JSONLines(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO-8601, milliseconds), level, logger, message,
    then the record's own fields (``extra=``: the access log's method, model, code, ...),
    and ``exc`` with the traceback of a logged exception."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            # a message that is its record's fields (the access log's) says them once, as keys
            "message": msg.brief() if hasattr(msg := record.msg, "brief") else record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS:
                line.setdefault(key, value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)  # ASCII: valid on a stream of any encoding


@contextlib.contextmanager
def server_log(verbose: bool, log_format: LogFormat = LogFormat.TEXT) -> Iterator[None]:
    """While the server runs: a log read later beside other services', so every line says
    when (UTC), and what the server does (start, warm-up, settings, drain) without -v.
    Text lines, or JSON objects for a log pipeline (_JSONLines), where the error that ends
    the server is a JSON line too. Undone on exit, for a process that goes on (a test, a
    program that embeds the CLI)."""
    root, served = logging.getLogger(), logging.getLogger("quantgate.serve")
    levels = root.level, served.level
    handler = logging.StreamHandler(sys.stderr)
    if log_format == LogFormat.JSON:
        handler.setFormatter(_JSONLines())
    else:
        handler.setFormatter(
            _UTC(
                "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s",
                "%Y-%m-%dT%H:%M:%S",
            )
        )
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    served.setLevel(logging.DEBUG if verbose else logging.INFO)  # -v: each batch, too
    try:
        yield
    except QuantgateError as e:
        if log_format == LogFormat.JSON:  # main() prints it as text for a person, too
            served.error("%s", e, extra={"exit_code": exit_code(e)})
        raise
    finally:
        root.removeHandler(handler)
        root.setLevel(levels[0])
        served.setLevel(levels[1])
