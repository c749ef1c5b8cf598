"""Configs made from Python are checked against their own annotations as they are made:
a wrong type is named with its field at once, not met minutes later as a TypeError deep
in the pipeline; conversions that lose nothing are made."""

import inspect
from pathlib import Path

import numpy as np
import pytest

from quantgate.errors import ConfigError, ConfigTypeError
from quantgate.export import ExportConfig, Exporter
from quantgate.quantize import GateConfig, QuantConfig
from quantgate.serve import ServeConfig


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ExportConfig(opset="17"), "ExportConfig: opset: expected a whole number, found str '17'"),
        (lambda: ExportConfig(atol="1e-4"), "atol: expected a number, found str '1e-4'"),
        (lambda: ExportConfig(exporter="onnx"), "exporter: expected one of 'auto', 'legacy', 'dynamo'"),
        (lambda: ExportConfig(name="m\nlistening on :1"), r"name 'm\nlistening on :1': expected a non-empty name without control"),
        # served, then no probe could ask for it: /v2/models/a/b/ready is 404
        (lambda: ExportConfig(name="a/b"), "name 'a/b': a model's name is one path segment, without '/'"),
        (lambda: GateConfig(iterations=5.5), "GateConfig: iterations: expected a whole number, found float 5.5"),
        (lambda: GateConfig(batch_sizes=32), "batch_sizes: expected a tuple (or list) of whole numbers, found int 32"),
        (lambda: GateConfig(batch_sizes=(1.7,)), "found tuple (1.7,)"),  # not silently 1
        (lambda: GateConfig(min_speedup=True), "min_speedup: expected a number, found bool True"),
        (lambda: GateConfig(eval_samples="all"), "eval_samples: expected a whole number or None"),
        (lambda: GateConfig(provider="tpu"), "provider 'tpu': expected 'cpu', 'cuda' or an ONNX Runtime"),  # at regate, before
        (lambda: QuantConfig(max_candidates=2.5), "QuantConfig: max_candidates: expected a whole number"),
        (lambda: QuantConfig(recipes=("a", 1)), "recipes: expected a tuple (or list) of strings"),
        (lambda: ServeConfig(path="b", port="8001"), "ServeConfig: port: expected a whole number"),
    ],
)  # fmt: skip
def test_a_value_of_the_wrong_type_is_named_with_its_field(make, message):
    with pytest.raises(ConfigError) as err:
        make()
    assert message in str(err.value)


def test_every_field_of_the_wrong_type_is_named_at_once():
    with pytest.raises(ConfigError, match="min_speedup: .*; batch_sizes: .*; iterations: "):
        GateConfig(min_speedup="1.2", batch_sizes=32, iterations=5.5)


def test_values_that_lose_nothing_are_converted():
    g = GateConfig(batch_sizes=[1, np.int64(8)], min_speedup=np.float32(1.5), iterations=4)
    assert g.batch_sizes == (1, 8) and all(type(b) is int for b in g.batch_sizes)
    assert type(g.min_speedup) is float and g.min_speedup == 1.5
    assert GateConfig(batch_sizes=np.array([2, 4])).batch_sizes == (2, 4)
    (eight,) = GateConfig(batch_sizes=(np.int64(8),)).batch_sizes  # a tuple's items too
    assert type(eight) is int and eight == 8
    from quantgate.quantize.cuda import CudaGateConfig

    assert CudaGateConfig(throughput=[64, 128]).throughput == (64, 128)
    with pytest.raises(ConfigError, match="throughput: expected a tuple .* of 2: a whole"):
        CudaGateConfig(throughput=(1, 2, 3))
    assert GateConfig(provider="cuda").provider == "CUDAExecutionProvider"  # as --device says
    # one recipe by name, not its letters
    assert QuantConfig(recipes="smooth-static-u8s8").recipes == ("smooth-static-u8s8",)
    assert QuantConfig(recipes=["a", "b"]).recipes == ("a", "b")
    assert ExportConfig(exporter="legacy").exporter is Exporter.LEGACY
    assert ServeConfig(path="bundles/digits").path == Path("bundles/digits")
    assert QuantConfig(fp16=np.bool_(False)).fp16 is False
    assert type(GateConfig(min_speedup=2).min_speedup) is float  # as np.int64(2) becomes


def test_only_conversions_that_lose_nothing_are_made():
    from fractions import Fraction

    with pytest.raises(ConfigError, match="min_speedup: expected a number, found Fraction"):
        GateConfig(min_speedup=Fraction(4, 3))
    with pytest.raises(ConfigError, match="auth_token_file: expected a path or None, found str"):
        ServeConfig(path="b", auth_token_file="")  # Path("") would be the current directory


