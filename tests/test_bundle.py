"""The bundle contract: round trip, hash verification, atomic replacement, refusals."""

import json
import os
import stat

import pytest

from quantgate import bundle as qb
from quantgate.errors import BundleError


def make_manifest(tmp, verdict="pass"):
    (tmp / "model.fp32.onnx").write_bytes(b"fp32 model bytes")
    v = qb.Variant(
        file="model.fp32.onnx",
        precision="fp32",
        sha256=qb.sha256_file(tmp / "model.fp32.onnx"),
        gates=(qb.GateResult("max_abs_diff", 1e-6, 1e-4, "<=", True),),
        verdict=verdict,
    )
    return qb.Manifest(
        name="m",
        task="classification",
        inputs=(qb.TensorSpec("input_ids", "int64", ("batch", "sequence")),),
        outputs=(qb.TensorSpec("logits", "float32", ("batch", 10)),),
        variants=(v,),
        opset=18,
        source={"kind": "checkpoint"},
    )


def write(out, verdict="pass", force=False):
    with qb.staging(out, force=force) as tmp:
        qb.write_manifest(tmp, make_manifest(tmp, verdict))
    return qb.load(out)


def test_round_trip(tmp_path):
    b = write(tmp_path / "b")
    assert b.manifest.verdict == "pass"
    assert b.manifest.inputs[0].dims == ("batch", "sequence")
    assert b.manifest.variant("fp32").gates[0].value == 1e-6
    assert json.loads((b.path / qb.MANIFEST).read_text())["verdict"] == "pass"


def test_failed_variant_fails_the_bundle(tmp_path):
    assert write(tmp_path / "b", verdict="fail").manifest.verdict == "fail"


def test_tampered_file_is_refused(tmp_path):
    b = write(tmp_path / "b")
    (b.path / "model.fp32.onnx").write_bytes(b"changed")
    with pytest.raises(BundleError, match="changed after export"):
        qb.load(b.path)


def test_missing_variant_is_named(tmp_path):
    with pytest.raises(BundleError, match="no int8 variant"):
        write(tmp_path / "b").manifest.variant("int8")


def test_failure_inside_staging_leaves_the_previous_bundle_intact(tmp_path):
    out = tmp_path / "b"
    before = write(out).manifest.created
    with pytest.raises(RuntimeError), qb.staging(out) as tmp:
        (tmp / "model.fp32.onnx").write_bytes(b"half")
        raise RuntimeError("crash mid-write")
    assert qb.load(out).manifest.created == before
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temporary leftovers


def test_existing_non_bundle_directory_is_refused_unless_forced(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(BundleError, match="not a bundle; refusing"):
        write(out)
    assert (out / "notes.txt").read_text() == "keep me"
    write(out, force=True)
    assert not (out / "notes.txt").exists()


def test_corrupt_manifest_is_a_clear_error(tmp_path):
    b = write(tmp_path / "b")
    (b.path / qb.MANIFEST).write_text("{")
    with pytest.raises(BundleError, match="is corrupt"):
        qb.load(b.path)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        qb.load(tmp_path / "nothing")
    with pytest.raises(BundleError, match="has no manifest.json"):
        qb.load(tmp_path)


def test_bundle_gets_the_mode_of_a_new_directory(tmp_path):
    umask = os.umask(0o027)
    try:
        b = write(tmp_path / "b")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(b.path.stat().st_mode) == 0o750  # not tempfile.mkdtemp's 0700


def test_a_gate_value_that_is_not_a_number_is_a_clear_error(tmp_path):
    b = write(tmp_path / "b")
    d = json.loads((b.path / qb.MANIFEST).read_text())
    d["variants"][0]["gates"][0]["value"] = "abc"
    (b.path / qb.MANIFEST).write_text(json.dumps(d))
    with pytest.raises(BundleError, match=r"is corrupt .*gate 'max_abs_diff' has value 'abc'"):
        qb.load(b.path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: d["variants"][0].update(file="../elsewhere/model.onnx"),
            "not a file name inside",
        ),
        (lambda d: d["variants"][0].update(file="/etc/hostname"), "not a file name inside"),
        (lambda d: d["variants"][0].update(file=5), "not a file name inside"),
        (lambda d: d.update(variants=[]), "not a non-empty list"),
        (lambda d: d.update(source=None), "source is a NoneType, not an object"),
        (lambda d: d.update(tools=[]), "tools is a list, not an object"),
        (lambda d: d["variants"][0].update(gates=[5]), "is corrupt"),
    ],
)
def test_a_manifest_of_the_wrong_shape_is_a_clear_error(tmp_path, edit, message):
    """A variant's file is a name inside the bundle: never a path to another file on disk."""
    b = write(tmp_path / "b")
    d = json.loads((b.path / qb.MANIFEST).read_text())
    edit(d)
    (b.path / qb.MANIFEST).write_text(json.dumps(d))
    with pytest.raises(BundleError, match=message):
        qb.load(b.path, verify=False)


def test_force_never_replaces_the_directory_a_person_is_working_in(tmp_path, monkeypatch):
    """`--out .` or an empty `--out "$DIR"` with --force would rename the bundle over the work."""
    work = tmp_path / "project"
    (work / "src").mkdir(parents=True)
    (work / "src" / "train.py").write_text("precious")
    monkeypatch.chdir(work / "src")
    for out, why in ((work / "src", "the current directory"), (work, "holds the current one")):
        with pytest.raises(BundleError, match=why):
            qb.check_writable_target(out, force=True)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    with pytest.raises(BundleError, match="the home directory"):
        qb.check_writable_target(tmp_path / "home", force=True)
    qb.check_writable_target(work / "src" / "bundle", force=True)  # a new directory is fine
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_text("x")
    qb.check_writable_target(other, force=True)  # elsewhere, --force is the user's call
    assert (work / "src" / "train.py").read_text() == "precious"
