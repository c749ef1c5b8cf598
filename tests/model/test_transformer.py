"""The seed's transformer: attention against PyTorch's reference, masks, and the KV cache."""

import pytest
import torch
import torch.nn.functional as F

from quantgate.errors import ConfigError, DataError
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


def test_input_longer_than_max_seq_len_is_a_clear_error():
    model = EncoderClassifier(small_cfg(n_classes=5)).eval()
    ids = torch.randint(1, 20, (2, 49))  # max_seq_len is 48
    with pytest.raises(DataError, match="sequence of 49 tokens is longer than .* max_seq_len 48"):
        model(ids, torch.ones_like(ids))


def test_decoder_past_max_seq_len_with_a_cache_is_a_clear_error():
    model = DecoderLM(small_cfg(max_seq_len=8)).eval()
    with torch.no_grad():
        _, past = model(torch.randint(0, 20, (1, 7)))
        with pytest.raises(DataError, match=r"9 tokens \(7 cached \+ 2 new\) .* max_seq_len 8"):
            model(torch.randint(0, 20, (1, 2)), past)


def test_mask_of_another_shape_than_the_ids_is_a_clear_error():
    model = EncoderClassifier(small_cfg(n_classes=5)).eval()
    ids = torch.randint(1, 20, (2, 10))
    with pytest.raises(DataError, match=r"attention_mask has shape \(2, 11\), input_ids \(2, 10\)"):
        model(ids, torch.ones(2, 11, dtype=torch.long))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("d_model", 32.0, "d_model must be an integer, got 32.0"),
        ("n_layers", True, "n_layers must be an integer, got True"),
        ("n_heads", 0, "n_heads must be >= 1, got 0"),
        ("pad_id", 20, r"pad_id must be 0..19, got 20"),
        ("n_classes", -1, "n_classes must be >= 0, got -1"),
        ("dropout", "0.1", r"dropout must be a number in \[0, 1\), got '0.1'"),
    ],
)
def test_config_fields_of_the_wrong_type_or_range_fail_clearly(field, value, message):
    with pytest.raises(ConfigError, match=message):
        small_cfg(**{field: value})


def test_a_row_of_padding_alone_gives_finite_logits():
    """A fully masked row softmaxes to uniform (finite MASK_VALUE), and pools to 0."""
    model = EncoderClassifier(small_cfg(n_classes=5)).eval()
    ids = torch.randint(1, 20, (2, 10))
    mask = torch.ones_like(ids)
    mask[1] = 0
    with torch.no_grad():
        logits = model(ids, mask)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[1], model.head.bias.detach(), atol=TOL, rtol=TOL)


def test_dropout_acts_in_training_only():
    model = EncoderClassifier(small_cfg(n_classes=5, dropout=0.5))
    ids = torch.randint(1, 20, (4, 10))
    mask = torch.ones_like(ids)
    model.train()
    assert not torch.allclose(model(ids, mask), model(ids, mask))
    model.eval()
    torch.testing.assert_close(model(ids, mask), model(ids, mask), atol=0, rtol=0)


def test_input_checks_stay_out_of_the_onnx_trace():
    """The shape checks are Python: traced, they would only warn. The graph stays dynamic."""
    import io
    import warnings

    import numpy as np

    ort = pytest.importorskip("onnxruntime")
    model = EncoderClassifier(small_cfg(n_classes=5)).eval()
    ids = torch.randint(1, 20, (2, 10))
    buf = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(
            model,
            (ids, torch.ones_like(ids)),
            buf,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "seq"},
                "attention_mask": {0: "batch", 1: "seq"},
            },
            opset_version=17,
            dynamo=False,
        )
    booleans = [w for w in caught if "Python boolean" in str(w.message)]
    assert booleans == [], [f"{w.filename}:{w.lineno}" for w in booleans]

    longer = torch.randint(1, 20, (3, 30))  # another batch and length than traced
    mask = torch.ones_like(longer)
    mask[2, 12:] = 0
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input_ids": longer.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        want = model(longer, mask).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
