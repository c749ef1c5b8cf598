"""The bundle on disk against the copy served: the session is built from the bytes whose
sha256 was checked (serve/modelfile.py), and a bundle that changes or goes while served is
warned about once and served as loaded (watch.BundleWatch)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import shutil
import time
import urllib.request
from pathlib import Path

import bundles
import numpy as np
import onnx
import pytest
import tritonclient.grpc as tc
from conftest import ServerProcess
from helpers import MODEL_FILE, Reference, batch, inputs, until
from onnx import TensorProto, helper

from quantgate import bundle as qb
from quantgate.bundle import CPU
from quantgate.errors import BundleError
from quantgate.serve import modelfile, runtime
from quantgate.serve.config import ServeConfig
from quantgate.serve.watch import BundleWatch, Served, bundle_stamp

CHANGED = "changed on disk since it was loaded"
GONE = "is gone from disk"


def settled(watch: BundleWatch) -> list:
    """Two looks: a change is said once the next look finds it again (settled)."""
    assert watch.check() == [], "said at its first look"
    return watch.check()


@pytest.fixture
def sessions(monkeypatch) -> list:
    """What each ONNX Runtime session of serve/runtime.py was built from, in order."""
    built: list = []
    real = runtime.ort.InferenceSession

    def spy(source, *args, **kwargs):
        built.append(source)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(runtime.ort, "InferenceSession", spy)
    return built


def _open(path: Path):
    return runtime.open_model(path, ServeConfig(path=path), CPU)


def test_the_session_is_built_from_the_bytes_whose_sha256_was_checked(tmp_path, sessions):
    b = bundles.build(tmp_path / "b", "classifier")
    sha = qb.load(b).manifest.variant("fp32").sha256
    model = _open(b)
    assert [type(s) for s in sessions] == [bytes]
    assert hashlib.sha256(sessions[0]).hexdigest() == sha
    # one copy: ONNX Runtime's Python session does not keep the file for the server's life
    assert getattr(model.session, "_model_bytes", None) is None


def test_a_bundle_replaced_after_its_hash_is_read_is_not_served(tmp_path, sessions, monkeypatch):
    """A re-export renames a new folder into place: one that lands between the sha256 and
    the session is refused (the session was built from the checked bytes; what reads the
    file by path after, the vocabulary limits, would read the new one)."""
    b = bundles.build(tmp_path / "b", "classifier")
    new = bundles.build(tmp_path / "new", "classifier", seed=1)
    sha = qb.load(b).manifest.variant("fp32").sha256
    read = modelfile.read_verified

    def read_then_replace(path, expected):
        got = read(path, expected)
        os.replace(b, tmp_path / "old")
        os.replace(new, b)  # the new bundle, verified on its own, with another model
        return got

    monkeypatch.setattr(modelfile, "read_verified", read_then_replace)
    with pytest.raises(BundleError, match="was replaced while the server loaded it"):
        _open(b)
    assert hashlib.sha256(sessions[0]).hexdigest() == sha  # the bytes checked, not the path
    monkeypatch.undo()
    assert _open(b).variant.sha256 != sha  # started again: the new one


def test_a_file_changed_since_the_bundle_was_verified_is_refused(tmp_path):
    b = bundles.build(tmp_path / "b", "classifier")
    sha = qb.load(b).manifest.variant("fp32").sha256
    (b / MODEL_FILE).write_bytes((b / MODEL_FILE).read_bytes() + b"\0")
    with pytest.raises(BundleError, match=r"has sha256 \w{12}\.\.\., the manifest read expects"):
        modelfile.read_verified(b / MODEL_FILE, sha)
    with pytest.raises(BundleError, match="cannot read .* the bundle was changed or removed"):
        modelfile.read_verified(b / "gone.onnx", sha)


def test_a_model_with_external_data_is_opened_by_its_path(tmp_path, sessions):
    """ONNX Runtime finds external weights beside the model's path, which bytes lack."""
    b = bundles.build(tmp_path / "b", "encoder")
    expected = Reference(b)
    sessions.clear()
    model = onnx.load(b / MODEL_FILE)
    onnx.save_model(model, b / MODEL_FILE, save_as_external_data=True, location="weights.bin",
                    size_threshold=0)  # fmt: skip
    assert modelfile.external_data((b / MODEL_FILE).read_bytes())[0]
    manifest = qb.load(b, verify=False).manifest
    fp32 = dataclasses.replace(manifest.variants[0], sha256=qb.sha256_file(b / MODEL_FILE))
    qb.write_manifest(
        b,
        dataclasses.replace(
            manifest, variants=(fp32,), files={"weights.bin": qb.sha256_file(b / "weights.bin")}
        ),
    )
    served = _open(b)
    assert sessions == [str(b / MODEL_FILE)]
    feeds = batch(np.random.default_rng(0), 2, 12)
    (got,) = served.session.run(None, feeds)
    np.testing.assert_allclose(got, expected(feeds), atol=1e-5)
    assert served.index_limits == {"input_ids": bundles.VOCAB}


