"""The bundle contract: round trip, hash verification, atomic replacement, refusals."""

import dataclasses
import errno
import json
import logging
import math
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from quantgate import bundle as qb
from quantgate.errors import BundleError, QuantgateError


def make_manifest(tmp, verdict="pass"):
    ok = verdict == "pass"
    (tmp / "model.fp32.onnx").write_bytes(b"fp32 model bytes")
    v = qb.Variant(
        file="model.fp32.onnx",
        precision="fp32",
        sha256=qb.sha256_file(tmp / "model.fp32.onnx"),
        # a variant's verdict is its gates': a failed one for a failed bundle
        gates=(qb.GateResult("max_abs_diff", 1e-6 if ok else 1.0, 1e-4, "<=", ok),),
    )
    return qb.Manifest(
        name="m",
        task="sequence-classification",
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


def test_a_manifest_in_python_round_trips_through_to_dict(tmp_path):
    """From Python as through the file: to_dict gives JSON's types, which from_dict reads."""
    m = make_manifest(tmp_path)
    d = m.to_dict()
    assert d == json.loads(json.dumps(d, allow_nan=False))  # lists, not tuples; no NaN
    assert qb.Manifest.from_dict(d) == m
    d["inputs"] = tuple(d["inputs"])  # a dict a person built: named as Python, not "an object"
    with pytest.raises(BundleError, match="manifest.inputs: expected a list of tensors, found a "
                       "Python tuple, not JSON"):  # fmt: skip
        qb.Manifest.from_dict(d)


def test_a_variant_without_providers_has_the_default_not_none(tmp_path):
    """The schema lets a hand-written manifest leave out a variant's providers; it read as
    no provider at all, and the variant could be served nowhere."""
    d = make_manifest(tmp_path).to_dict()
    del d["variants"][0]["providers"]
    variant = qb.Manifest.from_dict(d).variant("fp32")
    assert variant.providers == qb.Variant.providers == (qb.CPU,)


def test_a_bundle_reads_in_one_line(tmp_path):
    b = write(tmp_path / "b")
    assert repr(b) == f"Bundle({str(b.path)!r}, name='m', verdict='pass', variants=[fp32:pass])"


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
    with pytest.raises(RuntimeError, match="crash mid-write"), qb.staging(out) as tmp:
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


def test_a_folder_with_a_manifest_json_of_its_own_is_no_bundle_to_replace(tmp_path):
    """A web app's public/ folder has a manifest.json too: it was replaced, files and all,
    without --force."""
    out = tmp_path / "webapp"
    (out / "src").mkdir(parents=True)
    (out / qb.MANIFEST).write_text('{"name": "my-pwa", "icons": []}')
    (out / "src" / "app.js").write_text("code")
    with pytest.raises(BundleError, match="not a bundle; refusing"):
        write(out)
    assert (out / "src" / "app.js").read_text() == "code"


def test_files_added_to_a_bundle_are_not_lost_to_a_new_one_unless_forced(tmp_path):
    """A re-export replaces the bundle's directory as a whole: a person's NOTES.md in it was
    deleted without a word. A re-gate (rewrite) carries them over, as before."""
    b = write(tmp_path / "b")
    (b.path / "NOTES.md").write_text("why this model")
    (b.path / "plots").mkdir()
    (b.path / "plots" / "a.png").write_bytes(b"png")
    with pytest.raises(
        BundleError, match=r"holds files that are not the bundle's \(NOTES.md, plots/\)"
    ):
        write(b.path)
    assert (b.path / "NOTES.md").exists()
    qb.rewrite(b, b.manifest, "report")
    assert (b.path / "NOTES.md").read_text() == "why this model"
    write(b.path, force=True)
    assert not (b.path / "NOTES.md").exists() and qb.load(b.path).manifest.verdict == "pass"
    (b.path / ".DS_Store").write_bytes(b"finder")  # the system's litter, an empty folder: no
    (b.path / "empty").mkdir()  # one's work, and the next export goes through
    write(b.path)
    d = json.loads((b.path / qb.MANIFEST).read_text())
    (b.path / "NOTES.md").write_text("x")
    for files in (None, 3, {"a": "b"}):  # a damaged manifest: no traceback
        (b.path / qb.MANIFEST).write_text(json.dumps({**d, "files": files}))
        with pytest.raises(BundleError, match="NOTES.md"):
            write(b.path)


def test_corrupt_manifest_is_a_clear_error(tmp_path):
    b = write(tmp_path / "b")
    (b.path / qb.MANIFEST).write_text("{")
    with pytest.raises(BundleError, match="is corrupt"):
        qb.load(b.path)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        qb.load(tmp_path / "nothing")
    from quantgate.errors import ConfigTypeError

    with pytest.raises(ConfigTypeError, match="expected a bundle's path .* found int"):
        qb.load(5)  # type: ignore[arg-type]  # Path(5): Python's own TypeError, before
    with pytest.raises(BundleError, match="has no manifest.json"):
        qb.load(tmp_path)
    (tmp_path / qb.MANIFEST).mkdir()  # there, but no file: not "it has none"
    with pytest.raises(BundleError, match=r"manifest.json is not a file \(a directory\?\)"):
        qb.load(tmp_path)


def test_a_folder_of_bundles_is_told_by_the_bundles_it_holds(tmp_path):
    """A repository (NAME/, NAME/VERSION/) passed where a bundle was meant: every command that
    loads one (infer --bundle, gate, the library) names the bundles to pass instead, not
    "Create one with `quantgate export`"."""
    repo = tmp_path / "repo"
    write(repo / "classifier")
    write(repo / "encoder" / "1")
    write(repo / "deep" / "a" / "b")  # deeper than a repository's layout: not looked for
    write(repo / ".classifier.tmp-4000000-deadbeef-x")  # a killed export's: serve skips it
    write(repo / "lost+found" / "1")
    with pytest.raises(BundleError) as e:
        qb.load(repo)
    assert str(e.value) == (
        f"{repo} is not a bundle but holds bundles in classifier, encoder/1: pass one of them "
        f"({repo / 'classifier'})."
    )
    with pytest.raises(BundleError) as e:
        qb.load(repo / "encoder")  # one model's version folders
    assert f"holds bundles in 1: pass one of them ({repo / 'encoder' / '1'})" in str(e.value)
    many = tmp_path / "many"
    for i in range(7):
        write(many / f"m{i}")
    with pytest.raises(BundleError, match=r"holds bundles in m0, m1, m2, m3, m4, m5, \.\.\.: "):
        qb.load(many)
    write(tmp_path / "far" / "a" / "b" / "c")
    with pytest.raises(BundleError, match="has no manifest.json. Create one with"):
        qb.load(tmp_path / "far")  # none within two levels


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
    with pytest.raises(
        BundleError,
        match=r"is corrupt: .*\(max_abs_diff\)\.value: expected a number \(null: not measurable, failed\), found the string 'abc'",
    ):
        qb.load(b.path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: d["variants"][0].update(file="../elsewhere/model.onnx"),
            "expected a file name inside the bundle",
        ),
        (lambda d: d["variants"][0].update(file="/etc/hostname"), "a file name inside the bundle"),
        (lambda d: d["variants"][0].update(file=5), "a file name inside the bundle"),
        (lambda d: d.update(variants=[]), "variants: expected a non-empty list"),
        (lambda d: d.update(source=None), "source: expected an object, found null"),
        (lambda d: d.update(tools=[]), "tools: expected an object of package names"),
        (lambda d: d["variants"][0].update(gates=[5]), "is corrupt"),
        (lambda d: d["variants"][0].update(sha256=5), r"sha256: expected 64 hexadecimal"),
        (lambda d: d["variants"][0].update(sha256="abc"), r"found the string 'abc'"),
        (
            lambda d: d["variants"][0].update(providers="CPUExecutionProvider"),
            r"providers: expected a list of non-empty strings, found the string",
        ),
        (lambda d: d["variants"][0].update(precision="int4"), r"precision: expected one of fp32"),
        (lambda d: d["variants"].append(dict(d["variants"][0])), "'fp32' appears more than once"),
        (lambda d: d["variants"][0]["gates"][0].update(passed="yes"), "expected true or false"),
        (lambda d: d["export"].update(max_seq_len="64"), r"export\.max_seq_len: expected a whole"),
        (lambda d: d.update(opset="18"), r"opset: expected a whole number"),
        (lambda d: d.update(owner="me"), r"unknown field\(s\) 'owner'.*under extra"),
        (lambda d: d["inputs"][0].update(dims=5), r"inputs\[0\]\.dims: expected a list"),
        (lambda d: d.update(files={"../x": "0" * 64}), r"files: expected an object of paths"),
        # a name goes into log lines as it is: a line break forged a "listening on" line
        (
            lambda d: d.update(name="m v1: fp32\nlistening on 127.0.0.1:1\nx"),
            r"name: expected a non-empty name without control characters",
        ),
        (lambda d: d.update(name="m\x1b]0;title\x07"), "without control characters"),
        (lambda d: d.update(name="evil\u202egpj.exe"), "without control characters"),
        (lambda d: d.update(name="a\u2028b"), "without control characters"),
        (lambda d: d.update(name="digits\u200b"), "without control characters"),  # looks alike
        # a tokenizer read from another folder through ".." (no writer of bundles does that)
        (
            lambda d: hf(d, "../../evil_tok"),
            r"tokenizer: expected a folder of the bundle .* "
            r"which leads out of it",
        ),  # fmt: skip
        (lambda d: hf(d, "tokenizer/../../x"), r"which leads out of it"),
        (lambda d: hf(d, 5), r"tokenizer: expected a folder path, found"),
        # a failed gate's message reads the newest re-gate's record: a string crashed it
        (
            lambda d: d["extra"].update(regates=[{"verdict": "pass"}, "by hand"]),
            r"extra\.regates\[1\]: expected an object \(a re-gate's record\), found the string",
        ),
        (lambda d: d["extra"].update(regates=None), r"extra\.regates: expected a list, found null"),
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


def test_force_never_replaces_a_folder_that_holds_a_repository(tmp_path):
    """`train --force` (to retrain) with a mistyped --out deleted a folder of projects, a Git
    repository among them, without a word."""
    from quantgate.model.train import TrainConfig, train

    for inside in ("", "sub"):
        folder = tmp_path / f"victim{inside}"
        (folder / inside / ".git").mkdir(parents=True)
        (folder / "notes.txt").write_text("important")
        with pytest.raises(
            BundleError, match=rf"holds a version-controlled folder \(.*{inside}/?\.git\)"
        ):
            qb.check_writable_target(folder, force=True)
        with pytest.raises(QuantgateError, match=r"version-controlled.*even with --force"):
            train(folder, cfg=TrainConfig(epochs=1), force=True)
        assert (folder / "notes.txt").read_text() == "important"
    # a bundle versioned in Git: export --force deleted its history; a re-gate keeps it
    b = write(tmp_path / "versioned")
    (b.path / ".git").mkdir()
    with pytest.raises(BundleError, match="holds a version-controlled folder"):
        qb.check_writable_target(b.path, force=True)
    qb.check_writable_target(b.path, force=True, carries_others=True, mount_ok=True)
    # a link to a checkout elsewhere: replacing the folder removes the link, not the checkout
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "checkout").symlink_to(tmp_path / "victim")
    qb.check_writable_target(linked, force=True)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: d["variants"][0].update(verdict="pass"),
            r"verdict is 'pass', but its gate\(s\) max_abs_diff failed",
        ),
        (
            lambda d: d["variants"][0]["gates"][0].update(passed=True, value=1.0),
            r"passed is true, but its value 1\.0 is not <= 0\.0001",
        ),
        (lambda d: d.update(verdict="pass"), r"verdict is 'pass', but variant\(s\) fp32 failed"),
    ],
)
def test_a_pass_the_gates_do_not_support_is_refused(tmp_path, edit, message):
    """A verdict is derived from the gates: flipping it (or one gate's passed) by hand in the
    manifest must not get a failed model served."""
    b = write(tmp_path / "b", verdict="fail")
    d = json.loads((b.path / qb.MANIFEST).read_text())
    d["variants"][0]["gates"][0].update(value=1.0, passed=False)  # the failed gate, as written
    edit(d)
    (b.path / qb.MANIFEST).write_text(json.dumps(d))
    with pytest.raises(BundleError, match=message):
        qb.load(b.path)


