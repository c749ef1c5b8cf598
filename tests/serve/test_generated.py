"""Generated code is reproducible, and the server's imports stay light."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PINNED = "1.85.1"


def _grpc_tools() -> str | None:
    try:
        return metadata.version("grpcio-tools")
    except metadata.PackageNotFoundError:
        return None


@pytest.mark.skipif(
    _grpc_tools() != PINNED,
    reason=f"regenerating needs grpcio-tools=={PINNED} (have {_grpc_tools()})",
)
def test_generated_code_matches_protos(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate_protos.py"), "--out", str(tmp_path)],
        check=True,
    )
    fresh = sorted(p.name for p in tmp_path.iterdir())
    checked_in = sorted(p.name for p in (ROOT / "protos").glob("*_pb2*.py*"))
    assert fresh == checked_in
    for name in fresh:
        assert (tmp_path / name).read_text() == (ROOT / "protos" / name).read_text(), (
            f"protos/{name} is stale: run `make protos`"
        )
        assert "DO NOT EDIT" in (ROOT / "protos" / name).read_text().splitlines()[0]


def test_server_imports_neither_torch_nor_model_nor_quantize_nor_tritonclient():
    code = (
        "import sys, quantgate.serve.server, quantgate.serve.client, quantgate.cli; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'tritonclient') "
        "or m.startswith(('quantgate.model', 'quantgate.quantize'))]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"


def test_the_protos_say_in_words_that_tritonclients_came_first():
    """Both register model_config.proto with protobuf: quantgate's client imported after
    tritonclient failed with a TypeError 7.6 KB long, ending in "duplicate file name"."""
    code = "import tritonclient.grpc\nimport quantgate.serve.client"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "ImportError: quantgate's KServe v2 protos cannot be" in r.stderr
    assert "use quantgate.serve.Client or tritonclient in a process, not both" in r.stderr
    assert len(r.stderr) < 2000, r.stderr


def test_quantgate_client_and_infer_command(server, repo):
    """Our own client and `quantgate infer`, in a subprocess (their stubs and tritonclient's
    cannot share a process)."""
    code = f"""
import numpy as np, onnxruntime as ort
from quantgate.serve.client import Client, connection_failed
from quantgate.errors import BadRequest, ModelNotFound
ids = np.array([[3, 4, 5, 6]], dtype=np.int64); mask = np.ones_like(ids)
ref = ort.InferenceSession({str(repo / "classifier" / "model.fp32.onnx")!r}).run(None, {{"input_ids": ids, "attention_mask": mask}})[0]
with Client({server.url!r}) as c:
    assert c.ready()
    got = c.infer("classifier", {{"input_ids": ids, "attention_mask": mask}})["logits"]
    np.testing.assert_allclose(got, ref, atol=1e-4)
    for bad, err in ((dict(input_ids=ids), BadRequest), (None, ModelNotFound)):
        try:
            c.infer("classifier" if bad else "nope", bad or {{"input_ids": ids}})
        except err as e:
            print(type(e).__name__, e)
    # as a notebook writes it: one output by name, the version as a number, big-endian
    # arrays (sent in the wire's little-endian order)
    one = c.infer("classifier", {{"input_ids": ids.astype(">i8"), "attention_mask": mask}},
                  outputs="logits", version=1)
    assert list(one) == ["logits"] and np.array_equal(one["logits"], got), one
    assert c.metadata("classifier", version=1).versions == ["1"]
    try:  # refused in the client, before anything is sent: no KServe datatype for it
        c.infer("classifier", {{"input_ids": ids.astype(np.complex64), "attention_mask": mask}})
    except BadRequest as e:
        print("client refused:", e)
    try:
        c.infer("classifier", [ids, mask])
    except TypeError as e:
        print("TypeError:", e)
    # more rows than the server's max batch size (32): sent in parts, answered whole
    many = np.random.default_rng(0).integers(3, 12, (70, 9))
    feeds = {{"input_ids": many, "attention_mask": np.ones_like(many)}}
    whole = ort.InferenceSession({str(repo / "classifier" / "model.fp32.onnx")!r}).run(None, feeds)[0]
    assert c.config("classifier").max_batch_size == 32
    np.testing.assert_allclose(c.infer("classifier", feeds)["logits"], whole, atol=1e-4)
# the host a gRPC target names, in the message of a name that does not resolve
said = connection_failed("failed to connect to all addresses; DNS resolution failed for x",
                         "dns:///no-such.invalid:8001", tls=False)
print("unresolved:", said)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "BadRequest" in out.stdout and "'attention_mask'" in out.stdout
    assert "ModelNotFound" in out.stdout and out.stdout.strip().endswith("ok")
    assert "client refused: input 'input_ids': numpy dtype complex64" in out.stdout, out.stdout
    assert "TypeError: inputs: expected a mapping of input name to array" in out.stdout
    assert (
        "unresolved: cannot connect to dns:///no-such.invalid:8001: the host no-such.invalid "
        in out.stdout
    )

    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "quantgate",
            "infer",
            "classifier",
            "--url",
            server.url,
            "-i",
            "input_ids=[[3, 4, 5, 6]]",
        ],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.startswith("logits [1, 5] float32")
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "quantgate",
            "infer",
            "nope",
            "--url",
            server.url,
            "-i",
            "input_ids=[[1]]",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "unknown model 'nope'" in bad.stderr


