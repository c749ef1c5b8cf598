"""`make demo`: the whole path on the built-in model, as a user would run it.

    quantgate train                         # train (or reuse) the digits classifier
    quantgate export CHECKPOINT --out B     # export -> calibrate -> quantize -> gate -> bundle
    quantgate serve B --port 0              # a real gRPC server in a subprocess
    ... a few real test digits through quantgate.serve.client, then SIGTERM

Each step is the CLI itself, so what the demo shows is what a user gets.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

CHECKPOINT = Path("artifacts/digits-small")
BUNDLE = Path("artifacts/bundles/digits")
QG = [sys.executable, "-m", "quantgate"]


def step(title: str, *args: str) -> None:
    print(f"\n$ quantgate {' '.join(args)}    # {title}", flush=True)
    code = subprocess.call([*QG, *args])
    if code != 0:
        sys.exit(f"demo: `quantgate {args[0]}` exited {code}")


def serve_and_query() -> None:
    print(
        f"\n$ quantgate serve {BUNDLE} --port 0    # gRPC, KServe v2 / Triton protocol", flush=True
    )
    server = subprocess.Popen(
        [*QG, "serve", str(BUNDLE), "--host", "127.0.0.1", "--port", "0"],
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
        query(port)
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        print(f"server stopped on SIGTERM (exit {code})")


def query(port: int) -> None:
    import numpy as np

    from quantgate.model.data import load_digits_splits
    from quantgate.serve.client import Client

    test = load_digits_splits()["test"]
    rows = slice(0, 8)
    with Client(f"127.0.0.1:{port}", timeout=30) as client:
        out = client.infer(
            "digits",
            {"input_ids": test.input_ids[rows], "attention_mask": test.attention_mask[rows]},
        )
    predicted = np.asarray(out["logits"]).argmax(-1)
    print("\n8 held-out digits through gRPC:")
    print(f"  label     {test.labels[rows].tolist()}")
    print(f"  predicted {predicted.tolist()}")


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    step(
        "train the built-in classifier on scikit-learn's digits", "train", "--out", str(CHECKPOINT)
    )
    step("export, quantize and gate", "export", str(CHECKPOINT), "--out", str(BUNDLE), "--force")
    step("what the bundle holds", "inspect", str(BUNDLE))
    serve_and_query()


if __name__ == "__main__":
    main()