def test_every_problem_of_a_manifest_is_listed_at_once(tmp_path):
    b = write(tmp_path / "b")
    d = json.loads((b.path / qb.MANIFEST).read_text())
    d.update(name=5, opset="x")
    d["variants"][0].update(providers="CPU")
    (b.path / qb.MANIFEST).write_text(json.dumps(d))
    with pytest.raises(BundleError) as e:
        qb.load(b.path)
    assert "3 problems:" in str(e.value)
    for field in ("manifest.name:", "manifest.opset:", "variants[0] (fp32).providers:"):
        assert field in str(e.value)


def test_an_uppercase_sha256_is_the_same_hash(tmp_path):
    """PowerShell's Get-FileHash prints uppercase: a hash pasted from it still verifies."""
    b = write(tmp_path / "b")
    d = json.loads((b.path / qb.MANIFEST).read_text())
    d["variants"][0]["sha256"] = d["variants"][0]["sha256"].upper()
    (b.path / qb.MANIFEST).write_text(json.dumps(d))
    assert qb.load(b.path).manifest.variant("fp32").sha256 == d["variants"][0]["sha256"].lower()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"name": "a", "name": "b"}', "the key\\(s\\) 'name' appear twice"),
        ("[1, 2]", "expected a JSON object at the top, found a list"),
        ('{"x": "' + "a" * (qb.MAX_MANIFEST_BYTES + 1) + '"}', "is over 17 MB"),
    ],
    ids=["deep", "repeated-key", "list", "huge"],
)
def test_a_manifest_that_is_no_manifest_is_a_bundle_error(tmp_path, text, message):
    b = write(tmp_path / "b")
    (b.path / qb.MANIFEST).write_text(text)
    with pytest.raises(BundleError, match=message):
        qb.load(b.path)


