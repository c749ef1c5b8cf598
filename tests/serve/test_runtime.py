"""Opening bundles, request validation and the batcher, in process (no gRPC)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import bundles
import numpy as np
import pytest
from helpers import Reference, batch, batcher, hold_first_run, until

from quantgate import bundle as qb
from quantgate.bundle import CPU
from quantgate.errors import BadRequest, BundleError, Cancelled, DeadlineExceeded, Unavailable
from quantgate.serve.batcher import Batcher, Caller
from quantgate.serve.config import ServeConfig
from quantgate.serve.runtime import open_model


def test_failed_bundle_refused_unless_allowed(tmp_path):
    path = bundles.build(tmp_path / "failed", verdict=qb.FAIL)
    with pytest.raises(BundleError, match="--allow-failed-gates"):
        open_model(path, ServeConfig(path=path), CPU)
    model = open_model(path, ServeConfig(path=path, allow_failed_gates=True), CPU)
    assert model.variant.precision == "fp32"  # never the failed INT8


def test_tampered_bundle_refused(tmp_path):
    """A weight changed after the export: the file still opens in ONNX Runtime, and is
    refused for its hash (an appended byte broke the file too, and ONNX Runtime's error
    also named its sha256)."""
    import onnx
    from onnx import numpy_helper

    path = bundles.build(tmp_path / "tampered")
    model = onnx.load(str(path / "model.fp32.onnx"))
    weight = model.graph.initializer[0]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) + 1, weight.name))
    onnx.save(model, str(path / "model.fp32.onnx"))
    with pytest.raises(BundleError, match=r"model\.fp32\.onnx has sha256 \w+\.\.\., the manifest"):
        open_model(path, ServeConfig(path=path), CPU)


def test_a_model_file_onnx_runtime_cannot_open_is_a_bundle_error(tmp_path):
    """Its hash matches the manifest (the bundle was written so): a message, not a traceback."""
    import dataclasses

    path = bundles.build(tmp_path / "garbage")
    (path / "model.fp32.onnx").write_bytes(b"not an onnx model")
    m = qb.load(path, verify=False).manifest
    fp32 = dataclasses.replace(m.variants[0], sha256=qb.sha256_file(path / "model.fp32.onnx"))
    qb.write_manifest(path, dataclasses.replace(m, variants=(fp32, *m.variants[1:])))
    with pytest.raises(BundleError, match=r"ONNX Runtime cannot open .*model.fp32.onnx"):
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


def _no_mask_bundle(out, max_seq_len: int):
    """A bundle whose model takes token ids and no attention mask (so requests are never
    padded), exported for at most ``max_seq_len`` tokens."""
    from onnx import TensorProto, helper

    cast = helper.make_node("Cast", ["input_ids"], ["scores"], to=TensorProto.FLOAT)
    return bundles.hand_built(out, [cast], "no-mask", max_seq_len=max_seq_len)


def test_a_model_whose_answer_is_not_batch_first_is_served_unbatched(tmp_path):
    """A sequence-first model's answer, (sequence, 3), was cut as if its first axis were the
    requests' rows: rows dropped, two clients' answers mixed. Where the tensors do not share
    one leading axis, each request is the whole input (Triton's max_batch_size 0)."""
    from onnx import TensorProto, helper

    nodes = [  # (batch, sequence) ids -> (sequence, 3): the mean over the batch, 3 times
        helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["f"], ["m"], axes=[0], keepdims=0),
        helper.make_node("Unsqueeze", ["m", "one"], ["col"]),
        helper.make_node("Concat", ["col", "col", "col"], ["scores"], axis=1),
    ]
    one = helper.make_tensor("one", TensorProto.INT64, [1], [1])
    path = bundles.hand_built(tmp_path / "sf", nodes, "sf", output=("scores", ("sequence", 3)),
                              initializers=(one,))  # fmt: skip
    model = open_model(path, ServeConfig(path=path), CPU)
    assert not model.batched and model.max_batch_size == 0
    ids = np.arange(10, dtype=np.int64).reshape(2, 5)  # sequence 5: its answer is (5, 3)
    got, _ = batcher(model).infer({"input_ids": ids}, model.check({"input_ids": ids}))
    assert got["scores"].shape == (5, 3)  # the whole answer (its first row alone, before)
    np.testing.assert_allclose(got["scores"][:, 0], ids.mean(0))
    assert (
        bundles.build(tmp_path / "c", "classifier")
        and open_model(tmp_path / "c", ServeConfig(path=tmp_path / "c"), CPU).batched
    )  # (batch, ...) in and out: batched, as before


