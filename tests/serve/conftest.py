"""Fixtures for the server tests: tiny real bundles and real server subprocesses.

The test process drives servers with tritonclient, whose protobuf symbols collide with
quantgate.protos: tests here must not import quantgate.protos or the modules that load
it (codec, servicer, server, client). Runtime, batcher, engine and metrics are fine.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import bundles  # noqa: E402
from helpers import SERVERS  # noqa: E402

LISTENING = re.compile(r"listening on \S+:(\d+)")


class ServerProcess:
    """`quantgate serve` as a real subprocess on a free port. One a test leaves running (an
    assertion failed before it stopped it) is killed after the test (``_no_server_left``)."""

    started = SERVERS  # shared by both imports of this module (helpers.SERVERS)

    def __init__(self, path: Path, *args: str, startup_s: float = 60.0):
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "quantgate",
                "-v",
                "serve",
                str(path),
                "--port",
                "0",
                "--host",
                "127.0.0.1",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        ServerProcess.started.append(self)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        threading.Thread(
            target=self._drain, args=(self.proc.stderr, self.stderr), daemon=True
        ).start()
        port = self._wait_for_port(startup_s)
        self.url = f"127.0.0.1:{port}"

    @staticmethod
    def _drain(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)

    def _wait_for_port(self, timeout: float) -> int:
        found, port = threading.Event(), []

        def read() -> None:  # keeps draining stdout after the port line
            for line in self.proc.stdout:
                self.stdout.append(line)
                if not found.is_set() and (m := LISTENING.search(line)):
                    port.append(int(m.group(1)))
                    found.set()
            found.set()  # the process ended without listening

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(timeout) or not port:
            self.proc.kill()
            raise RuntimeError(f"server did not start:\n{''.join(self.stdout)}{self.log}")
        return port[0]

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait; returns the exit code (a server still running after
        ``timeout`` fails the test with its log)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the server did not exit {timeout:g} s after SIGTERM:\n{self.log}"
            ) from None

    @property
    def log(self) -> str:
        return "".join(self.stderr)


@pytest.fixture(autouse=True)
def _no_server_left() -> Iterator[None]:
    """Kill the servers a test started and left running: a failed test must not leave a
    process that holds a port and a core through the rest of the run."""
    before = len(ServerProcess.started)
    yield
    for srv in ServerProcess.started[before:]:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait(30)
    del ServerProcess.started[before:]


@pytest.fixture(scope="session")
def repo(tmp_path_factory) -> Path:
    """A repository folder: classifier/ (a bundle) and encoder/1/ (a versioned bundle)."""
    root = tmp_path_factory.mktemp("repo")
    bundles.build(root / "classifier", "classifier")
    bundles.build(root / "encoder" / "1", "encoder")
    return root


@pytest.fixture
def classifier(repo):
    """The classifier bundle opened as the server opens it (a fresh Model per test: tests
    wrap its ``run``)."""
    from quantgate.bundle import CPU
    from quantgate.serve.config import ServeConfig
    from quantgate.serve.runtime import open_model

    return open_model(repo / "classifier", ServeConfig(path=repo), CPU)


@pytest.fixture(scope="session")
def server(repo) -> Iterator[ServerProcess]:
    s = ServerProcess(repo, "--max-queue-delay-us", "2000")
    yield s
    assert s.terminate() == 0, s.log


@pytest.fixture(scope="module")
def client(server):
    """tritonclient's gRPC client of the shared ``server``."""
    import tritonclient.grpc as tc

    with tc.InferenceServerClient(server.url) as c:
        yield c
