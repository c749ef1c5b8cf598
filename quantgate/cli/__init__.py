"""The command line. It only translates: parse flags, build a config, call one library
function, print the result, and map errors to exit codes:

    0  success (every gate passed; the server answered every request it admitted)
    1  anything else, e.g. the server's shutdown grace ran out with requests unanswered
    2  bad usage or bad input (missing file, corrupt checkpoint, invalid option)
    3  a gate or a validation failed (the bundle and its report are still written)

One module per command, each with its own helpers:

    train.py     quantgate train: the built-in classifier on scikit-learn's digits
    export.py    quantgate export: ONNX, INT8 and its gates, a bundle
    gate.py      quantgate gate: a bundle's gates again, on new data or on CUDA
    inspect.py   quantgate inspect: a bundle's manifest, readable
    serve.py     quantgate serve: bundles over gRPC
    infer.py     quantgate infer: one request to a running server

and what they share:

    _app.py      the typer app, its root options (-v, --version), the ``command`` decorator
    _console.py  stdout and stderr as the commands print to them; the progress bars
    _gates.py    the gate threshold flags of export and gate; the gates as they print them
    _bundle.py   how a bundle was exported, as export and inspect print it
    _exit.py     main and run: the app run with signals handled, errors mapped to exit codes

Importing this package imports no heavy library (torch, onnx, onnxruntime, transformers,
grpc): each command imports what it needs when it runs, so --help stays fast.
"""

from quantgate.cli._app import app
from quantgate.cli._exit import main, run

# Each command registers with the app as its module is imported, and --help lists them in
# that order: the workflow's, not the alphabet's.
# isort: off
from quantgate.cli import train, export, gate, inspect, serve, infer  # noqa: F401
# isort: on

__all__ = ["app", "main", "run"]