def test_a_byte_order_mark_from_an_editor_is_not_corruption(tmp_path):
    b = write(tmp_path / "b")
    text = (b.path / qb.MANIFEST).read_text()
    (b.path / qb.MANIFEST).write_text("\ufeff" + text)  # what Notepad saves
    assert qb.load(b.path).manifest.name == "m"


def test_a_variant_linked_from_outside_the_bundle_is_refused(tmp_path):
    """The sha256 vouches for the file in the bundle; a link can point anywhere later."""
    b = write(tmp_path / "b")
    elsewhere = tmp_path / "elsewhere.onnx"
    (b.path / "model.fp32.onnx").rename(elsewhere)
    (b.path / "model.fp32.onnx").symlink_to(elsewhere)
    with pytest.raises(BundleError, match=r"model\.fp32\.onnx is outside the bundle: it resolves"):
        qb.load(b.path)
    (b.path / "model.fp32.onnx").unlink()
    (b.path / "real.onnx").symlink_to(elsewhere)  # a link inside the bundle to a file in it
    elsewhere.rename(b.path / "inner.onnx")
    (b.path / "model.fp32.onnx").symlink_to("inner.onnx")
    assert qb.load(b.path).manifest.variant("fp32")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda f: f.mkdir(), "model.fp32.onnx is a directory"),
        (lambda f: os.mkfifo(f), "model.fp32.onnx is not a regular file"),
    ],
)
def test_a_variant_that_is_no_file_says_what_it_is(tmp_path, make, message):
    b = write(tmp_path / "b")
    (b.path / "model.fp32.onnx").unlink()
    make(b.path / "model.fp32.onnx")
    with pytest.raises(BundleError, match=message):
        qb.load(b.path)