def test_weights_in_a_file_the_manifest_does_not_list_are_refused(tmp_path, sessions):
    """External weights no sha256 vouches for: zeroed, they were served as if verified."""
    b = bundles.build(tmp_path / "b", "encoder")
    model = onnx.load(b / MODEL_FILE)
    onnx.save_model(model, b / MODEL_FILE, save_as_external_data=True, location="./weights.bin",
                    size_threshold=0)  # fmt: skip
    assert modelfile.external_data((b / MODEL_FILE).read_bytes())[1] == {"./weights.bin"}
    manifest = qb.load(b, verify=False).manifest
    fp32 = dataclasses.replace(manifest.variants[0], sha256=qb.sha256_file(b / MODEL_FILE))
    qb.write_manifest(b, dataclasses.replace(manifest, variants=(fp32,), files={}))
    with pytest.raises(BundleError, match=r"variant fp32's model\.fp32\.onnx keeps weights in "
                       r"weights\.bin, which the manifest does not list"):  # fmt: skip
        _open(b)
    assert sessions == []  # refused before any session read them


def _tensor(name: str, external: bool) -> onnx.TensorProto:
    t = helper.make_tensor(name, TensorProto.FLOAT, [2], [1.0, 2.0])
    if external:
        t.ClearField("float_data")
        t.data_location = TensorProto.EXTERNAL
        t.external_data.add(key="location", value="w.bin")
    return t


def _model(initializer: bool = False, in_subgraph: bool = False) -> bytes:
    constant = helper.make_node("Constant", [], ["c"], value=_tensor("c", external=in_subgraph))
    branch = helper.make_graph(
        [constant], "then", [], [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2])]
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)],
        "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [_tensor("w", external=initializer)],
    )
    return helper.make_model(graph).SerializeToString()


def test_external_data_is_found_in_initializers_and_in_subgraphs_attributes():
    assert not modelfile.external_data(_model())[0]
    assert modelfile.external_data(_model(initializer=True))[0]
    assert modelfile.external_data(_model(in_subgraph=True))[0]
    assert not modelfile.external_data(b"not a model \xff\xff")[0]  # ORT says what is wrong
    assert modelfile.external_data(_model(in_subgraph=True))[1] == {"w.bin"}
    assert modelfile.external_data(_model())[1] == set()


def test_the_field_numbers_walked_are_onnx_own():
    def number(message, field: str) -> int:
        return message.DESCRIPTOR.fields_by_name[field].number

    names = {
        modelfile._MODEL: (onnx.ModelProto, ("graph", "training_info", "functions")),
        modelfile._TRAINING: (onnx.TrainingInfoProto, ("initialization", "algorithm")),
        modelfile._GRAPH: (onnx.GraphProto, ("node", "initializer", "sparse_initializer")),
        modelfile._NODE: (onnx.NodeProto, ("attribute",)),
        modelfile._ATTRIBUTE: (
            onnx.AttributeProto,
            ("t", "g", "tensors", "graphs", "sparse_tensor", "sparse_tensors"),
        ),
        modelfile._FUNCTION: (onnx.FunctionProto, ("node", "attribute_proto")),
        modelfile._SPARSE: (onnx.SparseTensorProto, ("values", "indices")),
    }
    kinds = {m.DESCRIPTOR.name: kind for kind, (m, _) in names.items()}
    kinds["TensorProto"] = modelfile._TENSOR
    for kind, (message, fields) in names.items():
        holds = modelfile._HOLDS[kind]
        assert sorted(holds) == sorted(number(message, f) for f in fields), message
        for f in fields:
            held = message.DESCRIPTOR.fields_by_name[f].message_type.name
            assert holds[number(message, f)] == kinds[held], (message, f)
    assert number(onnx.TensorProto, "external_data") == modelfile._EXTERNAL_DATA
    assert number(onnx.TensorProto, "data_location") == modelfile._DATA_LOCATION
    assert modelfile._EXTERNAL == TensorProto.EXTERNAL


