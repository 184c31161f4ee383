"""Data sets on disk: one module per layout, opened through :func:`open_dataset`.

Layouts:
    ``mmwhs``: MM-WHS 2017 whole-heart CT/MR (``ct_train_1001_image.nii.gz`` ...).
    ``chaos``: CHAOS challenge ``Train_Sets`` (DICOM slices + PNG masks).
    ``folder``: ``{ct,mr}/<case>_image.nii.gz`` + ``<case>_label.nii.gz`` + ``labels.json``.

Layout modules are imported only when their layout is opened, and no image library is
imported until a case is loaded: :func:`load_case` (:mod:`cmmas.datasets.loading`) is exported
lazily.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from cmmas.datasets.base import MODALITIES, Case, Dataset, natural_key
from cmmas.datasets.splits import explicit_split, fold_split
from cmmas.errors import DatasetError

#: layout name -> (module, function taking the root folder and returning a Dataset).
LAYOUTS = {
    "mmwhs": ("cmmas.datasets.mmwhs", "open_mmwhs"),
    "chaos": ("cmmas.datasets.chaos", "open_chaos"),
    "folder": ("cmmas.datasets.folder", "open_folder"),
}


def open_dataset(root: str | os.PathLike, layout: str) -> Dataset:
    """Scan ``root`` as a data set of the given layout (one of :data:`LAYOUTS`).

    Raises:
        DatasetError: unknown layout, missing folder, or a folder not of that layout.
    """
    if layout not in LAYOUTS:
        raise DatasetError(None, f"unknown data-set layout {layout!r}; expected one of {sorted(LAYOUTS)}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(root, f"data-set folder not found (layout {layout!r})")
    module, function = LAYOUTS[layout]
    return getattr(importlib.import_module(module), function)(root)


def __getattr__(name: str):
    """``load_case`` on first use: :mod:`cmmas.datasets.loading` imports the image libraries."""
    if name == "load_case":
        from cmmas.datasets.loading import load_case

        return load_case
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LAYOUTS",
    "MODALITIES",
    "Case",
    "Dataset",
    "explicit_split",
    "fold_split",
    "load_case",
    "natural_key",
    "open_dataset",
]