def test_axes_the_graph_leaves_unnamed_are_the_manifests_or_no_others(tmp_path):
    """ONNX Runtime reads an unnamed dimension as None. Named by position alone ("dim1"),
    every tensor's second axis was one sequence axis: a (batch, 8) output was cut to each
    request's length. The manifest names the axes quantgate exported; an axis neither
    names is its tensor's own, shared with no other."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [  # (batch, sequence) ids -> (batch, 8): each row's sum, 8 times
        helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["f", "one"], ["s"], keepdims=1),
        # 8 computed from the data, so that ONNX Runtime cannot infer the width either
        helper.make_node("ReduceMax", ["input_ids"], ["top"], keepdims=0),
        helper.make_node("Mul", ["top", "zero"], ["nought"]),
        helper.make_node("Add", ["nought", "eight"], ["width"]),
        helper.make_node("Reshape", ["width", "one"], ["width1"]),
        helper.make_node("Concat", ["one", "width1"], ["shape"], axis=0),
        helper.make_node("Expand", ["s", "shape"], ["pooled"]),
    ]
    graph = helper.make_graph(
        nodes, "unnamed",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [None, None])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [None, None])],
        [helper.make_tensor("one", TensorProto.INT64, [1], [1]),
         helper.make_tensor("zero", TensorProto.INT64, [], [0]),
         helper.make_tensor("eight", TensorProto.INT64, [], [8])],
    )  # fmt: skip
    path = tmp_path / "unnamed"
    with qb.staging(path, force=True) as tmp:
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                  tmp / "model.fp32.onnx")  # fmt: skip
        qb.write_manifest(tmp, qb.Manifest(
            name="unnamed", task="feature-extraction",
            inputs=(qb.TensorSpec("input_ids", "int64", ("batch", "sequence")),),
            outputs=(qb.TensorSpec("pooled", "float32", ("batch", 8)),),
            variants=(qb.Variant("model.fp32.onnx", "fp32",
                                 qb.sha256_file(tmp / "model.fp32.onnx")),),
            opset=17, source={"kind": "test"},
        ))  # fmt: skip
    model = open_model(path, ServeConfig(path=path), CPU)
    assert model.batched and [t.axes for t in model.outputs] == [("batch", "pooled:1")]
    ids = np.array([[1, 2, 3]], np.int64)
    got, _ = batcher(model).infer({"input_ids": ids}, 1)
    np.testing.assert_array_equal(got["pooled"], np.full((1, 8), 6.0))  # not cut to 3


def test_class_names_go_to_an_output_of_one_value_per_class_alone(tmp_path):
    """Top classes get the model's class names where the output scores its classes: a
    per-token output of a 4-token request had its positions named as the 4 classes."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Cast", ["input_ids"], ["scores"], to=TensorProto.FLOAT)]
    path = bundles.hand_built(tmp_path / "tok", nodes, "tok",
                              extra={"labels": ["a", "b", "c", "d"]})  # fmt: skip
    tokens = open_model(path, ServeConfig(path=path), CPU)
    assert tokens.labels == ("a", "b", "c", "d") and tokens.labels_of("scores") == ()
    bundles.build(tmp_path / "c", "classifier")
    classifier = open_model(tmp_path / "c", ServeConfig(path=tmp_path / "c"), CPU)
    assert classifier.labels_of("logits") == classifier.labels and classifier.labels


def test_onnx_runtime_rejecting_an_input_inside_the_graph_keeps_its_node_names_to_the_log(
    tmp_path, caplog
):
    """An index ONNX Runtime finds out of range inside the graph (a table the server could
    not read its size from) is the client's error, but ONNX Runtime's words name the node:
    the client gets an error id, the log the words."""
    from onnx import TensorProto, helper

    table = helper.make_tensor("table", TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])
    nodes = [
        helper.make_node("Constant", [], ["t"], value=table),
        helper.make_node("Gather", ["t", "input_ids"], ["scores"], name="/secret/Gather"),
    ]
    path = bundles.hand_built(tmp_path / "g", nodes, "g", max_seq_len=16)
    model = open_model(path, ServeConfig(path=path), CPU)
    warnings = caplog.at_level("WARNING", logger="quantgate.serve.runtime")
    with warnings, pytest.raises(BadRequest) as err:
        model.run({"input_ids": np.array([[1, 9]], np.int64)})
    said = str(err.value)
    assert said.startswith("model 'g' rejected the input (InvalidArgument); the server's log")
    assert "secret" not in said and "Gather" not in said
    ref = said.rsplit(" ", 1)[1]
    assert f"model 'g' rejected the input, error {ref}: InvalidArgument:" in caplog.text
    assert "/secret/Gather" in caplog.text