def test_a_change_on_disk_is_warned_about_once_per_change(tmp_path, caplog):
    b = bundles.build(tmp_path / "b", "classifier")
    changes: list = []
    watch = BundleWatch(
        [Served(b, ("tiny", "1"), "model.fp32.onnx, sha256 0123456789ab...", bundle_stamp(b))],
        on_change=lambda model, changed, refused: changes.append((model, changed, refused)),
    )

    def looks(n: int = 3) -> str:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="quantgate.serve.watch"):
            for _ in range(n):
                watch.check()
        return caplog.text

    assert looks() == ""
    bundles.build(b, "classifier", seed=1)  # a re-export: a new folder renamed into place
    said = looks()
    assert said.count(CHANGED) == 1 and "WARNING" in said, said
    assert f"bundle {b} (model tiny v1) {CHANGED}: still serving the copy loaded at " in said
    assert "(model.fp32.onnx, sha256 0123456789ab...); restart to serve the new one" in said
    manifest = b / "manifest.json"
    before = manifest.stat().st_mtime_ns
    manifest.write_text(manifest.read_text())  # rewritten in place: its mtime, one second on
    os.utime(manifest, ns=(before + 1_000_000_000, before + 1_000_000_000))  # coarse clocks
    assert looks().count(CHANGED) == 1
    manifest.unlink()
    assert looks().count("has no manifest.json on disk any more") == 1
    shutil.rmtree(b)
    said = looks()
    assert said.count(GONE) == 1 and "a restart would not serve it" in said, said
    # without an outlook, a change is not known to be refused; gone, it is
    assert changes == [(("tiny", "1"), True, False)] * 2 + [(("tiny", "1"), True, True)] * 2


def _gated_int8(b: Path, passed: bool, drop: float = 0.2) -> None:
    """Give the bundle's INT8 the gates a re-gate writes: accurate (``drop`` points) and
    faster, or not."""
    manifest = qb.load(b, verify=False).manifest
    gates = (
        qb.GateResult("accuracy_drop", drop if passed else 3.0, 1.0, "<=", passed),
        qb.GateResult("speedup_b1_s128", 1.8, 1.2, ">=", True, provider=CPU),
    )
    variants = tuple(
        dataclasses.replace(v, gates=gates, verdict=qb.verdict_of(gates))
        if v.precision == "int8"
        else v
        for v in manifest.variants
    )
    qb.write_manifest(b, dataclasses.replace(manifest, variants=variants))


def test_a_passing_re_gate_is_said_at_info_as_a_restart_would_serve_the_same(tmp_path, caplog):
    """A re-gate that passes the copy served rewrites the manifest: a change (the metric is
    1), said at INFO, as a restart would serve what is served now; a WARNING cried wolf."""
    b = bundles.build(tmp_path / "b", "classifier", verdict=qb.FAIL)  # with an INT8
    _gated_int8(b, passed=True)
    cfg = ServeConfig(path=b)
    model = runtime.open_model(b, cfg, CPU)
    assert model.variant.precision == "int8"
    changes: list = []
    watch = BundleWatch(
        [model.served(cfg)],
        on_change=lambda model, changed, refused: changes.append((changed, refused)),
    )
    _gated_int8(b, passed=True, drop=0.4)  # re-gated on new data: still passing
    with caplog.at_level(logging.INFO, logger="quantgate.serve.watch"):
        assert len(settled(watch)) == 1
    assert "WARNING" not in caplog.text and CHANGED in caplog.text, caplog.text
    assert "a restart would serve int8 (model.int8.onnx, sha256 " in caplog.text
    assert "(the copy served now)" in caplog.text and changes == [(True, False)]


