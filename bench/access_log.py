"""What `quantgate serve --access-log` costs a batch-1 request, side by side.

    python bench/access_log.py [--pairs N] [--quick] [--digits-bundle DIR]
                               [--minilm-bundle DIR] [--doc PATH]

For each bundle, two `quantgate serve` of it run at once: one with --access-log, one
without. Both servers' stderr (their log) goes to a file, as an operator's log would go, not
to a pipe this process reads. quantgate's Python client (quantgate.serve.client) sends
batch-1 requests to them in turn, one at a time, after warm-up: pair after pair, the order
reversed every pair (quantgate.quantize.speed.time_interleaved), so that drift on a shared
machine hits both servers alike. Per pair it takes the on/off ratio of the two round trips;
the table gives the median ratio with its interquartile range, the median per-pair
difference, each server's p50, and the median ratio in each fifth of the run.

Bundles (built once when missing, under artifacts/):
  - the built-in digits classifier as `make demo` builds it (`quantgate train`, then
    `quantgate export`), sequence 64, asking for `logits`; served with --allow-failed-gates
    where its gates refused a variant, as the demo serves it;
  - MiniLM INT8, the bundle bench/serve.py builds and serves (`--precision int8`), at
    sequence 16 and 128, asking for `sentence_embedding`. Skipped, with a message, where
    that bundle cannot be built (its model package, all-MiniLM-L6-v2, is not installed).

Writes between the ``bench:access-log`` markers under "## Serving" in docs/BENCHMARKS.md.
A default run takes a few minutes on 2 cores; --quick is a smoke run, too short to quote.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import BENCHMARKS, ROOT, Server, command_line, write_section
from gpu_check import bundle_feed

from quantgate.quantize.speed import time_interleaved
from quantgate.serve.client import Client
from serve import CLI, build_bundle, int8_variant  # bench/serve.py

DIGITS_CHECKPOINT = ROOT / "artifacts" / "digits-small"  # `make demo`'s paths
DIGITS_BUNDLE = ROOT / "artifacts" / "bundles" / "digits"
MINILM_BUNDLE = ROOT / "artifacts" / "bench-minilm-int8"  # bench/serve.py's
GATE_FAILED = 3  # quantgate export's exit code when a gate failed (the bundle is written)
ACCESS = "quantgate.serve.access"


def digits_bundle(out: Path) -> Path:
    """The built-in classifier's bundle, as `make demo` builds it."""
    if (out / "manifest.json").exists():
        return out
    steps = (
        ["train", "--out", str(DIGITS_CHECKPOINT)],
        ["export", str(DIGITS_CHECKPOINT), "--out", str(out), "--force"],
    )
    for step in steps:
        print("building the digits bundle: quantgate", " ".join(step), file=sys.stderr)
        code = subprocess.call([*CLI, *step])
        if code not in (0, GATE_FAILED):
            sys.exit(f"quantgate {step[0]} exited {code}")
    return out


def failed_gates(bundle: Path) -> bool:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return any(v.get("verdict") == "fail" for v in manifest["variants"])


def side_by_side(
    on: Client, off: Client, model: str, x: dict, outputs: tuple[str, ...], warmup: int, pairs: int
) -> dict:
    """``pairs`` interleaved requests to each server after ``warmup`` each: per-pair ratios."""

    def call(client: Client):
        return lambda: client.infer(model, x, outputs=outputs)

    ms = time_interleaved({"on": call(on), "off": call(off)}, warmup=warmup, pairs=pairs)
    on_ms, off_ms = np.array(ms["on"]), np.array(ms["off"])
    ratios = on_ms / off_ms
    q1, med, q3 = np.percentile(ratios, [25, 50, 75])
    return {
        "pairs": len(ratios),
        "sent": warmup + len(ratios),  # requests each server answered
        "p50_on": float(np.median(on_ms)),
        "p50_off": float(np.median(off_ms)),
        "ratio": float(med),
        "iqr": (float(q1), float(q3)),
        "diff": float(np.median(on_ms - off_ms)),
        "fifths": [float(np.median(part)) for part in np.array_split(ratios, 5)],
    }


def access_lines(log: Path) -> int:
    """The access lines in a server's log (its settings line names the logger too)."""
    return sum(f" {ACCESS}: " in line for line in log.read_text().splitlines())


