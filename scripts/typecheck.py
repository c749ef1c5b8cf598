"""Type-check quantgate with mypy (`make lint`), as the package is installed.

    python scripts/typecheck.py    # mypy's report, with the paths of this checkout

pyproject.toml maps folders of the checkout to subpackages (model/ is quantgate.model,
serve/ is quantgate.serve, ...). mypy reads packages from the source tree and cannot follow
that map, so it checks a view of the package made of symbolic links (under .mypy_cache/,
beside mypy's cache) and this script names each file in its report by its path here.
mypy's settings are pyproject's [tool.mypy].
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import mypy.api

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".mypy_cache"
VIEW = CACHE / "package-view"


def package_dirs() -> dict[str, Path]:
    """Each subpackage's folder in the checkout, as pyproject's package-dir says."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        mapping = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    return {package: ROOT / folder for package, folder in mapping.items()}


def make_view(dirs: dict[str, Path]) -> None:
    """VIEW/quantgate: quantgate/'s files, and a link per mapped subpackage's folder."""
    shutil.rmtree(VIEW, ignore_errors=True)
    top = VIEW / "quantgate"
    top.mkdir(parents=True)
    for entry in dirs["quantgate"].iterdir():
        if entry.name != "__pycache__":
            (top / entry.name).symlink_to(entry)
    for package, folder in dirs.items():
        if package != "quantgate":
            (top / package.removeprefix("quantgate.")).symlink_to(folder)


def main() -> int:
    dirs = package_dirs()
    make_view(dirs)
    os.chdir(VIEW)  # mypy names files relative to where it runs: quantgate/serve/x.py
    report, errors, code = mypy.api.run(
        ["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(CACHE)]
        + ["--python-executable", sys.executable, "-p", "quantgate"]
    )
    # quantgate/serve/x.py -> serve/x.py: the longest package first (quantgate/ is all of them)
    here = sorted(
        (
            (package.replace(".", "/") + "/", f"{folder.relative_to(ROOT)}/")
            for package, folder in dirs.items()
        ),
        key=lambda pair: -len(pair[0]),
    )
    for line in report.splitlines():
        prefix = next((p for p in here if line.startswith(p[0])), None)
        print(prefix[1] + line[len(prefix[0]) :] if prefix else line)
    print(errors, end="", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