@pytest.mark.parametrize("allow_failed", [False, True])
def test_a_re_gate_that_fails_the_copy_served_is_said_with_what_a_restart_would_serve(
    tmp_path, caplog, allow_failed
):
    """The server keeps serving what it loaded; the warning says what a restart would do
    with the bundle as re-gated: the copy served now failing is news to an operator."""
    b = bundles.build(tmp_path / "b", "classifier", verdict=qb.FAIL)
    _gated_int8(b, passed=True)
    cfg = ServeConfig(path=b, allow_failed_gates=allow_failed)
    model = runtime.open_model(b, cfg, CPU)
    assert model.variant.precision == "int8"
    watch = BundleWatch([model.served(cfg)])

    def warned() -> str:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="quantgate.serve.watch"):
            assert len(settled(watch)) == 1
        return caplog.text

    _gated_int8(b, passed=False)  # re-gated on new data: INT8 now 3 points off
    said = warned()
    assert CHANGED in said and "(model.int8.onnx, sha256" in said
    assert f"the copy served (int8) now fails its gates: see {b / 'report.md'}" in said
    if allow_failed:
        fp32 = qb.load(b, verify=False).manifest.variant("fp32").sha256[:12]
        assert f"a restart would serve fp32 (model.fp32.onnx, sha256 {fp32}...)" in said, said
    else:
        assert "a restart would refuse it (variants ['int8'] failed their gates; " in said
        assert "--allow-failed-gates serves its passing variants)" in said
    _gated_int8(b, passed=True)  # and back: the manifest loaded, written anew
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="quantgate.serve.watch"):
        assert len(settled(watch)) == 1
    assert "WARNING" not in caplog.text and "now fails" not in caplog.text, caplog.text
    assert "was written anew on disk, the same files as loaded (hashed)" in caplog.text


def test_a_bundle_copied_anew_byte_for_byte_is_no_change(tmp_path, caplog):
    """The same release copied into place again (rsync, a volume remounted): a warning and
    bundle_changed_on_disk stuck at 1, though the files hashed were the ones served."""
    b = bundles.build(tmp_path / "b", "classifier")
    cfg = ServeConfig(path=b)
    model = runtime.open_model(b, cfg, CPU)
    changes: list = []
    watch = BundleWatch(
        [model.served(cfg)],
        on_change=lambda model, changed, refused: changes.append((changed, refused)),
    )
    copy = shutil.copytree(b, tmp_path / "copy", copy_function=shutil.copy)  # new mtimes
    os.rename(b, tmp_path / "old")
    os.rename(copy, b)
    with caplog.at_level(logging.INFO, logger="quantgate.serve.watch"):
        assert len(settled(watch)) == 1
    assert "WARNING" not in caplog.text, caplog.text
    assert "was written anew on disk, the same files as loaded (hashed)" in caplog.text
    assert changes == [(False, False)]
    bundles.build(b, "classifier", seed=1)  # another export: a change, as before
    with caplog.at_level(logging.INFO, logger="quantgate.serve.watch"):
        assert len(settled(watch)) == 1
    assert CHANGED in caplog.text and changes[-1] == (True, False)


def test_a_restart_outlook_names_a_bundle_it_cannot_read(tmp_path):
    b = bundles.build(tmp_path / "b", "classifier")
    cfg = ServeConfig(path=b)
    model = runtime.open_model(b, cfg, CPU)
    (b / "manifest.json").write_text("{")
    said = runtime.restart_outlook(b, cfg, CPU, model.variant, model.bundle.manifest)
    assert said.refused and said.said.startswith("a restart would refuse it: "), said
    assert "manifest.json" in said.said, said


