"""The seed's transformer, written out so it can be checked against the formula

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V
    MultiHead(x)       = Concat(head_1, ..., head_h) W_O,  head_i = Attention(x W_Qi, x W_Ki, x W_Vi)

line by line. Pre-LN blocks (x + Attn(LN(x)), then x + FFN(LN(x))), one fused QKV
projection (one GEMM for Q, K and V), a numerically stable softmax, a padding mask, a
GELU feed-forward. Two heads on the same trunk: an encoder classifier (masked mean pool ->
classes) and a causal decoder LM with a KV cache for incremental decoding.

Shapes: B batch, T query length, S key length, C d_model, nh heads, hs head size (d_k).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from quantgate.errors import ConfigError

# A finite stand-in for -inf: a fully masked row then softmaxes to uniform instead of NaN.
MASK_VALUE = -1e9


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    max_seq_len: int
    d_model: int = 512
    n_heads: int = 8
    n_layers: int = 6
    d_ff: int = 2048  # 4 x d_model, as in the seed's base model
    dropout: float = 0.1
    n_classes: int = 0  # > 0 for the encoder classifier head
    pad_id: int = 0

    def __post_init__(self):
        if self.d_model % self.n_heads != 0:
            raise ConfigError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}): each head "
                f"gets d_k = d_model / n_heads dimensions. Try n_heads in "
                f"{[h for h in range(1, 17) if self.d_model % h == 0]} or change d_model."
            )
        for name in ("vocab_size", "max_seq_len", "d_model", "n_heads", "n_layers", "d_ff"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
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


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_k)) V, with ``mask`` True where a query may attend a key.

    q: (B, nh, T, hs); k, v: (B, nh, S, hs); mask broadcastable to (B, nh, T, S).
    """
    d_k = q.size(-1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d_k)  # (B, nh, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, MASK_VALUE)
    # Numerically stable softmax: exp(x - max) / sum(exp(x - max)).
    scores = scores - scores.amax(dim=-1, keepdim=True)
    weights = scores.exp()
    weights = weights / weights.sum(dim=-1, keepdim=True)  # (B, nh, T, S)
    return weights @ v  # (B, nh, T, hs)


KVCache = tuple[torch.Tensor, torch.Tensor]  # (k, v), each (B, nh, S_past, hs)


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.d_k = cfg.n_heads, cfg.d_k
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # W_Q, W_K, W_V as one GEMM
        self.out = nn.Linear(cfg.d_model, cfg.d_model)  # W_O
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, past: KVCache | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)  # each (B, T, C)
        q = q.view(B, T, self.n_heads, self.d_k).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_heads, self.d_k).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_heads, self.d_k).transpose(1, 2)  # (B, nh, T, hs)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, nh, S, hs)
            v = torch.cat([past[1], v], dim=2)  # (B, nh, S, hs)
        y = attention(q, k, v, mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # Concat(head_1..head_h): (B, T, C)
        return self.dropout(self.out(y)), (k, v)


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
        keep = attention_mask.bool()  # (B, S)
        h, _ = self.trunk(input_ids, keep[:, None, None, :])  # mask (B, 1, 1, S): (B, T, C)
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
        start = past[0][0].size(2) if past else 0
        S = start + T
        if self.cfg.max_seq_len < S:
            raise ConfigError(f"sequence of {S} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        # Query at absolute position start+i may attend keys 0..start+i.
        q_pos = torch.arange(start, S, device=input_ids.device)[:, None]  # (T, 1)
        k_pos = torch.arange(S, device=input_ids.device)[None, :]  # (1, S)
        causal = k_pos <= q_pos  # (T, S)
        h, presents = self.trunk(input_ids, causal, past, start)
        return self.lm_head(h), presents  # (B, T, vocab)
