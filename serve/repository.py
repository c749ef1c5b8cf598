"""The repository of served models: what ``quantgate serve PATH`` opens, one bundle or a
folder of them, each model under its name and version.

This module never imports torch or quantgate.quantize: a serving host has neither.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator
from pathlib import Path

from quantgate import bundle as qb
from quantgate.errors import BadRequest, ModelNotFound, QuantgateError, ServeError, quoted
from quantgate.fsutil import gone_cwd
from quantgate.schema import printable_name, unprintable
from quantgate.serve.config import ServeConfig
from quantgate.serve.runtime import Model, open_model
from quantgate.serve.variants import choose_provider

# A version as a client may write it: Triton reads it with C's stol (spaces before it, a
# plus sign, leading zeros) into an int64, and refuses a negative one.
VERSION = re.compile(r"[ \t\n\v\f\r]*\+?0*([0-9]{1,19})")
MAX_VERSION = 2**63 - 1  # int64's, as Triton's


def parse_version(version: str) -> str | None:
    """A client's ``version`` as the number it names ("01" is "1"), None where empty (the
    newest). Raises BadRequest for one that is no version number, whatever the model: as
    Triton, which reads the version before it looks the model up."""
    if not version:
        return None
    number = VERSION.fullmatch(version)
    if number is not None and int(number[1]) <= MAX_VERSION:
        return str(int(number[1]))
    digits = version.lstrip(" \t\n\v\f\r").removeprefix("+")
    if digits.isascii() and digits.isdigit():  # a number, too large for int64
        raise BadRequest(
            f"version {quoted(version)} is out of range: a version number is at most "
            f"{MAX_VERSION}, or empty for the newest"
        )
    raise BadRequest(
        f"version {quoted(version)} is no version number; a version is a whole number "
        "(1, 2, ...), or empty for the newest"
    )


class Repository:
    """Every served model, by name and version."""

    def __init__(self, models: list[Model]):
        self._models: dict[str, dict[str, Model]] = {}
        for m in models:
            if m.version in self._models.setdefault(m.name, {}):
                raise ServeError(f"two bundles serve model {m.name!r} version {m.version}")
            self._models[m.name][m.version] = m

    def get(self, name: str, version: str = "") -> Model:
        """The model ``name`` at ``version`` (empty: the newest), read as a number as Triton
        reads it ("01" is 1). Raises ModelNotFound, or BadRequest for a version that is no
        number (``parse_version``: whatever the name)."""
        try:
            number = parse_version(version)
        except BadRequest as e:
            raise BadRequest(f"model {quoted(name)}: {e}") from None
        versions = self._models.get(name)
        if versions is None:
            raise ModelNotFound(
                f"unknown model {quoted(name)}; this server serves {sorted(self._models)}"
            )
        if number is None:
            return versions[max(versions, key=int)]
        if (found := versions.get(number)) is None:
            raise ModelNotFound(
                f"model {name!r} has no version {quoted(version)}; it has "
                f"{sorted(versions, key=int)}"
            )
        return found

    def __contains__(self, name: object) -> bool:
        """Whether a model of that name is served (at any version)."""
        return name in self._models

    def versions(self, name: str) -> list[str]:
        return sorted(self._models[name], key=int)

    def __iter__(self) -> Iterator[Model]:
        """Every model, by name, each name's versions in numeric order (2 before 10)."""
        for name in sorted(self._models):
            yield from (self._models[name][v] for v in self.versions(name))


def load_repository(cfg: ServeConfig) -> Repository:
    """Open what ``cfg.path`` holds: one bundle, or a repository folder.

    A repository holds one folder per model, named as clients will call it, that is
    either a bundle (its manifest's version) or holds one bundle per version folder::

        repo/digits/manifest.json ...        model "digits", the manifest's version
        repo/minilm/1/manifest.json ...      model "minilm", version 1 (the folder's name,
        repo/minilm/2/manifest.json ...      as in Triton: copy a bundle in as the next one)

    Every model folder is opened, and every problem found (a bundle that fails to load, a
    folder that holds no bundle, a version folder that is not a number) is listed in one
    ServeError: a server never starts without a model its repository names. Folders whose
    name starts with "." are skipped, and ``lost+found`` (the root of every ext4 volume).
    """
    root = Path(cfg.path)
    _check_root(root)  # before the provider is chosen (and logged): nothing to serve
    provider = choose_provider(cfg.device)
    if qb.is_bundle(root):
        return Repository([open_model(root, cfg, provider)])
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not qb.skipped_folder(p.name))
    versions = [p.name for p in folders if p.name.isdigit() and qb.is_bundle(p)]
    if versions:  # served as a repository, its versions would become models named "1", "2"
        raise ServeError(
            f"{root} holds version folders {versions}: it is the folder of one model, not a "
            f"repository. Serve the repository that holds it ({root.absolute().parent}), where "
            f"the model is called {root.absolute().name!r}, or one version's folder."
        )
    models, problems = [], []
    for folder in folders:
        try:
            models += _open_model_folder(folder, cfg, provider)
        except QuantgateError as e:
            problems.append(f"{shown(folder.name)}: {e}")
    if problems:
        raise ServeError(
            f"repository {root}: {len(problems)} of its model folders cannot be served; fix "
            "or move them out:\n" + "\n".join(f"  - {p}" for p in problems)
        )
    if not models:
        raise ServeError(
            f"{root} holds no bundle: expected {root}/manifest.json, {root}/NAME/manifest.json "
            f"or {root}/NAME/VERSION/manifest.json. Create one with `quantgate export`."
        )
    return Repository(models)