def test_a_config_passed_as_a_dict_is_refused_with_how_to_make_one(tmp_path):
    from quantgate.export import export
    from quantgate.quantize import build

    with pytest.raises(TypeError, match=r"gate_cfg: expected a GateConfig, found dict; .*"
                       r"gate_cfg=GateConfig\(\*\*settings\)"):  # fmt: skip
        build("model", tmp_path / "b", gate_cfg={"min_speedup": 1.1})
    with pytest.raises(TypeError, match="cfg: expected an ExportConfig, found dict"):
        export("model", tmp_path / "b", cfg={"opset": 17})
    assert not (tmp_path / "b").exists()


def test_help_on_a_config_tells_each_field_with_the_comments_beside_it():
    """A library user's help(ServeConfig) showed the dataclass's signature and nothing of
    what a field means, which lived only in source comments."""
    import pydoc

    from quantgate.serve.config import ServeConfig

    assert "|  Fields:" in pydoc.render_doc(GateConfig, renderer=pydoc.plaintext)
    gate = " ".join(inspect.getdoc(GateConfig).split())
    assert "Fields: max_accuracy_drop: float = 1.0 points of the task metric (percent)" in gate
    # the comment above a field, and one that spans lines
    assert "ci_rule: str = 'point' Which value decides a gate with an interval:" in gate
    assert "(upper for a drop or KL, lower for cosine or agreement). Speed gates" in gate
    served = " ".join(inspect.getdoc(ServeConfig).split())
    assert "cuda_device_id: int = 0 which GPU (as CUDA numbers them;" in served
    assert "-- CUDA execution provider" not in served  # a section's heading, no field's
    assert "tls: TLSConfig | None = None auth_token: str | None = None required as" in served
    assert ServeConfig(path="b").__doc__ == ServeConfig.__doc__


def test_a_misspelt_field_is_answered_with_the_field_it_probably_means():
    """``config_class`` on a config: a keyword that is no field names the closest one (or
    the one it is a prefix of), as a config file's unknown setting does; the rest of the
    config is made and checked as before, and ``replace`` still works."""
    import dataclasses

    from quantgate.configs import check_fields, config_class

    @config_class
    @dataclasses.dataclass(frozen=True)
    class Thresholds:
        min_speedup: float = 1.2
        min_top1_agreement: float = 0.95

        def __post_init__(self):
            check_fields(self)

    with pytest.raises(ConfigTypeError) as err:  # a ConfigError, and the TypeError Python says
        Thresholds(min_speedp=1.1)
    assert isinstance(err.value, TypeError) and isinstance(err.value, ConfigError)
    assert str(err.value) == (
        "Thresholds: unknown field 'min_speedp' (did you mean 'min_speedup'?); its fields: "
        "min_speedup, min_top1_agreement"
    )
    with pytest.raises(TypeError, match=r"fields 'min_top1' \(did you mean 'min_top1_agreement'"
                       r"\?\), 'zzz'; its fields"):  # fmt: skip
        Thresholds(min_top1=0.9, zzz=1)
    made = Thresholds(1.5, min_top1_agreement=0.9)
    assert made == Thresholds(min_speedup=1.5, min_top1_agreement=0.9)
    assert dataclasses.replace(made, min_speedup=2).min_speedup == 2.0  # check_fields ran
    with pytest.raises(ConfigError, match="min_speedup: expected a number"):
        Thresholds(min_speedup="fast")


def test_every_stage_config_names_the_field_a_misspelt_keyword_means():
    from quantgate.export import ExportConfig
    from quantgate.quantize import GateConfig, QuantConfig
    from quantgate.serve import ServeConfig

    for config, wrong, meant in (
        (GateConfig, {"min_speedp": 1.1}, "min_speedup"),
        (QuantConfig, {"search_budget": 60}, "search_budget_s"),
        (ExportConfig, {"atl": 1e-3}, "atol"),
        (ServeConfig, {"path": "b", "max_batch": 8}, "max_batch_size"),
    ):
        with pytest.raises(TypeError, match=f"did you mean '{meant}'"):
            config(**wrong)


def test_a_model_that_is_no_model_is_a_quantgate_error_and_a_type_error(tmp_path):
    from quantgate.errors import ConfigTypeError
    from quantgate.export import export

    with pytest.raises(ConfigTypeError, match=r"model: expected a path, .* found int") as e:
        export(42, tmp_path / "b", on_progress=None)  # None: no progress, as build takes it
    assert isinstance(e.value, TypeError) and not (tmp_path / "b").exists()


def test_an_empty_name_is_the_out_folders_as_before():
    assert ExportConfig(name="").name == ""
