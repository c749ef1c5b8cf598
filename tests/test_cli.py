"""The entry point: usage errors (click's message, exit 2, never a traceback), help, and
exit codes."""

from __future__ import annotations

import signal

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
    ],
)
def test_usage_errors_exit_2_with_the_reason(cli, args, message):
    r = cli(*args)
    assert r.code == 2
    assert message in r.stderr and "Traceback" not in r.stderr + r.stdout


@pytest.mark.parametrize("command", ["export", "gate"])
def test_help_shows_the_gate_defaults(cli, command):
    r = cli(command, "--help")
    assert r.code == 0
    text = " ".join(r.stdout.replace("│", " ").split())  # rich's box, unwrapped
    for default in ("[default: 1]", "[default: 1.2]", "[default: 0.99]", "[default: 0.95]"):
        assert default in text


def test_ctrl_c_exits_130(cli, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("quantgate.bundle.load", interrupted)
    assert cli("inspect", "bundle").code == 130


def test_sigterm_exits_143_through_the_cleanup_path(cli, monkeypatch):
    """SystemExit runs every `with` block's cleanup, where Python's default handler does not."""
    before = signal.getsignal(signal.SIGTERM)

    def terminated(*args, **kwargs):
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # what a delivered SIGTERM runs

    monkeypatch.setattr("quantgate.bundle.load", terminated)
    assert cli("inspect", "bundle").code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # restored for whoever called main()
