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
assert stream.infer_response.parameters["triton_final_response"].bool_param
del stream.infer_response.parameters["triton_final_response"]
assert stream.infer_response == want and not stream.error_message
assert len(codec.stream_response(encoded)) <= len(encoded) + codec.STREAM_FRAMING
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
refused(request("BYTES", [1], "bytes_contents", [b"a sentence"]), "'x'", "BYTES (strings)",
        "token ids", "quantgate infer -t TEXT --bundle BUNDLE")
refused(request("INT8", [1, 1], "int_contents", [1000]), "'x'", "1000", "INT8")
refused(request("FP16", [1, 2]), "'x'", "FP16", "raw_input_contents")
refused(request("INT64", [0, 2**62], raw=b""), "'x'", str(2**62), "larger than any array")
refused(request("INT64", [1, -1], raw=b""), "'x'", "negative dimension", "variable axis")
# A tensor's parameters: shared memory and unknown ones refused, HTTP's binary_data ignored.
r = request("INT64", [1, 1], raw=np.int64(1).tobytes())
r.inputs[0].parameters["binary_data_size"].int64_param = 8
refused(r, "'x'", "'binary_data_size'", "takes none", "leave it out")
r = pb.ModelInferRequest(model_name="m")
out = r.outputs.add(name="y")
out.parameters["binary_data"].bool_param = True
assert codec.requested_outputs(r) == {"y": 0}
out.parameters["classification"].int64_param = 2
assert codec.requested_outputs(r) == {"y": 2}
out.parameters["top_k"].int64_param = 2
try:
    codec.requested_outputs(r)
except BadRequest as e:
    assert "'top_k' is not one this server honours (classification: " in str(e), str(e)
else:
    raise AssertionError("top_k accepted")
print("ok")
"""


def test_decoded_inputs_are_refused_rather_than_wrapped_or_crashed():
    out = subprocess.run([sys.executable, "-c", DECODE], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


CLASSIFY = """
import numpy as np
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor
from quantgate.serve import codec

def top(array, count, batched=True, labels=()):
    out = codec.classify("y", array, count, batched=batched, labels=labels)
    return [[s.decode() for s in row] for row in np.atleast_2d(out)], out.shape

# Largest first; equal values in index order; NaN last; floats with 6 decimals.
got, shape = top(np.array([[1, 3, 3, np.nan, 2]], np.float32), 9, labels=tuple("abcde"))
assert got == [["3.000000:1:b", "3.000000:2:c", "2.000000:4:e", "1.000000:0:a", "nan:3:d"]]
assert shape == (1, 5), shape
# Integers exactly: uint64 beyond int64, int64 beyond float64's 2**53.
got, _ = top(np.array([[2**64 - 1, 5, 2**64 - 2]], np.uint64), 2)
assert got == [[f"{2**64 - 1}:0", f"{2**64 - 2}:2"]], got
got, _ = top(np.array([[2**62, 2**62 + 1]], np.int64), 1)
assert got == [[f"{2**62 + 1}:1"]], got
# Names only where a row holds one value per class; a row is all after the batch axis.
hidden = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)
got, shape = top(hidden, 2, labels=("x", "y", "z"))
assert got == [["5.000000:5", "4.000000:4"], ["11.000000:5", "10.000000:4"]] and shape == (2, 2)
# A model without a batch axis: one row, shape (count,).
got, shape = top(np.array([0.5, 0.25], np.float32), 1, batched=False, labels=("yes", "no"))
assert got == [["0.500000:0:yes"]] and shape == (1,), (got, shape)
# The BYTES wire format is tritonclient's, both ways, names in UTF-8 included.
strings = codec.classify("y", np.array([[0.1, 0.9]], np.float32), 2, batched=True,
                         labels=("caf\\u00e9", "\\u732b"))
raw = codec.encode_bytes(strings)
assert deserialize_bytes_tensor(raw).tolist() == strings.reshape(-1).tolist()
assert serialize_byte_tensor(strings).item() == raw  # a 0-d object array
assert codec.decode_bytes(raw, (1, 2)).tolist() == strings.tolist()
assert strings[0, 0].decode() == "0.900000:1:\\u732b"
for bad, shape in ((raw[:-1], (1, 2)), (raw, (1, 3))):
    try:
        codec.decode_bytes(bad, shape)
    except Exception as e:
        assert type(e).__name__ == "InferenceFailed", e
    else:
        raise AssertionError(f"decoded {bad!r} as {shape}")
print("ok")
"""


def test_classification_strings_are_tritons_and_exact():
    out = subprocess.run([sys.executable, "-c", CLASSIFY], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_a_value_is_cast_to_a_datatype_only_where_it_survives():
    """What `quantgate infer` sends a model: a whole number unchanged or refused; a float
    rounded to the input's precision, but never a finite value turned into infinity (70000
    as FP16 reached the model as inf, with a RuntimeWarning)."""
    import numpy as np
    import pytest

    from quantgate.serve.dtypes import cast_exact  # numpy alone: no protos in this process

    assert cast_exact(np.array([7.0, -3.0]), "INT64").tolist() == [7, -3]
    with pytest.raises(ValueError, match=r"5\.5 does not fit INT64"):
        cast_exact(np.array([5.5]), "INT64")
    half = cast_exact(np.array([0.1, 65504.0, np.inf]), "FP16")
    assert half.dtype == np.float16 and half.tolist() == [np.float16(0.1), 65504.0, np.inf]
    with pytest.raises(ValueError, match=r"^70000\.0 does not fit FP16 \(-65504\.\.65504\)$"):
        cast_exact(np.array([1.0, 70000.0]), "FP16")
    with pytest.raises(ValueError, match=r"1e\+300 does not fit FP32"):
        cast_exact(np.array([1e300]), "FP32")
    assert cast_exact(np.array([2**24 + 1]), "FP32").tolist() == [2**24]  # rounded, as floats are
