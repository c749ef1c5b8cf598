"""What each bundle is served with: the execution provider, then the variant that the
bundle's gates vouch for on it.

This module never imports torch or quantgate.quantize: a serving host has neither.
"""

from __future__ import annotations

import logging

from quantgate import bundle as qb
from quantgate.bundle import CPU, CUDA
from quantgate.errors import BundleError, ServeError
from quantgate.serve.config import ServeConfig

log = logging.getLogger(__name__)

# What a provider serves when no variant has measured speed evidence there. On CUDA that is
# FP16 (2.11x FP32 on an H200, while INT8 fell back to the CPU: docs/BENCHMARKS.md);
# a bundle built without a GPU has accuracy gates for FP16 but no CUDA speed gate.
PREFERRED = {CUDA: "fp16"}


def choose_provider(device: str) -> str:
    """The execution provider for ``device`` ("auto", "cuda" or "cpu"), logged."""
    import onnxruntime as ort  # here: choosing a variant (inspect) needs no onnxruntime

    available = ort.get_available_providers()
    if device == "cpu":
        return CPU
    if CUDA in available:
        _preload_cuda_libraries()
        log.info("using the CUDA execution provider (onnxruntime %s)", ort.__version__)
        return CUDA
    if device == "cuda":
        raise ServeError(
            f"--device cuda, but this onnxruntime ({ort.__version__}) has no CUDA execution "
            f"provider (it has: {', '.join(available)}). Install onnxruntime-gpu "
            "(the `gpu` extra) on a machine with CUDA, or use --device cpu."
        )
    # The expected path on a CPU host (the `cpu` extra): said, not warned. A CUDA provider
    # that is listed but fails to load is warned about where the session is built.
    log.info(
        "no CUDA execution provider in onnxruntime %s (it has: %s); serving on the CPU",
        ort.__version__,
        ", ".join(available),
    )
    return CPU


def _preload_cuda_libraries() -> None:
    """onnxruntime-gpu >= 1.21 can load CUDA/cuDNN from the nvidia-* wheels (PyTorch's);
    without it the CUDA provider fails to load where those are not on the library path."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as e:  # noqa: BLE001 - a miss here shows up at session creation
            log.info("onnxruntime.preload_dlls() failed: %s", e)


def provider_options(cfg: ServeConfig, provider: str) -> list:
    """The ``providers`` argument of InferenceSession: CUDA with its options, then CPU."""
    if provider == CPU:
        return [CPU]
    cuda = {
        "device_id": str(cfg.cuda_device_id),
        "arena_extend_strategy": cfg.arena_extend_strategy,
        "cudnn_conv_algo_search": cfg.cudnn_conv_algo_search,
        # Run copies on the compute stream (ORT's default, stated: IO binding relies on it).
        "do_copy_in_default_stream": "1",
    }
    if cfg.gpu_mem_limit:
        cuda["gpu_mem_limit"] = str(cfg.gpu_mem_limit)
    return [(CUDA, cuda), CPU]


def choose_variant(
    manifest: qb.Manifest,
    provider: str,
    *,
    precision: str | None = None,
    allow_failed: bool = False,
    quiet: bool = False,
    served_as: str | None = None,
) -> qb.Variant:
    """The fastest variant that passed its gates on ``provider`` (FP32 when none beats it).

    ``precision`` forces one variant; it must suit the provider, and must have passed its
    gates unless ``allow_failed``. A variant passed over is logged, unless ``quiet``, with
    the model's name (``served_as``: the name it is served under, by default the
    manifest's): a repository's start logs every model's choice.
    """
    model = f"model {served_as or manifest.name!r}"
    if precision is not None:
        v = manifest.variant(precision)
        if not usable(v, provider):
            raise BundleError(
                f"bundle {manifest.name!r}: the {precision} variant is not meant for {provider} "
                f"(providers {list(v.providers)}, not_for {list(v.not_for)}); choose another --precision"
            )
        if not v.passed and not allow_failed:
            raise BundleError(
                f"bundle {manifest.name!r}: the {precision} variant failed its gates; "
                "pass --allow-failed-gates to serve it anyway"
            )
        return v
    candidates = [v for v in manifest.variants if v.passed and usable(v, provider)]
    if not candidates:
        raise BundleError(
            f"bundle {manifest.name!r} has no variant that passed its gates for {provider}"
        )
    measured, slower = [], []
    for v in candidates:
        score = qb.speed_score(passed_speed_gates(v, provider)) if v.precision != "fp32" else 0
        if score > 1:
            measured.append(v)
        elif score > 0:
            # Its gates passed only because they were set below 1x (--min-speedup 0.5, say):
            # accurate enough, but FP32 is faster here, and faster is what it is for.
            slower.append(v)
            if not quiet:
                log.warning(
                    "%s: %s passed its gates but runs at %.3fx fp32 on %s (geometric mean of "
                    "its measured shapes); not serving it. Pass --precision %s to serve it "
                    "anyway.",
                    model,
                    v.precision,
                    score,
                    provider,
                    v.precision,
                )
    if measured:
        # Passing its speed gates on this provider is the evidence, even where the slowest
        # shape only ties FP32 (a GPU at batch 1 is launch-bound: its gate asks >= 0.95x).
        return max(measured, key=lambda v: speedup(v, provider))
    preferred = [
        v for v in candidates if v.precision == PREFERRED.get(provider) and v not in slower
    ]
    if preferred:
        # No speed evidence on this provider (bundle made without one): its known-fast
        # precision, accuracy gates passed, over FP32.
        return preferred[0]
    fp32 = [v for v in candidates if v.precision == "fp32"]
    for v in candidates if fp32 and not quiet else ():
        if v.precision != "fp32" and v not in slower:
            log.info(
                "%s: %s passed its gates but none timed it on %s, so nothing says it is "
                "faster than fp32 here; serving fp32. Pass --precision %s to serve it anyway.",
                model,
                v.precision,
                provider,
                v.precision,
            )
    return (fp32 or candidates)[0]


def usable(variant: qb.Variant, provider: str) -> bool:
    """Whether ``variant`` may run on ``provider``. FP32 runs anywhere it is not excluded."""
    if provider in variant.not_for:
        return False
    return variant.precision == "fp32" or provider in variant.providers


def speedup(variant: qb.Variant, provider: str) -> float:
    """The variant's measured speedup over FP32 on ``provider``; 0 without evidence."""
    if variant.precision == "fp32":
        return 1.0
    values = [g.value for g in passed_speed_gates(variant, provider)]
    return min(values) if values else 0.0  # the slowest measured shape is the promise


def passed_speed_gates(variant: qb.Variant, provider: str) -> list[qb.GateResult]:
    """The variant's speed gates on ``provider`` that passed: its evidence there."""
    return [g for g in speed_gates_on(variant, provider) if g.passed]


def speed_gates_on(variant: qb.Variant, provider: str) -> list[qb.GateResult]:
    """The variant's speed gates measured on ``provider`` (no provider: its own)."""
    return [
        g
        for g in variant.gates
        if g.is_speed
        and (g.provider == provider or (g.provider is None and provider in variant.providers))
    ]