def test_a_sequence_beyond_the_exported_maximum_is_refused_mask_or_not(tmp_path):
    """The export validated the model up to max_seq_len; a longer request is the client's
    error (a BadRequest that says to truncate), also where no attention mask lets the server
    pad requests: ONNX Runtime would fail it as an internal error, or answer garbage."""
    path = _no_mask_bundle(tmp_path / "no-mask", max_seq_len=8)
    model = open_model(path, ServeConfig(path=path), CPU)
    assert model.sequence_axis is None and model.max_sequence == 8
    assert model.check({"input_ids": np.ones((2, 8), np.int64)}) == 2
    with pytest.raises(BadRequest, match="sequence length 9 exceeds the model's maximum 8"):
        model.check({"input_ids": np.ones((2, 9), np.int64)})


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
    # The batch runs once its 12 rows are queued; the delay only has to outlast threads
    # starting on a busy machine.
    b = Batcher(
        model,
        max_batch_size=sum(f["input_ids"].shape[0] for f in requests),
        max_queue_delay_us=30_000_000,
        max_queue_size=64,
        on_batch=lambda rows, t: sizes.append(rows),
    )
    with ThreadPoolExecutor(len(requests)) as pool:  # one thread per request, as gRPC's
        results = list(pool.map(lambda f: b.infer(f, f["input_ids"].shape[0]), requests))
    assert b.close(timeout=5)
    for (outputs, _timing), feeds in zip(results, requests, strict=True):
        np.testing.assert_allclose(outputs[kind], reference(feeds), atol=1e-4)
        assert outputs[kind].shape[:2] == reference(feeds).shape[:2]
    assert sizes == [sum(f["input_ids"].shape[0] for f in requests)]  # one bucket, one batch


def _recording(ran_on: list):
    """An on_batch that notes which thread ran each batch, and its rows."""
    return lambda rows, timing: ran_on.append((threading.current_thread().name, rows))


def test_a_lone_request_runs_on_the_thread_that_sent_it(repo, classifier):
    ran_on: list = []
    b = batcher(classifier, on_batch=_recording(ran_on))
    feeds = batch(np.random.default_rng(0), 1, 8)
    outputs, timing = b.infer(feeds, 1)
    assert ran_on == [(threading.current_thread().name, 1)]
    np.testing.assert_allclose(outputs["logits"], Reference(repo / "classifier")(feeds), atol=1e-4)
    assert timing.queue_ns >= 0 and timing.infer_ns > 0


def test_requests_arriving_while_a_batch_runs_form_the_next_batch(repo, classifier):
    """Leader/follower: while the first request runs, 12 more queue; the slot passes to
    one of their threads, which runs them together, and every thread gets its own rows."""
    ran_on: list = []
    b = batcher(classifier, on_batch=_recording(ran_on))
    started, release = hold_first_run(classifier)  # the first batch waits for the others
    rng = np.random.default_rng(1)
    requests = [batch(rng, 1, 4 + i) for i in range(13)]  # lengths 4..16: one bucket
    with ThreadPoolExecutor(13) as pool:
        first = pool.submit(b.infer, requests[0], 1)
        assert started.wait(10)
        rest = [pool.submit(b.infer, f, 1) for f in requests[1:]]
        until(lambda: b.depth == 12)
        release.set()
        results = [first.result(10)] + [f.result(10) for f in rest]
    reference = Reference(repo / "classifier")
    for (outputs, _), feeds in zip(results, requests, strict=True):
        np.testing.assert_allclose(outputs["logits"], reference(feeds), atol=1e-4)
    assert [rows for _, rows in ran_on] == [1, 12]
    assert ran_on[0][0] != ran_on[1][0]  # the first thread answered its own client first
    assert b.close(timeout=5) and b.depth == 0


def test_a_queued_request_whose_caller_goes_is_dropped_and_its_thread_released(classifier):
    b = batcher(classifier, max_queue_delay_us=10_000_000)  # the first waits for company
    rng = np.random.default_rng(2)
    caller = Caller()
    with ThreadPoolExecutor(2) as pool:
        gone = pool.submit(b.infer, batch(rng, 1, 4), 1, caller=caller)
        until(lambda: b.depth == 1)
        stays = pool.submit(b.infer, batch(rng, 1, 4), 1)
        until(lambda: b.depth == 2)
        caller.cancel()
        with pytest.raises(Cancelled):
            gone.result(10)
        assert b.depth == 1
        assert b.close(timeout=10)  # closing runs what is queued at once
        outputs, _ = stays.result(10)
    assert outputs["logits"].shape[0] == 1
    with pytest.raises(Unavailable, match="shutting down"):
        b.infer(batch(rng, 1, 4), 1)
    with pytest.raises(Cancelled):  # a caller already gone queues nothing
        batcher(classifier).infer(batch(rng, 1, 4), 1, caller=caller)


