"""Bundles of another quantgate release: what 0.1.0 wrote (format 1: no model identity, the
plot and the tokenizer not listed) is read, replaced and re-gated right; a newer release's
manifest is named as newer, not as corrupt."""

import dataclasses
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

import quantgate
from quantgate import bundle as qb
from quantgate.errors import BundleError

sys.path.insert(0, str(Path(__file__).parent))
from test_bundle import make_manifest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def make_bundle(out: Path) -> qb.Bundle:
    with qb.staging(out) as tmp:
        m = dataclasses.replace(make_manifest(tmp), tools={"quantgate": quantgate.__version__})
        qb.write_manifest(tmp, m)
        (tmp / qb.REPORT).write_text("report")
    return qb.load(out)


def as_0_1_0(bundle: Path, **source) -> None:
    """Make ``bundle`` what quantgate 0.1.0 left: format 1, a source with no identity, the
    plot and a tokenizer on disk that its manifest does not list."""
    d = json.loads((bundle / qb.MANIFEST).read_text())
    d["source"] = {k: v for k, v in {**d["source"], **source}.items() if k != "identity"}
    d.update(format_version=1, tools={**d["tools"], "quantgate": "0.1.0"})
    d["files"] = {f: sha for f, sha in d.get("files", {}).items() if f != qb.PLOT}
    (bundle / qb.MANIFEST).write_text(json.dumps(d, indent=2))
    (bundle / qb.PLOT).write_bytes(b"png")
    (bundle / "tokenizer").mkdir(exist_ok=True)
    (bundle / "tokenizer" / "vocab.txt").write_text("[PAD]\n")


def refusal(out: Path, model) -> str:
    with pytest.raises(BundleError) as e:
        qb.check_writable_target(out, force=False, inputs=[("model", model)])
    return " ".join(str(e.value).split())


def test_a_0_1_0_bundle_of_another_model_is_not_replaced_without_force(tmp_path, monkeypatch):
    """0.1.0 recorded no model identity, only the spec as given: `quantgate export ckpt
    --out <a MiniLM bundle>` replaced the MiniLM bundle with exit 0. The spec stands in for
    the identity: resolved to this export's model, the bundle is replaced; else it takes
    --force, and the refusal says what the bundle records and what this export is of."""
    models = tmp_path / "models"
    for name in ("minilm", "ckpt"):
        (models / name).mkdir(parents=True)
    out = tmp_path / "bundle"
    make_bundle(out)
    as_0_1_0(out, kind="huggingface", spec=str(models / "minilm"))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    err = refusal(out, models / "ckpt")
    assert err == (
        f"{out} holds a bundle made by an older quantgate (0.1.0) that recorded no model "
        f"identity: its manifest records only the spec that export was given, "
        f"'{models / 'minilm'}' (a huggingface model); this export is of {models / 'ckpt'}. "
        "Choose another --out, or pass --force to replace that bundle (once: the new one "
        "records its model)."
    )
    assert "recorded no model identity" in refusal(out, "pkg.models:build")
    qb.check_writable_target(out, force=True, inputs=[("model", models / "ckpt")])
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    # the same model, however it is named now: replaced without --force
    monkeypatch.chdir(models)
    for same in (models / "minilm", "minilm", "./minilm/", "../models/minilm"):
        qb.check_writable_target(out, force=False, inputs=[("model", same)])


def test_a_0_1_0_bundle_s_relative_spec_resolves_from_here_and_says_so(tmp_path, monkeypatch):
    """0.1.0 recorded the spec as typed: `ckpt`, from the directory that export ran in."""
    (tmp_path / "work" / "ckpt").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    out = tmp_path / "bundle"
    make_bundle(out)
    as_0_1_0(out, spec="ckpt", sha256="0" * 64)
    monkeypatch.chdir(tmp_path / "work")
    qb.check_writable_target(out, force=False, inputs=[("model", "ckpt")])
    monkeypatch.chdir(tmp_path / "elsewhere")
    err = refusal(out, tmp_path / "work" / "ckpt")
    assert (
        "records only the spec that export was given, 'ckpt' (a checkpoint model, a path "
        f"relative to the directory it ran in); this export is of {tmp_path / 'work' / 'ckpt'}"
    ) in err
    # a module factory is no path: said without the relative part, and the same one passes
    as_0_1_0(out, kind="factory", spec="pkg.models:build")
    qb.check_writable_target(out, force=False, inputs=[("model", "pkg.models:build")])
    assert "'pkg.models:build' (a factory model); this export" in refusal(out, "ckpt")
    # nothing that names a model at all: refused too
    as_0_1_0(out, spec=None)
    d = json.loads((out / qb.MANIFEST).read_text())
    (out / qb.MANIFEST).write_text(json.dumps({**d, "source": {"kind": "checkpoint"}}))
    assert "its manifest names no model (a checkpoint model, no spec)" in refusal(out, "ckpt")


