"""Provider selection, silent CUDA fall-back, per-provider variant choice, the load-time
placement check and CUDA session options of the server, on a CPU-only onnxruntime."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import pytest

from quantgate import bundle as qb
from quantgate.bundle import CPU, CUDA
from quantgate.errors import BundleError, ConfigError, ServeError
from quantgate.export import ExtraVariant, write_bundle
from quantgate.placement import PlacementReport
from quantgate.quantize import fp16
from quantgate.quantize.search import QuantConfig
from quantgate.serve import runtime
from quantgate.serve.config import ServeConfig
from quantgate.serve.runtime import open_model, placement_refusal
from quantgate.serve.variants import choose_provider, choose_variant, provider_options

from .conftest import ids_feed

FP16_COSINE = QuantConfig().fp16_min_cosine

needs_cpu_only_ort = pytest.mark.skipif(
    CUDA in ort.get_available_providers(), reason="this onnxruntime has CUDA"
)


@pytest.fixture(scope="module")
def gpu_bundle(tiny_bert_export, tmp_path_factory):
    """FP32 + FP16 (for CUDA, accuracy-gated only: made without a GPU) + a stand-in INT8."""
    work = tmp_path_factory.mktemp("bundle")
    f16 = fp16.save(fp16.to_fp16(tiny_bert_export.onnx), work / "fp16.onnx")
    fid = fp16.fidelity(
        tiny_bert_export.onnx,
        f16,
        [ids_feed([t.name for t in tiny_bert_export.inputs])],
        precision="fp16",
    )
    speed = qb.GateResult("speedup_b32_s128", 1.8, 1.2, ">=", True, provider=CPU)
    return write_bundle(
        tiny_bert_export,
        work / "bundle",
        variants=[
            ExtraVariant(f16, "fp16", gates=fid.gates(min_cosine=FP16_COSINE), providers=(CUDA,)),
            # the FP32 file again, standing in for an INT8 that passed on the CPU
            ExtraVariant(tiny_bert_export.onnx, "int8", gates=(speed,), not_for=(CUDA,)),
        ],
    )


def test_cuda_requested_without_the_provider_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    with pytest.raises(ServeError, match="Install onnxruntime-gpu"):
        choose_provider("cuda")


def test_auto_without_cuda_serves_on_the_cpu_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    with caplog.at_level(logging.INFO, logger="quantgate.serve.variants"):
        assert choose_provider("auto") == CPU
    assert "serving on the CPU" in caplog.text
    assert choose_provider("cpu") == CPU


def test_variant_per_provider_fp16_on_cuda_int8_on_cpu(gpu_bundle):
    m = gpu_bundle.manifest
    assert choose_variant(m, CUDA).precision == "fp16"  # no CUDA speed evidence: preferred
    assert choose_variant(m, CPU).precision == "int8"  # measured 1.8x on the CPU
    with pytest.raises(BundleError, match="not meant for CUDAExecutionProvider"):
        choose_variant(m, CUDA, precision="int8")  # not_for CUDA
    with pytest.raises(BundleError, match="not meant for CPUExecutionProvider"):
        choose_variant(m, CPU, precision="fp16")


def test_measured_cuda_speed_beats_the_preference(gpu_bundle):
    m = gpu_bundle.manifest
    fast = qb.GateResult("speedup_b128_s128", 1.9, 1.2, ">=", True, provider=CUDA)
    int8 = qb.Variant("x.onnx", "int8", "0", providers=(CUDA,), gates=(fast,))
    fp16_v = m.variant("fp16")
    slow16 = qb.GateResult("speedup_b128_s128", 1.3, 1.2, ">=", True, provider=CUDA)
    fp16_v = qb.Variant(**{**fp16_v.__dict__, "gates": (*fp16_v.gates, slow16)})
    m2 = qb.Manifest(**{**m.__dict__, "variants": (m.variant("fp32"), fp16_v, int8)})
    assert choose_variant(m2, CUDA).precision == "int8"


@needs_cpu_only_ort
def test_cuda_session_that_silently_lands_on_the_cpu_is_caught(gpu_bundle, monkeypatch, caplog):
    # onnxruntime-gpu lists CUDA where its libraries are missing, then builds a CPU session;
    # asking this CPU-only ORT for CUDA does exactly that, for real.
    cfg = ServeConfig(path=gpu_bundle.path, device="cuda")
    with pytest.raises(ServeError, match="failed to load"):
        open_model(gpu_bundle.path, cfg, CUDA)
    cfg = ServeConfig(path=gpu_bundle.path, device="auto")
    with caplog.at_level(logging.WARNING, logger="quantgate.serve.runtime"):
        model = open_model(gpu_bundle.path, cfg, CUDA)
    assert model.provider == CPU and model.variant.precision == "int8"  # re-chosen for the CPU
    assert "serving on the CPU" in caplog.text


def placed(memcpy: int = 0, **fallen_back: int) -> PlacementReport:
    """A CUDA session's report with ``memcpy`` copies and ``fallen_back`` CPU op counts."""
    return PlacementReport(
        CUDA,
        (CUDA, CPU),
        nodes=40,
        memcpy=memcpy,
        to_host=memcpy,
        from_host=0,
        fallen_back=fallen_back,
    )


