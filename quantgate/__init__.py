"""quantgate: PyTorch transformer -> ONNX -> calibrated INT8, proven by gates, served over gRPC.

The stages live in their own packages and data flows one way::

    quantgate.model -> quantgate.export -> quantgate.quantize -> bundle -> quantgate.serve
"""

import logging
import os

__version__ = "0.2.0"

# A library's loggers: their records go where the program's logging sends them, and nowhere
# where it configures none (not to logging's last-resort stderr: a library call prints nothing).
logging.getLogger(__name__).addHandler(logging.NullHandler())

# ONNX Runtime 1.32 on Linux records telemetry: a device id and an event database under
# ~/.cache/Microsoft, a file in $TMPDIR, and an error line in the log where $HOME is
# read-only (a container's). A tool for offline and production hosts leaves it off unless
# the environment says otherwise (ORT_DISABLE_TELEMETRY=0); before onnxruntime is imported.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
