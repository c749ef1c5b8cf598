"""The seed's transformer, written out so it can be checked against the formula

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V
    MultiHead(x)       = Concat(head_1, ..., head_h) W_O,  head_i = Attention(x W_Qi, x W_Ki, x W_Vi)

line by line. Pre-LN blocks (x + Attn(LN(x)), then x + FFN(LN(x))), one fused QKV
projection (one GEMM for Q, K and V), a numerically stable softmax, a padding mask, a
GELU feed-forward. Two heads on the same trunk: an encoder classifier (masked mean pool ->
classes) and a causal decoder LM with a KV cache for incremental decoding.

Notation, the seed's on the left:

    d_model   C, cfg.d_model          h     nh, cfg.n_heads
    d_k       hs = d_model / h        W_Q, W_K, W_V   MultiHeadAttention.qkv (one Linear)
    Q, K, V   q, k, v                 W_O   MultiHeadAttention.out

Shapes: B batch, T query length, S key length (S = T, or the cached keys plus T).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from quantgate.errors import ConfigError, DataError

# The score of a masked key: finite, not -inf. With -inf a row whose keys are all masked
# (a row of padding alone) would softmax to NaN (-inf - -inf), and the NaN would survive
# pooling (0 * NaN = NaN); with -1e9 it softmaxes to uniform weights. Where any key is
# real, a masked key's weight is exp(-1e9 - max) = 0 exactly in FP32. ONNX export writes it
# as a constant of Where; FP16 conversion clamps that to -65504, whose weight is still 0.
MASK_VALUE = -1e9


def _check_int(name: str, value, *, low: int, high: int | None = None) -> None:
    """A config field that must be an int in low..high (bool, 96.0 or "96" are not)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        raise ConfigError(f"{name} must be {bounds}, got {value}")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int  # token ids are 0..vocab_size-1
    max_seq_len: int  # learned positions: no input may be longer
    # The seed's base model: d_model 512, h 8 heads, so d_k = 512 / 8 = 64.
    d_model: int = 512
    n_heads: int = 8
    n_layers: int = 6
    d_ff: int = 2048  # 4 x d_model, as in the seed's base model
    dropout: float = 0.1  # on embeddings and each residual branch; training only (eval: none)
    n_classes: int = 0  # > 0 for the encoder classifier head; 0 for the decoder LM
    # The token padding positions hold. The attention mask, not this id, keeps padding out
    # of attention and pooling: any in-vocabulary id gives the same outputs.
    pad_id: int = 0

    def __post_init__(self):
        for name in ("vocab_size", "max_seq_len", "d_model", "n_heads", "n_layers", "d_ff"):
            _check_int(name, getattr(self, name), low=1)
        _check_int("n_classes", self.n_classes, low=0)
        _check_int("pad_id", self.pad_id, low=0, high=self.vocab_size - 1)
        if self.d_model % self.n_heads != 0:
            raise ConfigError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}): each head "
                f"gets d_k = d_model / n_heads dimensions. Try n_heads in "
                f"{[h for h in range(1, 17) if self.d_model % h == 0]} or change d_model."
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise ConfigError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def d_k(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, dict] = {
    # The seed's "base" transformer: d_model 512, 8 heads, d_k 64.
    "base": dict(d_model=512, n_heads=8, n_layers=6, d_ff=2048),
    # Trains on the digits task in a minute or two on 2 CPU cores.
    "small": dict(d_model=96, n_heads=4, n_layers=2, d_ff=192, dropout=0.2),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def softmax(x: torch.Tensor) -> torch.Tensor:
    """Over the last axis, numerically stable: exp(x - max) / sum(exp(x - max)).

    Subtracting the row's max changes nothing mathematically and keeps exp() <= 1, so large
    scores cannot overflow to inf.
    """
    e = (x - x.amax(dim=-1, keepdim=True)).exp()
    return e / e.sum(dim=-1, keepdim=True)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V, for every head at once.

    q: (B, nh, T, hs); k, v: (B, nh, S, hs); ``mask``: bool, broadcastable to (B, nh, T, S),
    True where a query may attend a key (a padded or future key: False).
    """
    d_k = q.size(-1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d_k)  # Q K^T / sqrt(d_k): (B, nh, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, MASK_VALUE)  # a masked key gets weight 0
    return softmax(scores) @ v  # (B, nh, T, S) @ (B, nh, S, hs) -> (B, nh, T, hs)


KVCache = tuple[torch.Tensor, torch.Tensor]  # (k, v), each (B, nh, S_past, hs)


class MultiHeadAttention(nn.Module):
    """MultiHead(x) = Concat(head_1, ..., head_h) W_O, head_i = Attention(x W_Qi, x W_Ki, x W_Vi).

    Returns the output and this call's keys and values (with ``past`` prepended): the cache
    the next incremental step passes back as ``past``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.d_k = cfg.n_heads, cfg.d_k
        # W_Q, W_K, W_V side by side, (C -> 3C): one GEMM instead of three. Each of Q, K, V
        # is then split into h heads of d_k columns: W_Qi is the i-th d_k columns of W_Q.
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)  # W_O
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, past: KVCache | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)  # x W_Q, x W_K, x W_V: each (B, T, C)
        q = q.view(B, T, self.n_heads, self.d_k).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_heads, self.d_k).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_heads, self.d_k).transpose(1, 2)  # (B, nh, T, hs)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # cached keys, then these: (B, nh, S, hs)
            v = torch.cat([past[1], v], dim=2)  # (B, nh, S, hs)
        y = attention(q, k, v, mask)  # head_1..head_h: (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # Concat(head_1..head_h): (B, T, C)
        return self.dropout(self.out(y)), (k, v)  # Concat(...) W_O: (B, T, C)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_ff)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(x))))


