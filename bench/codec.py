"""Encoding a ModelInfer response: protobuf's way against quantgate's single copy.

    python bench/codec.py [--rounds 10]

MiniLM's outputs at batch 1, sequence 128 (last_hidden_state, 196 KB, and
sentence_embedding, 1.5 KB) are put into a ModelInferResponse and serialized, two ways,
in alternating rounds of 200 after warm-up; medians of the round medians:

- protobuf: ``raw_output_contents.append(array.tobytes())`` then ``SerializeToString``
  (copies the tensor bytes three times);
- ``codec.encode_response``: header fields through protobuf, tensor bytes appended as
  raw_output_contents fields by hand (one copy). Both give the same message.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import bootstrap  # noqa: E402 - maps the source tree to quantgate.*


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    a = ap.parse_args()
    bootstrap()
    from quantgate.protos import grpc_service_pb2 as pb
    from quantgate.serve import codec

    rng = np.random.default_rng(0)
    outputs = {
        "last_hidden_state": rng.standard_normal((1, 128, 384), dtype=np.float32),
        "sentence_embedding": rng.standard_normal((1, 384), dtype=np.float32),
    }

    def header() -> pb.ModelInferResponse:
        return pb.ModelInferResponse(id="1", model_name="minilm", model_version="1")

    def protobuf() -> bytes:
        response = header()
        for name, array in outputs.items():
            response.outputs.add(name=name, datatype="FP32", shape=array.shape)
            response.raw_output_contents.append(array.tobytes())
        return response.SerializeToString()

    def single_copy() -> bytes:
        return codec.encode_response(header(), outputs)

    assert pb.ModelInferResponse.FromString(single_copy()) == pb.ModelInferResponse.FromString(
        protobuf()
    )
    ways = {"protobuf (tobytes, append, serialize)": protobuf, "codec.encode_response": single_copy}
    rounds: dict[str, list[float]] = {name: [] for name in ways}
    for i in range(a.rounds + 1):  # the first round is warm-up
        for name, fn in ways.items():
            times = []
            for _ in range(200):
                t = time.perf_counter_ns()
                fn()
                times.append(time.perf_counter_ns() - t)
            if i:
                rounds[name].append(statistics.median(times) / 1e3)
    size = sum(x.nbytes for x in outputs.values())
    print(f"encode + serialize {size / 1024:.0f} KiB of outputs, median of {a.rounds} rounds")
    for name, us in rounds.items():
        print(f"  {name}: {statistics.median(us):.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
