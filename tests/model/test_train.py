"""Training on the built-in digits task, checkpoints, and their errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from quantgate.errors import CheckpointError, exit_code
from quantgate.model.data import N_CALIBRATION, N_TEST, load_digits_splits
from quantgate.model.train import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    TrainConfig,
    digits_model_config,
    load_checkpoint,
    train,
)

# A tiny model and one epoch: these tests check the mechanics, not the accuracy.
TINY = dict(d_model=16, n_heads=2, n_layers=1, d_ff=32)
QUICK = TrainConfig(epochs=1, warmup=0.25)


def tiny_cfg():
    import dataclasses

    return dataclasses.replace(digits_model_config(), **TINY)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "digits"
    return train(out, model_cfg=tiny_cfg(), cfg=QUICK)


def test_splits_are_fixed_disjoint_and_cover_the_dataset():
    a, b = load_digits_splits(), load_digits_splits()
    assert (len(a["test"]), len(a["calibration"]), len(a["train"])) == (
        N_TEST,
        N_CALIBRATION,
        1797 - N_TEST - N_CALIBRATION,
    )
    for name in a:
        assert (a[name].input_ids == b[name].input_ids).all()
    assert (
        a["train"].input_ids.min() >= 1 and a["train"].input_ids.max() <= 17
    )  # intensity 0..16 -> tokens 1..17


def test_train_writes_a_checkpoint_that_loads(checkpoint):
    assert not checkpoint.reused
    model, info = load_checkpoint(checkpoint.checkpoint)
    assert info["metrics"]["test_accuracy"] == checkpoint.test_accuracy
    assert info["model"]["d_model"] == 16
    assert 0.0 <= checkpoint.test_accuracy <= 1.0


def test_training_learns(tmp_path):
    """The optimizer's steps change the model for the better: the tiny model, 8 epochs at a
    high rate (seconds), lowers its training loss and gets well above chance (10%) on the
    test split. The other tests' one epoch leaves it at chance, where they need no more."""
    got = train(tmp_path / "d", model_cfg=tiny_cfg(), cfg=TrainConfig(epochs=8, lr=1e-2))
    losses = [h["loss"] for h in got.history]
    assert len(losses) == 8 and losses[-1] < 0.85 * losses[0], losses
    assert got.test_accuracy >= 0.25, got.test_accuracy


def test_rerun_reuses_a_matching_checkpoint(checkpoint):
    again = train(checkpoint.checkpoint, model_cfg=tiny_cfg(), cfg=QUICK)
    assert again.reused and again.test_accuracy == checkpoint.test_accuracy


def test_training_is_deterministic(checkpoint, tmp_path):
    again = train(tmp_path / "again", model_cfg=tiny_cfg(), cfg=QUICK)
    first = json.loads((checkpoint.checkpoint / CONFIG_FILE).read_text())["weights_sha256"]
    second = json.loads((again.checkpoint / CONFIG_FILE).read_text())["weights_sha256"]
    assert first == second


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at .*does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_corrupt_config_is_a_clear_error(checkpoint, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoint.checkpoint, bad)
    (bad / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="is corrupt"):
        load_checkpoint(bad)


def test_corrupt_weights_are_a_clear_error(checkpoint, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoint.checkpoint, bad)
    data = (bad / WEIGHTS_FILE).read_bytes()
    (bad / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="does not match its config"):
        load_checkpoint(bad)


def test_incomplete_checkpoint_names_the_missing_file(checkpoint, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoint.checkpoint, bad)
    (bad / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"missing {WEIGHTS_FILE}"):
        load_checkpoint(bad)


def test_corrupt_retrain_is_not_reused(checkpoint, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoint.checkpoint, bad)
    (bad / WEIGHTS_FILE).write_bytes(b"garbage")
    result = train(bad, model_cfg=tiny_cfg(), cfg=QUICK)
    assert not result.reused
    load_checkpoint(bad)  # valid again