def with_gate(variant: qb.Variant, provider: str) -> qb.Variant:
    speed = qb.GateResult("speedup_b128_s128", 1.9, 1.2, ">=", True, provider=provider)
    return qb.Variant(**{**variant.__dict__, "gates": (*variant.gates, speed)})


def test_a_variant_that_falls_back_is_refused_unless_a_cuda_speed_gate_vouches(gpu_bundle):
    fp16_v, fp32_v = gpu_bundle.manifest.variant("fp16"), gpu_bundle.manifest.variant("fp32")
    int8_cpu = placed(2, MatMulInteger=1)
    assert placement_refusal(fp16_v, CUDA, placed()) is None
    assert placement_refusal(fp16_v, CUDA, None) is None  # the CPU provider: no report
    why = placement_refusal(fp16_v, CUDA, int8_cpu)
    assert "MatMulInteger x1" in why and "2 memcpy" in why
    assert placement_refusal(fp32_v, CUDA, int8_cpu) is None  # the reference
    assert placement_refusal(with_gate(fp16_v, CUDA), CUDA, int8_cpu) is None
    assert placement_refusal(with_gate(fp16_v, CPU), CUDA, int8_cpu) is not None


def test_only_cpu_nodes_fp32_does_not_have_count_against_a_variant(gpu_bundle):
    """ORT puts small shape computations on the CPU on purpose, for FP32 as well."""
    fp16_v = gpu_bundle.manifest.variant("fp16")
    shapes = placed(Shape=1, Gather=2)
    assert placement_refusal(fp16_v, CUDA, shapes) is not None  # against a clean placement
    assert placement_refusal(fp16_v, CUDA, shapes, shapes) is None
    why = placement_refusal(fp16_v, CUDA, placed(Shape=1, Gather=2, Cast=4), shapes)
    assert "FP32 has 0 memcpy and no Cast on the CPU" in why
    assert placement_refusal(fp16_v, CUDA, placed(2, Shape=1), shapes) is not None


@needs_cpu_only_ort
def test_the_server_opens_fp32_instead_of_a_variant_that_falls_back(gpu_bundle, caplog):
    """The load-time check of open_model on real sessions: asked for CUDA, this onnxruntime
    builds CPU sessions, every node of them on the CPU by ORT's own record. open_model
    catches that earlier and serves the CPU; the check is called here as open_model calls
    it on a GPU where FP16 (accuracy-gated, no CUDA speed gate) fell back."""
    fp16_v = gpu_bundle.manifest.variant("fp16")
    cfg = ServeConfig(path=gpu_bundle.path, device="cuda")
    opened = runtime._session(gpu_bundle, fp16_v, cfg, CUDA)
    report = opened.report
    assert report.falls_back and report.method == "ep-assignment"
    with caplog.at_level(logging.WARNING, logger="quantgate.serve.runtime"):
        variant, served = runtime._placement_checked(gpu_bundle, cfg, CUDA, fp16_v, opened)
    served_report = served.report
    assert variant.precision == "fp32" and served.session is not opened.session
    assert served_report.provider == CUDA and served_report is not report
    [refusal] = [r.getMessage() for r in caplog.records if "not serving" in r.getMessage()]
    assert f"fp16 ({fp16_v.file}) on {CUDA}" in refusal and report.reason() in refusal
    assert f"serving fp32 ({variant.file}) instead" in refusal
    # FP32 falls back as well here: it is served all the same, with a warning
    assert f"{variant.file} on {CUDA}: {served_report.reason()}; expect it" in caplog.text

    asked = ServeConfig(path=gpu_bundle.path, device="cuda", precision="fp16")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="quantgate.serve.runtime"):
        variant, served = runtime._placement_checked(gpu_bundle, asked, CUDA, fp16_v, opened)
    assert variant == fp16_v and served is opened
    assert "as --precision asks" in caplog.text and report.reason() in caplog.text


def test_io_binding_gives_the_same_outputs(gpu_bundle):
    plain = open_model(gpu_bundle.path, ServeConfig(path=gpu_bundle.path, device="cpu"), CPU)
    bound = open_model(
        gpu_bundle.path, ServeConfig(path=gpu_bundle.path, device="cpu", io_binding="on"), CPU
    )
    assert bound.io_binding and not plain.io_binding  # auto: off on the CPU
    feed = ids_feed([t.name for t in plain.inputs], batch=3, seq=9)
    a, b = plain.run(feed), bound.run(feed)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert bound.run(feed, outputs=(plain.outputs[0].name,)).keys() == {plain.outputs[0].name}


