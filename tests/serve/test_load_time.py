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


def test_a_queue_longer_than_the_shutdown_grace_is_warned_about_at_the_warm_up(repo, caplog):
    """A full queue of full batches that already outlasts the grace at the warm-up's short
    rows: a stop would cut off requests it admitted. Said once the warm-up measured it, with
    the figures and the two flags; at the defaults the tiny models' queue is a fraction of
    a second, and nothing is said."""
    model = open_model(repo / "classifier", ServeConfig(path=repo), CPU)
    caplog.set_level(logging.WARNING, logger="quantgate.serve")
    Engine(Repository([model]), ServeConfig(path=repo)).warm_up()
    assert not [r for r in caplog.records if "full queue" in r.getMessage()]

    cfg = ServeConfig(path=repo, shutdown_grace_s=0.001, max_queue_size=1000, instances=2)
    Engine(Repository([model]), cfg).warm_up()
    (said,) = [r.getMessage() for r in caplog.records if "full queue" in r.getMessage()]
    found = re.search(r"a full queue \(1000 requests of 32 rows\) is at least (\S+) s of work \("
                      r"a batch of 32 rows of sequence (\d+) ran in (\S+) ms, 2 instance\(s\)\), "
                      r"longer than the shutdown grace of 0.001 s", said)  # fmt: skip
    assert found, said
    # 500 waves of a batch each (two instances): the bound is the batch's time times 500
    assert float(found[1]) == pytest.approx(500 * float(found[3]) / 1e3, rel=0.01)
    assert "Lower --max-queue-size or raise --shutdown-grace" in said
