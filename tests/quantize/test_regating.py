"""Re-gating's guards against a gate loosened without a word: the interval's confidence, the
timed sequence length, the label protection and the export's own thresholds."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from qg_pipeline_helpers import rng_feeds, tiny_checkpoint, verdict_code  # noqa: E402

from quantgate.bundle import GateResult, Manifest, Variant, load  # noqa: E402
from quantgate.quantize.data import write_npz  # noqa: E402
from quantgate.quantize.decide import GateConfig  # noqa: E402
from quantgate.quantize.regating import _changed_settings, _labelled_accuracy  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """Where the module's first ``bundle`` exports; the others copy it."""
    return tmp_path_factory.mktemp("regating") / "b"


@pytest.fixture
def bundle(cli, tmp_path, gate_file, exported) -> Path:
    """The tiny digits model exported and gated on its labelled test split (seconds, once a
    module): each test re-gates a copy of its own."""
    if not exported.exists():
        r = cli("export", tiny_checkpoint(), "--out", exported, "--min-speedup", "0.01",
                "--samples", "32", "--search-budget", "1", "--gate-config", gate_file)  # fmt: skip
        assert r.code == 0, r.stderr
    out = tmp_path / "b"
    shutil.copytree(exported, out, symlinks=True)
    return out


def newest(out: Path) -> str:
    """The newest re-gate's paragraph in report.md."""
    return load(out).report.read_text().split("## Re-gated", 2)[1].split("\n\n")[1]


def test_a_lower_confidence_is_looser_only_where_the_bound_decides():
    """Under "upper" the bound at 50% sits next to the estimate: a bundle that failed three
    gates at 0.95 passed at 0.5. Under "point" the confidence decides no verdict."""
    upper = GateConfig(ci_rule="upper")
    assert _changed_settings(upper, GateConfig(ci_rule="upper", confidence=0.5)) == [
        ("confidence 0.95 -> 0.5", True)
    ]
    assert _changed_settings(upper, GateConfig(ci_rule="upper", confidence=0.99)) == [
        ("confidence 0.95 -> 0.99", False)
    ]
    assert _changed_settings(GateConfig(), GateConfig(confidence=0.5)) == [
        ("confidence 0.95 -> 0.5 (decides no verdict under ci_rule 'point')", False)
    ]
    # to the point estimate: looser by the rule; the confidence then decides nothing
    assert _changed_settings(upper, GateConfig(confidence=0.5)) == [
        ("ci_rule upper -> point", True),
        ("confidence 0.95 -> 0.5 (decides no verdict under ci_rule 'point')", False),
    ]
    # from the estimate to a bound, at any confidence: stricter
    assert _changed_settings(GateConfig(), GateConfig(ci_rule="upper", confidence=0.5)) == [
        ("ci_rule point -> upper", False),
        ("confidence 0.95 -> 0.5", False),
    ]


def test_a_different_timed_sequence_length_is_a_different_shape():
    """As with a dropped batch size, the shapes timed before are no longer timed, whichever
    way the length moves; a length the model caps to the same shape changes nothing."""
    assert _changed_settings(GateConfig(), GateConfig(seq_len=32)) == [
        ("seq_len 128 -> 32 (a different shape)", True)
    ]

    def capped(cfg):  # a model of at most 64 tokens
        return min(cfg.seq_len, 64)

    assert _changed_settings(GateConfig(), GateConfig(seq_len=96), timed_seq=capped) == [
        ("seq_len 128 -> 96 (timed at 64 either way)", False)
    ]
    assert _changed_settings(GateConfig(seq_len=32), GateConfig(seq_len=48), timed_seq=capped) == [
        ("seq_len 32 -> 48 (a different shape)", True)
    ]


def _manifest(task="sequence-classification", gates=(), quantization=None, regates=(), ev=None):
    int8 = Variant("model.int8.onnx", "int8", "0" * 64, gates=tuple(gates))
    extra = {"quantization": quantization or {}, "regates": list(regates)}
    calibration = {"samples": 32, "evaluation": ev} if ev is not None else None
    return Manifest("m", task, (), (), (int8,), 17, {}, extra=extra, calibration=calibration)


