"""User modules for the `package.module:factory` tests (imported by name, like a user's own).

Each factory returns a torch.nn.Module carrying ``example_inputs``, as the loader expects.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, D, HEADS, TAGS = 40, 32, 4, 5


class Tagger(nn.Module):
    """One SDPA attention layer; per-token tags and a pooled vector, returned as a dict."""

    output_names = ("token_logits", "pooled")
    task = "token-classification"

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.pos = nn.Embedding(48, D)
        self.qkv = nn.Linear(D, 3 * D)
        self.out = nn.Linear(D, D)
        self.tags = nn.Linear(D, TAGS)
        self.max_seq_len = 48
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(1, VOCAB, (6, 20), generator=gen)
        mask = torch.ones_like(ids)
        mask[3, 12:] = 0  # one row with padding, as a tokenizer would give it
        ids[3, 12:] = 0
        self.example_inputs = {"input_ids": ids, "attention_mask": mask}

    def forward(self, input_ids, attention_mask):
        B, T = input_ids.shape
        x = self.emb(input_ids) + self.pos(torch.arange(T))  # (B, T, D)
        q, k, v = self.qkv(x).split(D, dim=-1)  # each (B, T, D)
        q, k, v = (t.view(B, T, HEADS, D // HEADS).transpose(1, 2) for t in (q, k, v))
        keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (B, nh, T, hs)
        h = x + self.out(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)
        w = attention_mask.unsqueeze(-1).to(h.dtype)
        return {"token_logits": self.tags(h), "pooled": (h * w).sum(1) / w.sum(1).clamp(min=1)}


def tagger() -> nn.Module:
    torch.manual_seed(0)
    return Tagger()


def broken() -> nn.Module:
    raise RuntimeError("weights file tagger.bin not found")


class Untraceable(Tagger):
    """Works in PyTorch, fails in either exporter (an op with no ONNX translation, say)."""

    def forward(self, input_ids, attention_mask):
        if torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting():
            raise RuntimeError("aten::my_custom_op has no ONNX translation")
        return super().forward(input_ids, attention_mask)


def untraceable() -> nn.Module:
    torch.manual_seed(0)
    return Untraceable()


class Diverges(Tagger):
    """Exports without complaint, but the exported graph computes something else."""

    def forward(self, input_ids, attention_mask):
        out = super().forward(input_ids, attention_mask)
        if torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting():
            out["pooled"] = out["pooled"] * 1.01
        return out


def diverges() -> nn.Module:
    torch.manual_seed(0)
    return Diverges()


def not_a_module():
    return {"weights": [1, 2, 3]}


# -- factories that break the contract: each must be refused with a message, never a traceback


class Pooler(nn.Module):
    """The smallest module the contract allows: (batch, sequence) ids -> (batch, 3)."""

    def __init__(self, example_inputs):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, 3)
        self.example_inputs = example_inputs

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.emb(input_ids).mean(1))


def _ids(batch=4, seq=10):
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))


def no_inputs() -> nn.Module:
    return Pooler({})


def one_dim_inputs() -> nn.Module:
    return Pooler({"input_ids": _ids()[:, 0]})


def ragged_batch() -> nn.Module:
    return Pooler({"input_ids": _ids(), "attention_mask": torch.ones(3, 10, dtype=torch.long)})


def bfloat16_inputs() -> nn.Module:
    return Pooler({"input_ids": _ids().to(torch.bfloat16)})


def bfloat16_weights() -> nn.Module:
    return Pooler({"input_ids": _ids()}).to(torch.bfloat16)


def float64_buffer() -> nn.Module:
    """float32 weights and a float64 constant the module keeps on purpose: exported as ever."""
    m = Pooler({"input_ids": _ids()})
    m.register_buffer("scale", torch.tensor(0.5, dtype=torch.float64))
    return m


def bad_attributes() -> nn.Module:
    m = Pooler({"input_ids": _ids()})
    m.output_names, m.max_seq_len, m.pad_values = "logits", "64", {"input_ids": "x"}
    return m


def said_classification() -> nn.Module:
    m = Pooler({"input_ids": _ids()})
    m.task = "text-classification"  # as Hugging Face pipelines say it
    return m


def named_classes() -> nn.Module:
    m = Pooler({"input_ids": _ids()})
    m.class_names = ("neg", "neu", "pos")  # and no task: naming classes says it classifies
    m.register_buffer("labels", torch.arange(3))  # a tensor by that name is the module's own
    return m


class MaskedPooler(nn.Module):
    """A mean over real tokens, its padding mask named `mask` (not `attention_mask`)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        ids = _ids()
        self.example_inputs = {"input_ids": ids, "mask": torch.ones_like(ids)}

    def forward(self, input_ids, mask):
        w = mask.unsqueeze(-1).float()
        return (self.emb(input_ids) * w).sum(1) / w.sum(1)


