"""The response encoder, in a subprocess (quantgate.protos cannot share a process with
tritonclient's stubs, which the other server tests load)."""

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
