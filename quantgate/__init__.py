"""quantgate: PyTorch transformer -> ONNX -> calibrated INT8, proven by gates, served over gRPC.

The stages live in their own packages and data flows one way::

    quantgate.model -> quantgate.export -> quantgate.quantize -> bundle -> quantgate.serve
"""

__version__ = "0.1.0"