def test_a_served_file_changed_in_place_is_seen_and_refused_as_a_restart_would(tmp_path, caplog):
    """A model file overwritten in place (its manifest untouched) went unseen, and the next
    restart refused the bundle for its sha256: now it is said at once, the restart's refusal
    with it, and in a repository, that the whole repository would not start."""
    repo = tmp_path / "repo"
    b = bundles.build(repo / "tiny", "classifier")
    bundles.build(repo / "other", "classifier", seed=1)
    cfg = ServeConfig(path=repo)
    model = runtime.open_model(b, cfg, CPU, name="tiny")
    seen: list = []
    watch = BundleWatch(
        [model.served(cfg)], on_change=lambda model, c, refused: seen.append((c, refused))
    )
    assert not watch.check()
    data = (b / MODEL_FILE).read_bytes()
    (b / MODEL_FILE).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, in place
    with caplog.at_level(logging.WARNING, logger="quantgate.serve.watch"):
        assert len(settled(watch)) == 1
    said = " ".join(caplog.text.split())
    assert f"{CHANGED}: still serving the copy loaded at start" in said, said
    assert "a restart would refuse it, and with it the whole repository (the server starts " in said
    assert f"{MODEL_FILE} has sha256 " in said and "the file was changed after export" in said
    assert seen == [(True, True)]
    (b / MODEL_FILE).write_bytes(data)  # put back: its stamp differs, its bytes do not
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="quantgate.serve.watch"):
        assert len(settled(watch)) == 1
    assert "the same files as loaded (hashed)" in caplog.text, caplog.text
    assert "WARNING" not in caplog.text and seen[-1] == (False, False), caplog.text


def test_another_model_under_the_served_name_is_said_to_be_another(tmp_path, caplog):
    b = bundles.build(tmp_path / "b", "classifier")
    cfg = ServeConfig(path=b)
    model = runtime.open_model(b, cfg, CPU)
    watch = BundleWatch([model.served(cfg)])
    bundles.build(b, "encoder")  # re-exported over it: hidden states, not logits
    with caplog.at_level(logging.WARNING, logger="quantgate.serve.watch"):
        assert len(settled(watch)) == 1
    said = " ".join(caplog.text.split())
    assert (
        "it is not the model served (task sequence-classification -> feature-extraction; " in said
    )
    assert "outputs logits float32 (batch, 5) -> last_hidden_state float32 (batch, " in said
    assert "requests made for the one served would be refused after a restart" in said, said


def test_a_bundle_put_back_as_it_was_is_said_so(tmp_path, caplog):
    b = bundles.build(tmp_path / "b", "classifier")
    watch = BundleWatch([Served(b, ("tiny", "1"), "x", bundle_stamp(b))])
    os.rename(b, tmp_path / "aside")
    assert len(settled(watch)) == 1
    os.rename(tmp_path / "aside", b)
    with caplog.at_level(logging.INFO, logger="quantgate.serve.watch"):
        assert len(settled(watch)) == 1 and not watch.check()
    assert "is back on disk as it was loaded" in caplog.text


def _changed_metric(srv: ServerProcess, what: str = "changed") -> str:
    url = re.search(r"metrics on (http://\S+/metrics)", "".join(srv.stdout)).group(1)
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    line = rf"^quantgate_bundle_{what}_on_disk\{{([^}}]*)\}} (\S+)$"
    return re.search(line, text, re.M).group(0)


