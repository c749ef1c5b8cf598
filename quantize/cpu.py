"""What INT8 instructions this CPU has, and what that means for the recipe.

ONNX Runtime's integer GEMMs (MLAS) pick their kernel from the CPU at run time:

- ``amx-int8``, ``avx512-vnni``, ``avx-vnni``: u8 x s8 dot products accumulate straight
  into int32 (VPDPBUSD / AMX tiles): full 8-bit weights are safe and fast.
- ``avx512``, ``avx2`` without VNNI: u8 x s8 goes through VPMADDUBSW, which adds pairs of
  products in int16 and can saturate; ORT's advice is 7-bit weights (``reduce_range``).
- ``arm-dotprod`` (SDOT/UDOT), ``arm-i8mm`` (SMMLA): int32 accumulation, full range.

Detection reads /proc/cpuinfo (Linux); elsewhere it returns what ``platform`` tells.
"""

from __future__ import annotations

import platform
from pathlib import Path

# /proc/cpuinfo flag -> feature name used by quantgate
_X86 = {
    "amx_int8": "amx-int8",
    "avx512_vnni": "avx512-vnni",
    "avx_vnni": "avx-vnni",
    "avx512f": "avx512",
    "avx2": "avx2",
}
_ARM = {"asimddp": "arm-dotprod", "i8mm": "arm-i8mm"}
VNNI_LIKE = frozenset({"amx-int8", "avx512-vnni", "avx-vnni", "arm-dotprod", "arm-i8mm"})


def parse_cpuinfo(text: str) -> frozenset[str]:
    """Feature names from the text of /proc/cpuinfo (x86 ``flags`` or ARM ``Features``)."""
    found: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key not in ("flags", "features"):
            continue
        flags = set(value.split())
        table = _X86 if key == "flags" else _ARM
        found |= {name for flag, name in table.items() if flag in flags}
        break  # every core lists the same flags
    return frozenset(found)


def detect_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """This machine's INT8-relevant features, e.g. ``{"avx512-vnni", "avx512", "avx2"}``."""
    try:
        feats = parse_cpuinfo(cpuinfo.read_text(errors="replace"))
    except OSError:
        feats = frozenset()
    if not feats and platform.machine().lower() in ("arm64", "aarch64"):
        feats = frozenset({"arm-dotprod"})  # Apple silicon and recent ARM servers all have it
    return feats


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name, for benchmark tables."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def needs_reduce_range(features: frozenset[str]) -> bool:
    """True where u8 x s8 can saturate (x86 without VNNI): use 7-bit weights."""
    return not (features & VNNI_LIKE)