def test_an_unreadable_variant_is_a_bundle_error(tmp_path, monkeypatch, cli):
    b = write(tmp_path / "b")

    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(qb, "sha256_file", denied)
    r = cli("inspect", b.path)
    assert r.code == 2 and "Traceback" not in r.stderr
    assert "model.fp32.onnx cannot be read (Permission denied)" in " ".join(r.stderr.split())


def _as_nobody(argv: list[str]) -> subprocess.CompletedProcess:
    """``argv`` run as the unprivileged user 65534 (for root, who reads files whatever their
    mode); a skip where that user cannot run this Python (a checkout under /root)."""

    def drop() -> None:
        os.setgid(65534)
        os.setuid(65534)

    try:
        probe = subprocess.run([sys.executable, "-c", "import quantgate"], preexec_fn=drop,
                               capture_output=True, text=True)  # fmt: skip
        failed = probe.stderr[-200:] if probe.returncode else ""
    except OSError as e:  # the interpreter itself, not to be run by that user
        failed = str(e)
    if failed:
        pytest.skip(f"user 65534 cannot run this Python and quantgate: {failed}")
    return subprocess.run(argv, preexec_fn=drop, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", ["model.fp32.onnx", qb.MANIFEST])
def test_unreadable_files_exit_2_naming_the_file(cli, name):
    """As root too: the command then runs as an unprivileged user, in a folder it may enter."""
    top = Path(tempfile.mkdtemp(prefix="quantgate-test-"))
    try:
        top.chmod(0o755)
        b = write(top / "b")
        (b.path / name).chmod(0)
        if os.access(b.path / name, os.R_OK):  # root
            run = _as_nobody([sys.executable, "-m", "quantgate", "inspect", str(b.path)])
            code, stderr = run.returncode, run.stderr
        else:
            r = cli("inspect", b.path)
            code, stderr = r.code, r.stderr
        assert code == 2 and "Traceback" not in stderr, stderr
        assert "Permission denied" in stderr and name in stderr
    finally:
        shutil.rmtree(top)


def test_inspect_of_a_manifest_with_a_wrong_type_exits_2(cli, tmp_path):
    b = write(tmp_path / "b")
    d = json.loads((b.path / qb.MANIFEST).read_text())
    d["variants"][0]["sha256"] = 5
    d["export"] = {"max_seq_len": "64"}
    (b.path / qb.MANIFEST).write_text(json.dumps(d))
    r = cli("inspect", b.path)
    assert r.code == 2 and "Traceback" not in r.stderr
    assert "2 problems:" in r.stderr


def hf(d: dict, tokenizer: str) -> None:
    """Point manifest ``d`` at ``tokenizer``, as a Hugging Face export does."""
    d.setdefault("extra", {}).setdefault("huggingface", {})["tokenizer"] = tokenizer


@pytest.mark.parametrize("fmt", [1, 2])
@pytest.mark.parametrize("where", ["tokenizer", "./tokenizer", "/models/minilm"])
def test_a_tokenizer_older_bundles_name_still_loads(tmp_path, fmt, where):
    """0.1.0 named the model's own directory (absolute), and did not hash a tokenizer folder;
    a re-gate by 0.2.0 rewrote such manifests as format 2, unchanged otherwise. They load,
    as they did."""
    b = write(tmp_path / "b")
    d = json.loads((b.path / qb.MANIFEST).read_text())
    hf(d, where)
    d["format_version"] = fmt
    (b.path / qb.MANIFEST).write_text(json.dumps(d))
    assert qb.load(b.path).manifest.extra["huggingface"]["tokenizer"] == where


def with_tokenizer(out):
    """A bundle whose manifest lists its tokenizer's files, as export writes them."""
    with qb.staging(out) as tmp:
        m = make_manifest(tmp)
        (tmp / "tokenizer").mkdir()
        (tmp / "tokenizer" / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
        (tmp / "tokenizer" / "tokenizer_config.json").write_text("{}")
        files = {f"tokenizer/{p.name}": qb.sha256_file(p) for p in (tmp / "tokenizer").iterdir()}
        qb.write_manifest(tmp, dataclasses.replace(m, files=files))
    return qb.load(out)


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (
            lambda t: (t / "vocab.txt").write_text("[PAD]\n[UNK]\nhullo\n"),
            r"tokenizer/vocab\.txt has sha256 .* the file was changed after export",
        ),
        (lambda t: (t / "vocab.txt").unlink(), r"file tokenizer/vocab\.txt is missing"),
        (
            lambda t: (t / "added_tokens.json").write_text('{"hello": 0}'),
            r"tokenizer/added_tokens\.json is not in the manifest",
        ),
    ],
)
def test_a_tampered_tokenizer_is_refused(tmp_path, tamper, message):
    """`quantgate gate` tokenizes its evaluation text with the bundle's tokenizer: a changed
    vocabulary would change every gate's input without a word."""
    b = with_tokenizer(tmp_path / "b")
    d = json.loads((b.path / qb.MANIFEST).read_text())
    hf(d, "tokenizer/")  # the bundle's own, its files listed: read
    (b.path / qb.MANIFEST).write_text(json.dumps(d))
    assert qb.load(b.path).manifest.extra["huggingface"]["tokenizer"] == "tokenizer/"
    tamper(b.path / "tokenizer")
    with pytest.raises(BundleError, match=message):
        qb.load(b.path)
    assert qb.load(b.path, verify=False).manifest.files  # the manifest itself still reads


