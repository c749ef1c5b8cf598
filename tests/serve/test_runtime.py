"""Variant choice, request validation and the batcher, in process (no gRPC)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import bundles
import numpy as np
import pytest
from helpers import Reference, batch

from quantgate import bundle as qb
from quantgate.errors import BadRequest, BundleError
from quantgate.serve.batcher import Batcher
from quantgate.serve.config import ServeConfig
from quantgate.serve.runtime import CPU, CUDA, choose_variant, open_model


def _variant(precision, *, passed=True, providers=(CPU,), not_for=(), speedup=None, provider=None):
    gates = (
        ()
        if speedup is None
        else (qb.GateResult("speedup_b1_s128", speedup, 1.2, ">=", True, provider=provider),)
    )
    return qb.Variant(
        f"model.{precision}.onnx",
        precision,
        "0" * 64,
        providers=providers,
        gates=gates,
        verdict=qb.PASS if passed else qb.FAIL,
        not_for=not_for,
    )


def _manifest(*variants):
    return qb.Manifest("m", "classification", (), (), variants, 17, {})


def test_fastest_passing_variant_per_provider():
    m = _manifest(
        _variant("fp32"),
        _variant("int8", speedup=1.8, not_for=(CUDA,)),
        _variant("fp16", providers=(CUDA,), speedup=2.2, provider=CUDA),
    )
    assert choose_variant(m, CPU).precision == "int8"
    assert choose_variant(m, CUDA).precision == "fp16"


def test_a_variant_that_passed_its_speed_gates_beats_fp32_even_where_it_only_ties():
    """FP16 on CUDA: 2.1x at batch 128, 0.98x at a launch-bound batch 1 (its gate asks >= 0.95)."""
    gates = (
        qb.GateResult("speedup_b128_s128", 2.11, 1.2, ">=", True, provider=CUDA),
        qb.GateResult("speedup_b1_s128", 0.98, 0.95, ">=", True, provider=CUDA),
    )
    fp16 = qb.Variant(
        "model.fp16.onnx", "fp16", "0" * 64, providers=(CUDA,), gates=gates, verdict=qb.PASS
    )
    assert choose_variant(_manifest(_variant("fp32"), fp16), CUDA).precision == "fp16"


def test_failed_or_unmeasured_variants_fall_back_to_fp32():
    assert (
        choose_variant(
            _manifest(_variant("fp32"), _variant("int8", passed=False, speedup=3.0)), CPU
        ).precision
        == "fp32"
    )
    assert (
        choose_variant(_manifest(_variant("fp32"), _variant("int8")), CPU).precision == "fp32"
    )  # no evidence
    with pytest.raises(BundleError, match="failed its gates"):
        choose_variant(
            _manifest(_variant("fp32"), _variant("int8", passed=False)), CPU, precision="int8"
        )
    forced = choose_variant(
        _manifest(_variant("fp32"), _variant("int8", passed=False)),
        CPU,
        precision="int8",
        allow_failed=True,
    )
    assert forced.precision == "int8"


def test_failed_bundle_refused_unless_allowed(tmp_path):
    path = bundles.build(tmp_path / "failed", verdict=qb.FAIL)
    with pytest.raises(BundleError, match="--allow-failed-gates"):
        open_model(path, ServeConfig(path=path), CPU)
    model = open_model(path, ServeConfig(path=path, allow_failed_gates=True), CPU)
    assert model.variant.precision == "fp32"  # never the failed INT8


def test_tampered_bundle_refused(tmp_path):
    path = bundles.build(tmp_path / "tampered")
    with open(path / "model.fp32.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="sha256"):
        open_model(path, ServeConfig(path=path), CPU)


def test_check_collects_every_problem(repo):
    model = open_model(repo / "classifier", ServeConfig(path=repo), CPU)
    feeds = {"input_ids": np.zeros((2, 3), np.int32), "extra": np.zeros(1)}
    with pytest.raises(BadRequest) as err:
        model.check(feeds, ("nope",))
    for words in (
        "unexpected input 'extra'",
        "missing input 'attention_mask'",
        "input 'input_ids': datatype INT32, expected INT64",
        "unknown output 'nope'",
    ):
        assert words in str(err.value)


@pytest.mark.parametrize(
    "kind,folder", [("logits", "classifier"), ("last_hidden_state", "encoder/1")]
)
def test_batcher_pads_and_splits_exactly(repo, kind, folder):
    """Mixed lengths batched with padding give each request its own unpadded answer."""
    model = open_model(repo / folder, ServeConfig(path=repo), CPU)
    assert model.sequence_axis == "sequence"
    reference = Reference(repo / folder)
    rng = np.random.default_rng(0)
    requests = [batch(rng, 1 + i % 3, length) for i, length in enumerate([3, 9, 16, 5, 12, 1])]
    sizes = []

    async def run():
        with ThreadPoolExecutor(1) as pool:
            b = Batcher(
                model,
                pool,
                max_batch_size=32,
                max_queue_delay_us=50_000,
                max_queue_size=64,
                on_batch=lambda rows, t: sizes.append(rows),
            )
            b.start()
            results = await asyncio.gather(*(b.infer(f, f["input_ids"].shape[0]) for f in requests))
            await b.close()
        return results

    for (outputs, _timing), feeds in zip(asyncio.run(run()), requests, strict=True):
        np.testing.assert_allclose(outputs[kind], reference(feeds), atol=1e-4)
        assert outputs[kind].shape[:2] == reference(feeds).shape[:2]
    assert sizes == [sum(f["input_ids"].shape[0] for f in requests)]  # one bucket, one batch
