"""KServe v2 datatype names <-> numpy dtypes (little-endian). No protobuf here: the
runtime and the batcher use it without loading the wire format."""

from __future__ import annotations

import numpy as np

NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_NAMES = {dtype: name for name, dtype in NUMPY.items()}
assert np.little_endian, "raw contents are little-endian; a big-endian host would need byte swaps"


def datatype(dtype: np.dtype) -> str:
    """The KServe v2 datatype name of a numpy dtype ("INT64" for int64)."""
    return _NAMES[np.dtype(dtype)]


def cast_exact(values: np.ndarray, name: str) -> np.ndarray:
    """``values`` as KServe datatype ``name``, or ValueError naming the first value that
    would not survive the cast: a whole-number datatype gets each value unchanged (never
    rounded, never wrapped); a float one rounds to its precision, as any float input does,
    but never turns a finite value into infinity (70000 as FP16)."""
    dtype = NUMPY[name]
    if dtype.kind in "iub" and values.dtype.kind in "iuf" and values.size:
        low, high = (0, 1) if dtype.kind == "b" else (np.iinfo(dtype).min, np.iinfo(dtype).max)
        if values.dtype.kind == "f":
            with np.errstate(invalid="ignore"):
                bad = ~np.isfinite(values) | (values != np.round(values))
            bad |= (values < low) | (values > high)
            first = values[bad].flat[0] if bad.any() else None
        else:  # the extremes as Python ints: compared exactly, whatever the two widths
            lo, hi = int(values.min()), int(values.max())
            first = lo if lo < low else hi if hi > high else None
        if first is not None:
            raise ValueError(f"{first} does not fit {name} ({low}..{high}, whole numbers)")
    # (a safe cast, float32 into FP32 as the server's typed contents are, cannot overflow)
    if dtype.kind == "f" and values.dtype.kind in "iuf" and not np.can_cast(values, dtype):
        with np.errstate(over="ignore"):
            cast = values.astype(dtype, copy=False)
        if (overflow := np.isinf(cast) & np.isfinite(values)).any():
            largest = np.finfo(dtype).max
            raise ValueError(
                f"{values[overflow].flat[0]} does not fit {name} (-{largest:g}..{largest:g})"
            )
        return cast
    return values.astype(dtype, copy=False)
