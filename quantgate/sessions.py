"""ONNX Runtime sessions as quantgate opens them to measure a model: the gates', the speed
timings', the benchmarks'.

Every session of a variant gets that precision's options (``quantgate.workarounds``), so a
variant is measured under the options it is served with; the CPU provider stands behind any
other, as the server's sessions have it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from quantgate import cpus, onnxfiles, workarounds
from quantgate.bundle import CPU
from quantgate.errors import ConfigError


def session(
    model: Any,
    provider: str = CPU,
    *,
    threads: int = 0,
    spin: bool = True,
    precision: str = "fp32",
    optimize: bool = True,
    profile_prefix: str | None = None,
):
    """An ONNX Runtime session for ``model`` (a path or an ``onnx.ModelProto``) on
    ``provider``, with the CPU provider behind any other. A ModelProto past protobuf's 2 GB
    is opened from a temporary file with its weights beside it (``quantgate.onnxfiles``).

    ``threads``: intra-op threads (0: ``quantgate.cpus.threads``, ORT's default, one per
    physical core, unless a container's CPU quota is smaller; one on a GPU). ``spin`` False
    keeps idle threads from spinning, for sessions timed in turn. ``precision`` is the
    variant's (``quantgate.workarounds``). ``optimize`` False runs the graph as written (no
    ORT rewrites: statistics of its own tensors). ``profile_prefix`` turns on ORT's profiler,
    writing its JSON under that prefix (``session.end_profiling()`` names the file).
    """
    import onnxruntime as ort
    from onnx import external_data_helper as onnx_external

    if provider not in ort.get_available_providers():
        raise ConfigError(
            f"execution provider {provider} is not available in this onnxruntime "
            f"(available: {', '.join(ort.get_available_providers())})"
        )
    options = session_options(provider, threads=threads, spin=spin, precision=precision)
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    providers = [provider] if provider == CPU else [provider, CPU]
    if isinstance(model, (str, Path)):
        return _on(provider, ort.InferenceSession(str(model), options, providers=providers))
    if onnxfiles.too_large(model):  # cannot be serialized: written beside its weights
        with tempfile.TemporaryDirectory(prefix="quantgate-session-") as tmp:
            path = onnxfiles.save(model, Path(tmp) / "model.onnx")
            try:  # ONNX Runtime reads the weights in: the file may go once it has
                sess = ort.InferenceSession(str(path), options, providers=providers)
            finally:  # and the caller's model gets them back
                onnx_external.load_external_data_for_model(model, tmp)
        return _on(provider, sess)
    return _on(
        provider, ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    )


def session_options(provider: str, *, threads: int = 0, spin: bool = True, precision: str):
    """The options every session of a ``precision`` variant on ``provider`` starts from, the
    server's and the gates' alike: its intra-op ``threads`` (``quantgate.cpus``: one on a
    GPU), ONNX Runtime's errors only in the log (its warnings are about placement, which
    quantgate says in its own words), every graph optimization, the precision's
    workarounds, and where ``spin`` is False, idle threads that do not spin."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = cpus.threads(threads, gpu=provider != CPU)
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spin:
        # Two sessions timed in turn: an idle one's spinning threads would steal the cores
        # from the one being timed, whichever came second.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    workarounds.apply(options, precision)
    return options


def _on(provider: str, sess):
    """``sess``, refused where ONNX Runtime opened it on another provider than ``provider``:
    a CUDA provider whose libraries do not load gives a CPU session without an error, and
    its timings would be the CPU's, labelled CUDA's."""
    if sess.get_providers()[0] != provider:
        raise ConfigError(
            f"ONNX Runtime opened the session on {sess.get_providers()[0]}, not on {provider}: "
            f"its {provider} did not start (its log says why: missing CUDA or cuDNN libraries?)"
        )
    return sess


__all__ = ["session", "session_options"]
