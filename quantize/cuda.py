"""Gates on the CUDA execution provider: is each variant fast *where it will run*?

A GPU is launch-bound at small batches and bandwidth- or compute-bound at large ones, so
one speed number says little. Every variant is timed against FP32 at two shapes:

- ``throughput`` (batch 128, sequence 128): what a batching server sees under load. The
  variant must be at least ``min_speedup`` (1.2x, or the gates' --min-speedup) faster:
  that is the reason to ship it.
- ``latency`` (batch 1, sequence 128): a lone request. Kernel launches dominate here and
  FP16 gains little (on an H200, MiniLM FP16 ran 1.03x FP32), so this shape asks only
  that the variant is not slower: at least ``min_latency_ratio`` (0.95, timer noise).

Timing is interleaved after warm-up (A B, B A, ...: the loop of the CPU speed gates,
``speed.time_interleaved``), outputs bound to device memory through IO binding (so the
device->host copy of a 25 MB output is not what is measured), and the gate takes the
median of the per-pair ratios. The placement check (``quantgate.placement``) runs
first: a variant that leaves nodes on the CPU fails every speed gate with that reason,
whatever it measured.

The provider is a parameter, so the same code runs on the CPU provider in CI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from quantgate import cpus, placement
from quantgate.bundle import CPU, CUDA, GateResult, TensorSpec, all_passed, speed_gate_name
from quantgate.configs import check_fields, config_class
from quantgate.progress import ProgressFn
from quantgate.quantize.decide import GateConfig, decide, meets
from quantgate.quantize.speed import speed_feeds, time_interleaved
from quantgate.quantize.stats import median_coverage, median_interval
from quantgate.sessions import session

if TYPE_CHECKING:
    from quantgate.quantize.search import QuantConfig

NOT_FOR_CUDA = "not for CUDA: "  # opens the note that says why INT8 is not served on CUDA


@config_class
@dataclass(frozen=True)
class CudaGateConfig:
    throughput: tuple[int, int] = (128, 128)  # (batch, sequence)
    latency: tuple[int, int] = (1, 128)
    min_speedup: float = 1.2  # at the throughput shape
    min_latency_ratio: float = 0.95  # at the latency shape: not slower, within noise
    warmup: int = 3
    pairs: int = 40  # at most, per variant and shape
    budget_s: float = 10.0  # per shape, shared by the variants; at least 3 pairs each
    confidence: float = 0.95  # of each speed gate's interval (the gates' ``confidence``)

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class CudaTiming:
    shape: tuple[int, int]
    ms: dict[str, float]  # variant -> median ms (FP32: over all its pairs)
    speedup: dict[str, float]  # variant -> median of its per-pair FP32/variant ratios
    pairs: int  # the fewest pairs a variant was timed in
    ratios: dict[str, tuple[float, ...]] = field(default_factory=dict)  # variant -> its pairs'
    # variant -> FP32's median ms in the pairs it was timed with (FP32 beside that variant)
    fp32_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class CudaGating:
    """Every variant gated on the CUDA provider: what the report's CUDA section shows."""

    gates: dict[str, tuple[GateResult, ...]]  # precision -> its gates there
    timings: list[CudaTiming]
    where: dict[str, placement.PlacementReport]  # precision (fp32 too) -> its placement
    cfg: CudaGateConfig  # the shapes and thresholds they were timed and judged at


def available() -> bool:
    """Whether ONNX Runtime here has a CUDA provider that really loads a session."""
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        return False
    if hasattr(ort, "preload_dlls"):
        with contextlib.suppress(Exception):  # a miss shows up as a session without CUDA
            ort.preload_dlls()
    from onnx import TensorProto, helper

    node = helper.make_node("Identity", ["x"], ["y"])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    # An old opset and IR version, so that any onnxruntime can load it.
    model = helper.make_model(
        helper.make_graph([node], "probe", [x], [y]),
        opset_imports=[helper.make_opsetid("", 13)],
        ir_version=7,
    )
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=[CUDA, CPU])
    except Exception:  # noqa: BLE001 - no driver, no device: not available
        return False
    return CUDA in sess.get_providers()