def test_a_deadline_that_passes_in_the_queue_answers_deadline_exceeded(classifier):
    b = batcher(classifier)
    rng = np.random.default_rng(3)
    started, release = hold_first_run(classifier)
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(b.infer, batch(rng, 1, 4), 1)  # runs, and holds the model
        assert started.wait(10)
        late = pool.submit(b.infer, batch(rng, 1, 4), 1, timeout=0.05)  # queued behind it
        with pytest.raises(DeadlineExceeded, match="deadline passed while queued"):
            late.result(10)
        release.set()
        assert busy.result(10)[0]["logits"].shape[0] == 1
    assert b.close(timeout=5)


def test_a_full_queue_refuses_at_once(classifier):
    b = batcher(classifier, max_queue_size=2, max_queue_delay_us=10_000_000)
    rng = np.random.default_rng(4)
    with ThreadPoolExecutor(2) as pool:
        queued = [pool.submit(b.infer, batch(rng, 1, 4), 1) for _ in range(2)]
        until(lambda: b.depth == 2)
        with pytest.raises(Unavailable, match="queue full"):
            b.infer(batch(rng, 1, 4), 1)
        assert b.close(timeout=10)
        assert all(f.result(10)[0]["logits"].shape[0] == 1 for f in queued)


def test_two_instances_run_two_batches_at_once(classifier):
    """--instances 2: while one batch is stuck in session.run, a request that arrives
    takes the second slot and is answered; with one slot it would wait."""
    b = batcher(classifier, instances=2)
    rng = np.random.default_rng(5)
    started, release = hold_first_run(classifier)
    with ThreadPoolExecutor(2) as pool:
        stuck = pool.submit(b.infer, batch(rng, 1, 4), 1)
        assert started.wait(10)
        second = pool.submit(b.infer, batch(rng, 1, 4), 1)
        assert second.result(10)[0]["logits"].shape[0] == 1  # answered while the first runs
        assert not stuck.done()
        release.set()
        assert stuck.result(10)[0]["logits"].shape[0] == 1
    assert b.close(timeout=5)


def test_a_repository_lists_versions_in_numeric_order(repo, tmp_path):
    """RepositoryIndex, ModelStatistics and the metrics list what iterating gives: 2 before
    10, as ModelMetadata lists versions (folders come off the disk in text order)."""
    import shutil

    from quantgate.serve.repository import load_repository

    for version in ("10", "2", "1"):
        shutil.copytree(repo / "encoder" / "1", tmp_path / "encoder" / version)
    served = load_repository(ServeConfig(path=tmp_path))
    assert [m.version for m in served] == ["1", "2", "10"] == served.versions("encoder")


def test_a_dynamic_int8_is_served_with_a_word_on_its_batch_mates(repo, tmp_path, caplog):
    """Dynamic INT8 scales activations per batch: the operator reads, where the server says
    what it loaded, that batching moves answers, what the build measured, and the way out."""
    import dataclasses
    import shutil

    path = tmp_path / "dynamic"
    shutil.copytree(repo / "classifier", path)
    shutil.copy(path / "model.fp32.onnx", path / "model.int8.onnx")  # stands in for the INT8
    m = qb.load(path, verify=False).manifest
    gates = (
        qb.GateResult("speedup_b1_s16", 1.5, 1.2, ">=", True),
        qb.GateResult("batch_top1_agreement", 0.9972, 0.95, ">=", True),
    )
    int8 = qb.Variant(
        "model.int8.onnx", "int8", qb.sha256_file(path / "model.int8.onnx"),
        recipe={"name": "ort-dynamic-per-channel", "method": "dynamic"}, gates=gates,
    )  # fmt: skip
    qb.write_manifest(path, dataclasses.replace(m, variants=(*m.variants, int8)))
    with caplog.at_level("INFO", logger="quantgate.serve.runtime"):
        model = open_model(path, ServeConfig(path=path), CPU)
    assert model.variant.precision == "int8"
    assert "dynamic INT8: a row's answer moves slightly with the rows batched with it " in (
        caplog.text
    )
    assert "(batch_top1_agreement 0.9972); --no-dynamic-batching or --precision fp32" in (
        caplog.text
    )