def test_the_recorded_identity_still_decides_where_there_is_one(tmp_path):
    models = tmp_path / "models"
    (models / "a").mkdir(parents=True)
    out = tmp_path / "bundle"
    make_bundle(out)
    d = json.loads((out / qb.MANIFEST).read_text())
    # an identity the spec does not resolve to (the spec as typed elsewhere): the identity wins
    d["source"] = {"kind": "checkpoint", "spec": "b", "identity": str(models / "a")}
    (out / qb.MANIFEST).write_text(json.dumps(d))
    qb.check_writable_target(out, force=False, inputs=[("model", models / "a")])
    assert refusal(out, models / "b") == (
        f"{out} holds the bundle of another model ({models / 'a'}); this export is of "
        f"{models / 'b'}. Choose another --out, or pass --force to replace that bundle."
    )


def test_the_files_quantgate_writes_are_the_bundle_s_where_an_older_manifest_omits_them(
    tmp_path,
):
    """0.1.0 did not list candidates.png (nor a tokenizer) in `files`: re-exporting into its
    bundle was refused, "holds files that are not the bundle's (candidates.png)"."""
    out = tmp_path / "bundle"
    make_bundle(out)
    as_0_1_0(out, spec="ckpt")
    assert qb.foreign_files(out) == []
    make_bundle(out)  # replaced without --force
    assert not (out / qb.PLOT).exists() and not (out / "tokenizer").exists()

    as_0_1_0(out, spec="ckpt")
    (out / "NOTES.md").write_text("a person's")
    with pytest.raises(BundleError, match=r"holds files that are not the bundle's \(NOTES.md\)"):
        make_bundle(out)
    (out / "NOTES.md").unlink()
    # where the manifest lists the tokenizer's files, a file it does not list there is not its
    d = json.loads((out / qb.MANIFEST).read_text())
    d["files"] = {"tokenizer/vocab.txt": qb.sha256_file(out / "tokenizer" / "vocab.txt")}
    (out / qb.MANIFEST).write_text(json.dumps(d))
    (out / "tokenizer" / "mine.txt").write_text("a person's")
    assert qb.foreign_files(out) == ["tokenizer/mine.txt"]
    # a format 2 bundle lists its tokenizer: a tokenizer/ it does not list is someone's
    fresh = tmp_path / "fresh"
    make_bundle(fresh)
    (fresh / "tokenizer").mkdir()
    (fresh / "tokenizer" / "vocab.txt").write_text("a person's")
    assert qb.foreign_files(fresh) == ["tokenizer/"]


