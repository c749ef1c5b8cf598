"""gRPC transport alone: what one round trip costs before any model runs.

    python bench/grpc_transport.py [--requests N]

bench/serve.py and bench/gpu_check.py compare a lone request through `quantgate serve` with
session.run in-process; this measures the part that has nothing to do with quantgate's code.
Each server runs in its own process and answers two calls: ServerLive (an empty message)
and ModelInfer with a 196 KB output (MiniLM's last_hidden_state at sequence 128). The TCP
echo and the first three gRPC servers answer from memory; the four "after a model run"
servers run a small ONNX Runtime model before answering ModelInfer. The client is the
Python sync stub quantgate.serve.client uses. Servers compared:

- ``no gRPC: TCP echo``: the floor, a plain socket between the same two processes (one
  byte back for ServerLive, the 196 KB for ModelInfer);
- ``aio``: grpc.aio (one event loop, gRPC's poller thread), as `quantgate serve` ran
  before it moved to the thread-pool server;
- ``aio, no BDP, 4 MB window``: the same with HTTP/2 BDP probing off and a 4 MB stream window;
- ``sync``: grpc.server on a thread pool (the handler runs on a pool thread, no event loop);
- ``aio, pinned to 2 CPUs``: the aio server with its process on CPUs 0-1 (hosts with more);
- ``aio, after a model run``: before answering ModelInfer the handler runs an ONNX Runtime
  session (three 384x1536 FFN blocks on 128 tokens, ORT's default threads) on a worker
  thread, as the aio `quantgate serve` did, and reports how long it ran; the row shows the round
  trip minus that run: what the transport costs once a model has just used every core;
- the same with the model run on the event loop itself (no hop to a worker thread and
  back), with ORT's thread spinning off (its threads sleep as soon as they are idle), and
  on a sync server whose request thread runs the model itself: `quantgate serve`'s layout
  for a lone request (its batcher runs a request that finds the model idle where it
  arrived).

Requests go to the servers in turn, their order reversed every ten rounds; medians of N
each. The last column is the CPU time a ServerLive round trip costs the server's process and
the client's, averaged over the calls: for the server, the nanoseconds on CPU of all its threads
(/proc/PID/task/*/schedstat), read just before and after the client's window; for the
client, time.process_time() around the call alone. It tells work apart from waiting. With
$OUT set it writes grpc_transport.md there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from concurrent import futures
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import bootstrap  # noqa: E402 - maps the source tree to quantgate.*

PAYLOAD = bytes(128 * 384 * 4)
ECHO = "no gRPC: TCP echo"
AFTER_RUN = "aio, after a model run"
INLINE = "aio, after a model run on the event loop"  # no hop to a worker thread and back
NO_SPIN = "aio, after a model run, ORT spinning off"  # ORT's threads sleep when idle
SYNC_RUN = "sync, after a model run on the request thread"
MODEL_RUNS = (AFTER_RUN, INLINE, NO_SPIN, SYNC_RUN)
WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 4 << 20)]


def _model(spinning: bool = True):
    """An ONNX Runtime session that keeps both cores busy for some milliseconds."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(3):
        for j, shape in enumerate(((384, 1536), (1536, 384))):
            w = f"w{i}{j}"
            inits.append(numpy_helper.from_array(rng.standard_normal(shape, np.float32) * 0.05, w))
            nodes.append(helper.make_node("MatMul", [x, w], [f"{w}_out"]))
            x = f"{w}_out"
        nodes.append(helper.make_node("Relu", [x], [f"relu{i}"]))
        x = f"relu{i}"
    graph = helper.make_graph(
        nodes,
        "ffn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [128, 384])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [128, 384])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    feed = {"x": rng.standard_normal((128, 384), np.float32)}

    def run() -> int:
        t = time.perf_counter_ns()
        session.run(None, feed)
        return time.perf_counter_ns() - t

    return run


def _cpu_s(pid: int) -> float:
    """CPU seconds process ``pid``'s threads have run so far: the first field of each
    thread's /proc schedstat, in nanoseconds (/proc/PID/stat counts 10 ms ticks, too coarse
    for calls of a fraction of a millisecond). A thread that ended is no longer counted."""
    ns = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # the thread ended since the listing
            ns += int((task / "schedstat").read_text().split()[0])
    return ns / 1e9


def _servicer(asynchronous: bool, model=None, inline: bool = False):
    from quantgate.protos import grpc_service_pb2 as pb
    from quantgate.protos import grpc_service_pb2_grpc as pb_grpc

    def live(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def answer(ran_ns: int | None):
        # model_version carries the ns the model ran, for the client to subtract
        response = pb.ModelInferResponse(model_version="" if ran_ns is None else str(ran_ns))
        response.raw_output_contents.append(PAYLOAD)
        return response

    def infer(self, request, context):  # the model, if any, on the calling thread
        return answer(None if model is None else model())

    if asynchronous:

        async def alive(self, request, context):
            return live(self, request, context)

        async def ainfer(self, request, context):
            if model is None or inline:
                return infer(self, request, context)
            return answer(await asyncio.get_running_loop().run_in_executor(None, model))

        methods = {"ServerLive": alive, "ModelInfer": ainfer}
    else:
        methods = {"ServerLive": live, "ModelInfer": infer}
    return type("Servicer", (pb_grpc.GRPCInferenceServiceServicer,), methods)()


class _Echo:
    """The floor: a TCP echo server without gRPC, and a client with the stub's two calls.
    ServerLive sends 1 byte and reads it back; ModelInfer sends 1 byte and reads 196 KB."""

    @staticmethod
    def serve(ports) -> None:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            ports.put(listener.getsockname()[1])
            conn, _ = listener.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while request := conn.recv(1):
                conn.sendall(PAYLOAD if request == b"I" else request)

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def ServerLive(self, _request) -> None:
        self.sock.sendall(b"L")
        self.sock.recv(1)

    def ModelInfer(self, _request) -> None:
        self.sock.sendall(b"I")
        left = len(PAYLOAD)
        while left:
            left -= len(self.sock.recv(left))


def _serve(kind: str, ports) -> None:
    if kind == ECHO:
        return _Echo.serve(ports)
    bootstrap()
    import grpc

    from quantgate.protos import grpc_service_pb2_grpc as pb_grpc

    if kind == "aio, pinned to 2 CPUs":
        os.sched_setaffinity(0, {0, 1})
    if kind.startswith("sync"):
        server = grpc.server(futures.ThreadPoolExecutor(4))
        model = _model() if kind in MODEL_RUNS else None
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(_servicer(False, model), server)
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        server.start()
        server.wait_for_termination()
        return

    async def run() -> None:
        server = grpc.aio.server(options=WINDOW if "BDP" in kind else None)
        model = _model(spinning=kind != NO_SPIN) if kind in MODEL_RUNS else None
        servicer = _servicer(True, model, inline=kind == INLINE)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(run())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    a = ap.parse_args()
    bootstrap()
    import grpc

    from quantgate.protos import grpc_service_pb2 as pb
    from quantgate.protos import grpc_service_pb2_grpc as pb_grpc

    kinds = [ECHO, "aio", "aio, no BDP, 4 MB window", "sync", *MODEL_RUNS]
    if (os.cpu_count() or 1) > 2:
        kinds.append("aio, pinned to 2 CPUs")
    ctx = mp.get_context("spawn")
    procs, stubs, pids = [], {}, {}
    for kind in kinds:
        ports = ctx.Queue()
        proc = ctx.Process(target=_serve, args=(kind, ports), daemon=True)
        proc.start()
        procs.append(proc)
        pids[kind] = proc.pid
        port = ports.get(timeout=60)
        if kind == ECHO:
            stubs[kind] = _Echo(port)
            continue
        opts = WINDOW if "BDP" in kind else None
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=opts)
        stubs[kind] = pb_grpc.GRPCInferenceServiceStub(channel)
    live, infer = pb.ServerLiveRequest(), pb.ModelInferRequest(model_name="m")
    calls = {"ServerLive": lambda s: s.ServerLive(live), "196 KB": lambda s: s.ModelInfer(infer)}
    times = {(k, c): [] for k in kinds for c in calls}
    # CPU seconds each call cost the server process and this (client) process, summed
    cpu = {(k, c): [0.0, 0.0] for k in kinds for c in calls}
    ran: list[float] = []
    for i in range(a.requests + 200):  # the first 200 are warm-up
        # the servers in turn, the order reversed every other model-run round (those are
        # the rounds divisible by 10): a server timed right after a model run shares the
        # CPUs with that run's spinning threads, and it is not always the same one
        order = list(stubs.items())
        for kind, stub in order[:: -1 if i // 10 % 2 else 1]:
            if kind in MODEL_RUNS and i % 10:
                continue  # a model run per request would make the whole bench 10x longer
            for call, fn in calls.items():
                # the server's reading outside the client's CPU window, so that the client
                # column is the call alone, without the /proc reads
                server0 = _cpu_s(pids[kind])
                client0 = time.process_time()
                t = time.perf_counter()
                response = fn(stub)
                ms = (time.perf_counter() - t) * 1e3
                client1 = time.process_time()
                server1 = _cpu_s(pids[kind])
                if kind in MODEL_RUNS and call == "196 KB":
                    ran.append(int(response.model_version) / 1e6)
                    ms -= ran[-1]
                if i >= 200:
                    times[kind, call].append(ms)
                    cpu[kind, call][0] += server1 - server0
                    cpu[kind, call][1] += client1 - client0
    for proc in procs:
        proc.terminate()
    lines = [
        f"gRPC round trip, Python sync client, {os.cpu_count()} CPUs, grpcio {grpc.__version__}, "
        f"median of {a.requests} alternating requests ({a.requests // 10} for the model-run "
        f"servers, whose model ran {statistics.median(ran):.2f} ms (median), subtracted)",
        "",
        "| server | ServerLive ms | 196 KB response ms | CPU per ServerLive, server / client µs |",
        "|---|---|---|---|",
    ]
    for kind in kinds:
        live_ms = statistics.median(times[kind, "ServerLive"])
        big_ms = statistics.median(times[kind, "196 KB"])
        n = len(times[kind, "ServerLive"])
        server_us, client_us = (s / n * 1e6 for s in cpu[kind, "ServerLive"])
        lines.append(
            f"| {kind} | {live_ms:.3f} | {big_ms:.3f} | {server_us:.0f} / {client_us:.0f} |"
        )
    md = "\n".join(lines) + "\n"
    print(md)
    if out := os.environ.get("OUT"):
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "grpc_transport.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
