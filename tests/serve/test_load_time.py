"""quantgate_model_load_seconds: how long each model took to load (its bundle read and
verified, its session built, its warm-up), in the metrics and the log."""

from __future__ import annotations

import logging
import re

import pytest
from conftest import ServerProcess
from helpers import metric
from prometheus_client import generate_latest

from quantgate.bundle import CPU
from quantgate.serve.config import ServeConfig
from quantgate.serve.engine import Engine
from quantgate.serve.repository import Repository
from quantgate.serve.runtime import open_model

LOADED = re.compile(r"(\S+) version (\S+): loaded in (\S+) s \((\S+) s its bundle")


def _load_seconds(engine: Engine, model: str) -> float:
    text = generate_latest(engine.metrics.registry).decode()
    found = re.search(rf'^quantgate_model_load_seconds\{{model="{model}",version="1"\}} (\S+)$',
                      text, re.M)  # fmt: skip
    assert found, text
    return float(found[1])


def test_a_models_load_time_is_its_opening_then_its_warm_up_too(repo, caplog):
    """Before the warm-up the series is the bundle's and session's time (a scrape during a
    long warm-up has it), after it the warm-up's runs are added; the log says both."""
    caplog.set_level(logging.INFO, logger="quantgate.serve")
    model = open_model(repo / "classifier", ServeConfig(path=repo), CPU)
    assert model.load_s > 0
    opened = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded ")]
    # the time beside the name, before the notes (a dynamic INT8 one ended "... for answers
    # that repeat exactly in 0.02 s")
    assert opened == [
        f"loaded {model.name} v{model.version} in {model.load_s:.2f} s: {model.serving()}"
    ], opened

    engine = Engine(Repository([model]), ServeConfig(path=repo))
    assert _load_seconds(engine, model.name) == model.load_s
    engine.warm_up()
    loaded = _load_seconds(engine, model.name)
    assert loaded > model.load_s
    said = [LOADED.search(r.getMessage()) for r in caplog.records]
    (line,) = [m for m in said if m]
    assert line.groups()[:2] == (model.name, model.version), line
    assert float(line[3]) == pytest.approx(loaded, abs=0.006), (line[0], loaded)


def test_a_servers_metrics_have_each_models_load_time(repo):
    """Each model of a repository: its series, and the log's line of its load, alike."""
    srv = ServerProcess(repo, "--metrics-port", "0")
    try:
        lines = {(m[1], m[2]): float(m[3]) for m in LOADED.finditer(srv.log)}
        assert set(lines) == {("classifier", "1"), ("encoder", "1")}, srv.log
        for (name, version), said in lines.items():
            seconds = metric(srv, "quantgate_model_load_seconds", model=name, version=version)
            assert seconds > 0 and seconds == pytest.approx(said, abs=0.006), (name, seconds)
    finally:
        assert srv.terminate() == 0, srv.log
