"""INT8 (and FP16) from a validated FP32 export, shipped only on evidence.

data.py         calibration and evaluation data, streamed (.npz, arrays, iterables, built-in)
text.py         text files (JSONL, CSV, TSV, lines) and the model's tokenizer
textfiles.py    those formats, read row by row with their byte offsets
heldout.py      evaluation rows told from calibration rows by their token ids' hashes
labels.py       what a label means: a class index or name, a tag per token; what is refused
recipes.py      INT8 recipes as values; ``quantize(src, recipe, calibration, out)``
graph.py        quantgate's own INT8 graph: smoothing, QuantizeLinear, integer GEMMs
ort_recipes.py  ONNX Runtime's quantizers as recipes (static QDQ/QOperator, dynamic)
sensitivity.py  which nodes cost the most accuracy, to keep them in FP32
gates.py        accuracy gates against FP32: labelled, or agreement for the model's kind
decide.py       the gate thresholds (GateConfig), and how a gate is decided with its interval
fidelity.py     per-output fidelity against FP32: the cosine:<output> and R² gates
stats.py        the intervals beside them: Wilson, Tango, bootstrap, order statistics
speed.py        speed gates: candidate vs FP32 timed interleaved, per served shape
search.py       try recipes within a budget, keep the fastest that passes
fp16.py         the FP16 variant for CUDA and its fidelity gate
cuda.py         speed and placement gates on the CUDA execution provider
report.py       report.md sections and the candidates plot
pipeline.py     export -> calibrate -> search -> gates -> bundle (``build``)
regating.py     a bundle's gates again, on new data (``regate``)
verdict.py      which gates failed, and their likely causes, in words
cpu.py          the CPU's INT8 instructions, which decide the default recipe

The entry points, loaded on first use::

    from quantgate.quantize import GateConfig, QuantConfig, build, regate
    bundle = build("artifacts/digits-small", "bundles/digits")   # export -> INT8 -> gates
    bundle = regate("bundles/digits", evaluation=rows)           # the gates again, on new data
    feeds = text_inputs("bundles/minilm", ["a sentence"])        # text as the bundle's inputs
    feeds, windows = text_windows("bundles/qa", [(question, context)])  # a long context too
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quantgate._lazy import exports

_WHERE = {
    "build": "pipeline",
    "regate": "regating",
    "GateConfig": "decide",
    "QuantConfig": "search",
    "text_inputs": "text",
    "text_windows": "text",
}
__all__ = [
    "GateConfig",
    "QuantConfig",
    "build",
    "regate",
    "text_inputs",
    "text_windows",
]
__getattr__, __dir__ = exports(__name__, _WHERE)

if TYPE_CHECKING:
    from quantgate.quantize.decide import GateConfig
    from quantgate.quantize.pipeline import build
    from quantgate.quantize.regating import regate
    from quantgate.quantize.search import QuantConfig
    from quantgate.quantize.text import text_inputs, text_windows
