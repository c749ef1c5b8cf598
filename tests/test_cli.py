"""The entry point: usage errors (click's message, exit 2, never a traceback), help, and
exit codes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "bundle", "--no-such-option"], "No such option: --no-such-option"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["export"], "Missing argument"),
        (["serve", "bundle", "--port", "many"], "Invalid value for '--port'"),
        (["serve", "bundle", "--port", "70000"], "less than or equal to 65535"),
        (["serve", "bundle", "--metrics-port", "-1"], "Invalid value for '--metrics-port'"),
        (["serve", "bundle", "-v"], "No such option: -v (it goes before the command"),
        # typer's pydantic check led with "Value error, "
        (
            ["serve", "bundle", "--precision", "int4"],
            "Invalid value for '--precision': 'int4' is not one of 'fp32', 'int8', 'fp16'.",
        ),
    ],
)
def test_usage_errors_exit_2_with_the_reason(cli, args, message):
    r = cli(*args)
    assert r.code == 2
    assert message in " ".join(r.stderr.split()) and "Traceback" not in r.stderr + r.stdout
    assert "Value error" not in r.stderr


def test_help_shows_the_gate_defaults(cli):
    """The help writes the defaults out (the flags' own default is None: the config file's
    value, else GateConfig's or QuantConfig's); they must be theirs. Written, not read from
    the configs: the CLI imports no quantgate.quantize module until a command needs one (the
    server runs in the CLI's process)."""
    from quantgate.quantize.decide import GateConfig
    from quantgate.quantize.search import QuantConfig

    d = GateConfig()
    r = cli("export", "--help")
    assert r.code == 0
    text = " ".join(r.stdout.split())  # unwrapped
    for flag, default in (
        ("--max-accuracy-drop", d.max_accuracy_drop),
        ("--min-speedup", d.min_speedup),
        ("--min-cosine", d.min_cosine),
        ("--min-top1", d.min_top1_agreement),
        ("--max-answer-tokens", d.max_answer_tokens),
    ):
        help_of_flag = rf"{flag} [A-Z]+ (?:(?!--).)*?"  # up to the next option
        assert re.search(rf"{help_of_flag}\[default: {default:g}\]", text), (flag, text)
    assert not d.null_answer and re.search(r"--no-null-answer (?:(?!--).)*?\[default: no\]", text)
    q = QuantConfig()
    for flag, default in (
        ("--search-budget", q.search_budget_s),
        ("--max-candidates", q.max_candidates),
    ):
        help_of_flag = rf"{flag} [A-Z]+ (?:(?!--).)*?"
        assert re.search(rf"{help_of_flag}\(default {default:g}\)", text), (flag, text)
    r = cli("gate", "--help")  # a re-gate keeps the bundle's thresholds
    text = " ".join(r.stdout.split())
    assert text.count("[default: the one the bundle was last gated with]") == 5, text


def test_ctrl_c_exits_130(cli, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("quantgate.bundle.load", interrupted)
    r = cli("inspect", "bundle")
    assert r.code == 130 and "interrupted (SIGINT)" in r.stderr + r.stdout


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_exits_128_plus_it_through_the_cleanup_path(cli, monkeypatch, name):
    """KeyboardInterrupt or SystemExit run every `with` block's cleanup, where the default
    handlers of SIGTERM and SIGHUP (a closed terminal) do not; whatever the signal made
    fail (here an import), the command says it was interrupted."""
    sig = getattr(signal, name)
    before = signal.getsignal(sig)

    def delivered(*args, **kwargs):
        try:
            signal.getsignal(sig)(sig, None)  # what a delivered signal runs
        finally:  # an import the signal cut short fails as onnxruntime's does
            raise ImportError("initialization failed")

    monkeypatch.setattr("quantgate.bundle.load", delivered)
    r = cli("inspect", "bundle")
    assert r.code == 128 + sig and f"interrupted ({name})" in r.stderr + r.stdout, r
    assert signal.getsignal(sig) is before  # restored for whoever called main()


def test_a_signal_inherited_as_ignored_stays_ignored(cli, monkeypatch):
    """nohup, or a background job: the operator asked for the command to outlive it."""
    from quantgate.errors import BundleError

    seen = {}

    def look(*args, **kwargs):
        seen.update({s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)})
        raise BundleError("no bundle")

    monkeypatch.setattr("quantgate.bundle.load", look)
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        cli("inspect", "bundle")
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert seen[signal.SIGHUP] is signal.SIG_IGN and seen[signal.SIGTERM] is not signal.SIG_IGN


def test_an_interrupt_after_the_bundle_was_replaced_says_so(cli, monkeypatch, tmp_path):
    from quantgate import fsutil

    def late(*args, **kwargs):  # after the swap, the new bundle in place
        with fsutil.atomic_dir(tmp_path / "b"):
            pass
        raise KeyboardInterrupt

    monkeypatch.setattr("quantgate.bundle.load", late)
    r = cli("inspect", "bundle")
    assert r.code == 130
    text = " ".join((r.stderr + r.stdout).split())
    assert f"interrupted (SIGINT) after writing {tmp_path / 'b'}, which holds the new" in text


def test_an_end_of_file_is_an_error_not_an_interrupt(cli, monkeypatch):
    """click turns an EOFError from anywhere into Abort, which looked like Ctrl-C (130)."""

    def truncated(*args, **kwargs):
        raise EOFError("No data left in file")

    monkeypatch.setattr("quantgate.bundle.load", truncated)
    r = cli("inspect", "bundle")
    assert r.code == 1 and "error: unexpected end of file (No data left in file)" in r.stderr


def test_export_and_gate_refuse_a_bundle_another_process_is_writing(
    cli, tmp_path, tiny_checkpoint, claimed_elsewhere
):
    """Refused at once, exit 1, before the model is loaded or the data read; the bundle as
    it was."""
    from quantgate import bundle as qb

    out = tmp_path / "b"
    with qb.staging(out) as tmp:  # a bundle of one file (no model, no gates)
        (tmp / "model.fp32.onnx").write_text("one")
        variant = qb.Variant("model.fp32.onnx", "fp32", qb.sha256_file(tmp / "model.fp32.onnx"))
        qb.write_manifest(tmp, qb.Manifest("m", "x", (), (), (variant,), 17, {}))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    ev = tmp_path / "ev.jsonl"
    ev.write_text('{"text": "held out"}\n')
    with claimed_elsewhere(out):
        for args in (
            ("export", tiny_checkpoint, "--out", out, "--force", "--no-quantize"),
            ("gate", out, "--eval", ev),
        ):
            r = cli(*args)
            assert r.code == 1, r.stderr
            assert f"{out} is being written by another quantgate process (pid " in r.stderr
            assert "an export, since" in r.stderr and "Traceback" not in r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["b", "ev.jsonl"]  # and no claim left behind


def test_export_asks_for_data_before_exporting_a_model_without_its_own(cli, tmp_path):
    """Only the built-in checkpoint has data; others learn it before minutes of export."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "bert"}')  # not loaded: refused first
    r = cli("export", hf, "--out", tmp_path / "b", "--eval", tmp_path / "missing.jsonl")
    assert r.code == 2 and "--eval" in r.stderr and "no such file" in r.stderr
    ev = tmp_path / "ev.jsonl"
    ev.write_text('{"text": "held out"}\n')
    r = cli("export", hf, "--out", tmp_path / "b", "--eval", ev)
    assert r.code == 2 and "--calibration PATH required for this model" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "b").exists()
    r = cli("export", "--help")
    assert '{"text": ...}' in " ".join(r.stdout.split())  # JSON, not {'text'}
    factory = tmp_path / "mine.py"  # no tokenizer: asked for arrays only
    factory.write_text(
        "import torch\n"
        "def make():\n"
        "    m = torch.nn.Embedding(10, 4)\n"
        "    m.example_inputs = {'input_ids': torch.ones(2, 3, dtype=torch.long)}\n"
        "    return m\n"
    )
    r = cli("export", f"{factory}:make", "--out", tmp_path / "b")
    assert r.code == 2 and "named as its forward's arguments" in r.stderr, r.stderr
    assert ".jsonl" not in r.stderr, r.stderr


def test_inspect_shows_a_bundle_whose_export_record_is_damaged_and_says_which(cli, tmp_path):
    """The record of how a bundle was made is shown, not read by serve: a damaged one costs
    its own line, said in the schema's words, not the summary (it exited 2 with a KeyError)."""
    from quantgate import bundle as qb

    def inspected(name: str, export: dict) -> str:
        with qb.staging(tmp_path / name) as tmp:
            (tmp / "model.fp32.onnx").write_bytes(b"onnx")
            file = tmp / "model.fp32.onnx"
            variant = qb.Variant("model.fp32.onnx", "fp32", qb.sha256_file(file))
            manifest = qb.Manifest("b", "x", (), (), (variant,), 17, {}, export=export)
            qb.write_manifest(tmp, manifest)
        r = cli("inspect", tmp_path / name)
        assert r.code == 0 and "Traceback" not in r.stderr, r.stderr
        return " ".join(r.stdout.split())

    text = inspected(
        "b", {"fusions": {}, "validation": {"cases": [{"batch": 1}], "max_abs_diff": {}}}
    )
    assert (
        "validation: not shown: export.validation.cases[0]: the field 'sequence' is missing" in text
    )
    assert "fusions: none" in text and "serve picks: fp32 on CPU" in text  # the rest is shown
    text = inspected("c", {"fusions": [], "attempts": "legacy", "validation": {"cases": [{}]}})
    assert "fusions: not shown: export.fusions: expected an object, found a list" in text
    assert (
        "export notes: not shown: export.attempts: expected a list of strings, found the string 'legacy'"
        in text
    )
    assert "export.validation: the field 'max_abs_diff' is missing" in text
    assert "Error" not in text  # no Python exception's name


def test_no_quantize_refuses_the_flags_of_the_step_it_skips(cli, tmp_path):
    out = tmp_path / "b"
    r = cli("export", "--no-quantize", tmp_path / "model", "--out", out,
            "--eval", tmp_path / "ev.jsonl", "--min-speedup", "2")  # fmt: skip
    assert r.code == 2 and not out.exists()
    assert "--eval, --min-speedup are for quantization" in " ".join(r.stderr.split())
    r = cli("export", "--no-quantize", tmp_path / "model", "--out", out, "--samples", "8")
    assert r.code == 2 and "--samples is for quantization" in r.stderr, r.stderr
    assert "drop that flag" in r.stderr
    r = cli("export", "--no-quantize", tmp_path / "model", "--out", out,
            "--no-fp16", "--search-budget", "60", "--cuda-gates")  # fmt: skip
    err = " ".join(r.stderr.split())
    assert r.code == 2 and "--search-budget, --no-fp16, --cuda-gates are for" in err, err


def test_an_unknown_preset_is_refused_before_training_starts(cli, tmp_path):
    r = cli("train", "--preset", "huge", "--out", tmp_path / "c")
    assert r.code == 2 and "unknown preset 'huge'; choose one of ['base', 'small']" in r.stderr
    assert "training" not in r.stderr and not (tmp_path / "c").exists()  # no bar drawn


def test_train_writes_each_preset_to_its_own_folder_by_default(cli, monkeypatch, tmp_path):
    """`train --preset base` without --out: artifacts/digits-base, never the small model's
    folder, which the tour exports (training itself is the next tests'; here, where to)."""
    import quantgate.model.train as training

    written = []

    def where(out, **_):
        written.append(out)
        raise SystemExit(9)  # and train nothing

    monkeypatch.setattr(training, "train", where)
    monkeypatch.chdir(tmp_path)
    for preset in ("small", "base"):
        assert cli("train", "--preset", preset).code == 9
    assert written == [Path("artifacts/digits-small"), Path("artifacts/digits-base")]


def test_train_says_how_long_it_took_as_durations_are_said(cli, monkeypatch, tmp_path):
    """ "trained in 47 s", SI with the space, as the bars' "(3.0 s)" (it said "47s")."""
    import quantgate.model.train as training

    done = training.TrainResult(tmp_path / "c", test_accuracy=0.9, reused=False, seconds=47.2)
    monkeypatch.setattr(training, "train", lambda out, **_: done)  # 50 s of real training
    r = cli("train", "--out", tmp_path / "c")
    assert r.code == 0 and f"checkpoint {tmp_path / 'c'} (trained in 47 s)" in r.stdout, r.stdout


def test_a_missing_optional_extra_names_the_extra_to_install(cli, monkeypatch, tmp_path):
    """A serving host installs `cpu` alone: `quantgate train` there says what to install."""

    import quantgate.model  # (the package alone imports nothing heavy)

    for name in [m for m in sys.modules if m == "torch" or m.startswith("torch.")]:
        monkeypatch.delitem(sys.modules, name)
    for name in [m for m in sys.modules if m.startswith("quantgate.model")]:
        monkeypatch.delitem(sys.modules, name)
    # the import below rebinds quantgate.model: later tests get the package they had
    monkeypatch.setattr(quantgate, "model", quantgate.model)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch: ModuleNotFoundError
    r = cli("train", "--out", tmp_path / "c")
    assert r.code == 2 and "Traceback" not in r.stderr, r.stderr
    assert "needs torch" in r.stderr and "pip install 'quantgate[export]'" in r.stderr


def test_text_without_the_hf_extra_names_the_extra_to_install(monkeypatch, tmp_path):
    """A serving host's `quantgate infer -t` (or a CI runner's `gate --eval text.jsonl`)
    without transformers: the tokenizer lets its ModuleNotFoundError through (not "cannot
    load the model's tokenizer"), which main() maps to the extra to install, as above."""

    from quantgate.cli._exit import _EXTRAS
    from quantgate.quantize.text import _transformers_tokenizer

    monkeypatch.setitem(sys.modules, "transformers", None)  # import: ModuleNotFoundError
    with pytest.raises(ModuleNotFoundError) as err:
        _transformers_tokenizer(str(tmp_path))
    assert _EXTRAS[err.value.name] == "hf"


def test_help_into_a_pipe_keeps_sentences_and_option_values_whole():
    """A docstring's own line breaks are not kept, and a pipe gets more than a terminal's 80
    columns: "sequence-classification" is not broken at its hyphen; the command list shows
    each command's whole first line ("e.g." does not end it)."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "TERMINAL_WIDTH")}
    r = subprocess.run(
        [sys.executable, "-m", "quantgate", "export", "--help"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "(a mismatch exits 3 and leaves --out as it was)" in r.stdout, r.stdout
    for value in ("feature-extraction,", "multi-label-classification", "question-answering"):
        assert value in r.stdout, r.stdout  # not cut at its hyphen
    r = subprocess.run(
        [sys.executable, "-m", "quantgate", "--help"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert "(e.g. in CI after an ONNX Runtime upgrade)" in r.stdout, r.stdout


def test_the_console_marks_a_gate_decided_inside_its_interval(cli, tmp_path, capsys):
    """nn_top1_agreement 0.95 >= 0.95 with [0.9275, 0.97]: a pass another sample of the rows
    could have turned; the console says so, and not of a clear pass."""
    from quantgate import bundle as qb
    from quantgate.cli._gates import print_gates

    coin = qb.GateResult("nn_top1_agreement", 0.95, 0.95, ">=", True, ci=(0.9275, 0.97))
    clear = qb.GateResult("cosine", 0.998, 0.99, ">=", True, ci=(0.997, 0.999))
    _tiny_bundle(tmp_path / "b", (coin, clear))
    print_gates(tmp_path / "b")
    lines = capsys.readouterr().out.splitlines()
    (coin_line,) = [line for line in lines if "nn_top1_agreement" in line]
    (clear_line,) = [line for line in lines if "cosine" in line]
    assert coin_line.endswith("pass (uncertain: its interval crosses the threshold)"), coin_line
    assert clear_line.endswith(": pass"), clear_line
    r = cli("inspect", tmp_path / "b")  # its gates table too
    rows = {line.split()[1]: line for line in r.stdout.splitlines() if " int8 " in line}
    assert rows["nn_top1_agreement"].rstrip().endswith("pass (uncertain)"), r.stdout
    assert rows["cosine"].rstrip().endswith("pass"), r.stdout


def test_the_console_says_speed_timed_on_a_busy_machine(tmp_path, capsys):
    """A speed verdict that flips between runs on a loaded machine: report.md said why, the
    console did not."""
    from quantgate import bundle as qb
    from quantgate.cli._gates import print_gates
    from quantgate.quantize.speed import TimingConditions

    busy = TimingConditions(threads=0, cpus=2, load=3.5).describe()
    quiet = TimingConditions(threads=0, cpus=2, load=0.4).describe()
    for name, conditions in (("busy", busy), ("quiet", quiet)):
        gate = qb.GateResult("speedup_b1_s64", 1.1, 1.2, ">=", False, detail=f"timed: {conditions}")
        _tiny_bundle(tmp_path / name, (gate,))
        print_gates(tmp_path / name)
        said = capsys.readouterr().out
        assert ("speed timed while the machine was busy" in said) == (name == "busy"), said


def test_inspect_needs_no_onnxruntime(tmp_path):
    """A manifest is JSON: inspect printed its tables, then failed for want of onnxruntime
    (choosing the variant serve would pick imported it)."""
    import subprocess
    import sys

    from quantgate import bundle as qb

    gate = qb.GateResult("speedup_b1_s64", 1.5, 1.2, ">=", True, provider=qb.CPU)
    _tiny_bundle(tmp_path / "b", (gate,))
    code = (
        "import sys; sys.modules['onnxruntime'] = None\n"
        f"sys.argv = ['quantgate', 'inspect', {str(tmp_path / 'b')!r}]\n"
        "from quantgate.cli import main; main()"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "serve picks: int8 on CPU" in " ".join(r.stdout.split()), r.stdout


def _tiny_bundle(path, int8_gates=None, task="feature-extraction"):
    """A bundle of ``task``, of two stand-in files whose INT8 variant has ``int8_gates``
    (default: one passing cosine gate; no model in them: what a command checks before it
    runs one)."""
    from quantgate import bundle as qb

    if int8_gates is None:  # with no gate at all a variant fails: it has no evidence
        int8_gates = (qb.GateResult("cosine", 0.998, 0.99, ">=", True),)

    with qb.staging(path) as tmp:
        for name in ("model.fp32.onnx", "model.int8.onnx"):
            (tmp / name).write_bytes(name.encode())
        variants = (
            qb.Variant("model.fp32.onnx", "fp32", qb.sha256_file(tmp / "model.fp32.onnx")),
            qb.Variant("model.int8.onnx", "int8", qb.sha256_file(tmp / "model.int8.onnx"),
                       gates=int8_gates),
        )  # fmt: skip
        qb.write_manifest(tmp, qb.Manifest("b", task, (), (), variants, 17, {}))
    return path


def test_a_gate_measured_on_cuda_is_named_so(cli, tmp_path, capsys):
    """INT8's cosine on the CPU and on CUDA have one name: the console and inspect say which."""
    from quantgate import bundle as qb
    from quantgate.cli._gates import print_gates

    on_cpu = qb.GateResult("cosine:last_hidden_state", 0.9985, 0.99, ">=", True)
    on_cuda = qb.GateResult("cosine:last_hidden_state", 0.9981, 0.99, ">=", True, provider=qb.CUDA)
    _tiny_bundle(tmp_path / "b", (on_cpu, on_cuda))
    print_gates(tmp_path / "b")
    lines = [line.strip() for line in capsys.readouterr().out.splitlines() if "cosine" in line]
    assert lines == [
        "cosine:last_hidden_state 0.9985 >= 0.99: pass",
        "cosine:last_hidden_state on CUDA 0.9981 >= 0.99: pass",
    ]
    r = cli("inspect", tmp_path / "b")
    assert "cosine:last_hidden_state on CUDA  0.9981" in r.stdout, r.stdout


def test_gate_on_cuda_without_cuda_exits_2_before_measuring(cli, tmp_path, monkeypatch):
    from quantgate import bundle as qb
    from quantgate.quantize import cuda

    monkeypatch.setattr(cuda, "available", lambda: False)  # as on a host without a GPU
    _tiny_bundle(tmp_path / "b", (qb.GateResult("cosine", 0.998, 0.99, ">=", True),))
    before = (tmp_path / "b" / "manifest.json").read_text()
    r = cli("gate", tmp_path / "b", "--device", "cuda")
    assert r.code == 2, r.stdout + r.stderr
    message = " ".join(r.stderr.split())
    assert "no working CUDA provider" in message and "the `gpu` extra" in message, message
    assert (tmp_path / "b" / "manifest.json").read_text() == before


def test_a_recipe_that_is_not_this_cpus_is_refused_before_the_export(
    cli, tmp_path, tiny_checkpoint
):
    """--recipe narrows the search; a misspelt name is told with the names there are, before
    minutes of export, and nothing is written."""
    out = tmp_path / "b"
    r = cli("export", tiny_checkpoint, "--out", out, "--recipe", "smooth-static", "--recipe",
            "smooth-static-u8s8")  # fmt: skip
    assert r.code == 2, r.stderr
    assert "unknown recipe(s) smooth-static; this CPU's are, best first: smooth-static-u8s8, " in (
        " ".join(r.stderr.split())
    )
    assert "Traceback" not in r.stderr and not out.exists()
    r = cli("export", tiny_checkpoint, "--out", out, "--no-quantize", "--recipe", "x")
    assert r.code == 2 and "--recipe is for quantization" in r.stderr, r.stderr


def test_a_bad_threshold_flag_is_named_by_the_flag(cli, tmp_path, tiny_checkpoint):
    r = cli("export", tiny_checkpoint, "--out", tmp_path / "b", "--min-top1", "1.5")
    assert r.code == 2 and "--min-top1 1.5: expected 0..1" in r.stderr, r.stderr
    assert not (tmp_path / "b").exists()


def test_a_gate_config_files_bad_value_is_named_by_the_file(cli, tmp_path):
    """A value GateConfig refuses is named by the --gate-config file that gave it, as the
    file's other errors are; a bad flag beside it is still named by the flag."""
    _tiny_bundle(tmp_path / "b")
    gates = tmp_path / "gates.json"
    gates.write_text('{"ci_rule": "upr"}')
    r = cli("gate", tmp_path / "b", "--gate-config", gates)
    assert r.code == 2, r.stderr
    assert f"error: --gate-config {gates}: ci_rule 'upr': expected 'point' or 'upper'" in " ".join(
        r.stderr.split()
    )
    r = cli("gate", tmp_path / "b", "--gate-config", gates, "--min-speedup", "-1")
    lines = [line.strip() for line in r.stderr.splitlines()]
    assert (
        r.code == 2
        and f"- --gate-config {gates}: ci_rule 'upr': expected 'point' or 'upper'" in lines
    )
    assert "- --min-speedup -1.0: expected a finite number > 0" in lines, r.stderr
    gates.write_text('{"ci_rule": "upr", "iterations": 2}')  # the file's alone: one line
    r = cli("gate", tmp_path / "b", "--gate-config", gates)
    assert r.code == 2 and (
        f"error: --gate-config {gates}: ci_rule 'upr': expected 'point' or 'upper'; "
        "iterations 2: expected >= 3"
    ) in " ".join(r.stderr.split()), r.stderr


def test_a_gate_config_file_that_cannot_be_read_is_named_by_its_flag(cli, tmp_path):
    """The file's own faults (missing, not TOML) say which flag named it, as its refused
    values do, in `gate` and in `export` (which refuses before it exports)."""
    _tiny_bundle(tmp_path / "b")
    bad = tmp_path / "gates.toml"
    bad.write_text("min_speedup = \n")
    r = cli("gate", tmp_path / "b", "--gate-config", bad)
    said = " ".join(r.stderr.split())
    assert r.code == 2 and f"error: --gate-config {bad}: not valid TOML (" in said, r.stderr
    missing = tmp_path / "nowhere.toml"
    r = cli("export", tmp_path / "ckpt", "--out", tmp_path / "o", "--gate-config", missing)
    said = " ".join(r.stderr.split())
    assert r.code == 2 and f"error: --gate-config {missing}: cannot read it (" in said, r.stderr
    assert not (tmp_path / "o").exists()


def test_a_gate_config_error_lists_each_refused_field():
    """ConfigError.problems: (field, what is wrong), which the CLI names by flag or file."""
    from quantgate.errors import ConfigError
    from quantgate.quantize.decide import GateConfig

    with pytest.raises(ConfigError) as e:
        GateConfig(min_top1_agreement=1.5, iterations=2)
    assert e.value.problems == (
        ("min_top1_agreement", "1.5: expected 0..1"),
        ("iterations", "2: expected >= 3"),
    )
    assert str(e.value) == (
        "invalid gate config:\n  - min_top1_agreement 1.5: expected 0..1\n"
        "  - iterations 2: expected >= 3"
    )


def test_inspect_refusing_a_changed_file_says_how_to_read_the_manifest_anyway(cli, tmp_path):
    _tiny_bundle(tmp_path / "b")
    (tmp_path / "b" / "model.int8.onnx").write_bytes(b"changed")
    r = cli("inspect", tmp_path / "b")
    message = " ".join(r.stderr.split())
    assert r.code == 2 and "model.int8.onnx has sha256" in message, r.stderr
    assert message.endswith("To read its manifest anyway, pass --no-verify."), r.stderr
    r = cli("inspect", tmp_path / "b", "--no-verify")
    assert r.code == 0 and "model.int8.onnx" in r.stdout, r.stderr
    r = cli("inspect", tmp_path / "b" / "model.int8.onnx")  # not a bundle: no --no-verify
    assert r.code == 2 and "is a file, not a bundle" in r.stderr and "--no-verify" not in r.stderr


def test_inspect_no_verify_says_which_file_is_missing_and_that_serve_refuses_it(cli, tmp_path):
    """--no-verify reads the manifest of a bundle that lost a file; its table said 0.0 MB
    and "serve picks" the variant, of a bundle serve refuses."""
    _tiny_bundle(tmp_path / "b")
    (tmp_path / "b" / "model.fp32.onnx").unlink()
    r = cli("inspect", tmp_path / "b", "--no-verify")
    assert r.code == 0, r.stderr
    rows = {line.split()[0]: line.split()[:3] for line in r.stdout.splitlines() if line.strip()}
    assert rows["model.fp32.onnx"] == ["model.fp32.onnx", "fp32", "missing"], r.stdout
    assert rows["model.int8.onnx"] == ["model.int8.onnx", "int8", "15"], r.stdout  # 15 bytes
    assert "serve picks" not in r.stdout, r.stdout
    assert "serve: refuses it: model.fp32.onnx is missing (restore it" in r.stdout, r.stdout
    assert "files not verified (--no-verify)" in r.stdout, r.stdout
    (tmp_path / "b" / "model.fp32.onnx").write_bytes(b"model.fp32.onnx")  # as it was
    r = cli("inspect", tmp_path / "b")
    assert r.code == 0 and "serve picks: fp32 on CPU" in r.stdout, r.stderr
    assert "not verified" not in r.stdout, r.stdout


def test_inspect_says_a_models_size_with_its_external_weights_as_sizes_are_said(cli, tmp_path):
    """The size column counts the weights ONNX keeps beside the model, in fsutil.size_said's
    units (it was a bare number under "MB")."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from quantgate import bundle as qb

    w = numpy_helper.from_array(np.zeros((600, 500), np.float32), "w")  # 1.2 MB
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 600])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 500])],
        [w],
    )
    with qb.staging(tmp_path / "b") as tmp:
        onnx.save_model(helper.make_model(graph), str(tmp / "model.fp32.onnx"),
                        save_as_external_data=True, location="weights.bin")  # fmt: skip
        variant = qb.Variant("model.fp32.onnx", "fp32", qb.sha256_file(tmp / "model.fp32.onnx"))
        files = {"weights.bin": qb.sha256_file(tmp / "weights.bin")}
        qb.write_manifest(tmp, qb.Manifest("b", "x", (), (), (variant,), 17, {}, files=files))
    r = cli("inspect", tmp_path / "b")
    assert r.code == 0, r.stderr
    (row,) = [line.split() for line in r.stdout.splitlines() if "model.fp32.onnx" in line]
    assert row[:4] == ["model.fp32.onnx", "fp32", "1.2", "MB"], r.stdout


def test_an_early_refusal_is_the_first_thing_a_log_shows(cli, tmp_path):
    """Off a terminal, rich printed its bars at the end whatever they held: an empty line, or
    a bar at 0/7, before the refusal. Only bars of work done are printed now."""
    r = cli("gate", tmp_path / "nope")
    assert r.code == 2 and r.stderr.startswith("error: no bundle at "), repr(r.stderr[:80])
    r = cli("export", "qg_no_such_module:make", "--no-quantize", "--out", tmp_path / "b")
    assert r.code == 2 and r.stderr.startswith("error: cannot import"), repr(r.stderr[:80])


def test_a_ctrl_c_as_the_process_exits_is_no_traceback():
    """A Ctrl-C just after a command finished met Python's own handler: KeyboardInterrupt in
    the interpreter's shutdown, a traceback, and exit 0. The console script (run) records it:
    the command's exit code, no traceback. (An atexit callback sends it, at the shutdown.)"""
    code = (
        "import atexit, os, signal, sys\n"
        "import quantgate.cli as cli\n"
        "atexit.register(lambda: os.kill(os.getpid(), signal.SIGINT))\n"
        "sys.argv = ['quantgate', '--version']\n"
        "cli.run()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "quantgate" in r.stdout, r
    assert "Traceback" not in r.stderr and "KeyboardInterrupt" not in r.stderr, r.stderr


def test_a_signal_while_the_libraries_unload_keeps_the_exit_code(tmp_path):
    """After the exit handlers, Python puts the default action back for handlers written in
    Python, and torch and ONNX Runtime take a second or more to unload: a Ctrl-C then killed
    the process, and CI read 130 for a gate's exit 3. (An object whose __del__ sleeps at the
    interpreter's teardown stands in for those libraries.)"""
    code = (
        "import sys, time\n"
        "from quantgate.cli import _exit\n"
        "class Unloading:\n"
        "    def __del__(self):\n"
        "        print('unloading', flush=True)\n"
        "        time.sleep(1.0)\n"
        "def main():\n"
        "    sys.modules['__main__'].kept = Unloading()\n"
        "    sys.exit(3)\n"
        "_exit.main = main\n"
        "_exit.run()\n"
    )
    assert _signalled_at_exit(code, "unloading", signal.SIGINT) == 3


def _signalled_at_exit(code: str, said: str, sig: signal.Signals) -> int:
    """The exit status of ``python -c code`` (which runs ``_exit.run``) sent ``sig`` 0.2 s
    after it printed the line ``said``: once its command is over."""
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == f"{said}\n"
    time.sleep(0.2)
    p.send_signal(sig)
    return p.wait(timeout=60)


def test_a_teardown_that_hangs_still_ends_though_signals_are_ignored():
    """Ignoring the ending signals at the teardown made a process stuck there (an exit
    handler waiting on a lock a stuck thread holds) deaf to SIGTERM and Ctrl-C for good: an
    alarm ends it after TEARDOWN_S (1 s here)."""
    code = (
        "import atexit, sys, time\n"
        "from quantgate.cli import _exit\n"
        "atexit.register(lambda: time.sleep(3600))  # runs after run()'s own, as logging's\n"
        "_exit.TEARDOWN_S = 1\n"
        "_exit.main = lambda: print('done', flush=True)\n"
        "_exit.run()\n"
    )
    assert _signalled_at_exit(code, "done", signal.SIGTERM) == -signal.SIGALRM  # SIGTERM ignored


def test_off_a_terminal_each_finished_step_is_one_line():
    """A CI log got nothing for minutes, then the bars once (or, under FORCE_COLOR, every
    redraw): each step a task finishes is now a line, with how far it got and its time, in
    the order they finished (a task's last step was said only when the bars closed, after
    the steps of tasks that finished later)."""
    import io

    from rich.console import Console

    from quantgate.cli._console import _Progress

    log = io.StringIO()
    with _Progress(console=Console(file=log, force_terminal=True)) as bar:  # FORCE_COLOR
        search = bar.add_task("search", total=3, status="")
        calib = bar.add_task("calibration", total=2, status="")
        bar.update(search, completed=0, total=3, status="recipe-a")
        bar.update(calib, completed=2, total=2, status="recipe-a")
        bar.update(search, completed=1, total=3, status="recipe-b")
        bar.update(calib, completed=1, total=2, status="recipe-b")  # counts afresh
        timing = bar.add_task("timing", total=4, status="")
        bar.update(timing, completed=1, total=4, status="b1")
        bar.update(timing, completed=3, total=4, status="b32")
        bar.update(timing, completed=4, total=4, status="b32")  # its last step ends here
        bar.update(search, completed=3, total=3, status="done")
    lines = log.getvalue().splitlines()
    assert [re.sub(r" \(\d+\.\d s\)", " (time)", line) for line in lines] == [
        "calibration 2/2: recipe-a",  # its total: said at once (no time: it began there)
        "search 1/3: recipe-a (time)",
        "timing 3/4: b1 (time)",
        "timing 4/4: b32 (time)",  # said as it ends, not when the bars close
        "search 3/3: recipe-b (time)",
        "search 3/3: done",  # a marker: no time of its own
        "calibration 1/2: recipe-b",  # still going at the end
    ], lines
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()


def test_off_a_terminal_a_task_of_many_steps_is_said_every_few_seconds(monkeypatch):
    """Training's 500 steps, each with its loss, were 500 lines of a CI log: a task of more
    than MANY_STEPS steps is said at most every MANY_EVERY_S seconds, and at its last step;
    each line's time is of the steps since the line before it."""
    import io
    import types

    from rich.console import Console

    from quantgate.cli import _console

    clock = [0.0]  # _console's own clock: the process's time.monotonic stays as it is
    monkeypatch.setattr(_console, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    log = io.StringIO()
    with _console._Progress(console=Console(file=log, force_terminal=True)) as bar:
        # as `quantgate train` adds it: a status is the loss of the step it comes with
        training = bar.add_task("training", total=None, status="", result=True)
        for step in range(1, 501):  # a step every 1/8 s
            bar.update(training, completed=step, total=500, status=f"loss {3 - step / 250:.3f}")
            clock[0] += 0.125
    lines = log.getvalue().splitlines()
    assert 12 <= len(lines) <= 14, lines  # 62.5 s of steps: a line every 5 s
    # the first step: at once, with its own loss (it was said as step 2, and the last step
    # twice: "500/500: loss 1.004", then "500/500: loss 1.000")
    assert lines[0] == "training 1/500: loss 2.996 (0.0 s)"  # its time since the bar began
    for line in lines:
        step, loss = re.fullmatch(r"training (\d+)/500: loss (\S+)( \(\d+\.\d s\))?", line).group(
            1, 2
        )
        assert float(loss) == round(3 - int(step) / 250, 3), line  # each count's own loss
    assert re.fullmatch(r"training 4\d/500: loss 2\.8\d\d \(5\.0 s\)", lines[1]), lines
    assert lines[-1].startswith("training 500/500: loss 1.000")  # the last: at once
    counts = [int(line.split()[1].split("/")[0]) for line in lines]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)


def test_off_a_terminal_a_step_that_goes_on_is_said_again_every_few_seconds(monkeypatch):
    """The speed gates' timing at batch 32 was one step of 16 s, and a CI log said nothing
    meanwhile: a step that goes on is said every STILL_EVERY_S as its count moves, marked
    "going on", each line's time that since the line before; in a task of many steps too
    (three batch sizes: 57), and once at its end, even where the end falls due for both."""
    import io
    import types

    from rich.console import Console

    from quantgate.cli import _console

    def lines_of(total: int) -> list[str]:
        clock = [0.0]
        monkeypatch.setattr(_console, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
        log = io.StringIO()
        with _console._Progress(console=Console(file=log, force_terminal=True)) as bar:
            timing = bar.add_task("timing", total=None, status="")
            bar.update(timing, completed=1, total=total, status="b1")
            clock[0] += 1
            for done in range(2, total + 1):  # b32: a pair a second
                bar.update(timing, completed=done, total=total, status="b32")
                clock[0] += 1
        return log.getvalue().splitlines()

    assert lines_of(30) == [
        "timing 2/30: b1 (1.0 s)",
        "timing 12/30: b32 (10.0 s, going on)",
        "timing 22/30: b32 (10.0 s, going on)",
        "timing 30/30: b32 (8.0 s)",  # its end: the time since the line before
    ]
    assert lines_of(22)[-2:] == [
        "timing 12/22: b32 (10.0 s, going on)",
        "timing 22/22: b32 (10.0 s)",
    ]
    many = lines_of(70)
    assert len(many) == 8 and many[1] == "timing 12/70: b32 (10.0 s, going on)", many
    assert many[-1] == "timing 70/70: b32 (8.0 s)"

    # a step that ends 2 s after its "going on" line in a task of many steps: its end is
    # said (the line had counted towards the 5 s between a task's lines, and it was not)
    clock = [0.0]
    monkeypatch.setattr(_console, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    log = io.StringIO()
    with _console._Progress(console=Console(file=log, force_terminal=True)) as bar:
        timing = bar.add_task("timing", total=None, status="")
        for done in range(1, 14):  # b1: 13 pairs a second apart, then b8
            bar.update(timing, completed=done, total=70, status="b1")
            clock[0] += 1
        bar.update(timing, completed=14, total=70, status="b8")
    assert log.getvalue().splitlines() == [
        "timing 11/70: b1 (10.0 s, going on)",
        "timing 14/70: b1 (3.0 s)",
        "timing 14/70: b8",  # still going as the bars close
    ]


def test_off_a_terminal_an_interrupted_training_says_its_last_loss(monkeypatch):
    """A task of many steps says one every few seconds: the bars closing (Ctrl-C) said
    nothing of the steps since, and the last loss was lost."""
    import io
    import types

    from rich.console import Console

    from quantgate.cli import _console

    clock = [0.0]
    monkeypatch.setattr(_console, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    log = io.StringIO()
    with _console._Progress(console=Console(file=log, force_terminal=True)) as bar:
        training = bar.add_task("training", total=None, status="", result=True)
        for step in range(1, 31):  # interrupted at 30 of 500
            bar.update(training, completed=step, total=500, status=f"loss {step}")
            clock[0] += 0.125
    assert log.getvalue().splitlines() == [
        "training 1/500: loss 1 (0.0 s)",
        "training 30/500: loss 30 (3.8 s)",  # said as the bars close
    ]


def test_a_reader_that_stops_reading_keeps_the_commands_exit_code(tmp_path):
    """`quantgate inspect ... | head -1`: the output's reader went away, and the command
    exited 1 (a BrokenPipeError), whatever it had to say. It keeps its own exit code now."""
    from quantgate import bundle as qb

    _tiny_bundle(tmp_path / "b", (qb.GateResult("cosine", 1.0, 0.99, ">=", True),))
    r = subprocess.run(
        f"{sys.executable} -m quantgate inspect {tmp_path / 'b'} | true; exit ${{PIPESTATUS[0]}}",
        shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr


def test_a_gate_failed_by_its_bound_says_so_where_its_value_passes(cli, tmp_path):
    """Under ci_rule "upper", "cosine_tail 0 [0, 0.037] <= 0.02: FAIL" read as 0 <= 0.02
    failing: the console and the error name the bound that failed it."""
    from quantgate import bundle as qb
    from quantgate.quantize.verdict import failure_message

    rule = "; its upper bound must be <= the threshold: the point estimate passes, its upper bound does not"
    g = qb.GateResult("cosine_tail", 0.0, 0.02, "<=", False, ci=(0.0, 0.03699), detail=rule)
    _tiny_bundle(tmp_path / "b", (g,))
    r = cli("inspect", tmp_path / "b")
    assert "its upper bound 0.03699 is not <= 0.02: ci_rule upper" in r.stdout, r.stdout
    message = failure_message(qb.load(tmp_path / "b").manifest, tmp_path / "b")
    assert "its upper bound 0.03699 is not, and ci_rule 'upper' decides by it" in message


@pytest.mark.parametrize(
    ("text", "value", "advice"),
    [
        ("[5, 7]", [5, 7], "send one row as a batch of one: -i 'ids=[[5, 7]]'"),
        ("@row.json", [5, 7], "send one row as a batch of one: wrap it in [ ]"),
        ("-", [5, 7], "send one row as a batch of one: wrap it in [ ]"),
    ],
)
def test_infer_offers_a_batch_of_one_for_a_row_of_the_input(text, value, advice):
    from types import SimpleNamespace

    from quantgate.cli.infer import _refused

    spec = {"ids": SimpleNamespace(shape=[-1, -1], datatype="INT64")}
    e = SimpleNamespace(name="ids", cause="rank", what="expected 2 dimensions, got 1")
    assert _refused(e, {"ids": text}, spec, {"ids": value}).endswith(advice)


def test_infer_offers_no_batch_of_one_where_the_value_is_no_row_of_the_input():
    """Features of (batch, sequence, 3) given as [[1, 0, 0, 0]]: wrapped, the server would
    refuse it too (its last dimension is 4); the message says what a row is instead."""
    from types import SimpleNamespace

    from quantgate.cli.infer import _refused

    spec = {"features": SimpleNamespace(shape=[-1, -1, 3], datatype="FP32")}
    e = SimpleNamespace(name="features", cause="rank", what="expected 3 dimensions, got 2")
    said = _refused(e, {"features": "[[1, 0, 0, 0]]"}, spec, {"features": [[1, 0, 0, 0]]})
    assert said == "--input features: expected 3 dimensions, got 2; a row of it is (N, 3)"


def test_a_taggers_tokens_are_read_from_their_rows_first_positions(capsys):
    """A tagger that takes no attention_mask, two texts of other lengths: each text's tokens
    with the first positions of its row (zip(strict) raised on the shorter text, whose row
    went on with padding)."""
    import numpy as np

    from quantgate.cli.infer import _print_tags

    logits = np.zeros((2, 4, 2), np.float32)
    logits[:, :, 1] = 5  # every position's top class is "B"
    _print_tags(["a b", "a b c d"], logits, ("O", "B"), [["a", "b"], ["a", "b", "c", "d"]])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line[:4] == "    "]
    assert [r[:2] for r in rows] == [["a", "B"], ["b", "B"], ["a", "B"], ["b", "B"],
                                     ["c", "B"], ["d", "B"]]  # fmt: skip


def test_infer_classes_leaves_out_outputs_of_one_value_per_row():
    """A predicted index or a score, (batch,), has no classes: Triton's rule would rank its
    one value and print "index 0" as every row's class."""
    from types import SimpleNamespace

    from quantgate.cli.infer import _classified
    from quantgate.errors import ConfigError

    logits = SimpleNamespace(name="logits", shape=[-1, 10])
    pred = SimpleNamespace(name="pred", shape=[-1])
    assert _classified([logits, pred], ()) == ("logits",)
    assert _classified([logits, pred], ("logits",)) == ("logits",)
    with pytest.raises(ConfigError, match="output 'pred' is one value per row"):
        _classified([logits, pred], ("pred",))
    with pytest.raises(ConfigError, match=r"every output is one value per row \(pred\)"):
        _classified([pred], ())
    # a regression's single score per row, (batch, 1): printed "'LABEL_0' (0)" for every row
    score = SimpleNamespace(name="logits", shape=[-1, 1])
    with pytest.raises(
        ConfigError, match=r"output 'logits' is one value per row \(shape \[-1, 1\]\)"
    ):
        _classified([score], ("logits",))
    with pytest.raises(ConfigError, match=r"every output is one value per row \(logits\)"):
        _classified([score], ())


def test_infer_null_answer_is_refused_where_no_answer_is_printed(cli, tmp_path):
    """--null-answer reads the answers infer prints: without -p, with --json, or with -o of
    one score, there are none to read; and a model that answers no questions has none, which
    is said first (it was said only once --json was dropped)."""
    qa = _tiny_bundle(tmp_path / "qa", task="question-answering")
    classifier = _tiny_bundle(tmp_path / "cls", task="sequence-classification")
    for bundle, args, says in (
        (qa, ("-t", "q"), "give each as -t QUESTION -p CONTEXT"),
        (qa, ("-t", "q", "-p", "c", "--json"), "--json prints the scores instead"),
        (qa, ("-t", "q", "-p", "c", "-o", "start_logits"), "-o prints the scores instead"),
        (classifier, ("-t", "q", "-p", "c", "--json"), "model, which answers no questions"),
    ):
        r = cli("infer", "m", "--bundle", bundle, "--null-answer", *args)
        assert r.code == 2 and says in " ".join(r.stderr.split()), r.stderr


def test_infer_refuses_what_it_cannot_send_before_it_connects(cli, tmp_path):
    """Each said in infer's flags, exit 2, before any connection (--url 127.0.0.1:1 would
    refuse one): a question without its context, a port out of range or a host without
    brackets, NaN seconds, a token with a space, two inputs from one standard input, a
    text or an input file that is not there (the one said as the other), JSON cut short,
    an input without its name or given twice: the inputs' JSON was read only once the
    server had answered, behind "cannot connect"."""
    qa = _tiny_bundle(tmp_path / "qa", task="question-answering")
    nope = tmp_path / "nope.json"
    for args, says in (
        (("--bundle", qa, "-t", "Where?"), "answers questions from a context: give each as -t"),
        (("-i", "x=[[1]]", "--url", "localhost:99999"), "port '99999' is not a number from 1 to"),
        (("-i", "x=[[1]]", "--url", "localhost:abc"), "port 'abc' is not a number from 1 to 65535"),
        (("-i", "x=[[1]]", "--url", ":8001"), "no host: expected HOST:PORT, e.g. localhost:8001"),
        (("-i", "x=[[1]]", "--url", "::1:8001"), "an IPv6 address goes in brackets: [::1]:8001"),
        (("-i", "x=[[1]]", "--url", "::1"), "expected [ADDR]:PORT, e.g. [::1]:8001 (Triton's"),
        (("-i", "x=[[1]]", "--url", "HTTP://h:8001/"), "without a scheme (gRPC takes an address"),
        (("-i", "x=[[1]]", "--url", "localhost:\u0668\u0660\u0660\u0661"), "is not a number"),
        (("-i", "x=[[1]]", "--timeout", "nan"), "--timeout must be more than 0 seconds (inf: no"),
        (("-i", "x=[[1]]", "--token", "a b"), "--token (or QUANTGATE_AUTH_TOKEN): the token has"),
        (("-i", "x=-", "-i", "y=-"), "standard input is read once, but --input x and --input y"),
        (("--bundle", qa, "-t", "@nope.txt", "-p", "c"), "--text @nope.txt: cannot read nope.txt"),
        (("-i", f"x=@{nope}"), f"--input x=@{nope}: cannot read {nope} ([Errno 2] No such"),
        (("-i", "x=[[1,2"), "--input x: not JSON (Expecting ',' delimiter: line 1 column 6"),
        (("-i", "[[1]]"), "--input '[[1]]': expected NAME=JSON, e.g. -i 'input_ids=[[5, 7, 9]]'"),
        (("-i", "x=[[1]]", "-i", "x=[[2]]"), "--input x: it is given twice; give each input once"),
    ):
        r = cli("infer", "m", "--url", "127.0.0.1:1", *args)
        said = " ".join(r.stderr.split())
        assert r.code == 2 and says in said, (args, r.stderr)
        assert "connect" not in said, said


def test_a_server_address_is_told_as_the_address_to_give_instead():
    """`infer --url` and `Client(url)`: an IPv6 address was split at its last colon
    ("[fe80:]:1") and a scheme other than http(s):// read as a host ("[grpc://h]:8001");
    gRPC's own targets pass as they are."""
    from quantgate.serve.config import url_problem

    for url, says in (
        ("::1", "expected [ADDR]:PORT, e.g. [::1]:8001"),
        ("[::1]", "expected [ADDR]:PORT, e.g. [::1]:8001"),
        ("fe80::1", "expected [ADDR]:PORT, e.g. [fe80::1]:8001"),
        ("fe80::1:8001", "an IPv6 address goes in brackets: [fe80::1]:8001"),
        ("grpc://h:8001", "without a scheme (gRPC takes an address, not a URL): h:8001"),
        ("HTTPS://h/v2/models", "without a scheme (gRPC takes an address, not a URL): h:8001"),
        ("grpc+tls://[::1]", "without a scheme (gRPC takes an address, not a URL): [::1]:8001"),
        ("h:\u0668\u0660\u0660\u0661", "is not a number from 1 to 65535"),  # Arabic-Indic
        ("h:0", "the port '0' is not a number from 1 to 65535"),
        ("a:b:c", "expected HOST:PORT, a host name without ':' or an IPv6 address in"),
    ):
        assert says in (url_problem(url) or ""), (url, url_problem(url))
    for url in ("[::1]:8001", "h:8001", "dns:///h:8001", "xds:///svc", "google-c2p:///svc"):
        assert url_problem(url) is None, (url, url_problem(url))


def test_infer_json_writes_scores_that_are_not_numbers_as_null(capsys):
    """JSON has no NaN: Python wrote NaN and Infinity, which strict parsers (JavaScript's,
    Go's, jq's) refuse; an FP16 variant can overflow to infinity."""
    import json

    import numpy as np

    from quantgate.cli.infer import _print_json

    scores = np.array([[np.nan, np.inf, -np.inf, 1.5]], dtype=np.float32)
    _print_json("m", {"logits": scores, "ids": np.array([[1, 2]])})

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    doc = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert doc["outputs"]["logits"]["data"] == [[None, None, None, 1.5]]
    assert doc["outputs"]["ids"]["data"] == [[1, 2]]


def test_a_text_read_from_a_file_or_standard_input_is_the_files_text(tmp_path, monkeypatch):
    """A byte-order mark, and the line break that ends a file (echo's, an editor's), are no
    part of the text: standard input kept the mark, and both kept the line break, which a
    byte-level BPE tokenizer made a token of. A text given inline is sent as typed."""
    import io

    from quantgate.cli.infer import _text

    path = tmp_path / "t.txt"
    path.write_bytes(b"\xef\xbb\xbfa cat\r\n")
    assert _text("--text", f"@{path}") == "a cat"
    monkeypatch.setattr(sys, "stdin", io.StringIO("\ufeffa cat\n"))
    assert _text("--text", "-") == "a cat"
    path.write_text("two\nlines\n\n")  # one line break ends the file; the text keeps its own
    assert _text("--text-pair", f"@{path}") == "two\nlines\n"
    assert _text("--text", "a cat\n") == "a cat\n"
    # a Windows file's line breaks as written, as a JSONL row and standard input keep them
    # (universal newlines made each "\r\n" and "\r" one "\n": other ids to a byte-level BPE)
    path.write_bytes(b"line one\r\nline two\rthree\r\n")
    assert _text("--text-pair", f"@{path}") == "line one\r\nline two\rthree"