class Block(nn.Module):
    """Pre-LN: x + Attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = MultiHeadAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, past: KVCache | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        a, present = self.attn(self.ln1(x), mask, past)
        x = x + a
        x = x + self.ffn(self.ln2(x))
        return x, present


class Trunk(nn.Module):
    """Token embedding plus learned positions, then the blocks, then a final LayerNorm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def forward(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        past: list[KVCache] | None = None,
        start: int = 0,
    ) -> tuple[torch.Tensor, list[KVCache]]:
        T = input_ids.size(1)
        # Input checks run in Python, outside the graph: skipped while tracing (ONNX export),
        # where they could not be recorded and would only warn.
        if not torch.jit.is_tracing() and start + T > self.cfg.max_seq_len:
            raise DataError(
                f"a sequence of {start + T} tokens"
                + (f" ({start} cached + {T} new)" if start else "")
                + f" is longer than the model's max_seq_len {self.cfg.max_seq_len}: it has "
                "no position embedding beyond that. Truncate the input."
            )
        pos = torch.arange(start, start + T, device=input_ids.device)  # (T,)
        x = self.drop(self.tok(input_ids) + self.pos(pos))  # (B, T, C)
        presents = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, mask, past[i] if past is not None else None)
            presents.append(present)
        return self.ln_f(x), presents


class EncoderClassifier(nn.Module):
    """Bidirectional encoder; mean of the real (non-padding) positions -> class logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.n_classes <= 0:
            raise ConfigError(f"EncoderClassifier needs n_classes > 0, got {cfg.n_classes}")
        self.cfg = cfg
        self.trunk = Trunk(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.n_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: (B, T), the mask 1 at real tokens and 0 at padding."""
        if not torch.jit.is_tracing() and attention_mask.shape != input_ids.shape:
            raise DataError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                f"{tuple(input_ids.shape)}: expected the same (batch, sequence) shape, one mask "
                "value per token (1 real, 0 padding)."
            )
        keep = attention_mask.bool()  # (B, S), S = T: every position is both query and key
        h, _ = self.trunk(input_ids, keep[:, None, None, :])  # mask (B, 1, 1, S): (B, T, C)
        # Mean over the real tokens only; a row of padding alone pools to 0, not 0 / 0.
        w = keep.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        pooled = (h * w).sum(1) / w.sum(1).clamp(min=1.0)  # (B, C)
        return self.head(pooled)  # (B, n_classes)


class DecoderLM(nn.Module):
    """Causal decoder LM. ``past`` holds each layer's keys and values for incremental decoding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.trunk = Trunk(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(
        self, input_ids: torch.Tensor, past: list[KVCache] | None = None
    ) -> tuple[torch.Tensor, list[KVCache]]:
        T = input_ids.size(1)
        start = past[0][0].size(2) if past else 0  # tokens already cached
        S = start + T
        # Query at absolute position start+i may attend keys 0..start+i.
        q_pos = torch.arange(start, S, device=input_ids.device)[:, None]  # (T, 1)
        k_pos = torch.arange(S, device=input_ids.device)[None, :]  # (1, S)
        causal = k_pos <= q_pos  # (T, S)
        h, presents = self.trunk(input_ids, causal, past, start)
        return self.lm_head(h), presents  # (B, T, vocab)