def test_cli_refuses_a_file_as_checkpoint_dir_without_a_traceback(tmp_path):
    target = tmp_path / "x"
    target.write_text("not a checkpoint")
    proc = subprocess.run(
        [sys.executable, "-m", "quantgate", "train", "--out", str(target)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "is a file" in proc.stderr
    assert target.read_text() == "not a checkpoint"


def test_out_that_is_not_a_checkpoint_is_refused_unless_forced(cli, tmp_path):
    out = tmp_path / "mydata"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    r = cli("train", "--out", out)
    assert r.code == 2
    assert "not a checkpoint; refusing to replace it" in " ".join(r.stderr.split())
    assert (out / "notes.txt").read_text() == "precious"

    train(out, model_cfg=tiny_cfg(), cfg=QUICK, force=True)
    load_checkpoint(out)
    assert not (out / "notes.txt").exists()


def test_config_without_its_training_settings_is_retrained(checkpoint, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoint.checkpoint, bad)
    info = json.loads((bad / CONFIG_FILE).read_text())
    del info["train"]
    (bad / CONFIG_FILE).write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="is corrupt .*no 'train' key"):
        load_checkpoint(bad)
    assert not train(bad, model_cfg=tiny_cfg(), cfg=QUICK).reused
    load_checkpoint(bad)  # valid again


def test_out_that_cannot_be_written_is_refused_before_training(tmp_path):
    (tmp_path / "afile").write_text("")
    steps = []
    with pytest.raises(CheckpointError, match="afile is not a directory. Choose another --out"):
        train(
            tmp_path / "afile" / "ckpt",
            model_cfg=tiny_cfg(),
            cfg=QUICK,
            on_step=lambda *a: steps.append(a),
        )
    assert steps == []  # refused before any training, not after it


def test_a_failed_checkpoint_write_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("quantgate.model.train.torch.save", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*nothing was changed") as e:
        train(tmp_path / "ckpt", model_cfg=tiny_cfg(), cfg=QUICK)
    assert list(tmp_path.iterdir()) == []
    assert exit_code(e.value) == 1  # a full disk, as the README's exit codes say


def test_force_never_replaces_the_directory_training_runs_in(tmp_path, monkeypatch):
    """`quantgate train --out . --force` would rename the checkpoint over the work."""
    (tmp_path / "notes.txt").write_text("precious")
    monkeypatch.chdir(tmp_path)
    steps = []
    for out in (Path("."), tmp_path.parent):
        with pytest.raises(CheckpointError, match="refusing .even with --force"):
            train(out, force=True, on_step=lambda *a: steps.append(a))
    assert not steps and (tmp_path / "notes.txt").read_text() == "precious"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One tiny training run, with its per-step losses and the caller's RNG state around it."""
    import torch

    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()
    steps = []
    out = tmp_path_factory.mktemp("recorded") / "digits"
    result = train(out, model_cfg=tiny_cfg(), cfg=QUICK, on_step=lambda *a: steps.append(a))
    return result, steps, rng_before, torch.get_rng_state()


def test_train_leaves_the_callers_global_rng_alone(recorded):
    import torch

    _, _, before, after = recorded
    assert torch.equal(before, after)


def test_loading_a_checkpoint_leaves_the_callers_rng_and_default_dtype_alone(recorded):
    """A reused checkpoint (train() finding it there, an export reading it) drew its model's
    throwaway initialisation from the caller's global RNG, and under the caller's default
    dtype made a float64 model that no exporter validated."""
    import torch

    result, _, _, _ = recorded
    torch.manual_seed(7)
    before = torch.get_rng_state()
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model, _ = load_checkpoint(result.checkpoint)
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(dtype)
    assert torch.equal(before, torch.get_rng_state())
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_history_is_each_epochs_mean_loss_over_every_image(recorded):
    result, steps, _, _ = recorded
    n = len(load_digits_splits()["train"])
    sizes = [min(QUICK.batch_size, n - i) for i in range(0, n, QUICK.batch_size)]
    assert [s[:2] for s in steps] == [(i + 1, len(sizes)) for i in range(len(sizes))]
    want = sum(loss * size for (_, _, loss), size in zip(steps, sizes, strict=True)) / n
    assert result.history == [{"epoch": 1, "loss": pytest.approx(want, rel=1e-9)}]


def test_checkpoint_round_trip_gives_the_trained_models_accuracy(checkpoint):
    from quantgate.model.train import accuracy

    model, info = load_checkpoint(checkpoint.checkpoint)
    assert not model.training  # dropout off
    test = load_digits_splits()["test"]
    got = accuracy(model, test.input_ids, test.attention_mask, test.labels)
    assert got == info["metrics"]["test_accuracy"] == checkpoint.test_accuracy


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(epochs=0), "epochs must be an integer >= 1, got 0"),
        (dict(batch_size=0, lr=-1.0), "batch_size must be an integer >= 1, got 0; lr must be"),
        (dict(warmup=1.0), r"warmup must be a fraction of the steps in \[0, 1\), got 1.0"),
        (dict(threads=0), "threads must be an integer >= 1, got 0"),
        # torch seeds with the low 32 bits: 2**32 trained seed 0's weights as a new model,
        # and 2**64 was a traceback
        (dict(seed=2**32), r"seed must be an integer in \[0, 2\*\*32\), got 4294967296"),
        (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*32\), got -1"),
    ],
)
def test_invalid_training_config_is_refused_listing_every_problem(changes, message):
    from quantgate.errors import ConfigError

    with pytest.raises(ConfigError, match=f"invalid training config: {message}"):
        TrainConfig(**changes)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(n_classes=5), "n_classes 5 != 10"),
        (dict(max_seq_len=32), "max_seq_len 32 < 64"),
        (dict(vocab_size=10, pad_id=0), "vocab_size 10 < 18"),
    ],
)
def test_model_that_does_not_fit_the_digits_is_refused_before_training(tmp_path, changes, message):
    import dataclasses

    from quantgate.errors import ConfigError

    steps = []
    with pytest.raises(ConfigError, match=f"does not fit the digits task: {message}"):
        train(
            tmp_path / "ckpt",
            model_cfg=dataclasses.replace(tiny_cfg(), **changes),
            cfg=QUICK,
            on_step=lambda *a: steps.append(a),
        )
    assert steps == [] and not (tmp_path / "ckpt").exists()


