"""Graph optimization: ONNX Runtime's transformer fusions.

``onnxruntime.transformers.optimizer`` rewrites subgraphs into ORT's fused contrib ops
(Attention, SkipLayerNormalization, BiasGelu, EmbedLayerNormalization, ...). Only the
Python fusions run here (``opt_level=0``): the file stays portable across execution
providers, and ORT applies its own provider-specific optimizations when it loads the model.
The fused model is validated again by the caller.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import onnx

from quantgate import onnxfiles
from quantgate.errors import ExportError
from quantgate.quiet import logger_silenced, stdout_captured

log = logging.getLogger(__name__)


class OptimizerFailed(ExportError):
    """ONNX Runtime's transformer optimizer raised on a graph (its own bug: the export ships
    the exporter's graph, unfused, instead)."""


# The fusion families reported, and the fused op types that count for each. Other fused
# ops (a plain LayerNormalization, say) still appear in the per-op counts.
FUSION_FAMILIES: dict[str, tuple[str, ...]] = {
    "Attention": ("Attention", "MultiHeadAttention"),
    "SkipLayerNormalization": ("SkipLayerNormalization",),
    "Gelu": ("Gelu", "BiasGelu", "FastGelu"),
    "EmbedLayerNormalization": ("EmbedLayerNormalization",),
}


def fuse(src: Path, dst: Path, *, num_heads: int = 0, hidden_size: int = 0) -> dict[str, int]:
    """Write the fused graph of ``src`` to ``dst``; return fused op type -> count (non-zero)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    # The mask as given, 0s wherever they are. The optimizer's default turns it into a count
    # per row (MaskIndexEnd), which attends to a row's first N positions: right for right
    # padding alone. A row padded on the left (a tokenizer's padding_side="left") got
    # embeddings at cosine 0.37 to PyTorch's on all-MiniLM-L6-v2.
    options.use_raw_attention_mask(True)
    try:
        # A ModelProto, not a path: the optimizer then writes no files of its own.
        with (
            stdout_captured() as chatter,  # the optimizer print()s some diagnostics
            # its shape inference, a warning per node it cannot bound (DeBERTa's relative
            # positions: "Cannot determine if 128 - sequence < 0", a dozen times): the fused
            # graph is validated against PyTorch after, which is what decides
            logger_silenced("symbolic_shape_infer"),
            # a fusion that needs shapes it could not infer says so, once per attempt: the
            # fusions made are in the export's record, the ones missing in its report
            logger_silenced("fusion_skiplayernorm"),
        ):
            optimized = optimize_model(
                onnx.load(str(src)),
                model_type="bert",
                num_heads=num_heads,
                hidden_size=hidden_size,
                optimization_options=options,
                opt_level=0,
            )
        stats = optimized.get_fused_operator_statistics()
        # past protobuf's 2 GB, its weights in a file beside it (onnxfiles)
        external = onnxfiles.too_large(optimized.model)
        optimized.save_model_to_file(str(dst), use_external_data_format=external)
    # writing the fused graph: the machine's failure (a full disk), not the optimizer's
    except OSError as e:
        raise ExportError(f"ONNX Runtime's transformer optimizer failed on {src.name}: {e}") from e
    except Exception as e:  # noqa: BLE001
        raise OptimizerFailed(
            f"ONNX Runtime's transformer optimizer failed on {src.name}: {type(e).__name__}: {e}"
        ) from e
    if chatter.getvalue().strip():
        log.info("optimizer said: %s", " ".join(chatter.getvalue().split()))
    # The optimizer's copies of the model (weights and all) sit in reference cycles: freed
    # now, not under the validation that reads the fused graph next (+490 MB on MiniLM).
    del optimized
    gc.collect()
    fused = {op: int(n) for op, n in sorted(stats.items()) if n}
    log.info("fusions in %s: %s", dst.name, fused or "none")
    return fused


def fusion_summary(fused: dict[str, int]) -> dict[str, int]:
    """Per family (Attention, SkipLayerNormalization, Gelu, ...), how many nodes were fused."""
    return {family: sum(fused.get(op, 0) for op in ops) for family, ops in FUSION_FAMILIES.items()}
