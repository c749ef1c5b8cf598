"""The server's log as an operator reads it: text or JSON lines (--log-format), and the
access log's line per RPC (--access-log)."""

from __future__ import annotations

import json
import logging
import queue
import re
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as tc
from bundles import counting
from conftest import ServerProcess
from helpers import batch, inputs, until
from tritonclient.utils import InferenceServerException

from quantgate.serve.logs import LogFormat, server_log

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


def test_the_servers_log_setup_is_undone_when_it_returns(capsys):
    """`serve` logs with UTC timestamps, its own steps without -v; a process that goes on
    (this one) gets its levels and handlers back, and no other formatter is touched."""
    root, served = logging.getLogger(), logging.getLogger("quantgate.serve")
    before = (root.level, served.level, list(root.handlers))
    formatters = [(h, h.formatter and h.formatter.converter) for h in root.handlers]
    with server_log(verbose=False):
        logging.getLogger("quantgate.serve.server").info("serving on here")
        logging.getLogger("quantgate.quantize").info("not a server step: not without -v")
    err = capsys.readouterr().err
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO quantgate\.serve\.server: serving on here"
    assert re.search(stamp, err) and "not a server step" not in err, err
    assert (root.level, served.level, list(root.handlers)) == before
    assert [(h, h.formatter and h.formatter.converter) for h in root.handlers] == formatters