def bound_runner(sess, feed: Mapping[str, np.ndarray], provider: str) -> Callable[[], None]:
    """One run through IO binding, outputs left on the device (ORT syncs at run end)."""
    binding = sess.io_binding()
    for k, v in feed.items():
        binding.bind_cpu_input(k, v)
    device = "cuda" if provider == CUDA else "cpu"
    for o in sess.get_outputs():
        binding.bind_output(o.name, device)
    return lambda: sess.run_with_iobinding(binding)


def measure(
    files: Mapping[str, str | Path],
    inputs: Sequence[TensorSpec],
    cfg: CudaGateConfig = CudaGateConfig(),
    *,
    provider: str = CUDA,
    falling_back: Collection[str] = (),
) -> list[CudaTiming]:
    """Time every model in ``files`` (one must be "fp32") against FP32 at both shapes.

    Each variant is interleaved with FP32 alone, a pair at a time: in one loop over all of
    them, the variant after INT8 (whose ops ran on the CPU for half a second, the GPU idle
    and its clocks falling) would start every reversed round cold, and FP32 never would.
    The shape's budget is shared among the pairs. A variant in ``falling_back`` (nodes on the
    CPU: dynamic INT8's) gets the CPU's threads for those nodes, as ONNX Runtime's default
    gives them (and the one H200 run had), not a CUDA session's one: on one thread each of
    its runs would take several times as long, out of a GPU run's few minutes."""
    # Spin-free, as the CPU speed gates: timed in turn, one session's idle CPU threads (INT8's
    # ops that fall back to the CPU) would spin into the next one's run.
    cpu_threads = cpus.threads() or cpus.physical()
    sessions = {
        k: session(
            p, provider, threads=cpu_threads if k in falling_back else 0, spin=False, precision=k
        )
        for k, p in files.items()
    }
    others = [k for k in sessions if k != "fp32"] or ["fp32"]  # FP32 alone: timed alone
    out = []
    for shape in (cfg.throughput, cfg.latency):
        feed = speed_feeds(inputs, *shape, sample=None)
        runners = {k: bound_runner(s, feed, provider) for k, s in sessions.items()}
        fp32_ms: list[float] = []
        ms, speedup, pairs, ratios, beside = {}, {"fp32": 1.0}, [], {}, {}
        for k in others:
            t = time_interleaved(
                {"fp32": runners["fp32"], k: runners[k]},  # one runner where k is FP32
                warmup=cfg.warmup,
                budget_s=cfg.budget_s / len(others),
                pairs=cfg.pairs,
            )
            fp32_ms += t["fp32"]
            ms[k] = statistics.median(t[k])
            ratios[k] = tuple(b / c for b, c in zip(t["fp32"], t[k], strict=True))
            speedup[k] = statistics.median(ratios[k])
            beside[k] = statistics.median(t["fp32"])
            pairs.append(len(t[k]))
        out.append(
            CudaTiming(
                shape=shape,
                ms={"fp32": statistics.median(fp32_ms), **ms},
                speedup=speedup,
                pairs=min(pairs),
                ratios=ratios,
                fp32_ms=beside,
            )
        )
    return out