def mask_by_another_name() -> nn.Module:
    torch.manual_seed(0)
    return MaskedPooler()


def id2label_classes() -> nn.Module:
    m = Pooler({"input_ids": _ids()})
    m.id2label = {0: "neg", 1: "pos"}  # a transformers config's name: not the contract's
    return m


def non_tensor_output() -> nn.Module:
    class ReturnsAnInt(Pooler):
        def forward(self, input_ids, attention_mask=None):
            return [super().forward(input_ids), 3]

    return ReturnsAnInt({"input_ids": _ids()})


def needs_arguments(vocab, width=8) -> nn.Module:
    return Pooler({"input_ids": _ids()})


def none_loss() -> nn.Module:
    """Hugging Face's style without labels: {"loss": None, "logits": ...}."""

    class NoLoss(Pooler):
        def forward(self, input_ids, attention_mask=None):
            return {"loss": None, "logits": super().forward(input_ids)}

    return NoLoss({"input_ids": _ids()})


def unused_input() -> nn.Module:
    """Takes attention_mask but ignores it: both exporters drop it from the graph."""
    return Pooler({"input_ids": _ids(), "attention_mask": torch.ones(4, 10, dtype=torch.long)})


def mean_over_padding() -> nn.Module:
    """Reads its mask, but divides by the padded length: a row's answer shrinks with the
    padding the server's batching adds to it."""

    class PaddedMean(Pooler):
        def forward(self, input_ids, attention_mask):
            w = attention_mask.unsqueeze(-1).float()  # (B, T, 1)
            return self.head((self.emb(input_ids) * w).sum(1) / input_ids.shape[1])

    return PaddedMean({"input_ids": _ids(), "attention_mask": torch.ones(4, 10, dtype=torch.long)})


def attention_map() -> nn.Module:
    """A pooled vector and its (B, T, T) attention map, both reading the mask: an output with
    a second variable axis, which the server cannot cut back, so it never pads this model."""

    class AttentionMap(Pooler):
        output_names = ("pooled", "scores")

        def forward(self, input_ids, attention_mask):
            x = self.emb(input_ids)  # (B, T, C)
            keep = attention_mask[:, None, :].bool()  # (B, 1, T)
            scores = (x @ x.transpose(1, 2)).masked_fill(~keep, -1e9).softmax(-1)  # (B, T, T)
            w = attention_mask.unsqueeze(-1).float()
            return {"pooled": (x * w).sum(1) / w.sum(1).clamp(min=1), "scores": scores}

    return AttentionMap(
        {"input_ids": _ids(), "attention_mask": torch.ones(4, 10, dtype=torch.long)}
    )


def nan_output() -> nn.Module:
    class LogOfNegative(Pooler):  # a model broken on real input: NaN in PyTorch already
        def forward(self, input_ids, attention_mask=None):
            return torch.log(super().forward(input_ids) - 1e3)

    return LogOfNegative({"input_ids": _ids()})


