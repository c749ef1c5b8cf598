"""Tiny real bundles for the server tests, exported here with torch (the server never is).

Until quantgate.export lands these follow the bundle contract by hand: torch.onnx.export
with dynamic (batch, sequence) axes, then quantgate.bundle.staging + write_manifest.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from quantgate import bundle as qb
from quantgate.model.transformer import EncoderClassifier, ModelConfig, Trunk

VOCAB, MAX_LEN = 32, 160
CONFIG = ModelConfig(
    vocab_size=VOCAB,
    max_seq_len=MAX_LEN,
    d_model=32,
    n_heads=4,
    n_layers=2,
    d_ff=64,
    dropout=0.0,
    n_classes=5,
)
LABELS = ("ant", "bee", "cat", "dog", "émeu")  # the classifier's class names, by index


class Encoder(nn.Module):
    """The trunk's hidden states: an output with a sequence axis, cut back after padding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.trunk = Trunk(cfg)

    def forward(self, input_ids, attention_mask):
        h, _ = self.trunk(input_ids, attention_mask.bool()[:, None, None, :])  # (B, T, C)
        return h


def _export(model: nn.Module, path: Path, output: str, output_axes: dict[int, str]) -> None:
    model.eval()
    ids = torch.randint(1, VOCAB, (2, 12))
    torch.onnx.export(
        model,
        (ids, torch.ones_like(ids)),
        str(path),
        input_names=["input_ids", "attention_mask"],
        output_names=[output],
        dynamic_axes={
            "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "sequence"},
            output: output_axes,
        },
        opset_version=17,
        dynamo=False,
    )


def build(out: Path, kind: str = "classifier", *, verdict: str = qb.PASS, seed: int = 0) -> Path:
    """Write a bundle at ``out``: kind "classifier" (logits) or "encoder" (hidden states)."""
    torch.manual_seed(seed)
    if kind == "classifier":
        model, output, axes, dims = EncoderClassifier(CONFIG), "logits", {0: "batch"}, ("batch", 5)
    else:
        model, output, axes, dims = (
            Encoder(CONFIG),
            "last_hidden_state",
            {0: "batch", 1: "sequence"},
            ("batch", "sequence", 32),
        )
    with qb.staging(out, force=True) as tmp:
        _export(model, tmp / "model.fp32.onnx", output, axes)
        variants = [qb.Variant("model.fp32.onnx", "fp32", qb.sha256_file(tmp / "model.fp32.onnx"))]
        if verdict == qb.FAIL:
            # A second copy standing in for an INT8 that failed its accuracy gate.
            (tmp / "model.int8.onnx").write_bytes((tmp / "model.fp32.onnx").read_bytes())
            gate = qb.GateResult("accuracy_drop", 5.0, 1.0, "<=", False)
            variants.append(
                qb.Variant(
                    "model.int8.onnx",
                    "int8",
                    qb.sha256_file(tmp / "model.int8.onnx"),
                    gates=(gate,),
                    verdict=qb.FAIL,
                )
            )
        spec = lambda name, dt, d: qb.TensorSpec(name, dt, d)  # noqa: E731
        qb.write_manifest(
            tmp,
            qb.Manifest(
                name=f"tiny-{kind}",
                task="sequence-classification" if kind == "classifier" else "feature-extraction",
                inputs=(
                    spec("input_ids", "int64", ("batch", "sequence")),
                    spec("attention_mask", "int64", ("batch", "sequence")),
                ),
                outputs=(spec(output, "float32", dims),),
                variants=tuple(variants),
                opset=17,
                source={"kind": "test", "seed": seed},
                extra={"labels": list(LABELS)} if kind == "classifier" else {},
            ),
        )
    return out


def hand_built(
    out: Path,
    nodes: list,
    name: str,
    *,
    inputs: tuple[str, ...] = ("input_ids",),
    output: tuple[str, tuple] = ("scores", ("batch", "sequence")),
    initializers: tuple = (),
    task: str = "feature-extraction",
    max_seq_len: int | None = None,
    extra: dict | None = None,
    pad_values: dict | None = None,
) -> Path:
    """Write a bundle at ``out`` whose hand-built ONNX graph (``nodes``, ``initializers``)
    takes int64 ``inputs`` (batch, sequence) and answers one float ``output`` (name, dims):
    by default token ids alone (no attention mask, so requests are never padded) to scores
    of the same shape. ``max_seq_len`` is recorded as the export's limit where given, and
    ``pad_values`` as the export's pad values per input."""
    import onnx
    from onnx import TensorProto, helper

    axes = ("batch", "sequence")
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info(n, TensorProto.INT64, list(axes)) for n in inputs],
        [helper.make_tensor_value_info(output[0], TensorProto.FLOAT, list(output[1]))],
        list(initializers),
    )  # fmt: skip
    with qb.staging(out, force=True) as tmp:
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                  tmp / "model.fp32.onnx")  # fmt: skip
        qb.write_manifest(
            tmp,
            qb.Manifest(
                name=name,
                task=task,
                inputs=tuple(qb.TensorSpec(n, "int64", axes) for n in inputs),
                outputs=(qb.TensorSpec(output[0], "float32", tuple(output[1])),),
                variants=(
                    qb.Variant("model.fp32.onnx", "fp32", qb.sha256_file(tmp / "model.fp32.onnx")),
                ),
                opset=17,
                source={"kind": "test"},
                export={
                    **({} if max_seq_len is None else {"max_seq_len": max_seq_len}),
                    **({} if pad_values is None else {"pad_values": pad_values}),
                },
                extra=extra or {},
            ),
        )
    return out


def counting(out: Path, warm_up_steps: int = 0) -> Path:
    """Write a bundle at ``out`` whose model counts, one ONNX Loop step at a time, to its
    largest input id: instant on warm-up's zeros, seconds for input_ids=[[10**7]] (11.8 s
    in-process on a busy 2-core host), and until its client goes for [[10**10]] (its run is
    then stopped): it holds a drain or a runner slot. With ``warm_up_steps``, ids all 0 count that many instead:
    a warm-up that takes a while. Its output, ``counted``, is the count where the mask is 1."""
    from onnx import TensorProto, helper

    body = helper.make_graph(
        [helper.make_node("Add", ["count_in", "one"], ["count_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "step",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("count_in", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("count_out", TensorProto.FLOAT, [])],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )  # fmt: skip
    steps = [helper.make_node("ReduceMax", ["input_ids"], ["largest"], keepdims=0)]
    consts = [helper.make_tensor("true", TensorProto.BOOL, [], [True]),
              helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])]  # fmt: skip
    if warm_up_steps:
        steps += [helper.make_node("Equal", ["largest", "zero_id"], ["zeros"]),
                  helper.make_node("Where", ["zeros", "warm_up_steps", "largest"], ["steps"])]  # fmt: skip
        consts += [helper.make_tensor("zero_id", TensorProto.INT64, [], [0]),
                   helper.make_tensor("warm_up_steps", TensorProto.INT64, [], [warm_up_steps])]  # fmt: skip
    else:
        steps.append(helper.make_node("Identity", ["largest"], ["steps"]))
    nodes = [
        *steps,
        helper.make_node("Loop", ["steps", "true", "zero"], ["count"], body=body),
        helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["mask", "count"], ["counted"]),
    ]
    return hand_built(out, nodes, "slow", inputs=("input_ids", "attention_mask"),
                      output=("counted", ("batch", "sequence")), initializers=tuple(consts))  # fmt: skip
