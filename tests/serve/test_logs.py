"""The server's log as an operator reads it: text or JSON lines (--log-format)."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys

from conftest import ServerProcess

from quantgate.cli import LogFormat, _server_log

TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def _json_lines(text: str) -> list[dict]:
    """Every line of ``text`` as a JSON object (a line that is not one fails the test)."""
    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise AssertionError(f"not a JSON line ({e}): {line!r}\n{text}") from None
    return lines


def test_json_lines_have_ts_level_logger_message_and_the_records_fields(capsys):
    root = logging.getLogger()
    before = (root.level, list(root.handlers))
    with _server_log(verbose=False, log_format=LogFormat.JSON):
        log = logging.getLogger("quantgate.serve.server")
        log.info("serving on %s", "here:1", extra={"model": "m", "rows": 3, "peer": None})
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            log.exception('request "a"\nfailed')
        logging.getLogger("quantgate.quantize").info("not a server step: not without -v")
    assert (root.level, list(root.handlers)) == before  # undone, as the text format is
    serving, failed = _json_lines(capsys.readouterr().err)
    assert TS.fullmatch(serving["ts"]), serving
    assert serving == {
        "ts": serving["ts"],
        "level": "INFO",
        "logger": "quantgate.serve.server",
        "message": "serving on here:1",
        "model": "m",
        "rows": 3,
        "peer": None,
    }
    assert (failed["level"], failed["message"]) == ("ERROR", 'request "a"\nfailed')
    assert failed["exc"].startswith("Traceback") and "ZeroDivisionError" in failed["exc"]


def test_a_server_with_log_format_json_logs_only_json_lines(repo):
    srv = ServerProcess(repo / "classifier", "--log-format", "json")
    assert srv.terminate() == 0, srv.log
    lines = _json_lines(srv.log)
    assert all(TS.fullmatch(r["ts"]) and r["level"] and r["logger"] for r in lines), lines
    messages = [r["message"] for r in lines if r["logger"] == "quantgate.serve.server"]
    assert any(m.startswith("serving on 127.0.0.1:") for m in messages), messages
    assert messages[-1] == "stopped: every admitted request was answered", messages
    assert any(m.startswith("listening on 127.0.0.1:") for m in srv.stdout), srv.stdout


def test_the_error_that_stops_a_json_logging_server_is_a_json_line_too(tmp_path):
    missing = tmp_path / "nothing-here"
    r = subprocess.run(
        [sys.executable, "-m", "quantgate", "serve", str(missing), "--port", "0",
         "--log-format", "json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    json_lines = [line for line in r.stderr.splitlines() if line.startswith("{")]
    (error,) = [e for e in _json_lines("\n".join(json_lines)) if e["level"] == "ERROR"]
    assert str(missing) in error["message"] and error["exit_code"] == 2, error
    assert error["logger"] == "quantgate.serve", error
    assert f"error: {error['message']}" in r.stderr  # and the line for a person, as in text
