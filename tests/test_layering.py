"""The stages' import rules: data flows one way, and a serving host needs no torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# stage folder -> modules it must never import
FORBIDDEN = {
    "serve": (
        "torch",
        "quantgate.model",
        "quantgate.export",
        "quantgate.quantize",
        "transformers",
        "tritonclient",
    ),
    "quantize": ("quantgate.serve",),
    "export": ("quantgate.quantize", "quantgate.serve"),
    "model": ("quantgate.export", "quantgate.quantize", "quantgate.serve"),
}


def package_of(path: Path) -> str:
    """The package a file of this repository is in: serve/variants.py is in quantgate.serve
    (the stage folders are installed as quantgate.*)."""
    parts = path.resolve().relative_to(ROOT).parts[:-1]
    return ".".join(parts if parts[:1] == ("quantgate",) else ("quantgate", *parts))


def imported_modules(path: Path, package: str | None = None) -> set[str]:
    """Every module ``path`` imports, anywhere in it (a function's imports too), by its
    absolute name; a relative import is resolved against ``package`` (by default, the
    file's own)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module
            if node.level:  # `from ..quantize import decide` in quantgate.serve
                base = (package or package_of(path)).split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, *([module] if module else [])])
            assert module, ast.dump(node)
            # `from quantgate import quantize` imports quantgate.quantize: record both forms
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize("stage", sorted(FORBIDDEN))
def test_stage_imports_respect_the_data_flow(stage):
    files = sorted((ROOT / stage).rglob("*.py"))
    assert files, f"no Python files under {stage}/"
    offenders = [
        f"{f.relative_to(ROOT)} imports {name}"
        for f in files
        for name in imported_modules(f)
        if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[stage])
    ]
    assert not offenders, "\n".join(offenders)


# where each installed package's files are (pyproject's package-dir)
FOLDERS = {"quantgate": ROOT / "quantgate", "quantgate.model": ROOT / "model",
           "quantgate.export": ROOT / "export", "quantgate.quantize": ROOT / "quantize",
           "quantgate.serve": ROOT / "serve", "quantgate.protos": ROOT / "protos"}  # fmt: skip


def file_of(module: str) -> Path | None:
    """The file of this repository that is ``module`` (a package's __init__.py), if any."""
    packages = [p for p in FOLDERS if module == p or module.startswith(p + ".")]
    if not packages:
        return None
    package = max(packages, key=len)
    base = FOLDERS[package].joinpath(*module[len(package) :].split(".")[1:])
    return next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()), None)


def test_nothing_serve_imports_reaches_torch():
    """The stage rule above reads serve/'s own files; a core module they import (schema,
    fsutil, ...) that imported torch would pass it, and a serving host would need torch.
    Every quantgate module reachable from serve/, through imports anywhere in each file."""
    seen: set[Path] = set()
    todo = sorted((ROOT / "serve").glob("*.py"))
    reached: dict[str, Path] = {}
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        for name in imported_modules(f):
            reached.setdefault(name, f)
            if (g := file_of(name)) is not None and g not in seen:
                todo.append(g)
    assert ROOT / "quantgate" / "schema.py" in seen  # the walk leaves serve/
    offenders = [f"{reached[n].relative_to(ROOT)} imports {n}" for n in sorted(reached)
                 if n.split(".")[0] == "torch" or n.startswith(("quantgate.model", "quantgate.export"))]  # fmt: skip
    assert not offenders, "\n".join(offenders)


# Inside serve/, only the gRPC layer speaks protobuf: the engine, batcher, runtime and their
# counters stay importable next to tritonclient, whose generated modules register the same
# .proto file names (one process cannot hold both), so tests drive them in-process.
WIRE = ("server.py", "servicer.py", "codec.py", "client.py")


def test_only_the_grpc_layer_of_serve_imports_the_protos():
    offenders = [
        f"serve/{f.name} imports {name}"
        for f in sorted((ROOT / "serve").glob("*.py"))
        if f.name not in WIRE
        for name in imported_modules(f)
        if name.startswith("quantgate.protos")
    ]
    assert not offenders, "\n".join(offenders)


def test_the_checker_sees_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text(
        "import torch.nn\nfrom quantgate.model import train\nfrom quantgate import serve\n"
        "def late():\n    from ..quantize import decide\n    from . import codec\n"
    )
    assert imported_modules(f, "quantgate.serve") == {
        "torch.nn",
        "quantgate.model",
        "quantgate.model.train",
        "quantgate",
        "quantgate.serve",
        "quantgate.quantize",  # relative, inside a function: resolved, and seen
        "quantgate.quantize.decide",
        "quantgate.serve.codec",
    }
    assert package_of(ROOT / "serve" / "variants.py") == "quantgate.serve"
    assert package_of(ROOT / "quantgate" / "cli" / "serve.py") == "quantgate.cli"


def test_each_stage_offers_its_entry_points_without_importing_them():
    """``from quantgate.quantize import build``: every name a stage's ``__all__`` offers is
    there, and importing the packages alone loads neither torch nor onnxruntime (in a
    subprocess: quantgate.serve's Client loads protobuf symbols tritonclient's clash with)."""
    code = """
import importlib, sys
stages = ["quantgate.model", "quantgate.export", "quantgate.quantize", "quantgate.serve"]
packages = [importlib.import_module(s) for s in stages]
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "onnxruntime", "onnx"})
assert not heavy, heavy
for p in packages:
    assert p.__all__, p.__name__
    for name in p.__all__:
        assert getattr(p, name).__name__ == name, (p.__name__, name)
assert set(packages[2].__all__) <= set(dir(packages[2]))  # tab completion sees them
try:
    packages[-1].Nope
except AttributeError as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "module 'quantgate.serve' has no attribute 'Nope'"


@pytest.mark.slow
def test_the_package_type_checks():
    """mypy over the package as installed (scripts/typecheck.py, `make lint`): CI runs only
    the tests, and a type error is a wrong call or an unchecked None waiting for its input.
    About 17 s cold on 2 CPUs (torch's and transformers' annotations are skipped), a second
    with its cache."""
    pytest.importorskip("mypy")
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "typecheck.py")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Success: no issues found" in r.stdout, r.stdout


def test_the_command_lines_help_loads_no_numpy_nor_model_libraries():
    """`quantgate --help` (and every command's start) imported numpy for configs.py's
    isinstance checks: 44% of the start-up's imports, for values that are numpy's only where
    numpy is loaded already."""
    code = """
import sys
from quantgate.cli import run
sys.argv = ["quantgate", "--help"]
try:
    run()
except SystemExit as e:
    assert e.code == 0, e.code
heavy = {"numpy", "onnx", "onnxruntime", "torch", "grpc", "transformers"}
print(sorted({m.split(".")[0] for m in sys.modules} & heavy))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "[]", r.stdout[-300:]