def dict_outputs() -> nn.Module:
    class Named(Pooler):  # no output_names: the dict's keys name the outputs
        def forward(self, input_ids, attention_mask=None):
            logits = super().forward(input_ids)
            return {"logits": logits, "probs": logits.softmax(-1)}

    return Named({"input_ids": _ids()})


def op_named_outputs() -> nn.Module:
    """Outputs named as the dynamo exporter names its values after their ops: an
    embedding, a division."""

    class OpNamed(Pooler):
        def forward(self, input_ids, attention_mask=None):
            pooled = self.emb(input_ids).sum(1) / input_ids.shape[1]  # ops embedding, div
            unit = pooled / pooled.norm(dim=-1, keepdim=True)
            return {"embedding": unit, "embedding_1": unit * 3, "div": pooled * 2,
                    "logits": self.head(pooled)}  # fmt: skip

    return OpNamed({"input_ids": _ids()})


class TorchEncoder(nn.Module):
    """PyTorch's own nn.TransformerEncoder. The legacy (tracing) exporter bakes the example's
    sizes into its attention's Reshapes (the graph runs at the example's shape only); the
    dynamo exporter keeps them symbolic. Its FP16 graph is the one that crashed ONNX Runtime
    (quantgate.workarounds)."""

    output_names = ("logits",)

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        layer = nn.TransformerEncoderLayer(D, HEADS, 2 * D, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(D, TAGS)
        self.example_inputs = {"input_ids": _ids(4, 12)}

    def forward(self, input_ids):
        return self.head(self.enc(self.emb(input_ids)).mean(1))


def torch_encoder() -> nn.Module:
    torch.manual_seed(0)
    return TorchEncoder().eval()


# -- what tracing gets wrong: a Python value computed from a tensor becomes a constant ----


def _padded_ids(batch=4, seq=10, real=(10, 10, 10, 6)):
    ids = _ids(batch, seq)
    mask = (torch.arange(seq)[None] < torch.tensor(real)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


class BranchOnMask(Pooler):
    """Averages over the real tokens only when some row is padded: an `if` on tensor data.
    Tracing keeps the branch its example took (an unpadded batch: the mask is dropped);
    torch.export refuses to decide it."""

    def forward(self, input_ids, attention_mask):
        x = self.emb(input_ids)
        if bool((attention_mask == 0).any()):  # BRANCH: the line the refusal names
            w = attention_mask.unsqueeze(-1).to(x.dtype)
            return self.head((x * w).sum(1) / w.sum(1))
        return self.head(x.mean(1))


def branch_on_mask() -> nn.Module:
    return BranchOnMask(_padded_ids())


class TruncatesToLongestRow(Pooler):
    """Cuts the batch to its longest real row with int(): tracing fixes the example's length
    (right up to that width, wrong beyond it); torch.export keeps it symbolic."""

    def forward(self, input_ids, attention_mask):
        n = int(attention_mask.sum(1).max())  # LENGTH: the line the tracer note names
        w = attention_mask[:, :n].unsqueeze(-1).to(torch.float32)
        return self.head((self.emb(input_ids[:, :n]) * w).sum(1) / w.sum(1))


def truncates() -> nn.Module:
    """Declares 48 tokens, with examples of 10: only validating at 48 finds the fixed length."""
    m = TruncatesToLongestRow(_padded_ids())
    m.max_seq_len = 48
    return m


def truncates_at_its_width() -> nn.Module:
    """The same model kept to its example's width, where the traced graph is right."""
    return TruncatesToLongestRow(_padded_ids())


class ShortPositions(Pooler):
    """Declares max_seq_len 64 with a position table of 16 rows."""

    def __init__(self, example_inputs):
        super().__init__(example_inputs)
        self.pos = nn.Embedding(16, 8)
        self.max_seq_len = 64

    def forward(self, input_ids, attention_mask=None):
        x = self.emb(input_ids) + self.pos(torch.arange(input_ids.shape[1]))
        return self.head(x.mean(1))


def short_positions() -> nn.Module:
    return ShortPositions({"input_ids": _ids()})


class BranchesOnLength(Pooler):
    """Pools rows of more than 8 tokens by their mean, shorter ones by their first token: a
    branch on the sequence's length that a trace keeps one side of."""

    def forward(self, input_ids, attention_mask=None):
        x = self.emb(input_ids)
        return self.head(x.mean(1) if input_ids.shape[1] > 8 else x[:, 0])  # BRANCH


def branches_on_length() -> nn.Module:
    return BranchesOnLength({"input_ids": _ids(seq=12)})


class DropsOut(Pooler):
    """F.dropout(x, p) defaults to training=True: eval() leaves it on."""

    def forward(self, input_ids, attention_mask=None):
        return self.head(F.dropout(self.emb(input_ids), 0.5).mean(1))


def drops_out() -> nn.Module:
    return DropsOut({"input_ids": _ids()})


class BatchStatistics(Pooler):
    """A BatchNorm without running statistics normalizes by the batch in eval mode too: a
    row's answer moves with its batch-mates."""

    def __init__(self, example_inputs):
        super().__init__(example_inputs)
        self.norm = nn.BatchNorm1d(8, track_running_stats=False)

    def forward(self, input_ids, attention_mask=None):  # over every token of the batch
        return self.head(self.norm(self.emb(input_ids).transpose(1, 2)).mean(2))


def batch_statistics() -> nn.Module:
    return BatchStatistics({"input_ids": _ids()})


class PooledBatchStatistics(BatchStatistics):
    """The same over each row's pooled features: a lone row has one value per channel."""

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.norm(self.emb(input_ids).mean(1)))


def pooled_batch_statistics() -> nn.Module:
    return PooledBatchStatistics({"input_ids": _ids()})


class SequenceFirst(Pooler):
    """nn.TransformerEncoder's default layout: forward takes (sequence, batch) ids, so its
    answer's first axis follows the inputs' axis 1."""

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.emb(input_ids).mean(0))