def test_json_lines_have_ts_level_logger_message_and_the_records_fields(capsys):
    root = logging.getLogger()
    before = (root.level, list(root.handlers))
    with server_log(verbose=False, log_format=LogFormat.JSON):
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


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (("{missing}", "--port", "0"), "{missing}"),
        # a setting refused before any bundle is read: it was a text line alone
        (("{missing}", "--port", "18491", "--metrics-port", "18491"), "is the gRPC --port too"),
        (("{missing}", "--tls-cert", "{missing}"), "TLS needs both --tls-cert and --tls-key"),
    ],
)
def test_the_error_that_stops_a_json_logging_server_is_a_json_line_too(tmp_path, flags, said):
    missing = str(tmp_path / "nothing-here")
    r = subprocess.run(
        [sys.executable, "-m", "quantgate", "serve", *(f.format(missing=missing) for f in flags),
         "--log-format", "json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    json_lines = [line for line in r.stderr.splitlines() if line.startswith("{")]
    (error,) = [e for e in _json_lines("\n".join(json_lines)) if e["level"] == "ERROR"]
    assert said.format(missing=missing) in error["message"] and error["exit_code"] == 2, error
    assert error["logger"] == "quantgate.serve", error
    assert f"error: {error['message']}" in r.stderr  # and the line for a person, as in text


ACCESS = "quantgate.serve.access"
MODEL = "tiny-classifier"  # the manifest's name: the bundle is served alone
SERVICE = "/inference.GRPCInferenceService/"
LOGFMT = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def _logfmt(message: str) -> dict:
    """An access line's ``key=value`` message back as fields (quoted values are JSON)."""
    fields = {k: json.loads(v) if v.startswith('"') else v for k, v in LOGFMT.findall(message)}
    assert " ".join(f"{k}={v}" for k, v in LOGFMT.findall(message)) == message, message
    return {k: None if v == "-" else v for k, v in fields.items()}


def test_the_access_log_has_a_line_per_rpc_with_its_status_rows_and_latency(repo):
    """One JSON server with a token, whose lone requests wait 1 s for company: every way a
    call ends (a request whose timeout, 1 us, passes in the queue too), each a line with
    its fields as keys, and only the method and the code as its message."""
    token = {"authorization": "Bearer s3cret"}
    srv = ServerProcess(repo / "classifier", "--access-log", "--log-format", "json",
                        "--auth-token", "s3cret", "--max-queue-delay-us", "1000000")  # fmt: skip
    rng = np.random.default_rng(0)
    try:
        with tc.InferenceServerClient(srv.url) as c:
            assert c.is_server_live()  # open to probes: no token
            c.infer(MODEL, inputs(batch(rng, 3, 5)), headers=token, request_id='a "b"\nmodel=x')
            ok_rows, too_many = inputs(batch(rng, 1, 5)), inputs(batch(rng, 40, 5))
            refused = {
                "NOT_FOUND": dict(model_name="nope", inputs=ok_rows, headers=token),
                "INVALID_ARGUMENT": dict(model_name=MODEL, inputs=too_many, headers=token),
                "UNAUTHENTICATED": dict(model_name=MODEL, inputs=ok_rows),
                "UNAVAILABLE": dict(
                    # the request's timeout (us), run out in the queue, as Triton answers
                    # it (a client deadline could pass before a handler runs on a loaded
                    # machine, and such a call has no line)
                    model_name=MODEL,
                    inputs=ok_rows,
                    headers=token,
                    timeout=1,
                ),
            }
            for code, kwargs in refused.items():
                with pytest.raises(InferenceServerException) as err:
                    c.infer(**kwargs)
                assert code in err.value.status(), err.value

            answers: queue.SimpleQueue = queue.SimpleQueue()
            c.start_stream(callback=lambda result, error: answers.put(error), headers=token)
            for rows in (2, 40, 4):  # 40 rows: over --max-batch-size, answered in the stream
                c.async_stream_infer(MODEL, inputs(batch(rng, rows, 5)))
            errors = [answers.get(timeout=30) for _ in range(3)]
            c.stop_stream()
            assert [e is None for e in errors] == [True, False, True], errors

        def access() -> list[dict]:
            # (gRPC's C library writes its rare lines as text: the JSON-only test is above)
            json_lines = "\n".join(line for line in srv.log.splitlines() if line[:1] == "{")
            return [r for r in _json_lines(json_lines) if r["logger"] == ACCESS]

        try:  # the expired request is logged when the server's clock says it expired
            until(lambda: len(access()) == 7, timeout=30)
        except AssertionError:
            raise AssertionError(f"expected 7 access lines, found:\n{srv.log}") from None
    finally:
        assert srv.terminate() == 0, srv.log
    lines = access()
    for r in lines:
        assert r["message"] == f"{r['method'].removeprefix(SERVICE)} {r['code']}", r
        assert r["level"] == "INFO" and r["peer"].startswith("ipv4:127.0.0.1:"), r
        assert isinstance(r["latency_ms"], float) and r["latency_ms"] >= 0, r
    by_code = {}
    for r in lines:
        by_code.setdefault((r["method"].removeprefix(SERVICE), r["code"]), []).append(r)
    (live,) = by_code["ServerLive", "OK"]
    assert (live["model"], live["rows"], live["request_id"]) == (None, None, None), live
    (ok,) = by_code["ModelInfer", "OK"]
    assert (ok["model"], ok["version"], ok["rows"]) == (MODEL, "1", 3), ok
    assert ok["request_id"] == 'a "b"\nmodel=x', ok
    assert ok["latency_ms"] >= 900, ok  # it waited --max-queue-delay-us for company
    assert "--max-queue-delay-us 1000000: a request alone in the queue waits 1 s" in srv.log
    (missing,) = by_code["ModelInfer", "NOT_FOUND"]
    assert (missing["model"], missing["version"], missing["rows"]) == ("nope", None, None)
    (big,) = by_code["ModelInfer", "INVALID_ARGUMENT"]
    assert (big["model"], big["rows"]) == (MODEL, None), big
    # refused before the servicer, and before its request is read: a client without the
    # token spends no server memory parsing, and cannot write what it likes into the log
    (denied,) = by_code["ModelInfer", "UNAUTHENTICATED"]
    assert denied["model"] is None and denied["request_id"] is None, denied
    (late,) = by_code["ModelInfer", "UNAVAILABLE"]  # no abort: the servicer's code
    assert late["rows"] is None and late["model"] == MODEL, late
    (stream,) = by_code["ModelStreamInfer", "OK"]
    assert (stream["requests"], stream["failed"], stream["rows"]) == (3, 1, 6), stream
    assert (stream["model"], stream["version"]) == (MODEL, "1"), stream
    assert "requests" not in ok and "failed" not in ok, ok


def test_a_text_access_line_is_its_fields_as_key_value_pairs(repo):
    """The text format's access line holds every field; a value with spaces, quotes or a
    newline is quoted (JSON escapes): one line, and a client cannot forge a field."""
    srv = ServerProcess(repo / "classifier", "--access-log")
    try:
        with tc.InferenceServerClient(srv.url) as c:
            c.infer(
                MODEL, inputs(batch(np.random.default_rng(2), 2, 5)), request_id='a "b"\nmodel=x'
            )

        def access() -> list[str]:
            return [line for line in srv.log.splitlines() if f" INFO {ACCESS}: " in line]

        until(lambda: len(access()) == 1, timeout=30)  # written after the response is sent
    finally:
        assert srv.terminate() == 0, srv.log
    (line,) = access()
    assert TS.match(line), line
    message = line.partition(f" INFO {ACCESS}: ")[2]
    assert 'request_id="a \\"b\\"\\nmodel=x"' in message, message
    fields = _logfmt(message)
    assert fields.pop("peer").startswith("ipv4:127.0.0.1:"), fields
    assert float(fields.pop("latency_ms")) >= 0, fields
    assert fields == {
        "method": SERVICE + "ModelInfer",
        "model": MODEL,
        "version": "1",
        "code": "OK",
        "rows": "2",
        "request_id": 'a "b"\nmodel=x',
    }


def test_a_call_that_passes_its_deadline_while_it_runs_keeps_its_peer(tmp_path):
    """gRPC answers "" for the peer of a call that has ended; the access line of a call
    whose deadline passed while its model ran was written with peer="" (the reviewer's
    run: 6 lines of 90)."""
    srv = ServerProcess(counting(tmp_path / "slow"), "--access-log")
    slow = {"input_ids": np.array([[10**10]]), "attention_mask": np.array([[1]])}
    try:
        with tc.InferenceServerClient(srv.url) as c, pytest.raises(InferenceServerException):
            c.infer("slow", inputs(slow), client_timeout=0.5)  # runs for seconds

        def access() -> list[str]:
            return [line for line in srv.log.splitlines() if f" INFO {ACCESS}: " in line]

        until(lambda: len(access()) == 1, timeout=30)
    finally:
        srv.terminate()
    fields = _logfmt(access()[0].partition(f" INFO {ACCESS}: ")[2])
    assert fields["code"] in ("DEADLINE_EXCEEDED", "CANCELLED"), fields
    assert fields["peer"].startswith("ipv4:127.0.0.1:"), fields


def test_a_stream_the_client_cancels_is_logged_cancelled(tmp_path):
    """The client cancels a stream whose request runs: its run is stopped, the servicer
    finds nothing left to send and returns, and the line said code=OK (every one of 136
    streams a reviewer cancelled) though gRPC sent the client no status. (A cancel that
    reaches gRPC as the stream's end, after every answer was sent, is an OK the server
    sent: which of the two comes first, there, is gRPC's.)"""
    srv = ServerProcess(counting(tmp_path / "slow"), "--access-log")
    endless = {"input_ids": np.array([[10**10]]), "attention_mask": np.array([[1]])}
    try:
        with tc.InferenceServerClient(srv.url) as c:
            c.start_stream(callback=lambda result, error: None)
            try:
                c.async_stream_infer("slow", inputs(endless))  # counts until its client goes
                until(lambda: "slow: running a batch of 1" in srv.log, timeout=60)  # (-v)
            finally:
                c.stop_stream(cancel_requests=True)

        def access() -> list[str]:
            return [line for line in srv.log.splitlines() if f" INFO {ACCESS}: " in line]

        until(lambda: any("ModelStreamInfer" in line for line in access()), timeout=60)
    finally:
        assert srv.terminate() == 0, srv.log
    (line,) = [line for line in access() if "ModelStreamInfer" in line]
    fields = _logfmt(line.partition(f" INFO {ACCESS}: ")[2])
    assert (fields["code"], fields["requests"]) == ("CANCELLED", "1"), line


def test_without_access_log_no_rpc_is_logged(server):
    with tc.InferenceServerClient(server.url) as c:
        c.infer("classifier", inputs(batch(np.random.default_rng(1), 1, 5)))
        assert c.is_server_live()
    assert ACCESS not in server.log and "access log on" not in server.log, server.log