def test_cuda_options_reach_the_provider_and_bad_ones_are_refused(tmp_path):
    cfg = ServeConfig(path=tmp_path, cuda_device_id=1, gpu_mem_limit=2 << 30)
    (name, opts), cpu = provider_options(cfg, CUDA)
    assert (name, cpu) == (CUDA, CPU)
    assert opts["device_id"] == "1" and opts["gpu_mem_limit"] == str(2 << 30)
    assert opts["arena_extend_strategy"] == "kSameAsRequested"
    assert opts["cudnn_conv_algo_search"] == "HEURISTIC" and "enable_cuda_graph" not in opts
    assert provider_options(cfg, CPU) == [CPU]
    with pytest.raises(ConfigError, match="arena_extend_strategy"):
        ServeConfig(path=tmp_path, arena_extend_strategy="grow")
    with pytest.raises(ConfigError, match="io_binding"):
        ServeConfig(path=tmp_path, io_binding="yes")


@pytest.fixture
def no_temp_folder(monkeypatch):
    """$TMPDIR, /tmp and the rest of Python's candidates unusable, as on a read-only root
    filesystem: ``tempfile.gettempdir`` raises what Python raises there."""
    import tempfile

    def none_usable():
        raise FileNotFoundError(2, "No usable temporary directory found in ['/tmp', '/var/tmp']")

    monkeypatch.setattr(tempfile, "gettempdir", none_usable)
    monkeypatch.setattr(runtime, "_no_folder_said", False)


def test_no_temporary_folder_serves_on_cuda_without_the_placement_check(
    gpu_bundle, no_temp_folder, caplog
):
    """A read-only root filesystem with no writable /tmp: the CUDA session is built without
    the optimized copy the placement check reads, with one WARNING that says why and what
    to do, instead of failing the server's start. (This onnxruntime builds CPU sessions when
    asked for CUDA, through the same code as a GPU's.)"""
    fp16_v = gpu_bundle.manifest.variant("fp16")
    cfg = ServeConfig(path=gpu_bundle.path, device="cuda")
    with caplog.at_level(logging.WARNING, logger="quantgate.serve.runtime"):
        opened = runtime._session(gpu_bundle, fp16_v, cfg, CUDA)
        again = runtime._session(gpu_bundle, fp16_v, cfg, CUDA)  # another model: said once
    assert opened.report is None and again.report is None
    feed = ids_feed([i.name for i in opened.session.get_inputs()])
    assert opened.session.run(None, feed)[0].shape[0] == 2  # a session that serves
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    said = warning.getMessage()
    assert "No usable temporary directory found" in said, said
    assert "every model is served without the check" in said, said
    assert "mount a writable /tmp" in said and "TMPDIR" in said, said
    # and the placement rules read no report as nothing to refuse
    assert runtime.placement_refusal(fp16_v, CUDA, opened.report) is None


def test_a_missing_tmpdir_is_no_temporary_folder(tmp_path, monkeypatch, caplog):
    """TMPDIR naming a folder that does not exist (as Python has it once chosen)."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))
    monkeypatch.setattr(runtime, "_no_folder_said", False)
    with (
        caplog.at_level(logging.WARNING, logger="quantgate.serve.runtime"),
        runtime.placement_folder() as folder,
    ):
        assert folder is None
    assert "no temporary folder can be made" in caplog.text, caplog.text


def test_the_placement_folder_is_made_and_removed(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with runtime.placement_folder() as folder:
        assert folder.is_dir() and folder.parent == tmp_path
        assert folder.name.startswith(runtime.PLACEMENT_PREFIX)
    assert not folder.exists() and list(tmp_path.iterdir()) == []


def test_an_optimized_copy_that_cannot_be_written_is_not_fatal(gpu_bundle, monkeypatch, caplog):
    """A /tmp too small for the optimized copy (ORT fails the session with "SystemError :
    <errno>", 2 for the missing folder here): the session is opened again without it, and
    served unchecked, with a WARNING."""
    from quantgate import placement

    record = placement.record

    def unwritable(options, folder):
        record(options, folder)
        options.optimized_model_filepath = str(folder / "missing" / "optimized.onnx")

    monkeypatch.setattr(placement, "record", unwritable)
    fp16_v = gpu_bundle.manifest.variant("fp16")
    cfg = ServeConfig(path=gpu_bundle.path, device="cuda")
    with caplog.at_level(logging.WARNING, logger="quantgate.serve.runtime"):
        opened = runtime._session(gpu_bundle, fp16_v, cfg, CUDA)
    assert opened.report is None
    assert f"{fp16_v.file}'s nodes" in caplog.text and "could not write it into" in caplog.text
    assert "it is served without the check" in caplog.text, caplog.text
