"""Process-wide state swapped one holder at a time: the lock over captures and exporters, and
the stand-in root handler while ONNX Runtime's quantizers run."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest


def test_a_child_forked_while_a_thread_holds_the_lock_gets_it_free():
    """A child forked while a thread exports would wait forever for a holder it does not
    have (fork is Linux's default start method)."""
    import multiprocessing

    from quantgate.quiet import GLOBAL_STATE

    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with GLOBAL_STATE:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(10)
    child = multiprocessing.get_context("fork").Process(target=_take_the_lock)
    child.start()
    child.join(20)
    try:
        assert child.exitcode == 0, "the forked child waited on the lock"
    finally:
        if child.is_alive():
            child.kill()
        release.set()
        holder.join()


def test_a_child_forked_by_the_lock_holder_keeps_it_to_release():
    """Forked inside a capture: the child leaves the capture, releasing the lock it was
    forked holding (made free at the fork, the release raised RuntimeError)."""
    import os

    from quantgate.quiet import stdout_captured

    pid = -1
    try:
        with stdout_captured():
            pid = os.fork()  # the child goes on from here: out of the capture, releasing it
    except BaseException:  # noqa: BLE001 - in the child: its exit code says it
        if pid == 0:
            os._exit(1)
        raise
    if pid == 0:
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _take_the_lock() -> None:
    from quantgate.quiet import GLOBAL_STATE

    with GLOBAL_STATE:
        pass


_OVERLAPPING = """
import logging
from quantgate.quantize.ort_recipes import _without_preprocess_advice

first, second = _without_preprocess_advice(), _without_preprocess_advice()
first.__enter__()
second.__enter__()
first.__exit__(None, None, None)
logging.warning("ONNX Runtime warns while the second still quantizes")
second.__exit__(None, None, None)
print(logging.getLogger().handlers)
"""


def test_the_stand_in_root_handler_stays_until_the_last_quantization_ends():
    """Two builds quantizing at once in threads: the first to finish took the stand-in away
    while the second still ran, and ONNX Runtime's logging.warning then gave the root logger
    a stderr handler (the program's own basicConfig did nothing after)."""
    done = subprocess.run(
        [sys.executable, "-c", _OVERLAPPING], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("[]\n", "")


def test_a_logger_silenced_for_an_export_gets_the_programs_level_back():
    """The dynamo exporter's registration warnings are silenced while it runs; a program
    that set that logger's level (to debug torch) kept ERROR for good."""
    import logging

    from quantgate.quiet import logger_silenced

    name = "torch.onnx._internal.exporter._registration"
    logger = logging.getLogger(name)
    logger.setLevel(logging.DEBUG)
    try:
        with pytest.raises(RuntimeError), logger_silenced(name):
            assert not logger.isEnabledFor(logging.WARNING)
            raise RuntimeError("the export failed")
        assert logger.level == logging.DEBUG
    finally:
        logger.setLevel(logging.NOTSET)


def test_what_a_library_prints_to_stderr_is_captured_and_quantgates_log_still_shows(capsys):
    """torch.export prints a model's whole partial FX graph to sys.stderr when it cannot
    trace it (Longformer's: 300 lines before the export's own message). Captured; a log
    handler made before, holding the stream it was made with, still writes there."""
    import io
    import logging

    from quantgate.quiet import stderr_captured

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    log = logging.getLogger("quantgate.test_quiet")
    log.addHandler(handler)
    try:
        with stderr_captured() as printed:
            print("def forward(self, arg0_1): ...", file=sys.stderr)
            log.warning("quantgate's own line")
    finally:
        log.removeHandler(handler)
    assert printed.getvalue() == "def forward(self, arg0_1): ...\n"
    assert "def forward" not in capsys.readouterr().err
    assert stream.getvalue() == "quantgate's own line\n"
