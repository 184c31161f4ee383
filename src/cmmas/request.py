"""Checking a request before any work: no output may overwrite an input or another output.

Pure path and number checks, no image read: each failure is one :class:`~cmmas.errors.CmmasError`
naming the argument and the file. Paths are compared resolved (symlinks followed, ``./`` and
``..`` removed), and a folder input (a DICOM series) covers every file inside it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from cmmas.errors import CmmasError
from cmmas.io import IMAGE_SUFFIXES

#: Endings an image output may have: the formats written without a separate header file.
OUTPUT_IMAGE_SUFFIXES = tuple(s for s in IMAGE_SUFFIXES if s in (".nii.gz", ".nii", ".mha"))

#: An argument and one of its paths, e.g. ``("--target", Path("scan.nii.gz"))``.
Named = tuple[str, "str | os.PathLike"]


def resolved(path: str | os.PathLike) -> Path:
    """``path`` made absolute with symlinks followed (as far as they exist) and ``.``/``..`` removed."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def check_image_output(argument: str, path: str | os.PathLike) -> None:
    """Refuse an image output path with an ending other than :data:`OUTPUT_IMAGE_SUFFIXES`.

    Raises:
        CmmasError: naming ``argument`` and the path.
    """
    name = os.fspath(path)
    if not name.lower().endswith(OUTPUT_IMAGE_SUFFIXES):
        raise CmmasError(name, f"{argument}: unsupported image ending; use one of {', '.join(OUTPUT_IMAGE_SUFFIXES)}")


def check_writable(argument: str, path: str | os.PathLike) -> None:
    """Refuse an output file path that ends in '/', is an existing folder, or whose nearest existing
    parent folder cannot be written.

    Raises:
        CmmasError: naming ``argument`` and the path.
    """
    name = os.fspath(path)
    if name.endswith(("/", os.sep)):
        raise CmmasError(name, f"{argument}: names a folder (ends in '/'); give a file name")
    target = Path(name)
    if target.is_dir():
        raise CmmasError(name, f"{argument}: is an existing folder; give a file name")
    parent = resolved(target).parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CmmasError(name, f"{argument}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CmmasError(name, f"{argument}: folder {parent} is not writable")


def check_outputs(inputs: Iterable[Named], outputs: Iterable[Named]) -> None:
    """Refuse outputs that would overwrite an input or each other, or cannot be written.

    Args:
        inputs: (argument, path) of every file or folder read (scans, atlases, models, bundle);
            a folder covers every path inside it.
        outputs: (argument, path) of every file written, derived names included.

    Raises:
        CmmasError: the first collision or unwritable output, naming its argument and file.
    """
    folders, files = [], {}
    for argument, path in inputs:
        where = resolved(path)
        (folders if Path(path).is_dir() else []).append((where, argument, path))
        files.setdefault(where, (argument, path))
    written: dict[Path, tuple[str, str | os.PathLike]] = {}
    for argument, path in outputs:
        where = resolved(path)
        if where in files:
            source, given = files[where]
            raise CmmasError(path, f"{argument}: would overwrite the input {source} {os.fspath(given)}")
        for folder, source, given in folders:
            if folder in where.parents:
                raise CmmasError(path, f"{argument}: would write inside the input {source} folder {os.fspath(given)}")
        if where in written:
            other, first = written[where]
            raise CmmasError(path, f"{argument}: is also the output {other} {os.fspath(first)} of this call")
        written[where] = (argument, path)
        check_writable(argument, path)


def output_names(label: str | os.PathLike, derived: Mapping[str, str | os.PathLike]) -> list[Named]:
    """The (argument, path) of one label map's outputs: ``--out`` for the label map itself, and
    ``--out (<kind>)`` for each name derived from it (``derived``: kind -> path, as
    ``output_paths`` gives; its "label" entry is the label map)."""
    named = [("--out", label)]
    named += [(f"--out ({kind})", path) for kind, path in derived.items() if kind != "label"]
    return named


def check_at_least(argument: str, value: int | None, low: int) -> None:
    """Refuse an integer option below ``low`` (None: not given, accepted).

    Raises:
        CmmasError: naming the argument.
    """
    if value is not None and value < low:
        raise CmmasError(None, f"{argument} must be at least {low}, got {value}")


def image_inputs(argument: str, paths: Sequence[str | os.PathLike] | None) -> list[Named]:
    """``(argument, path)`` for each of ``paths`` (None: none)."""
    return [(argument, p) for p in paths or ()]
