"""What the bench scripts share: their section of docs/BENCHMARKS.md, the command line they
record there, a timing window, a `quantgate serve` subprocess, and perf_analyzer.

Standard library only at import time: bench/gpu_check.py imports this before its bootstrap
maps the source tree to quantgate.*.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "docs" / "BENCHMARKS.md"


# -- docs/BENCHMARKS.md ---------------------------------------------------------------------


def markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"


def write_section(name: str, text: str, *, heading: str, doc: Path = BENCHMARKS) -> None:
    """Put ``text`` between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` in ``doc``.

    Only what lies between the two markers is replaced: headings, hand-written analysis and
    other sections around them stay as they are. Where the markers are absent, they are
    added with ``text`` at the end of the ``## HEADING`` section, or in a new ``## HEADING``
    section at the end of the file. A marker without its partner, or a pair twice, is an
    error: the file is left untouched rather than guessed at.
    """
    begin, end = markers(name)
    block = f"{begin}\n{text.strip(chr(10))}\n{end}"
    body = doc.read_text() if doc.exists() else "# Benchmarks\n"
    lines = body.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == begin]
    ends = [i for i, line in enumerate(lines) if line.strip() == end]
    if len(starts) > 1 or len(ends) > 1 or len(starts) != len(ends):
        raise ValueError(
            f"{doc}: expected one {begin} ... {end} pair, found {len(starts)} and {len(ends)}"
        )
    if starts:
        (i,), (j,) = starts, ends
        if j < i:
            raise ValueError(f"{doc}: {end} comes before {begin}")
        lines[i : j + 1] = block.split("\n")
        body = "\n".join(lines) + "\n"
    else:
        section = re.search(rf"^## {re.escape(heading)}[ \t]*\n.*?(?=^## |\Z)", body, re.S | re.M)
        if section:
            head, tail = body[: section.end()].rstrip("\n"), body[section.end() :]
            body = f"{head}\n\n{block}\n" + (f"\n{tail}" if tail else "")
        else:
            body = f"{body.rstrip(chr(10))}\n\n## {heading}\n\n{block}\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    tmp = doc.with_name(f".{doc.name}.tmp")
    tmp.write_text(body)
    tmp.replace(doc)


def fine_tuning_args(doc: str, steps: int, batch: str) -> argparse.Namespace:
    """The command line of a bench that fine-tunes MiniLM, then exports and measures it:
    --steps (of ``batch``, "16 pairs"), --out to keep its files, --doc / --no-write."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=steps, help=f"fine-tuning steps of {batch}")
    ap.add_argument("--out", type=Path, help="keep the model, data and bundle here")
    ap.add_argument("--doc", type=Path, default=BENCHMARKS)
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error(f"--steps: expected 1 or more, got {args.steps}")
    return args


def train(model, optimizer, steps: int, loss_at, schedule=None) -> list[float]:
    """``steps`` optimizer steps of ``model`` (``loss_at(step)``: that step's loss tensor),
    the learning rate stepped by ``schedule`` where given, the loss printed every 20 steps;
    the model left in eval mode. Each step's loss."""
    model.train()
    losses = []
    for step in range(steps):
        loss = loss_at(step)
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % 20 == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    model.eval()
    return losses


def write_jsonl(path: Path, rows: list[dict], *, labels: bool) -> Path:
    """Text pairs as quantgate reads them, one JSON object a line: ``text`` and
    ``text_pair``, with each row's ``label`` where ``labels``."""
    keep = ("text", "text_pair", "label") if labels else ("text", "text_pair")
    path.write_text("".join(json.dumps({k: r[k] for k in keep}) + "\n" for r in rows))
    return path


def export(model: Path, out: Path, calibration: Path, evaluation: Path, *flags: str):
    """`quantgate export MODEL --out OUT --calibration ... --eval ...`, as a user runs it:
    the bundle's manifest, the command's exit code (3: a gate failed, which a table shows)
    and its seconds. Any other failure ends the benchmark with its stderr."""
    command = [
        sys.executable, "-m", "quantgate", "export", str(model), "--out", str(out),
        "--calibration", str(calibration), "--eval", str(evaluation), *flags,
    ]  # fmt: skip
    t0 = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if run.returncode not in (0, 3):
        sys.exit(f"quantgate export failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    return json.loads((out / "manifest.json").read_text()), run.returncode, seconds


def gates_table(manifest: dict) -> list[str]:
    """Each variant's gates in a bundle's manifest, as a Markdown table's lines."""
    lines = [
        "| variant | gate | value | interval | threshold | result |",
        "|---|---|---|---|---|---|",
    ]
    for v in manifest["variants"]:
        for g in v.get("gates", []):
            lo, hi = g.get("ci") or (None, None)
            interval = "" if lo is None else f"[{lo:.4g}, {hi:.4g}]"
            lines.append(
                f"| {v['precision']} | {g['name']} | {g['value']:.4g} | {interval} | "
                f"{g['op']} {g['threshold']:g} | {'pass' if g['passed'] else 'FAIL'} |"
            )
    return lines


def command_line() -> str:
    """This run's command as typed, for the docs: interpreter and script relative to the
    repository where they lie in it, then the real arguments."""

    def shown(path: str, fallback: str) -> str:
        try:
            return str(Path(path).absolute().relative_to(ROOT))
        except ValueError:
            return fallback

    python = shown(sys.executable, "python") if Path(sys.executable).is_absolute() else "python"
    script = shown(sys.argv[0], sys.argv[0])
    return shlex.join([python, script, *sys.argv[1:]])


def timed(fn, seconds: float, warmup: int = 5) -> list[float]:
    """Milliseconds of each call to ``fn`` during ``seconds``, after ``warmup`` calls.

    One function for a duration, not speed.time_interleaved: the scripts alternate whole
    windows (in-process, then served), and a served window is perf_analyzer's to time."""
    for _ in range(warmup):
        fn()
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


# -- a `quantgate serve` subprocess ---------------------------------------------------------


# Runs a command on the CPUs its first argument names (as `taskset -c` would). Not a
# preexec_fn: Python code in the forked child runs this process's at-fork handlers, and
# gRPC's, with clients of other servers open, broke the child's start now and then
# ("epoll_wait error: Bad file descriptor", the server gone).
_PINNED = (
    "import os, sys; os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(',')}); "
    "os.execvp(sys.argv[2], sys.argv[2:])"
)


class Server:
    """`quantgate serve BUNDLE --host 127.0.0.1 --port 0 ARGS` in a subprocess, up once it
    prints the port it listens on; SIGTERM (then SIGKILL after 60 s) on exit.

    ``cli`` is how to run `quantgate`: ``[sys.executable, "-m", "quantgate"]``, or a script
    that bootstraps the source tree first. Its output is drained on a thread after start-up
    (a full pipe would block the server); the last lines are kept for error messages.
    ``log``: a file for the server's stderr (its log) instead of that pipe, as an operator's
    log would go: no thread of this process wakes up for each of its lines. ``cpus``: the
    CPUs the server runs on (as ``taskset -c`` would pin it), every thread it makes.
    """

    def __init__(
        self,
        cli: Sequence[str],
        bundle: Path,
        *args: str,
        start_timeout: float = 120,
        log: Path | None = None,
        cpus: Collection[int] | None = None,
    ):
        cmd = [*cli, "serve", str(bundle), "--host", "127.0.0.1", "--port", "0", *args]
        self.args = cmd[len(cli) :]
        self.log = log
        if cpus is not None:  # pinned before the server starts: every thread it makes too
            cmd = [sys.executable, "-c", _PINNED, ",".join(map(str, cpus)), *cmd]
        with open(log, "w") if log else contextlib.nullcontext(subprocess.STDOUT) as stderr:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True)
        self.lines: collections.deque[str] = collections.deque(maxlen=50)
        self.serving: list[str] = []  # the server's "serving ..." lines: what it chose
        self._up = threading.Event()
        # Read on a thread from the start: a readline() here would block past start_timeout
        # on a server that hangs without printing.
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + start_timeout
        try:
            while not self._up.wait(0.2):
                if self.proc.poll() is not None and not self._up.wait(1):
                    raise RuntimeError(f"quantgate serve exited:\n{self.tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"quantgate serve did not start in {start_timeout:.0f} s:\n{self.tail()}"
                    )
        except BaseException:
            self.close()
            raise

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if self._up.is_set():
                continue
            if line.startswith("serving "):
                self.serving.append(line.strip())
            if m := re.search(r"listening on \S+:(\d+)", line):
                self.port = int(m.group(1))
                self.url = f"127.0.0.1:{self.port}"
                self._up.set()

    def tail(self) -> str:
        logged = self.log.read_text().splitlines(keepends=True)[-20:] if self.log else []
        return "".join([*self.lines, *logged])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- perf_analyzer --------------------------------------------------------------------------

# perf_analyzer's CSV columns (microseconds, means over its measurement) -> our names (ms)
PERF_COLUMNS = {
    "Client Send": "client_send",
    # perf_analyzer computes this one as its wait for the response minus the server's queue
    # and compute: it holds the transport both ways and the server's own overhead.
    "Network+Server Send/Recv": "network",
    "Server Queue": "queue",
    "Server Compute Input": "compute_input",
    "Server Compute Infer": "compute_infer",
    "Server Compute Output": "compute_output",
    "Client Recv": "client_recv",
}


class PerfAnalyzerError(RuntimeError):
    pass


def find_perf_analyzer() -> Path | None:
    """perf_analyzer on PATH, else the one `scripts/get-perf-analyzer.sh` puts in .tools/."""
    exe = shutil.which("perf_analyzer")
    local = ROOT / ".tools" / "bin" / "perf_analyzer"
    return Path(exe) if exe else local if local.exists() else None


def perf_analyzer(
    url: str,
    model: str,
    request: Mapping[str, Any],
    args: Sequence[str],
    interval_ms: int,
    *,
    exe: Path | None = None,
    timeout: float = 900,
) -> list[dict]:
    """Run perf_analyzer over gRPC with the batch-1 ``request`` (input name -> array of
    shape (1, ...)) and ``args`` (the load: ``--concurrency-range 1``, ...); one dict per
    load level from its CSV: level, tput (inferences/s), p50/p95/p99 and the columns of
    PERF_COLUMNS in milliseconds. Raises PerfAnalyzerError when it writes no results."""
    exe = exe or find_perf_analyzer()
    if exe is None:
        raise PerfAnalyzerError("perf_analyzer not found: run scripts/get-perf-analyzer.sh")
    with tempfile.TemporaryDirectory(prefix="qg-perf-") as d:
        data, out = Path(d) / "data.json", Path(d) / "out.csv"
        rows = {
            k: {"content": v[0].tolist(), "shape": list(v.shape[1:])} for k, v in request.items()
        }
        data.write_text(json.dumps({"data": [rows]}))
        cmd = [
            str(exe), "-m", model, "-u", url, "-i", "grpc", "-b", "1",
            "--input-data", str(data), "--measurement-interval", str(interval_ms),
            "--stability-percentage", "50", "-f", str(out), *args,
        ]  # fmt: skip
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if not out.exists():
            raise PerfAnalyzerError(
                f"perf_analyzer {' '.join(args)} wrote no results (exit {run.returncode}): "
                + (run.stdout + run.stderr)[-500:]
            )
        with open(out) as f:
            found = list(csv.DictReader(f))
    return [
        {
            "level": r.get("Concurrency") or r.get("Request Rate"),
            "tput": float(r["Inferences/Second"]),
            "p50": float(r["p50 latency"]) / 1e3,
            "p95": float(r["p95 latency"]) / 1e3,
            "p99": float(r["p99 latency"]) / 1e3,
            "split": {ours: float(r[col]) / 1e3 for col, ours in PERF_COLUMNS.items() if col in r},
        }
        for r in found
    ]


def server_split(before, after) -> dict[str, float]:
    """Mean server-side milliseconds per request between two ModelStatistics snapshots
    (``Client.statistics(model)``): each phase Triton counts (success is the whole of the
    server's time), compute (input + infer + output), and overhead: the rest of the server's
    time per request (decoding, checks, hand-offs between threads, encoding)."""
    b, a = before.model_stats[0].inference_stats, after.model_stats[0].inference_stats
    n = max(1, a.success.count - b.success.count)
    phases = ("success", "queue", "compute_input", "compute_infer", "compute_output")
    ms = {p: (getattr(a, p).ns - getattr(b, p).ns) / n / 1e6 for p in phases}
    ms["compute"] = ms["compute_input"] + ms["compute_infer"] + ms["compute_output"]
    ms["overhead"] = ms["success"] - ms["queue"] - ms["compute"]
    return ms