def test_checkpoint_whose_config_holds_a_float_size_is_corrupt(checkpoint, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoint.checkpoint, bad)
    info = json.loads((bad / CONFIG_FILE).read_text())
    info["model"]["d_model"] = 16.0
    (bad / CONFIG_FILE).write_text(json.dumps(info))
    with pytest.raises(
        CheckpointError, match="config.json is corrupt .*d_model must be an integer"
    ):
        load_checkpoint(bad)


@pytest.mark.parametrize("epochs", [1, 2, 25])
def test_every_run_warms_up_to_its_peak_rate_and_decays(epochs):
    """The warm-up is a fraction of the run: 50 of the default 500 steps, 2 of 20 in one epoch
    (a fixed 50 steps would leave a short run below its peak rate throughout)."""
    from quantgate.model.train import learning_rate

    cfg = TrainConfig(epochs=epochs)
    total = epochs * 20  # 1,237 images in batches of 64
    rates = [learning_rate(cfg, step, total) for step in range(total)]
    peak = rates.index(max(rates))
    assert max(rates) == pytest.approx(cfg.lr) and peak == round(0.1 * total) - 1
    assert rates[:peak] == sorted(rates[:peak]) and rates[peak:] == sorted(rates[peak:])[::-1]
    assert rates[-1] < 0.01 * cfg.lr
