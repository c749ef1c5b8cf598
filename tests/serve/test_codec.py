"""The codec, in a subprocess (quantgate.protos cannot share a process with tritonclient's
stubs, which the other server tests load)."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import numpy as np
from quantgate.protos import grpc_service_pb2 as pb
from quantgate.serve import codec

rng = np.random.default_rng(0)
cases = {
    "hidden": rng.standard_normal((1, 128, 384)).astype(np.float32),  # 196 KB: 3-byte length
    "half": rng.standard_normal((2, 3)).astype(np.float16),
    "flags": np.array([[True, False, True]]),
    "empty": np.zeros((0, 4), dtype=np.int64),
    "transposed": np.arange(12, dtype=np.int32).reshape(3, 4).T,  # not C-contiguous
    "scalar": np.float64(2.5) * np.ones(()),
}
encoded = codec.encode_response(pb.ModelInferResponse(id="7", model_name="m"), cases)
want = pb.ModelInferResponse(id="7", model_name="m")
for name, array in cases.items():
    want.outputs.add(name=name, datatype=codec.datatype(array.dtype), shape=array.shape)
    want.raw_output_contents.append(np.ascontiguousarray(array).tobytes())
got = pb.ModelInferResponse.FromString(encoded)
assert got == want, (got.outputs, want.outputs)
for t, raw in zip(got.outputs, got.raw_output_contents):
    array = np.frombuffer(raw, dtype=codec.DATATYPES[t.datatype][0]).reshape(tuple(t.shape))
    np.testing.assert_array_equal(array, cases[t.name])
stream = pb.ModelStreamInferResponse.FromString(codec.stream_response(encoded))
assert stream.infer_response == want and not stream.error_message
assert codec.serialize(encoded) is encoded
assert codec.serialize(want) == want.SerializeToString()
print("ok")
"""


def test_encoded_response_is_the_message_with_raw_contents():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


DECODE = """
import numpy as np
from quantgate.errors import BadRequest
from quantgate.protos import grpc_service_pb2 as pb
from quantgate.serve import codec


def request(datatype, shape, field=None, values=(), raw=None):
    r = pb.ModelInferRequest(model_name="m")
    t = r.inputs.add(name="x", datatype=datatype, shape=shape)
    if field:
        getattr(t.contents, field).extend(values)
    if raw is not None:
        r.raw_input_contents.append(raw)
    return r


def refused(r, *words):
    try:
        codec.decode_inputs(r)
    except BadRequest as e:
        assert all(w in str(e) for w in words), (str(e), words)
        return
    raise AssertionError(f"accepted {r}")


got = codec.decode_inputs(request("INT8", [1, 3], "int_contents", [-128, 0, 127]))["x"]
assert got.dtype == np.int8 and got.tolist() == [[-128, 0, 127]]
refused(request("UINT8", [1, 1], "uint_contents", [300]), "'x'", "300", "UINT8", "0..255")
refused(request("INT8", [1, 1], "int_contents", [1000]), "'x'", "1000", "INT8")
refused(request("FP16", [1, 2]), "'x'", "FP16", "raw_input_contents")
refused(request("INT64", [0, 2**62], raw=b""), "'x'", str(2**62))
print("ok")
"""


def test_decoded_inputs_are_refused_rather_than_wrapped_or_crashed():
    out = subprocess.run([sys.executable, "-c", DECODE], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