def test_new_bundles_are_format_2_and_format_1_ones_still_load(tmp_path):
    """Format 2 means what format 1's readers misread (null gate values, export.pad_values,
    newer gates); they refuse it as newer. A format 1 bundle loads as before, and what
    quantgate writes over it (a re-gate's rewrite) is format 2."""
    assert qb.FORMAT_VERSION == 2
    out = tmp_path / "bundle"
    b = make_bundle(out)
    assert json.loads((out / qb.MANIFEST).read_text())["format_version"] == 2
    assert b.manifest.format_version == 2
    as_0_1_0(out, spec="ckpt")
    d = json.loads((out / qb.MANIFEST).read_text())  # a text model's: its tokenizer unhashed
    d["extra"] = {**d.get("extra", {}), "huggingface": {"tokenizer": "tokenizer"}}
    (out / qb.MANIFEST).write_text(json.dumps(d))
    old = qb.load(out, verify=False)
    assert old.manifest.format_version == 1 and old.manifest.tools["quantgate"] == "0.1.0"
    assert old.manifest.variant("fp32").passed
    qb.rewrite(old, old.manifest, "report")
    again = qb.load(out)  # verified, as a server loads it
    assert json.loads((out / qb.MANIFEST).read_text())["format_version"] == 2
    assert again.manifest.format_version == 2 and (out / qb.PLOT).read_bytes() == b"png"
    # its tokenizer now listed, as format 2 lists it: a change to it is told
    assert "tokenizer/vocab.txt" in again.manifest.files
    (out / "tokenizer" / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    with pytest.raises(BundleError, match=r"tokenizer/vocab\.txt has sha256"):
        qb.load(out)


def test_a_newer_release_s_manifest_is_named_newer_not_corrupt(tmp_path):
    """A newer format's manifest may have fields and values this release does not know:
    said before any check that would call it corrupt."""
    out = tmp_path / "bundle"
    make_bundle(out)
    d = json.loads((out / qb.MANIFEST).read_text())
    d.update(format_version=3, tools={"quantgate": "0.3.0"}, streaming={"chunk": 64})
    d["variants"][0]["gates"][0]["value"] = "a new kind of value"
    (out / qb.MANIFEST).write_text(json.dumps(d))
    with pytest.raises(BundleError) as e:
        qb.load(out)
    assert str(e.value) == (
        "manifest format 3 is newer than this quantgate understands (2); upgrade quantgate "
        "(the bundle was written by quantgate 0.3.0)"
    )


def test_the_release_is_0_2_0_wherever_it_is_stated():
    """A manifest's tools.quantgate tells the release that wrote it: 0.1.0 wrote format 1."""
    stated = re.search(r'(?m)^version = "(.*)"$', (ROOT / "pyproject.toml").read_text())
    assert stated and quantgate.__version__ == stated[1] == "0.2.0"


def test_export_over_a_0_1_0_bundle(cli, tmp_path, tiny_checkpoint):
    """Through the CLI: another model's export over a 0.1.0 bundle exits 2 and keeps it; its
    own model's re-export replaces it (its unlisted plot and tokenizer too) as format 2."""
    out = tmp_path / "b"
    assert cli("export", "--no-quantize", tiny_checkpoint, "--out", out).code == 0
    as_0_1_0(out, spec=str(tiny_checkpoint))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    twin = tmp_path / "elsewhere" / tiny_checkpoint.name
    shutil.copytree(tiny_checkpoint, twin)
    r = cli("export", "--no-quantize", twin, "--out", out)
    assert r.code == 2, r.stderr
    err = " ".join(r.stderr.split())
    assert re.search(
        rf"{re.escape(str(out))} holds a bundle made by an older quantgate \(0\.1\.0\) that "
        r"recorded no model identity: .* this export is of "
        rf"{re.escape(str(twin))}\. Choose another --out, or pass --force",
        err,
    ), err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    r = cli("export", "--no-quantize", tiny_checkpoint, "--out", out)
    assert r.code == 0, r.stderr
    d = json.loads((out / qb.MANIFEST).read_text())
    assert d["format_version"] == 2 and d["tools"]["quantgate"] == "0.2.0"
    assert d["source"]["identity"] == str(tiny_checkpoint.resolve())


@pytest.mark.parametrize(
    "odd",
    [
        "link inside",
        "link outside",
        "backslash name",
        "linked folder",
        "linked parent",
        "the bundle itself",
    ],
)
def test_a_rewrite_lists_an_older_tokenizer_only_where_the_bundle_then_still_loads(tmp_path, odd):
    """A folder whose files are listed may hold nothing else: a link in it, a name a
    manifest cannot hold, would leave a re-gated bundle that no server loads. Such a
    folder stays unlisted, as it was; the bundle its rewrite writes loads, verified."""
    out = tmp_path / "bundle"
    make_bundle(out)
    as_0_1_0(out, spec="ckpt")
    tok = out / "tokenizer"
    tokenizer = "tokenizer"
    if odd == "link inside":
        (tok / "vocab.json").symlink_to("vocab.txt")
    elif odd == "link outside":
        (tmp_path / "elsewhere.txt").write_text("x")
        (tok / "extra.txt").symlink_to(tmp_path / "elsewhere.txt")
    elif odd == "backslash name":
        (tok / "sub\\vocab.txt").write_text("[PAD]\n")  # a Windows zip's name
    elif odd == "linked folder":
        shutil.move(tok, tmp_path / "tok")
        tok.symlink_to(tmp_path / "tok")
    elif odd == "linked parent":  # models -> a folder outside, the tokenizer in it
        (tmp_path / "elsewhere").mkdir()
        shutil.move(tok, tmp_path / "elsewhere" / "tok")
        (out / "models").symlink_to(tmp_path / "elsewhere")
        tokenizer = "models/tok"
    else:
        tokenizer = "."
    d = json.loads((out / qb.MANIFEST).read_text())
    d["extra"] = {**d.get("extra", {}), "huggingface": {"tokenizer": tokenizer}}
    (out / qb.MANIFEST).write_text(json.dumps(d))
    old = qb.load(out)
    qb.rewrite(old, old.manifest, "report")
    again = qb.load(out)  # verified, as a server loads it
    assert again.manifest.files == old.manifest.files  # left unlisted, as it was