def test_the_label_protection_reads_every_gating_the_bundle_records():
    """A re-gate with --allow-unlabelled leaves INT8 without its accuracy gate: the export's
    record (or an earlier labelled re-gate) still says the bundle was gated on labels."""
    drop = GateResult("accuracy_drop", 0.3, 0.5, "<=", True)
    agreement = GateResult("top1_agreement", 0.99, 0.95, ">=", True)
    build = {
        "shipped": "static",
        "gate_config": {"max_accuracy_drop": 0.7},
        "candidates": [{"name": "static", "accuracy": {"accuracy_drop": 0.3}}],
    }
    assert _labelled_accuracy(_manifest(gates=[drop])) == ("accuracy_drop", 0.5)
    assert _labelled_accuracy(_manifest(gates=[agreement], quantization=build)) == (
        "accuracy_drop",
        0.7,
    )
    unlabelled = {"provider": "CPUExecutionProvider", "evaluation": {"labels": False}}
    labelled = {"provider": "CPUExecutionProvider", "evaluation": {"labels": True},
                "gate_config": {"max_accuracy_drop": 2.0}}  # fmt: skip
    on_cuda = {**labelled, "provider": "CUDAExecutionProvider"}  # CUDA gates no accuracy
    # built without labels, re-gated with them once: that re-gate's threshold
    assert _labelled_accuracy(_manifest(gates=[agreement], regates=[labelled, unlabelled])) == (
        "accuracy_drop",
        2.0,
    )
    assert _labelled_accuracy(_manifest(gates=[agreement], regates=[on_cuda, unlabelled])) is None
    # an older build record without candidates: its labelled evaluation rows, by the task
    tagger = _manifest("token-classification", [agreement], ev={"labels": True})
    assert _labelled_accuracy(tagger) == ("token_accuracy_drop", 1.0)
    assert _labelled_accuracy(_manifest("feature-extraction", ev={"labels": True})) is None
    assert _labelled_accuracy(_manifest(gates=[agreement], ev={"labels": False})) is None


def test_allow_unlabelled_is_asked_for_on_every_run(cli, bundle, tmp_path, gate_file, caplog):
    """After one re-gate with --allow-unlabelled the same command without it is refused again:
    the bundle was built on labelled accuracy, whatever its last gating measured."""
    unlabelled = write_npz(tmp_path / "nolabels.npz", rng_feeds(50, seed=3))
    args = ("--eval", unlabelled, "--gate-config", gate_file)
    r = cli("gate", bundle, *args, "--allow-unlabelled")
    assert r.code == verdict_code(bundle), r.stderr
    gates = {g.name for g in load(bundle).manifest.variant("int8").gates}
    assert "accuracy_drop" not in gates and "top1_agreement" in gates
    # the waiver is written down, not only warned about
    assert (
        "Run with --allow-unlabelled: the evaluation rows have no labels, so INT8 was gated on "
        "agreement with FP32 (top1_agreement, kl) in place of its labelled accuracy gate "
        "(accuracy_drop <= 1 points)." in " ".join(newest(bundle).split())
    )
    before = (bundle / "manifest.json").read_bytes()
    r = cli("gate", bundle, *args)
    assert r.code == 2, r.stderr
    said = " ".join(r.stderr.split())
    assert "has no labels, but this bundle's INT8 was gated on labelled accuracy" in said, said
    assert "(accuracy_drop <= 1 points)" in said
    assert (bundle / "manifest.json").read_bytes() == before
    # labelled rows bring the accuracy gate back
    labelled = write_npz(tmp_path / "labels.npz", rng_feeds(50), labels=np.arange(50) % 10)
    r = cli("gate", bundle, "--eval", labelled, "--gate-config", gate_file)
    assert r.code == verdict_code(bundle), r.stderr
    assert "accuracy_drop" in {g.name for g in load(bundle).manifest.variant("int8").gates}