def test_a_bundle_re_exported_while_served_is_warned_about_once_and_served_as_loaded(
    tmp_path,
):
    b = bundles.build(tmp_path / "classifier", "classifier")
    loaded = Reference(b)
    sha = qb.load(b).manifest.variant("fp32").sha256
    srv = ServerProcess(b, "--metrics-port", "0")
    try:
        feeds = batch(np.random.default_rng(0), 3, 12)

        def answer() -> np.ndarray:
            with tc.InferenceServerClient(srv.url) as c:
                return c.infer("tiny-classifier", inputs(feeds)).as_numpy("logits")

        metric = 'quantgate_bundle_changed_on_disk{model="tiny-classifier",version="1"}'
        assert _changed_metric(srv) == f"{metric} 0.0"
        bundles.build(b, "classifier", seed=1)  # the re-export, renamed into place
        new = Reference(b)
        until(lambda: CHANGED in srv.log)
        time.sleep(2.5)  # more looks (one a second): no more lines
        assert srv.log.count(CHANGED) == 1, srv.log
        line = next(s for s in srv.stderr if CHANGED in s)
        assert " WARNING quantgate.serve.watch: " in line, line
        assert f"bundle {b} (model tiny-classifier v1)" in line, line
        newsha = qb.load(b).manifest.variant("fp32").sha256
        assert f"(model.fp32.onnx, sha256 {sha[:12]}...); a restart would serve fp32 " in line
        assert line.rstrip().endswith(f"(model.fp32.onnx, sha256 {newsha[:12]}...)"), line
        got = answer()
        np.testing.assert_allclose(got, loaded(feeds), atol=1e-4)
        assert not np.allclose(got, new(feeds), atol=1e-4)  # not the new one
        assert _changed_metric(srv) == f"{metric} 1.0"
        refused = metric.replace("changed", "refused")
        assert _changed_metric(srv, "refused") == f"{refused} 0.0"  # a restart serves the new one
        shutil.rmtree(b)
        until(lambda: GONE in srv.log)
        time.sleep(1.5)
        assert srv.log.count(GONE) == 1 and srv.log.count(CHANGED) == 1, srv.log
        assert _changed_metric(srv, "refused") == f"{refused} 1.0"
        np.testing.assert_allclose(answer(), loaded(feeds), atol=1e-4)
    finally:
        assert srv.terminate() == 0, srv.log


def test_a_folder_added_to_a_served_repository_is_said_once(tmp_path, caplog):
    """A version folder copied in while the server runs (or a model folder) is what a restart
    would serve, and requests without a version would move to it: said once, as a change is."""
    from quantgate.serve.repository import load_repository, unserved_folders

    repo = tmp_path / "repo"
    bundles.build(repo / "tiny" / "1", "classifier")
    bundles.build(repo / "flat", "classifier")  # a model folder that is a bundle itself
    served = {(m.name, m.version) for m in load_repository(ServeConfig(path=repo))}
    assert served == {("tiny", "1"), ("flat", "1")} and unserved_folders(repo, served) == []
    counts: list = []
    watch = BundleWatch(
        [], repository=(repo, lambda: unserved_folders(repo, served)), on_unserved=counts.append
    )

    def said() -> str:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="quantgate.serve.watch"):
            for _ in range(3):
                watch.check()
        return caplog.text

    assert said() == ""
    bundles.build(repo / "tiny" / "2", "classifier", seed=1)
    bundles.build(repo / "bert", "encoder")
    bundles.build(repo / "flat" / "2", "classifier")  # which a restart refuses
    (repo / "x\nlistening on :1").mkdir()  # said escaped: no line of its own
    (repo / "lost+found").mkdir()
    (repo / ".staging").mkdir()
    with caplog.at_level(logging.INFO, logger="quantgate.serve.watch"):
        watch.check()  # a first look: folders being copied in may still grow
    assert "not served" not in caplog.text and counts == []
    text = " ".join(said().split())
    assert text.count("holds folders not served") == 1, text
    assert (
        f"repository {repo} holds folders not served: bert, flat/2, tiny/2, "
        "'x\\nlistening on :1'; a restart " in text
    ), text
    assert f"(`quantgate serve {repo} --check` tells); a new version takes the requests" in text
    assert counts == [4]
    for gone in ("tiny/2", "bert", "flat/2", "x\nlistening on :1"):
        shutil.rmtree(repo / gone)
    assert said().count("holds only the folders served") == 1 and counts == [4, 0]