def test_inspect_lists_the_files_the_manifest_vouches_for_and_a_missing_report(cli, tmp_path):
    b = with_tokenizer(tmp_path / "b")
    (b.path / qb.REPORT).write_text("# m\n")
    r = cli("inspect", b.path)
    text = " ".join(r.stdout.split())
    assert r.code == 0, r.stderr
    assert "other files (sha256 in the manifest): tokenizer/ (2 files)" in text
    assert "is missing" not in text
    (b.path / qb.REPORT).unlink()
    r = cli("inspect", b.path)
    assert r.code == 0 and f"report: {b.path / qb.REPORT} is missing" in " ".join(r.stdout.split())


def test_a_variants_verdict_is_its_gates():
    """Given new gates (a re-gate, CUDA's results), a variant gets their verdict: no caller
    has to remember to recompute it. Without gates (an older bundle's FP32) it keeps its own."""
    ok = qb.GateResult("cosine:logits", 0.999, 0.99, ">=", True)
    bad = qb.GateResult("speedup_b1_s128", 0.9, 0.95, ">=", False)
    v = qb.Variant("model.int8.onnx", "int8", "0" * 64, gates=(ok,))
    assert v.verdict == qb.PASS
    assert dataclasses.replace(v, gates=(ok, bad)).verdict == qb.FAIL
    assert dataclasses.replace(v, gates=(ok, bad), verdict=qb.PASS).verdict == qb.FAIL
    assert qb.Variant("model.fp32.onnx", "fp32", "0" * 64).verdict == qb.PASS