def test_request_inputs_makes_a_requests_arrays_from_the_models_metadata():
    """Token ids as lists become the inputs' datatypes exactly, with the attention mask and
    token types a tokenizer adds; what cannot be sent as given is refused, by cause."""
    code = """
import numpy as np
from quantgate.protos import grpc_service_pb2 as pb
from quantgate.serve.client import InputRefused, request_inputs
meta = pb.ModelMetadataResponse(name="m", inputs=[
    pb.ModelMetadataResponse.TensorMetadata(name=n, datatype=d, shape=[-1, -1])
    for n, d in (("input_ids", "INT64"), ("attention_mask", "INT64"), ("token_type_ids", "INT32"))])
feeds = request_inputs(meta, {"input_ids": [[5, 7, 9], [1, 2, 0]]})
assert sorted(feeds) == ["attention_mask", "input_ids", "token_type_ids"], feeds
assert feeds["input_ids"].dtype == np.int64 and feeds["input_ids"].tolist() == [[5, 7, 9], [1, 2, 0]]
assert feeds["attention_mask"].dtype == np.int64 and (feeds["attention_mask"] == 1).all()
assert feeds["token_type_ids"].dtype == np.int32 and (feeds["token_type_ids"] == 0).all()
mask = np.array([[1, 1, 1], [1, 1, 0]], dtype=np.int32)  # given: kept, as INT64
given = request_inputs(meta, {"input_ids": [[5, 7, 9], [1, 2, 0]], "attention_mask": mask})
assert given["attention_mask"].dtype == np.int64 and given["attention_mask"].tolist() == mask.tolist()
for bad in ({"token_ids": [[1]]}, {"input_ids": [[5.5]]}, {"input_ids": [[1, 2], [3]]},
            {"input_ids": [["a"]]}, {"input_ids": [5, 7]}, {"input_ids": [[2**70]]}):
    try:
        request_inputs(meta, bad)
    except InputRefused as e:
        print(e.cause, "|", e)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "unknown | input 'token_ids': the model's inputs are ['attention_mask', 'input_ids', "
        "'token_type_ids']",
        "inexact | input 'input_ids': 5.5 does not fit INT64 "
        "(-9223372036854775808..9223372036854775807, whole numbers)",
        "ragged | input 'input_ids': its rows differ in length; the rows of a batch have one "
        "length (pad short rows with 0, and 0 in attention_mask)",
        "not_numbers | input 'input_ids': expected numbers that fit INT64",
        "rank | input 'input_ids': expected 2 dimensions, the first the batch, got 1 dimension",
        "not_numbers | input 'input_ids': expected numbers that fit INT64",
    ], run.stdout


def test_the_client_takes_answers_as_large_as_the_server_sends(tmp_path):
    """gRPC's own client limit is 4 MiB; the server answers up to --max-message-bytes (64 MiB
    by default), and hidden states pass 4 MiB at 16 rows of 256 tokens. Here 300 tokens
    widened to 4,096 floats each: 4.9 MB, received whole by quantgate's client."""
    from bundles import hand_built
    from conftest import ServerProcess
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["f", "last"], ["u"]),
        helper.make_node("Expand", ["u", "width"], ["wide"]),
    ]
    consts = (
        helper.make_tensor("last", TensorProto.INT64, [1], [2]),
        helper.make_tensor("width", TensorProto.INT64, [3], [1, 1, 4096]),
    )
    out = ("wide", ("batch", "sequence", 4096))
    path = hand_built(tmp_path / "wide", nodes, "wide", output=out, initializers=consts)
    srv = ServerProcess(path)
    code = f"""
import numpy as np
from quantgate.serve.client import Client
ids = np.arange(300, dtype=np.int64)[None]
with Client({srv.url!r}) as c:
    wide = c.infer("wide", {{"input_ids": ids}})["wide"]
assert wide.shape == (1, 300, 4096) and wide.nbytes > 4 << 20, wide.shape
assert (wide[0, :, -1] == np.arange(300)).all()
print("ok")
"""
    try:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    finally:
        assert srv.terminate() == 0, srv.log
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_the_client_says_why_it_cannot_connect_and_what_to_do(tmp_path):
    """gRPC's own UNAVAILABLE ("failed to connect to all addresses; ... Connection refused")
    becomes a ConnectionFailed (an Unavailable) that says what went wrong and what to do:
    nothing listening, an HTTP server where a gRPC one was meant (a metrics port), TLS asked
    of a plaintext server. A server's own UNAVAILABLE (a full queue) is left as it says."""
    import http.server
    import socket
    import threading

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]  # closed again: nothing listens on it
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    code = f"""
from quantgate.errors import Unavailable
from quantgate.serve.client import Client, ClientTLS, ConnectionFailed, connection_failed
for url, tls in (("127.0.0.1:{free}", None), ("127.0.0.1:{web.server_port}", None),
                 ("127.0.0.1:{web.server_port}", ClientTLS())):
    try:
        with Client(url, tls=tls, timeout=10) as c:
            c.ready()
    except ConnectionFailed as e:
        assert isinstance(e, Unavailable)
        print(e.cause, "|", e)
assert connection_failed("model 'm' has 256 requests waiting: queue full", "u", tls=False) is None
"""
    try:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    finally:
        web.shutdown()
        web.server_close()
    assert run.returncode == 0, run.stderr
    refused, http, plaintext = run.stdout.splitlines()
    assert refused == (
        f"refused | cannot connect to 127.0.0.1:{free}: nothing listens there (connection "
        "refused). Start a server with `quantgate serve BUNDLE`, or give the url of a running one."
    )
    assert http.startswith(f"not_grpc | the server at 127.0.0.1:{web.server_port} answers HTTP/1")
    assert "metrics port (serve --metrics-port), not its gRPC port" in http, http
    assert plaintext.startswith(f"not_tls | the server at 127.0.0.1:{web.server_port} does not "
                                "serve TLS"), plaintext  # fmt: skip
    assert plaintext.endswith("Connect without TLS: Client(url) with no tls."), plaintext