def measure(case: dict, warmup: int, pairs: int, logs: Path) -> dict:
    """Both servers of one bundle up, every sequence length of the case measured on them."""
    on_log, off_log = logs / f"{case['name']}-on.log", logs / f"{case['name']}-off.log"
    args = case["args"]
    with (
        Server(CLI, case["bundle"], *args, "--access-log", log=on_log) as on_server,
        Server(CLI, case["bundle"], *args, log=off_log) as off_server,
        Client(on_server.url, timeout=60) as on,
        Client(off_server.url, timeout=60) as off,
    ):
        rows = []
        for seq in case["seqs"]:
            x = bundle_feed(case["bundle"], 1, seq)
            r = side_by_side(on, off, case["model"], x, case["outputs"], warmup, pairs)
            rows.append({"seq": seq, **r, "load": os.getloadavg()[0]})
            print(
                f"{case['label']} seq {seq}: on/off {r['ratio']:.3f} "
                f"(IQR {r['iqr'][0]:.3f}-{r['iqr'][1]:.3f}), p50 {r['p50_off']:.2f} -> "
                f"{r['p50_on']:.2f} ms",
                file=sys.stderr,
            )
        serving = on_server.serving
    # both servers have exited: their logs are complete
    return {
        "rows": rows,
        "serving": serving,
        "lines": (access_lines(on_log), access_lines(off_log)),
        "sent": sum(r["sent"] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, help="timed pairs per row (default 3000; --quick 200)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--digits-bundle", type=Path, default=DIGITS_BUNDLE)
    parser.add_argument("--minilm-bundle", type=Path, default=MINILM_BUNDLE)
    parser.add_argument("--doc", type=Path, default=BENCHMARKS, help="the file to write into")
    args = parser.parse_args()
    pairs = args.pairs or (200 if args.quick else 3000)
    warmup = 20 if args.quick else 100

    # Every bundle first: a MiniLM that cannot be built is known before any timing.
    digits = digits_bundle(args.digits_bundle)
    cases = [
        {
            "name": "digits",
            "label": "digits (built-in)",
            "bundle": digits,
            "model": json.loads((digits / "manifest.json").read_text())["name"],
            "args": ("--allow-failed-gates",) if failed_gates(digits) else (),
            "seqs": (64,),
            "outputs": ("logits",),
        }
    ]
    skipped = None
    try:
        minilm = build_bundle(args.minilm_bundle)
    except ImportError as e:  # the model's package, or what its calibration texts need
        skipped = f"{e.name or e} is not installed"
    except subprocess.CalledProcessError as e:
        skipped = f"`quantgate export` exited {e.returncode}"
    if skipped:
        skipped = f"MiniLM skipped: its bundle could not be built offline ({skipped})"
        print(skipped, file=sys.stderr)
    else:
        _, recipe = int8_variant(minilm)
        cases.append(
            {
                "name": "minilm",
                "label": f"MiniLM INT8 ({recipe})",
                "bundle": minilm,
                "model": "minilm",
                "args": ("--precision", "int8"),
                "seqs": (16, 128),
                "outputs": ("sentence_embedding",),
            }
        )

    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="qg-access-log-") as d:
        results = [(case, measure(case, warmup, pairs, Path(d))) for case in cases]
    load_after = os.getloadavg()

    lines = [
        "| model | seq | pairs | p50 off ms | p50 on ms | on/off (median of per-pair ratios) "
        "| IQR of the ratios | on - off per pair, median ms | median ratio in each fifth |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case, res in results:
        for r in res["rows"]:
            lines.append(
                f"| {case['label']} | {r['seq']} | {r['pairs']} | {r['p50_off']:.2f} "
                f"| {r['p50_on']:.2f} | **{r['ratio']:.3f}** "
                f"| {r['iqr'][0]:.3f}-{r['iqr'][1]:.3f} | {r['diff']:+.3f} "
                f"| {', '.join(f'{f:.3f}' for f in r['fifths'])} |"
            )
    notes = [""]
    for case, res in results:
        on_lines, off_lines = res["lines"]
        served = "; ".join(s.removeprefix("serving ") for s in res["serving"])
        notes.append(
            f"- {case['label']}: served `{served}` (`{' '.join(['quantgate serve', *case['args']])}` "
            f"on both); the `--access-log` server wrote "
            f"{on_lines} access lines for the {res['sent']} requests it answered (warm-up "
            f"included), the other {off_lines}; 1-minute load average after each row: "
            + ", ".join(f"{r['load']:.2f}" for r in res["rows"])
        )
    if skipped:
        notes.append(f"- {skipped}")
    fmt = ", ".join
    header = (
        f"`{command_line()}`, {started:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, load "
        f"average (1/5/15 min) {fmt(f'{v:.2f}' for v in load_before)} before the servers "
        f"started and {fmt(f'{v:.2f}' for v in load_after)} after (the run itself raises it: "
        "see the load after each row below)"
        # the load before the servers started: other jobs on the cores (bench/quantize.py's test)
        + (", shared with other jobs at the start" if load_before[0] >= 0.5 else "")
        + ". Two `quantgate serve` of each bundle side by "
        "side, one with `--access-log`, one without, both logging (stderr) to a file. "
        f"quantgate's Python client sends batch-1 requests to them in turn, one at a time, "
        f"the order reversed every pair, after {warmup} warm-up requests to each; digits "
        "asks for `logits`, MiniLM for `sentence_embedding`."
    )
    reading = (
        "How to read it: on/off 1.05 means a request took 5% longer with the access log "
        "(the median over pairs of two requests sent back to back); on - off is that cost in "
        "milliseconds. The IQR is the spread of single pairs, not the uncertainty of the "
        "median: the fifths show how far the median moves over the run. With two servers "
        "taking turns, one's ONNX Runtime threads spin on after its run while the other "
        "runs: p50s run above a lone server's (bench/serve.py), and the ms column carries "
        "over better than the ratio. Absolute times drift with the machine; compare rows of one run."
    )
    text = "\n".join(["### Access log", "", header, "", *lines, *notes, "", reading])
    print(text)
    write_section("access-log", text, heading="Serving", doc=args.doc)
    print(f"wrote the access-log section of {args.doc}", file=sys.stderr)


if __name__ == "__main__":
    main()
