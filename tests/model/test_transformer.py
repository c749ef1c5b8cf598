"""The seed's transformer: attention against PyTorch's reference, masks, and the KV cache."""

import pytest
import torch
import torch.nn.functional as F

from quantgate.errors import ConfigError
from quantgate.model.transformer import DecoderLM, EncoderClassifier, ModelConfig, attention, preset

TOL = 1e-5


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def qkv(B=3, nh=4, T=7, S=7, hs=16):
    return torch.randn(B, nh, T, hs), torch.randn(B, nh, S, hs), torch.randn(B, nh, S, hs)


def test_attention_matches_sdpa_without_mask():
    q, k, v = qkv()
    torch.testing.assert_close(
        attention(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=TOL, rtol=TOL
    )


def test_attention_matches_sdpa_with_padding_mask():
    q, k, v = qkv()
    lengths = torch.tensor([7, 4, 1])
    keep = torch.arange(7)[None, :] < lengths[:, None]  # (B, S)
    mask = keep[:, None, None, :]  # (B, 1, 1, S)
    got = attention(q, k, v, mask)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)


def test_attention_matches_sdpa_causal():
    q, k, v = qkv()
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    torch.testing.assert_close(
        attention(q, k, v, causal),
        F.scaled_dot_product_attention(q, k, v, is_causal=True),
        atol=TOL,
        rtol=TOL,
    )


def test_attention_matches_sdpa_causal_with_cache_offset():
    # 3 new queries against 10 keys (7 cached): query i sits at absolute position 7 + i.
    q, k, v = qkv(T=3, S=10)
    mask = torch.arange(10)[None, :] <= torch.arange(7, 10)[:, None]
    got = attention(q, k, v, mask)
    torch.testing.assert_close(
        got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=TOL, rtol=TOL
    )


def test_softmax_is_numerically_stable_for_large_scores():
    q, k, v = qkv()
    got = attention(q * 1e4, k * 1e4, v)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(
        got, F.scaled_dot_product_attention(q * 1e4, k * 1e4, v), atol=1e-4, rtol=1e-4
    )


def small_cfg(**kw):
    return ModelConfig(
        **{
            **dict(
                vocab_size=20,
                max_seq_len=48,
                d_model=32,
                n_heads=4,
                n_layers=2,
                d_ff=64,
                dropout=0.0,
            ),
            **kw,
        }
    )


def test_padding_does_not_change_the_classifier_outputs():
    model = EncoderClassifier(small_cfg(n_classes=5)).eval()
    ids = torch.randint(1, 20, (2, 10))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        base = model(ids, mask)
        padded_ids = torch.cat([ids, torch.randint(1, 20, (2, 6))], dim=1)  # junk in the padding
        padded_mask = torch.cat([mask, torch.zeros(2, 6, dtype=mask.dtype)], dim=1)
        padded = model(padded_ids, padded_mask)
    torch.testing.assert_close(padded, base, atol=TOL, rtol=TOL)


def test_padding_does_not_change_hidden_states_at_real_positions():
    model = EncoderClassifier(small_cfg(n_classes=5)).eval()
    ids = torch.randint(1, 20, (1, 9))
    with torch.no_grad():
        h, _ = model.trunk(ids, torch.ones(1, 1, 1, 9, dtype=torch.bool))
        keep = torch.tensor([[True] * 9 + [False] * 5])
        padded = torch.cat([ids, torch.full((1, 5), 3)], dim=1)
        hp, _ = model.trunk(padded, keep[:, None, None, :])
    torch.testing.assert_close(hp[:, :9], h, atol=TOL, rtol=TOL)


def test_kv_cache_incremental_logits_equal_full_forward_over_32_steps():
    model = DecoderLM(small_cfg()).eval()
    ids = torch.randint(0, 20, (2, 33))
    with torch.no_grad():
        full, _ = model(ids)
        logits, past = model(ids[:, :1])
        steps = [logits]
        for t in range(1, 33):  # 32 incremental steps, one token each
            logits, past = model(ids[:, t : t + 1], past)
            steps.append(logits)
    assert past[0][0].shape == (2, 4, 33, 8)  # (B, nh, S, hs)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=TOL, rtol=TOL)


def test_decoder_is_causal():
    model = DecoderLM(small_cfg()).eval()
    ids = torch.randint(0, 20, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 20
    with torch.no_grad():
        a, _ = model(ids)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=TOL, rtol=TOL)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_d_model_not_divisible_by_heads_fails_clearly():
    with pytest.raises(ConfigError, match=r"d_model \(100\) must be divisible by n_heads \(8\)"):
        small_cfg(d_model=100, n_heads=8)


def test_base_preset_is_the_seeds_model():
    cfg = preset("base", vocab_size=100, max_seq_len=128)
    assert (cfg.d_model, cfg.n_heads, cfg.d_k) == (512, 8, 64)


def test_unknown_preset_fails_clearly():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge", vocab_size=10, max_seq_len=8)
