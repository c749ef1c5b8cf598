"""`make demo`: the whole path on the built-in model, as a user would run it.

    quantgate train                         # train (or reuse) the digits classifier
    quantgate export CHECKPOINT --out B     # export -> calibrate -> quantize -> gate -> bundle
    quantgate serve B --port 0              # a real gRPC server in a subprocess, serving the
                                            # fastest variant that passed its gates
    ... a few real test digits through quantgate.serve.client, then SIGTERM

Each step is the CLI itself, so what the demo shows is what a user gets.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

CHECKPOINT = Path("artifacts/digits-small")
BUNDLE = Path("bundles/digits")
QG = [sys.executable, "-m", "quantgate"]
GATE_FAILED = 3  # quantgate's exit code when a gate failed (the bundle is still written)


def step(title: str, *args: str, allowed: tuple[int, ...] = (0,)) -> int:
    print(f"\n$ quantgate {' '.join(args)}    # {title}", flush=True)
    with subprocess.Popen([*QG, *args]) as command:
        try:
            code = command.wait()
        except KeyboardInterrupt:
            stop(command)
            raise
    if code not in allowed:
        sys.exit(f"demo: `quantgate {args[0]}` exited {code}")
    return code


def stop(child: subprocess.Popen) -> None:
    """After Ctrl-C: ``child`` got it too (one process group), and cleans up, says so and
    exits (subprocess.call would kill it a quarter of a second in); where only the demo was
    signalled (`kill -INT`, an IDE's stop button), it is asked to stop, with SIGTERM."""
    try:
        child.wait(timeout=5)
        return
    except subprocess.TimeoutExpired:
        pass
    child.terminate()
    try:
        child.wait(timeout=30)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def serve_and_query(*flags: str) -> None:
    shown = " ".join((str(BUNDLE), "--host 127.0.0.1 --port 0", *flags))
    print(f"\n$ quantgate serve {shown}    # gRPC, KServe v2 / Triton protocol", flush=True)
    server = subprocess.Popen(
        [*QG, "serve", str(BUNDLE), "--host", "127.0.0.1", "--port", "0", *flags],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = None
        deadline = time.monotonic() + 120
        for line in server.stdout:
            print("  " + line.rstrip(), flush=True)
            if m := re.search(r"listening on .*:(\d+)", line):
                port = int(m.group(1))
                break
            if time.monotonic() > deadline:
                break
        if port is None:
            sys.exit("demo: the server did not start")
        ask = query(port)
    except BaseException:  # Ctrl-C (a SIGTERM on top would cut its drain short), or a failure
        stop(server)
        raise
    server.send_signal(signal.SIGTERM)
    code = server.wait(timeout=60)
    print(f"server stopped on SIGTERM (exit {code})")
    print(
        "\nBy hand (. .venv/bin/activate first):\n"
        f"  quantgate serve {' '.join((str(BUNDLE), *flags))}    # on :8001; Ctrl-C stops it\n"
        f"  {ask}    # in another shell: a held-out digit's 64 pixel tokens, its top 3 classes"
    )


def query(port: int) -> str:
    """Send eight held-out digits to the server at ``port`` and print their classes; the
    `quantgate infer` command that sends the first of them, for a person to run."""
    import numpy as np

    from quantgate.model.data import load_digits_splits
    from quantgate.serve.client import Client

    test = load_digits_splits()["test"]
    rows = slice(0, 8)
    feeds = {"input_ids": test.input_ids[rows], "attention_mask": test.attention_mask[rows]}
    with Client(f"127.0.0.1:{port}", timeout=30) as client:
        logits = client.infer("digits", feeds)["logits"]
        # Triton's classification extension: the server answers "score:index:class name"
        top = client.infer("digits", feeds, outputs=("logits",), classes=1)["logits"][:, 0]
    names = [s.decode().split(":", 2)[2] for s in top]
    assert [int(n) for n in names] == np.asarray(logits).argmax(-1).tolist()
    print("\n8 held-out digits through gRPC:")
    print(f"  label      {' '.join(str(x) for x in test.labels[rows])}")
    print(
        f"  top class  {' '.join(names)}    (Triton's classification extension, "
        f"class_count=1: {top[0].decode()!r}, ... as score:index:class name)"
    )
    first = json.dumps(test.input_ids[:1].tolist())
    return f"quantgate infer digits -i 'input_ids={first}' --classes 3"


def _replacing(bundle: Path) -> tuple[str, ...]:
    """``--force`` where the demo's folder holds a bundle and nothing else (an earlier demo's,
    as a rule: a checkpoint trained again is another model, whose export would refuse to
    replace it). A folder that is no bundle, or holds files of yours beside one, is refused
    as the tour's export refuses it, naming them."""
    from quantgate import bundle as qb

    return ("--force",) if qb.is_bundle(bundle) and not qb.foreign_files(bundle) else ()


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    step(
        "train the built-in classifier on scikit-learn's digits", "train", "--out", str(CHECKPOINT)
    )
    gates = step(
        "export, quantize and gate",
        *("export", str(CHECKPOINT), "--out", str(BUNDLE), *_replacing(BUNDLE)),
        allowed=(0, GATE_FAILED),
    )
    step("what the bundle holds", "inspect", str(BUNDLE))
    if gates == GATE_FAILED:
        # The refusal is the product working: INT8 that is not measurably faster (or is less
        # accurate) does not ship. The server then serves only the variants that passed.
        print(
            "\nquantgate refused the INT8 variant (exit 3, reasons above and in report.md);"
            " serving what passed its gates (the validated FP32 model).",
            flush=True,
        )
        serve_and_query("--allow-failed-gates")
    else:
        serve_and_query()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the command running got it too, and said so
        sys.exit(130)
