"""A burst of calls arriving faster than the server takes them up: gRPC holds them until
the server does, up to ``server.PENDING_CALLS``, where its default cancelled some at random
from 1,000 waiting (CANCELLED, no detail, counted nowhere)."""

from __future__ import annotations

import subprocess
import sys

from conftest import ServerProcess

CALLS = 2500  # at once, over 16 connections: the default cancelled hundreds of them

BURST = """
import asyncio, collections, sys
import grpc, numpy as np
from quantgate.protos import grpc_service_pb2 as pb, grpc_service_pb2_grpc as pbg

url, n = sys.argv[1], int(sys.argv[2])
request = pb.ModelInferRequest(model_name="tiny-classifier")
ids = np.full((1, 8), 3, dtype=np.int64)
for name, value in (("input_ids", ids), ("attention_mask", np.ones_like(ids))):
    t = request.inputs.add(name=name, datatype="INT64", shape=[1, 8])
    request.raw_input_contents.append(value.tobytes())

async def main():
    channels = [grpc.aio.insecure_channel(url) for _ in range(16)]
    stubs = [pbg.GRPCInferenceServiceStub(c) for c in channels]
    codes = collections.Counter()

    async def one(i):
        try:
            await stubs[i % 16].ModelInfer(request, timeout=120)
            codes["OK"] += 1
        except grpc.aio.AioRpcError as e:
            codes[e.code().name] += 1

    await asyncio.gather(*(one(i) for i in range(n)))
    for c in channels:
        await c.close()
    print(" ".join(f"{k}={v}" for k, v in sorted(codes.items())))

asyncio.run(main())
"""


def test_a_burst_of_calls_is_served_whole_not_cancelled_at_random(repo):
    srv = ServerProcess(repo / "classifier")
    try:
        run = subprocess.run([sys.executable, "-c", BURST, srv.url, str(CALLS)],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    finally:
        assert srv.terminate() == 0, srv.log
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == [f"OK={CALLS}"], run.stdout
