"""ONNX Runtime defects that quantgate steers around, each with the smallest graph that shows it.

Every session quantgate opens on a variant (the gates', the server's, the placement check's)
passes its options through ``apply``, so a variant is measured and served under the same
options.

**FP16 on the CPU provider: NchwcTransformer segfaults** (onnxruntime 1.32; it looks like
microsoft/onnxruntime#15494, open since 1.14). With ``ORT_ENABLE_ALL``, creating a session
for an FP16 graph in which a ``Transpose`` feeds a ``MatMul`` whose weight is an FP16
initializer kills the process (SIGSEGV) inside ``InferenceSession``: no exception, no
message. ``nn.TransformerEncoder`` exported by the dynamo exporter has exactly that pattern
(``x.transpose(0, 1) @ in_proj_weight.T``), so the FP16 variant of such a model took the
whole ``quantgate export`` down with it. Disabling that one optimizer avoids it. It rewrites
2-D convolutions and pooling into the NCHWc layout, which an FP16 transformer does not have,
so nothing is lost; FP32 and INT8 sessions keep it. The repro (Transpose -> MatMul, ten
lines of ``onnx.helper``) is ``transpose_matmul_fp16`` in tests/gpu/test_fp16.py; its test
skips, saying so, once an onnxruntime no longer crashes without the workaround.
"""

from __future__ import annotations

# Session config key (onnxruntime_session_options_config_keys.h): optimizers to skip, by name.
DISABLE_OPTIMIZERS = "optimization.disable_specified_optimizers"

# The optimizers each precision's sessions run without.
DISABLED: dict[str, tuple[str, ...]] = {"fp16": ("NchwcTransformer",)}


def apply(options, precision: str) -> None:
    """Set up ``options`` (an ``ort.SessionOptions``, changed in place) to open a
    ``precision`` variant safely."""
    skip = DISABLED.get(precision, ())
    if skip:
        options.add_session_config_entry(DISABLE_OPTIMIZERS, ",".join(skip))


__all__ = ["DISABLED", "apply"]
