"""Where a number came from: the code's commit, the configuration, the models' and data's identity.

:func:`provenance` is the record every result file carries (``summary.json`` of an evaluation,
``<stem>_qc.json`` of a segmentation, every bench JSON), so that a table generated from it can say
which commit and command made it and whether that code still stands. Standard library only: it
never imports TensorFlow (versions are read only of the libraries the process already loaded).
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

#: Libraries whose versions are recorded when (and only when) the process has imported them.
LIBRARIES = ("numpy", "tensorflow", "keras", "SimpleITK", "ants")

#: Changed files listed at most in ``code["changed"]`` of a dirty tree.
MAX_CHANGED = 20

_SOURCE = Path(__file__).resolve().parent


def _git(folder: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


@functools.lru_cache(maxsize=None)
def code_state(folder: str | os.PathLike = _SOURCE) -> dict:
    """The code a process runs, asked once per process and folder.

    In a git checkout: ``{"commit": <40 hex>, "dirty": bool, "changed": [paths]}``, where dirty
    means a *tracked* file differs from the commit (``git status --porcelain
    --untracked-files=no``: untracked files such as ``runs/`` or scratch scripts do not count, so
    a new module not yet added is not seen). Outside a checkout (an installed package):
    ``{"commit": None, "version": <importlib.metadata version or None>}``.
    """
    folder = Path(folder)
    head = _git(folder, "rev-parse", "HEAD")
    if head is None:
        try:
            version = importlib.metadata.version("cmmas")
        except importlib.metadata.PackageNotFoundError:
            version = None
        return {"commit": None, "version": version}
    status = _git(folder, "status", "--porcelain", "--untracked-files=no") or ""
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    return {"commit": head.strip(), "dirty": bool(changed), "changed": changed[:MAX_CHANGED]}


def sha256_file(path: str | os.PathLike) -> str | None:
    """Hex sha256 of a file's bytes; None when it is not a file."""
    path = Path(path)
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _model_record(path: str | os.PathLike) -> dict:
    """Path, sha256 of the model and of its card ``<model>.keras.json`` (None when absent)."""
    path = Path(path)
    card = path.with_name(path.name + ".json")  # cmmas.nn.model_card.card_path, without its imports
    return {"path": str(path.resolve()), "sha256": sha256_file(path), "card_sha256": sha256_file(card)}


def _plain(value):
    """``value`` as JSON types: mappings, sequences and scalars kept, anything else as its str."""
    return json.loads(json.dumps(value, default=str))


def canonical_json(config: Mapping | None) -> str:
    """``config`` as canonical JSON: sorted keys, no spaces, non-JSON values as their str."""
    return json.dumps(_plain(dict(config or {})), sort_keys=True, separators=(",", ":"))


def config_hash(config: Mapping | None, length: int = 12) -> str:
    """Short hex sha256 of :func:`canonical_json`: equal for equal configs, whatever their key order."""
    return hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()[:length]


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = str(getattr(module, "__version__", "unknown"))
    return versions


def provenance(
    config: Mapping | None = None,
    models: Mapping[str, str | os.PathLike] | None = None,
    data: str | os.PathLike | None = None,
    cases: Sequence[str] | None = None,
) -> dict:
    """The provenance record of a result.

    Args:
        config: the run's full configuration (flag values, a config object's dict); stored as
            JSON types (anything else as its str), with its :func:`config_hash`.
        models: name -> model file (e.g. ``{"reg": ".../model.keras"}``); each recorded with its
            absolute path and the sha256 of the file and of its card ``<model>.keras.json``
            (None for a missing file or card).
        data: the data folder, recorded absolute.
        cases: the case ids the result covers.

    Returns:
        ``{"code": code_state(), "time": UTC ISO 8601, "versions": {python, and numpy,
        tensorflow, ... if imported}, "config": {...}, "config_hash": str, "models": {name:
        {path, sha256, card_sha256}}, "data": str | None, "cases": [ids]}``.
    """
    return {
        "code": _plain(code_state()),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "config": _plain(dict(config or {})),
        "config_hash": config_hash(config),
        "models": {name: _model_record(path) for name, path in (models or {}).items() if path},
        "data": str(Path(data).resolve()) if data else None,
        "cases": list(cases or []),
    }