def sequence_first() -> nn.Module:
    return SequenceFirst({"input_ids": _ids(batch=10, seq=4)})


class ScalarOut(Pooler):
    def forward(self, input_ids, attention_mask=None):
        logits = self.head(self.emb(input_ids).mean(1))
        return {"logits": logits, "mean_logit": logits.mean()}


def scalar_out() -> nn.Module:
    return ScalarOut({"input_ids": _ids()})


class Eigenvalues(Pooler):
    """An op the legacy exporter has no ONNX form for: it fails, printing its TorchScript
    graph from C++."""

    def forward(self, input_ids, attention_mask=None):
        x = self.emb(input_ids).mean(1)  # each row's: (batch, 8, 8) -> (batch, 8)
        return torch.linalg.eigvalsh(x[:, :, None] @ x[:, None, :])


def eigenvalues() -> nn.Module:
    return Eigenvalues({"input_ids": _ids()})


class MaskedTorchEncoder(nn.Module):
    """nn.TransformerEncoder with its padding mask: in eval mode its fast path (nested
    tensors) answers exactly 0 at padded positions, which no exported graph does."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1)
        ids = _ids()
        mask = torch.ones_like(ids)
        mask[1:, 6:] = 0
        self.example_inputs = {"input_ids": ids, "attention_mask": mask}
        self.max_seq_len = 32

    def forward(self, input_ids, attention_mask):
        return self.enc(self.emb(input_ids), src_key_padding_mask=attention_mask == 0)


def masked_torch_encoder() -> nn.Module:
    torch.manual_seed(0)
    return MaskedTorchEncoder().eval()


class Scored(NamedTuple):
    logits: torch.Tensor
    pooled: torch.Tensor


class ReturnsNamedTuple(Pooler):
    def forward(self, input_ids, attention_mask=None):
        pooled = self.emb(input_ids).mean(1)
        return Scored(self.head(pooled), pooled)


def returns_named_tuple() -> nn.Module:
    return ReturnsNamedTuple({"input_ids": _ids()})


class TakesIdx(Pooler):
    def forward(self, idx):
        return self.head(self.emb(idx).mean(1))


def takes_idx() -> nn.Module:
    """forward(idx), its example named input_ids: the call raised TypeError, told wrapped in
    advice about shapes and fixed windows."""
    module = TakesIdx({"input_ids": _ids()})
    module.output_names = ["logits"]
    return module


def inverted_mask() -> nn.Module:
    """True = padding, as nn.MultiheadAttention's key_padding_mask takes it: full rows of 0s."""
    ids = _ids()
    return Pooler({"input_ids": ids, "attention_mask": torch.zeros_like(ids, dtype=torch.bool)})