def unserved_folders(root: Path, served: Collection[tuple[str, str]]) -> list[str]:
    """The folders of the repository at ``root`` that a restart would open and the server
    does not serve (``served``: (name, version) pairs): a model folder added ("bert"), or a
    version folder ("minilm/2", also beside a model folder that is a bundle itself, which a
    restart refuses), found as ``load_repository`` finds them, no bundle read. A flat model
    folder's own version is its manifest's, which watch.BundleWatch looks at."""
    names = {name for name, _ in served}
    found = []
    try:
        for folder in sorted(
            p for p in root.iterdir() if p.is_dir() and not qb.skipped_folder(p.name)
        ):
            if folder.name not in names:
                found.append(shown(folder.name))
                continue
            found += [
                shown(f"{folder.name}/{sub.name}")
                for sub in sorted(folder.iterdir())
                if sub.is_dir() and qb.is_bundle(sub) and (folder.name, sub.name) not in served
            ]
    except OSError:  # a folder going while it is listed: the next look sees what stays
        return found
    return found


def _check_root(root: Path) -> None:
    """A ServeError, saying what to pass instead, where ``root`` is missing or a file."""
    if gone := gone_cwd(root):
        raise ServeError(gone)
    if not root.exists():
        raise ServeError(
            f"{root} does not exist; expected a bundle or a folder of bundles. "
            + (
                qb.left_aside(root)
                or "Create a bundle with `quantgate export`, or pass the path of one."
            )
        )
    if not root.is_dir():
        holder = next((p for p in root.parents if qb.is_bundle(p)), None)
        instead = f" ({holder})" if holder is not None else ""
        raise ServeError(
            f"{root} is a file, not a bundle: a bundle is a directory holding {qb.MANIFEST}. "
            f"Pass the bundle's directory{instead}, or a folder of bundles."
        )


def shown(name: str) -> str:
    """A folder's name as a log line may hold it: as it is, or quoted and escaped where it
    holds a control character (a line break would forge a line of its own)."""
    return name if printable_name(name) else repr(name)


def _open_model_folder(folder: Path, cfg: ServeConfig, provider: str) -> list[Model]:
    """The versions of model ``folder.name``: the folder as a bundle, or its VERSION/ bundles."""
    if not printable_name(folder.name):
        bad = unprintable(folder.name)
        raise ServeError(
            "a model folder's name is the name clients call the model by, and goes into log "
            "lines as it is: "
            + (
                f"rename it without {bad} (control characters, line breaks and invisible "
                "formatting are refused)"
                if bad
                else "give it a name that is not blank"
            )
        )
    subs = sorted(p for p in folder.iterdir() if p.is_dir() and qb.is_bundle(p))
    if qb.is_bundle(folder):
        if subs:
            raise ServeError(
                f"{folder} is a bundle and also holds bundles in {[p.name for p in subs]}; "
                "keep one layout: the bundle's files in NAME/, or one bundle per NAME/VERSION/"
            )
        return [open_model(folder, cfg, provider, name=folder.name)]
    if not subs:
        raise ServeError(
            f"{folder} holds no bundle: no {qb.MANIFEST} in it, nor in a version folder "
            f"({folder}/1/{qb.MANIFEST})"
        )
    # a number as clients write it: "01" beside "1" would be two versions they cannot tell apart
    misnamed = [
        p.name
        for p in subs
        if not re.fullmatch(r"[1-9][0-9]*", p.name) or int(p.name) > MAX_VERSION
    ]
    if misnamed:
        raise ServeError(
            f"{folder} holds bundles in {misnamed}: version folders are named by their "
            f"version number, from 1 to {MAX_VERSION} and without leading zeros (1, 2, ...); "
            "rename them"
        )
    return [open_model(sub, cfg, provider, name=folder.name, version=sub.name) for sub in subs]
