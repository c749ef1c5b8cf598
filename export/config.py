"""The export stage's one config."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from quantgate.configs import check_fields, config_class
from quantgate.errors import ConfigError
from quantgate.schema import printable_name


class Exporter(str, Enum):
    AUTO = "auto"  # legacy first, dynamo when legacy fails to export or to validate
    LEGACY = "legacy"  # torch.onnx.export(dynamo=False): TorchScript tracing
    DYNAMO = "dynamo"  # torch.onnx.export(dynamo=True): torch.export + onnxscript


@config_class
@dataclass(frozen=True)
class ExportConfig:
    task: str | None = None  # None: from the model (HF architectures; the built-in classifies)
    # AUTO tries LEGACY first: on all-MiniLM-L6-v2 its graph fused fully (6 Attention,
    # EmbedLayerNormalization) while the dynamo graph fused no attention, and it exported
    # 6x faster.
    exporter: Exporter = Exporter.AUTO
    # 17 is the first opset with LayerNormalization, which ORT's fusions build on; the dynamo
    # exporter needs at least 18 and converts up when given less.
    opset: int = 17
    max_seq_len: int | None = None  # None: the model's own limit (positions, tokenizer)
    optimize: bool = True  # ONNX Runtime's transformer fusions, validated again afterwards
    atol: float = 1e-4  # validation passes where |ort - torch| <= atol + rtol * |torch|
    rtol: float = 1e-4
    mid_batch: int = 8  # the "middle batch" validation shape
    name: str | None = None  # bundle name; None: the --out directory's name

    def __post_init__(self):
        check_fields(self)  # types first (exporter: a member or its value, "legacy")
        if not 14 <= self.opset <= 23:
            raise ConfigError(f"opset {self.opset} is outside 14..23, what the exporters support")
        if not (0 <= self.atol < math.inf and 0 <= self.rtol < math.inf):  # NaN fails too
            raise ConfigError(
                f"tolerances must be finite and >= 0, got atol={self.atol} rtol={self.rtol}"
            )
        if self.mid_batch < 2:
            raise ConfigError(f"mid_batch must be at least 2, got {self.mid_batch}")
        if self.name and not printable_name(self.name):  # "": the --out folder's name
            raise ConfigError(
                f"name {self.name!r}: expected a non-empty name without control characters "
                "(line breaks, escapes, direction overrides): it goes into log lines and "
                "metadata as it is"
            )
        if self.name and "/" in self.name:
            raise ConfigError(
                f"name {self.name!r}: a model's name is one path segment, without '/': "
                "clients ask for it in URLs (/v2/models/NAME/ready) and a repository serves "
                "it from a folder of that name. Name it otherwise (a-b, a.b)"
            )
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise ConfigError(
                f"max_seq_len (--max-seq-len) must be positive, got {self.max_seq_len}"
            )