def on_meta() -> nn.Module:
    """Made on the 'meta' device, its weights never loaded: no values to export."""
    with torch.device("meta"):
        module = Pooler({})
    module.example_inputs = {"input_ids": _ids()}
    return module


def misnamed_classes() -> nn.Module:
    """Three class scores, two class names."""
    module = Pooler({"input_ids": _ids()})
    module.class_names = ("no", "yes")
    return module


class NoOnnxOp(Pooler):
    """Uses an operator neither exporter translates (singular values)."""

    def forward(self, input_ids, attention_mask=None):
        x = self.emb(input_ids)
        return self.head(x.mean(1)) + torch.linalg.svdvals(x)[:, :1]


def no_onnx_op() -> nn.Module:
    return NoOnnxOp({"input_ids": _ids()})


class Reranker(nn.Module):
    """A cross-encoder's shape: a (batch, 1) relevance logit for each (query, passage) row."""

    task = "sequence-classification"

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.mix = nn.Linear(D, D)
        self.score = nn.Linear(D, 1)
        ids = _ids(6, 16)
        self.example_inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def forward(self, input_ids, attention_mask):
        w = attention_mask.unsqueeze(-1).float()
        h = torch.tanh(self.mix(self.emb(input_ids)))  # (B, T, D)
        return self.score((h * w).sum(1) / w.sum(1).clamp(min=1))  # (B, 1)


def reranker() -> nn.Module:
    torch.manual_seed(0)
    return Reranker()


class SpanScorer(nn.Module):
    """A question answerer's two scores per token, returned as a bare tuple (output_0,
    output_1: no names its gates can read)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 2)
        self.example_inputs = {"input_ids": _ids()}
        self.task = "question-answering"

    def forward(self, input_ids):
        scores = self.emb(input_ids)  # (B, T, 2)
        return scores[..., 0], scores[..., 1]


def unnamed_spans() -> nn.Module:
    torch.manual_seed(0)
    return SpanScorer()


def named_spans() -> nn.Module:
    m = unnamed_spans()
    m.output_names = ["start_logits", "end_logits"]
    return m


class MasksPaddingWithInfinity(nn.Module):
    """Per-token scores, the padded positions -inf, in a branch the tracer keeps one side of:
    the graph answers 0 there where PyTorch answers -inf."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.head = nn.Linear(16, 1)
        ids = torch.randint(1, 100, (8, 16), generator=torch.Generator().manual_seed(1))
        self.example_inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        self.output_names = ["scores"]

    def forward(self, input_ids, attention_mask):
        s = self.head(self.embed(input_ids)).squeeze(-1) * attention_mask
        if (attention_mask == 0).any():  # traced on all-1 masks: never taken in the graph
            s = s.masked_fill(attention_mask == 0, float("-inf"))
        return s


def masks_padding_with_infinity() -> nn.Module:
    torch.manual_seed(0)
    return MasksPaddingWithInfinity().eval()