def test_a_file_being_written_is_said_once_it_is_written(tmp_path, caplog):
    """A served file rewritten in place changes at every look while it is written: it was
    said (and the bundle hashed) at each, "refused" then "serves"; now once, when it
    settles."""
    b = bundles.build(tmp_path / "b", "classifier")
    cfg = ServeConfig(path=b)
    model = runtime.open_model(b, cfg, CPU)
    refused: list = []
    watch = BundleWatch([model.served(cfg)], on_change=lambda m, c, r: refused.append(r))
    data = (b / MODEL_FILE).read_bytes()
    with caplog.at_level(logging.INFO, logger="quantgate.serve.watch"):
        for end in range(1, 6):  # five looks, each finding more of the file written
            (b / MODEL_FILE).write_bytes(data[: len(data) * end // 5])
            watch.check()
        assert caplog.text == "" and refused == []
        assert len(watch.check()) == 1  # the same as the last look: written
    # the same bytes in the end: said once, as no change
    assert caplog.text.count("was written anew on disk, the same files as loaded") == 1
    assert CHANGED not in caplog.text and refused == [False]


def test_an_outlook_that_fails_still_says_the_change(tmp_path, caplog):
    b = bundles.build(tmp_path / "b", "classifier")

    def broken():
        raise PermissionError(13, "Permission denied", str(b / MODEL_FILE))

    seen: list = []
    served = Served(b, ("tiny", "1"), "x", bundle_stamp(b), outlook=broken)
    watch = BundleWatch([served], on_change=lambda m, c, r: seen.append((c, r)))
    bundles.build(b, "classifier", seed=1)
    with caplog.at_level(logging.WARNING, logger="quantgate.serve.watch"):
        assert len(settled(watch)) == 1
    assert "what a restart would do is not known: [Errno 13] Permission denied" in caplog.text
    assert seen == [(True, True)]


def test_a_restart_that_would_serve_another_name_or_version_says_so(tmp_path, caplog):
    """A single bundle is served by its manifest's name and version: a re-export under
    another name moves it, and requests naming the old one would be refused."""
    b = bundles.build(tmp_path / "b", "classifier")
    cfg = ServeConfig(path=b)
    model = runtime.open_model(b, cfg, CPU)
    watch = BundleWatch([model.served(cfg)])
    manifest = qb.load(b).manifest
    qb.write_manifest(b, dataclasses.replace(manifest, name="renamed", version=2))
    with caplog.at_level(logging.WARNING, logger="quantgate.serve.watch"):
        assert len(settled(watch)) == 1
    said = " ".join(caplog.text.split())
    assert "a restart would serve it as model renamed v2, not tiny-classifier v1: " in said, said


def test_a_file_a_new_manifest_lists_is_watched_from_then_on(tmp_path, caplog):
    """The watch looked at the files the loaded manifest listed: a file a re-export added
    (a tokenizer's) was then changed unseen, and the next restart refused the bundle."""
    b = bundles.build(tmp_path / "b", "classifier")
    cfg = ServeConfig(path=b)
    model = runtime.open_model(b, cfg, CPU)
    refused: list = []
    watch = BundleWatch([model.served(cfg)], on_change=lambda m, c, r: refused.append(r))
    (b / "vocab.txt").write_text("[PAD]\n")
    manifest = qb.load(b).manifest
    qb.write_manifest(
        b, dataclasses.replace(manifest, files={"vocab.txt": qb.sha256_file(b / "vocab.txt")})
    )
    assert len(settled(watch)) == 1 and refused == [False]
    (b / "vocab.txt").write_text("[UNK]\n")  # in place, the manifest untouched
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="quantgate.serve.watch"):
        assert len(settled(watch)) == 1
    assert "vocab.txt has sha256" in caplog.text and refused == [False, True], caplog.text


def test_a_served_repository_counts_the_folders_it_does_not_serve(tmp_path):
    """The gauge an alert reads for folders a restart would serve, wired to the watch."""
    repo = tmp_path / "repo"
    bundles.build(repo / "tiny" / "1", "classifier")
    srv = ServerProcess(repo, "--metrics-port", "0")
    url = re.search(r"metrics on (http://\S+/metrics)", "".join(srv.stdout)).group(1)

    def unserved() -> float:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        return float(re.search(r"^quantgate_repository_unserved_folders (\S+)$", text, re.M)[1])

    try:
        assert unserved() == 0
        bundles.build(repo / "tiny" / "2", "classifier", seed=1)
        until(lambda: unserved() == 1, timeout=30)
    finally:
        assert srv.terminate() == 0, srv.log
