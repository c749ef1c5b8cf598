"""Right padding: requests of different lengths stacked into one batch, as the server does it.

One rule for the server's batcher (``serve.batcher``) and for the gate that measures what
its batching does to a model's answers (``quantize.gates.batch_consistency``): a gate that
padded otherwise would measure batches the server never makes. And one rule for which
models it pads (``sequence_axis``), for the server (``serve.runtime.Model``) and for the
export's check that padding moves no answer (``export.validation``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from types import MappingProxyType

import numpy as np

MASK = "attention_mask"  # 1 on a row's tokens, 0 on its padding


def right_pad(
    parts: Sequence[Mapping[str, np.ndarray]],
    pads: Mapping[str, int | float] = MappingProxyType({}),
    *,
    sequence: Collection[str] | None = None,
) -> dict[str, np.ndarray]:
    """``parts`` (each one or more rows: input name -> (rows, ...)) stacked into one batch,
    each row padded after its tokens to the longest part.

    The inputs with the sequence axis (at 1) are ``sequence``, where the caller knows them
    (the server's model: every input), else those whose axis 1 is as long as the attention
    mask's in every part. Each is padded with its value in ``pads`` (default 0), the mask with
    0 whatever ``pads`` says, and any dims after the sequence are kept: (rows, T, ...). Other
    inputs, and every input where the parts have no mask, are concatenated as they are.
    """
    first = parts[0]
    if MASK not in first:
        return {k: np.concatenate([p[k] for p in parts]) for k in first}
    spans = []  # (first row, end row, length) of each part in the batch
    total = longest = 0
    for p in parts:
        rows, n = p[MASK].shape[:2]
        spans.append((total, total + rows, n))
        total, longest = total + rows, max(longest, n)
    batch = {}
    for k, a in first.items():
        if k not in sequence if sequence is not None else _unpadded(k, a, parts, spans):
            batch[k] = np.concatenate([p[k] for p in parts])
            continue
        pad = 0 if k == MASK else pads.get(k, 0)
        out = np.full((total, longest) + a.shape[2:], pad, dtype=a.dtype)  # (B, T, ...)
        for p, (start, stop, n) in zip(parts, spans, strict=True):
            out[start:stop, :n] = p[k]
        batch[k] = out
    return batch


def sequence_axis(
    inputs: Mapping[str, Sequence[int | str]], outputs: Iterable[Sequence[int | str]]
) -> str | None:
    """The name of the axis along which the server pads requests of different lengths into
    one batch, given each input's and output's axes (ints fixed, names variable); None where
    it batches requests of the same length only. Padding needs an attention mask (then it
    changes no answer), every input shaped (batch, sequence) with one name for the sequence,
    and no variable output axis but the batch and that sequence at axis 1 (each request's
    answer is cut back to its length there)."""
    if MASK not in inputs:
        return None
    names = {axes[1] if len(axes) == 2 else None for axes in inputs.values()}
    if len(names) != 1 or not isinstance(seq := names.pop(), str):
        return None
    for axes in outputs:
        for i, axis in enumerate(axes[1:], start=1):
            if isinstance(axis, str) and not (i == 1 and axis == seq):
                return None  # a variable axis an answer could not be cut back along
    return seq


def _unpadded(name: str, first: np.ndarray, parts, spans) -> bool:
    """Whether input ``name`` has no sequence axis: no axis 1, or one that is not the mask's
    length in some part."""
    return first.ndim < 2 or any(
        p[name].shape[1] != n for p, (_, _, n) in zip(parts, spans, strict=True)
    )


__all__ = ["MASK", "right_pad", "sequence_axis"]