def test_a_bundle_regated_from_inside_it_is_read_back(cli, bundle, gate_file, monkeypatch):
    """`cd BUNDLE && quantgate gate .`: the rewrite puts a new directory at the bundle's path,
    and "." still named the old one, removed: the bundle was rewritten, then the command
    said ". is not a bundle" and exited 2 (2 as well where a gate had failed)."""
    monkeypatch.chdir(bundle)
    r = cli("gate", ".", "--gate-config", gate_file)
    assert r.code == 0, r.stderr
    assert "verdict pass" in r.stdout and "not a bundle" not in r.stderr
    r = cli("gate", ".", "--gate-config", gate_file)  # "." is the directory removed
    assert r.code == 2 and "no longer exists (a re-gate or export replaced" in r.stderr
    # inspect and serve said "not a bundle ... Create one with `quantgate export`" (serve in
    # a process of its own, which inherits the removed directory: it loads the protocol's stubs)
    r = cli("inspect", ".")
    served = subprocess.run([sys.executable, "-m", "quantgate", "serve", ".", "--check"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    for code, said in ((r.code, r.stderr), (served.returncode, served.stderr)):
        said = " ".join(said.split())
        assert code == 2 and ". is relative to the current directory, which no longer" in said
        assert 'cd into it again (cd "$PWD")' in said and "not a bundle" not in said
    monkeypatch.chdir(bundle)  # cd "$PWD"
    r = cli("gate", ".", "--gate-config", gate_file, "--min-speedup", "1000")
    assert r.code == 3, r.stderr
    # its gates, read from where it was written ("." is the directory the rewrite replaced)
    assert "verdict fail" in r.stdout and "speedup_b" in r.stdout, r.stdout
    record = load(bundle).manifest.extra["regates"][-1]  # what measured it
    assert set(record["tools"]) == {"quantgate", "onnxruntime"}, record
    shown = cli("inspect", bundle).stdout
    assert f"last re-gated {record['at']} with quantgate " in " ".join(shown.split()), shown


def test_a_read_only_bundle_is_refused_with_advice_for_a_re_gate(cli, bundle, gate_file):
    """A re-gate has no --out: the advice for a bundle it may not rewrite is to gate a copy
    (it said "Choose another --out", an export's words)."""
    bundle.chmod(0o555)
    try:
        r = cli("gate", bundle, "--gate-config", gate_file)
    finally:
        bundle.chmod(0o755)
    assert r.code == 2, r.stderr
    said = " ".join(r.stderr.split())
    assert f"{bundle} is read-only (mode 555)" in said, said
    assert f"or re-gate a copy of it in a place you can write (cp -r {bundle} COPY, then " in said
    assert "--out" not in said, said


def test_settings_looser_than_the_exports_are_said_on_every_run(cli, bundle, gate_file, caplog):
    """A loosened threshold is kept by the next plain re-gate (it keeps the last gating's):
    that one, and every later one, still warns and says so in report.md."""
    r = cli("gate", bundle, "--max-accuracy-drop", "5", "--gate-config", gate_file)
    assert r.code == 0, r.stderr
    assert "looser settings than the bundle was last gated with: max_accuracy_drop 1.0 -> 5.0" in (
        caplog.text
    )
    assert "looser than the export's" not in caplog.text  # the same fact, said once
    assert "max_accuracy_drop 1.0 -> 5.0 (looser)." in newest(bundle)
    for _ in range(2):
        caplog.clear()
        r = cli("gate", bundle, "--gate-config", gate_file)
        assert r.code == 0, r.stderr
        said = "re-gating with settings looser than the export's: max_accuracy_drop 1.0 -> 5.0"
        assert said in caplog.text
        assert newest(bundle).endswith(
            "Thresholds and rules: those of the last gating. Looser than the export's: "
            "max_accuracy_drop 1.0 -> 5.0."
        ), newest(bundle)
    # how the machine measures is the re-gate's own: neither looser nor kept, but said, for
    # a verdict on fewer timed pairs is thinner than the last gating's
    fewer = gate_file.parent / "fewer.toml"
    fewer.write_text(gate_file.read_text().replace("iterations = 3", "iterations = 4"))
    assert cli("gate", bundle, "--gate-config", fewer).code == 0
    assert newest(bundle).endswith(
        "Thresholds and rules: those of the last gating. Measured otherwise than the last "
        "gating: iterations 3 -> 4. Looser than the export's: max_accuracy_drop 1.0 -> 5.0."
    ), newest(bundle)
    assert cli("gate", bundle, "--gate-config", gate_file).code == 0
    assert "Measured otherwise than the last gating: iterations 4 -> 3." in newest(bundle)
    # back to the export's threshold: tighter than the last gating, and nothing looser
    caplog.clear()
    r = cli("gate", bundle, "--max-accuracy-drop", "1", "--gate-config", gate_file)
    assert "looser" not in caplog.text and "Looser" not in newest(bundle)
    assert "max_accuracy_drop 5.0 -> 1.0." in newest(bundle)

    # A shorter timed sequence: a different shape, looser as a dropped batch size is; a
    # longer one than the model's 64 tokens times the same shape.
    caplog.clear()
    shorter = gate_file.parent / "short.toml"
    shorter.write_text(gate_file.read_text() + "seq_len = 32\n")
    cli("gate", bundle, "--gate-config", shorter)
    assert "seq_len 128 -> 32 (a different shape) (looser)" in newest(bundle)
    assert "looser than the export's: seq_len 128 -> 32 (a different shape)" not in caplog.text
    assert "the bundle was last gated with: seq_len 128 -> 32 (a different shape)" in caplog.text
    longer = gate_file.parent / "long.toml"
    longer.write_text(gate_file.read_text() + "seq_len = 256\n")
    cli("gate", bundle, "--gate-config", longer)
    assert "seq_len 32 -> 256 (a different shape) (looser)" in newest(bundle)  # 32 -> 64
    assert "Looser than the export's" not in newest(bundle)  # 128 and 256 both time 64

    # Under "upper", a lower confidence is looser, and kept by the next plain re-gate.
    caplog.clear()
    upper = gate_file.parent / "upper.toml"
    upper.write_text(gate_file.read_text() + 'ci_rule = "upper"\n')
    cli("gate", bundle, "--gate-config", upper)
    assert "looser" not in caplog.text  # a bound in place of the estimate: stricter
    half = gate_file.parent / "half.toml"
    half.write_text(gate_file.read_text() + "confidence = 0.5\n")
    cli("gate", bundle, "--gate-config", half)
    assert "confidence 0.95 -> 0.5 (looser)" in newest(bundle)
    assert "last gated with: confidence 0.95 -> 0.5" in caplog.text


def test_a_regate_says_which_gates_were_redefined_since_the_last_gating(
    cli, bundle, gate_file, caplog
):
    """The same gate, threshold and data can decide otherwise once quantgate redefines a
    gate (a near tie counting as nearest-neighbour agreement turned a failed MiniLM re-gate
    green): a re-gate of a bundle gated under older definitions says which changed, in the
    log and in report.md, once; the gating it records carries this quantgate's version."""
    import json

    from quantgate.quantize.decide import DEFINITION_CHANGES, GATE_DEFINITIONS

    path = bundle / "manifest.json"
    build = json.loads(path.read_text())["extra"]["quantization"]
    assert build["gate_definitions"] == GATE_DEFINITIONS  # what an export records
    r = cli("gate", bundle, "--gate-config", gate_file)
    assert r.code == 0, r.stderr
    assert "redefined" not in caplog.text and "redefined" not in newest(bundle)

    def last_gated_under(version: int | None) -> None:
        d = json.loads(path.read_text())
        last = d["extra"]["regates"][-1]
        if version is None:  # a gating from before versions were recorded
            del last["gate_definitions"]
        else:
            last["gate_definitions"] = version
        path.write_text(json.dumps(d))

    near_tie = DEFINITION_CHANGES[2][0].what
    # -1: a damaged record, read as none (it was a KeyError, a traceback)
    unrecorded = "a version it did not record"
    for version, under in ((None, unrecorded), (1, "version 1"), (-1, unrecorded)):
        last_gated_under(version)
        caplog.clear()
        r = cli("gate", bundle, "--gate-config", gate_file)
        assert r.code == 0, r.stderr
        said = f"the gates were redefined since this bundle was last gated (under the gates' definitions {under}; this quantgate's are version {GATE_DEFINITIONS})"
        assert said in " ".join(caplog.text.split()), caplog.text
        assert near_tie in caplog.text
        assert (
            f"The gates were redefined since the last gating (under the gates' definitions {under}"
            in newest(bundle)
        )
        assert near_tie in newest(bundle)
        recorded = json.loads(path.read_text())["extra"]["regates"][-1]
        assert recorded["gate_definitions"] == GATE_DEFINITIONS
    caplog.clear()  # said once: the re-gate after is under this version
    r = cli("gate", bundle, "--gate-config", gate_file)
    assert "redefined" not in caplog.text and "redefined" not in newest(bundle)
    last_gated_under(5)  # versions 6 and 7 changed question answerers' and multi-label gates
    caplog.clear()
    r = cli("gate", bundle, "--gate-config", gate_file)
    assert r.code == 0, r.stderr
    said = " ".join(caplog.text.split())
    assert "under the gates' definitions version 5" in said  # version 8's, every task's
    assert "negligible against the median row norm" in said
    assert "question" not in said and "multi-label" not in said, said  # not a classifier's
    last_gated_under(GATE_DEFINITIONS + 1)  # a newer quantgate's gating
    r = cli("gate", bundle, "--gate-config", gate_file)
    assert r.code == 0, r.stderr
    assert (
        f"last gated by a newer quantgate (gate definitions {GATE_DEFINITIONS + 1}" in caplog.text
    )


def test_a_bundle_that_is_a_mount_point_is_regated_in_place(cli, bundle, gate_file, tmp_path):
    """`docker -v ./bundle:/bundle`: a mount point cannot be replaced by a rename, and the
    re-gate failed after all its measuring (a bind mount of the same filesystem is no mount
    point to os.path.ismount). Its manifest and report.md are replaced in place, each whole,
    the files keeping their modes; nothing is left beside them."""
    import os
    import stat
    import subprocess

    from quantgate.fsutil import is_mount_point

    target = tmp_path / "mounted"
    target.mkdir()
    bound = subprocess.run(["mount", "--bind", str(bundle), str(target)], capture_output=True)
    if bound.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {bound.stderr.decode().strip()}")
    try:
        assert not os.path.ismount(target) and is_mount_point(target)  # the same filesystem
        os.chmod(target / "report.md", 0o640)
        before = sorted(p.name for p in target.iterdir())
        (target / ".report.md.k1ll3d").write_text("half")  # an earlier rewrite, killed
        inode = os.stat(target / "model.int8.onnx").st_ino
        r = cli("gate", target, "--gate-config", gate_file)
        assert r.code == 0, r.stderr
        assert sorted(p.name for p in target.iterdir()) == before
        assert os.stat(target / "model.int8.onnx").st_ino == inode  # untouched, not copied
        assert stat.S_IMODE(os.stat(target / "report.md").st_mode) == 0o640
        assert "were re-run with onnxruntime" in newest(target)  # the new report
        assert load(target).manifest.verdict == "pass"
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_a_regate_refuses_weights_in_a_file_the_manifest_does_not_list(cli, bundle):
    """External weights no sha256 vouches for would be gated as if they were the export's."""
    import dataclasses

    import onnx

    from quantgate.bundle import sha256_file, write_manifest

    m = load(bundle).manifest
    fp32 = m.variant("fp32")
    onnx.save_model(onnx.load(bundle / fp32.file), bundle / fp32.file, save_as_external_data=True,
                    location="w.bin", size_threshold=0)  # fmt: skip
    variants = tuple(
        dataclasses.replace(v, sha256=sha256_file(bundle / v.file)) if v is fp32 else v
        for v in m.variants
    )
    write_manifest(bundle, dataclasses.replace(m, variants=variants))
    before = (bundle / "manifest.json").read_text()
    r = cli("gate", bundle)
    assert r.code == 2, r.stderr
    assert "variant fp32's model.fp32.onnx keeps weights in w.bin, which the manifest does not " \
           "list" in r.stderr  # fmt: skip
    assert (bundle / "manifest.json").read_text() == before  # nothing rewritten


def test_a_definitions_change_is_said_of_the_tasks_it_changed():
    from quantgate.quantize.decide import definition_changes

    qa = definition_changes(5, "question-answering")
    assert len(qa) == 5 and qa[0].startswith("a question-answering model")
    assert "overlapping windows" in qa[1]  # version 7's
    anyone = definition_changes(7, "sequence-classification")  # version 8's for every task
    assert len(anyone) == 3 and qa[2:] == anyone
    assert definition_changes(5, "sequence-classification") == anyone
    assert len(definition_changes(5)) == 3 + 5  # any task
    assert definition_changes(4, "sequence-classification") == definition_changes(4)[:2] + anyone
    tagger = definition_changes(7, "token-classification")
    assert len(tagger) == 5 and tagger[0].startswith("a token classifier's single logit")


def test_reading_answers_otherwise_is_looser_and_a_setting_added_since_is_its_default():
    """A re-gate that reads a question answerer's answers by another rule (shorter answers,
    or none allowed) judges other answers: looser, as a dropped threshold (a span gate that
    failed passed at max_answer_tokens 1). A build recorded before these settings existed
    holds their defaults: a re-gate recording them set no thresholds."""
    import dataclasses
    from types import SimpleNamespace

    from quantgate.quantize.verdict import _thresholds_origin

    assert _changed_settings(GateConfig(), GateConfig(max_answer_tokens=1)) == [
        ("max_answer_tokens 30 -> 1 (answers read by another rule)", True)
    ]
    assert _changed_settings(GateConfig(), GateConfig(null_answer=True)) == [
        ("null_answer False -> True (answers read by another rule)", True)
    ]
    now = dataclasses.asdict(GateConfig(min_top1_agreement=0.999))
    old = {k: v for k, v in now.items() if k not in ("null_answer", "max_answer_tokens")}
    regates = [{"at": "t1", "gate_config": now}, {"at": "t2", "gate_config": now}]
    bundle = SimpleNamespace(extra={"quantization": {"gate_config": old}, "regates": regates})
    assert _thresholds_origin(bundle) == []  # the export's, as the build recorded them
