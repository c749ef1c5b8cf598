"""Fixtures shared by every test package."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run ``quantgate ARGS...`` through the real entry point, exit-code mapping included."""
    from quantgate.cli import main

    def run(*args) -> CliResult:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["quantgate", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run