def gates(
    name: str,
    timings: Sequence[CudaTiming],
    cfg: CudaGateConfig,
    *,
    report: placement.PlacementReport | None = None,
    baseline: placement.PlacementReport | None = None,
    provider: str = CUDA,
) -> tuple[GateResult, ...]:
    """The speed gates of variant ``name`` (and its placement gate when ``report`` is given):
    each the median of its per-pair ratios against FP32, decided by that median, with the
    order-statistic interval the CPU's speed gates give (where its pairs are known)."""
    out = []
    confidence = cfg.confidence
    for t in timings:
        latency = t.shape == cfg.latency
        threshold = cfg.min_latency_ratio if latency else cfg.min_speedup
        value = t.speedup[name]
        ratios = np.array(t.ratios.get(name, ()))
        ci = median_interval(ratios, confidence) if len(ratios) else None
        coverage = median_coverage(len(ratios), confidence) if len(ratios) else confidence
        passed, rule = decide(value, ci, threshold, ">=", rule="point", confidence=coverage)
        out.append(
            GateResult(
                name=speed_gate_name(*t.shape),
                value=value,
                threshold=threshold,
                op=">=",
                passed=passed,
                ci=ci,
                provider=provider,
                detail=(
                    f"{'latency: not slower than FP32' if latency else 'throughput'}; "
                    f"FP32 {t.fp32_ms.get(name, t.ms['fp32']):.2f} ms, {name} "
                    f"{t.ms[name]:.2f} ms (medians), median of "
                    f"{len(ratios) or f'at least {t.pairs}'} pair ratios interleaved with FP32"
                    + (
                        f", with its order-statistic interval ({coverage:.1%} coverage were "
                        "the pairs independent)"
                        if ci is not None
                        else ""
                    )
                    + rule
                ),
            )
        )
    if report is None:
        return tuple(out)
    return placement.fail_speed_gates(out, report, baseline=baseline)


def apply_gates(variant, gates: Sequence[GateResult], provider: str = CUDA):
    """``variant`` (an ExtraVariant or a bundle's Variant) with the results of its gates on
    ``provider`` (CUDA; the CPU where tests stand it in) put in place of any it had there.

    FP16 is for CUDA: the gates join its evidence and decide whether it ships. INT8's
    decide only where it runs: all passed, and CUDA joins its providers; any failed, and
    it is marked not for CUDA, with the reason as its last note. Gates measured elsewhere
    (the CPU's) are kept, so a re-gate on CUDA replaces only what CUDA measured before.
    """
    kept = tuple(g for g in variant.gates if g.provider != provider)
    if variant.precision == "fp16":
        return dataclasses.replace(variant, gates=(*kept, *gates))
    notes = "" if variant.notes.startswith(NOT_FOR_CUDA) else variant.notes
    notes = notes.partition("; " + NOT_FOR_CUDA)[0]  # an earlier gating's reason, the last note
    providers = tuple(p for p in variant.providers if p != CUDA)
    not_for = tuple(p for p in variant.not_for if p != CUDA)
    if all_passed(gates):
        return dataclasses.replace(
            variant, gates=(*kept, *gates), providers=(*providers, CUDA), not_for=not_for,
            notes=notes,
        )  # fmt: skip
    failed = "; ".join(_why_failed(gates))
    return dataclasses.replace(
        variant,
        gates=kept,
        providers=providers,
        not_for=(*not_for, CUDA),
        notes=(notes + "; " if notes else "") + f"{NOT_FOR_CUDA}{failed}",
    )


def _why_failed(gates: Sequence[GateResult]) -> list[str]:
    """Why a variant is not for CUDA, in the gates' words: its falling back to the CPU, and
    each gate whose value missed its threshold (a speed gate failed only by the fall-back,
    its speed enough, is not listed as slow)."""
    failed = [g for g in gates if not g.passed]
    out = [f"falls back to the CPU ({g.detail})" for g in failed if g.name == "placement"]
    return out + [
        f"{g.name} {g.value:.2f} (needs {g.op} {g.threshold:g})"
        for g in failed
        if g.name != "placement"
        and not (g.is_speed and meets(g.value, g.op, g.threshold))  # failed by the fall-back
    ]


def gate_variants(
    fp32: str | Path,
    variants: Mapping[str, str | Path],
    inputs: Sequence[TensorSpec],
    cfg: CudaGateConfig = CudaGateConfig(),
    *,
    provider: str = CUDA,
) -> tuple[
    dict[str, tuple[GateResult, ...]], list[CudaTiming], dict[str, placement.PlacementReport]
]:
    """Placement and speed gates on ``provider`` for every variant against ``fp32``.

    Returns the gates per variant, the timings behind them and the placement reports.
    """
    files = {"fp32": fp32, **variants}
    where = {k: placement.check(p, provider, precision=k) for k, p in files.items()}
    falling_back = [
        k for k in variants if not placement.placement_gate(where[k], baseline=where["fp32"]).passed
    ]
    timings = measure(files, inputs, cfg, provider=provider, falling_back=falling_back)
    result = {
        k: gates(k, timings, cfg, report=where[k], baseline=where["fp32"], provider=provider)
        for k in variants
    }
    return result, timings, where