def test_a_fail_its_gates_do_not_support_is_refused(tmp_path):
    """The other way round: a variant marked 'fail' over gates that all passed is not what
    write_manifest writes, so the manifest was edited or damaged; it is refused, not served."""
    b = write(tmp_path / "b")
    d = json.loads((b.path / qb.MANIFEST).read_text())
    d["variants"][0]["verdict"] = "fail"
    (b.path / qb.MANIFEST).write_text(json.dumps(d))
    with pytest.raises(BundleError, match=r"verdict is 'fail', but every one of its 1 gate"):
        qb.load(b.path)


def _strict(text: str):
    """json.loads that refuses NaN and Infinity, as JSON parsers outside Python do."""

    def refuse(token: str):
        raise ValueError(f"not standard JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_a_gate_value_that_could_not_be_measured_is_written_as_standard_json(tmp_path):
    """A candidate whose every output row is NaN has no mean cosine: the manifest says null
    (NaN would make it JSON that jq, Go or a browser refuse), and it reads back as NaN."""
    nan = qb.GateResult("cosine:logits", float("nan"), 0.99, ">=", False, detail="all NaN")
    with qb.staging(tmp_path / "b") as tmp:
        m = make_manifest(tmp)
        (tmp / "model.int8.onnx").write_bytes(b"int8 model bytes")
        int8 = qb.Variant(
            "model.int8.onnx", "int8", qb.sha256_file(tmp / "model.int8.onnx"), gates=(nan,)
        )
        qb.write_manifest(tmp, dataclasses.replace(m, variants=(*m.variants, int8)))
    d = _strict((tmp_path / "b" / qb.MANIFEST).read_text())
    assert d["variants"][1]["gates"][0]["value"] is None
    gate = qb.load(tmp_path / "b").manifest.variant("int8").gates[0]
    assert math.isnan(gate.value) and not gate.passed


def test_a_null_value_on_a_passed_gate_is_refused(tmp_path):
    b = write(tmp_path / "b")
    d = json.loads((b.path / qb.MANIFEST).read_text())
    d["variants"][0]["gates"][0]["value"] = None
    (b.path / qb.MANIFEST).write_text(json.dumps(d))
    with pytest.raises(BundleError, match=r"passed is true, but its value is null"):
        qb.load(b.path)


def test_inspect_says_which_variant_serve_would_pick_or_that_it_refuses(cli, tmp_path):
    b = write(tmp_path / "ok")
    r = cli("inspect", b.path)
    assert r.code == 0 and "serve picks: fp32 on CPU, fp32 on CUDA" in r.stdout, r.stdout
    failed = write(tmp_path / "failed", verdict="fail")
    r = cli("inspect", failed.path)
    assert "serve: refuses it (a gate failed); with --allow-failed-gates: nothing on CPU" in (
        " ".join(r.stdout.split())
    ), r.stdout


def test_non_finite_numbers_in_the_free_records_are_written_as_null(tmp_path):
    """A search candidate whose outputs were all NaN is recorded under extra: the manifest
    stays standard JSON there too."""
    with qb.staging(tmp_path / "b") as tmp:
        m = make_manifest(tmp)
        extra = {"quantization": {"candidates": [{"accuracy": {"cosine": float("nan")}}]}}
        qb.write_manifest(tmp, dataclasses.replace(m, extra=extra))
    d = _strict((tmp_path / "b" / qb.MANIFEST).read_text())
    assert d["extra"]["quantization"]["candidates"][0]["accuracy"]["cosine"] is None


def test_pad_values_are_the_exports_record_else_an_older_bundles_pad_token_id(tmp_path):
    """Bundles record export.pad_values; one from before has only its Hugging Face pad token
    id, which pads input_ids; without either every input pads with 0."""
    m = make_manifest(tmp_path)
    assert m.pad_values == {}
    older = dataclasses.replace(m, extra={"huggingface": {"pad_token_id": 1}})
    assert older.pad_values == {"input_ids": 1}
    recorded = {"input_ids": 50256, "attention_mask": 0}
    newer = dataclasses.replace(older, export={"pad_values": recorded})
    assert newer.pad_values == recorded


def test_a_variant_with_no_gate_has_no_evidence_and_fails(tmp_path):
    """An INT8 or FP16 variant ships on its gates' evidence: with none it fails, where an
    empty ``all(...)`` would pass it."""
    from quantgate.export.writer import ExtraVariant

    passed = qb.GateResult("cosine", 0.999, 0.99, ">=", True)
    assert not qb.all_passed(()) and qb.verdict_of(()) == qb.FAIL
    assert qb.verdict_of((passed,)) == qb.PASS
    assert ExtraVariant(path=tmp_path / "m.onnx", precision="int8").verdict == qb.FAIL
    # nor in a manifest: its gates deleted, and verdicts set to pass, a failed INT8 was served
    assert qb.Variant("model.int8.onnx", "int8", "0" * 64).verdict == qb.FAIL
    d = make_manifest(tmp_path).to_dict()
    d["variants"].append(
        {"file": "model.int8.onnx", "precision": "int8", "sha256": "0" * 64, "gates": [],
         "verdict": "pass"}
    )  # fmt: skip
    with pytest.raises(BundleError, match=r"variants\[1\].*verdict is 'pass', but it has no gates"):
        qb.Manifest.from_dict(d)


@pytest.mark.parametrize(
    "name", ["👩\u200d💻-coder", "می\u200cخواهم", "soft\u00adhyphen", "модель"]
)
def test_names_written_with_joiners_and_other_scripts_load(tmp_path, name):
    """Emoji sequences and Persian are written with zero-width joiners: format characters
    that reorder nothing, unlike the direction overrides refused with control characters."""
    b = write(tmp_path / "b")
    d = json.loads((b.path / qb.MANIFEST).read_text())
    d["name"] = name
    (b.path / qb.MANIFEST).write_text(json.dumps(d))
    assert qb.load(b.path).manifest.name == name


def test_a_tokenizer_unlisted_since_its_export_is_listed_with_a_warning(tmp_path, caplog):
    """A re-gate lists the files of a tokenizer folder its manifest does not (a bundle of
    0.1.0 listed none). In a manifest of this format the export listed them: unlisted, then
    swapped, a tokenizer was hashed as the bundle's own without a word."""
    b = write(tmp_path / "b")
    (b.path / "tokenizer").mkdir()
    (b.path / "tokenizer" / "tokenizer.json").write_text("{}")
    hf = {"huggingface": {"tokenizer": "tokenizer"}}
    for fmt, warned in ((1, False), (2, True)):
        m = dataclasses.replace(b.manifest, extra=hf, format_version=fmt)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="quantgate.bundle"):
            qb.rewrite(b, m, "report")
        assert list(qb.load(b.path).manifest.files) == ["tokenizer/tokenizer.json"]
        assert (
            "lists none of its files, as an export of this format does" in caplog.text
        ) is warned
        d = json.loads((b.path / qb.MANIFEST).read_text())
        d["files"] = {}  # unlisted again, for the next round
        (b.path / qb.MANIFEST).write_text(json.dumps(d))
        b = qb.load(b.path)
