"""The entry point's usage errors: click's message and exit 2, never a traceback."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "bundle", "--no-such-option"], "No such option: --no-such-option"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["export"], "Missing argument"),
        (["serve", "bundle", "--port", "many"], "Invalid value for '--port'"),
    ],
)
def test_usage_errors_exit_2_with_the_reason(cli, args, message):
    r = cli(*args)
    assert r.code == 2
    assert message in r.stderr and "Traceback" not in r.stderr + r.stdout