def gate_built(
    result,
    variants: list,
    evaluation,
    cfg: QuantConfig,
    emit: ProgressFn,
    *,
    gate_cfg: GateConfig | None = None,
    provider: str = CUDA,
) -> tuple[list, list[str]]:
    """A build's variants, where a CUDA GPU is present, gated on it (``gate_every_variant``)
    with the results applied (``apply_gates``): FP16 ships on CUDA only if it is accurate and
    faster there; INT8's CUDA results decide only where it runs, slower or falling back to the
    CPU and it is marked not for CUDA (its CPU gates still decide whether it ships). The
    variants and the report's CUDA section; ``gate_cfg`` (the defaults when None) sets INT8's
    cosine threshold; ``provider`` is a parameter so that tests run this on the CPU.
    """
    from quantgate.quantize import report  # which imports this module

    if provider == CUDA and not available():
        return variants, []
    files = {v.precision: v.path for v in variants}
    gated = gate_every_variant(
        result.onnx, files, result.inputs, result.max_seq_len, evaluation, emit,
        fp16_min_cosine=cfg.fp16_min_cosine, gate_cfg=gate_cfg or GateConfig(), provider=provider,
    )  # fmt: skip
    out = [apply_gates(v, gated.gates[v.precision], provider) for v in variants]
    return out, [report.cuda_section(gated)]


def gate_every_variant(
    fp32: Path,
    files: dict[str, Path],
    inputs: Sequence,
    max_seq_len: int,
    evaluation,
    emit: ProgressFn,
    *,
    fp16_min_cosine: float,
    gate_cfg: GateConfig,
    provider: str,
) -> CudaGating:
    """Every variant in ``files`` (precision -> ONNX file) gated on ``provider``.

    Placement and speed against ``fp32`` (``gate_variants``, at sequence lengths capped
    at what the model takes; at the throughput shape at least ``gate_cfg.min_speedup``);
    then the fidelity on ``evaluation`` there (CUDA's FP16 arithmetic, which the CPU
    provider computes in FP32 between Casts): always for FP16, cosine >= ``fp16_min_cosine``, and for INT8 only where it
    is fast enough to run there at all, cosine >= ``gate_cfg.min_cosine``.
    """
    from quantgate.quantize import fp16

    emit("cuda", 0, 1, f"timing every variant on {provider}")
    # the throughput gate asks what the CPU's speed gates ask (--min-speedup); batch 1's stays
    # "not slower": a GPU at batch 1 is launch-bound and only ties FP32
    default = CudaGateConfig(min_speedup=gate_cfg.min_speedup, confidence=gate_cfg.confidence)
    seq = min(default.throughput[1], max_seq_len)
    timing = dataclasses.replace(
        default, throughput=(default.throughput[0], seq), latency=(default.latency[0], seq)
    )
    gates, timings, where = gate_variants(fp32, files, inputs, timing, provider=provider)
    for k, file in files.items():
        if k != "fp16" and not all_passed(gates[k]):
            continue  # not for CUDA anyway: its accuracy there does not matter
        try:
            fidelity = fp16.fidelity(fp32, file, evaluation(), provider=provider, precision=k)
        except fp16.NoFloatOutput:  # nothing FP16 or INT8 changes to compare: speed alone
            continue
        threshold = fp16_min_cosine if k == "fp16" else gate_cfg.min_cosine
        gates[k] = (*fidelity.gates(min_cosine=threshold, cfg=gate_cfg), *gates[k])
    emit("cuda", 1, 1, "gated")
    return CudaGating(gates, timings, where, timing)


__all__ = [
    "CudaGateConfig",
    "CudaGating",
    "CudaTiming",
    "apply_gates",
    "available",
    "gate_built",
    "gate_every_variant",
    "gate_variants",
    "gates",
    "measure",
]
