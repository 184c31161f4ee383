"""Reading a case's image and label map, whatever its layout (NIfTI/MHA/NRRD files, DICOM
series, CHAOS PNG masks), checked against the data set's label table."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from cmmas import io
from cmmas.datasets.base import Case
from cmmas.datasets.chaos import read_chaos_case
from cmmas.errors import DatasetError, LabelError

if TYPE_CHECKING:
    from cmmas.io import Image


log = logging.getLogger(__name__)


def load_case(
    case: Case,
    labels: Mapping[int, str] | None = None,
    component: int | None = None,
) -> tuple[Image, Image | None]:
    """Read a case's image and label map.

    Args:
        case: the case to read. A folder ``image_path`` is read as CHAOS DICOM slices with PNG
            masks (:func:`cmmas.datasets.chaos.read_chaos_case`); files are read with
            :func:`cmmas.io.read_image` / :func:`cmmas.io.read_label`.
        labels: label table (code -> name); when given, any other non-zero code raises.
        component: keep only this label code (others set to 0); must be in ``labels`` if given.

    Returns:
        ``(image, label)``: image as float32 ``(z, y, x)``; label as int32 on the same grid,
        or None when the case has no label.

    Raises:
        ImageReadError: a file is missing or unreadable.
        GeometryError: the label's grid differs from the image's (names the label file).
        LabelError: the label holds codes outside ``labels`` or ``component`` is unknown.
        DatasetError: ``component`` was asked of an unlabelled case.
    """
    image, label = _read(case)
    if label is None:
        if component is not None:
            raise DatasetError(case.image_path, f"case {case.id!r} has no label map to take component {component} from")
        return image, None
    label = _apply_aliases(label, case.label_aliases)
    if labels is not None:
        _check_codes(label, labels)
        if component is not None and component not in labels:
            raise LabelError(label.path, f"component {component} is not in the label table {sorted(labels)}")
    if component is not None:
        keep = label.array == component
        if not keep.any():
            log.warning("%s: label %d is absent from case %s", label.path, component, case.id)
        label = label.with_array(label.array * keep)
    return image, label


def _read(case: Case) -> tuple[Image, Image | None]:
    if case.image_path.is_dir():
        return read_chaos_case(case)
    image = io.read_image(case.image_path)
    if case.label_path is None:
        return image, None
    return image, io.read_label(case.label_path, like=image)


def _apply_aliases(label: Image, aliases: tuple[tuple[int, int], ...]) -> Image:
    if not aliases:
        return label
    array = label.array.copy()
    for found, meant in aliases:
        hit = label.array == found
        if hit.any():
            log.info("%s: %d voxel(s) of code %d read as %d", label.path, int(hit.sum()), found, meant)
            array[hit] = meant
    return label.with_array(array)


def _check_codes(label: Image, labels: Mapping[int, str]) -> None:
    present = set(np.unique(label.array).tolist()) - {0}
    unknown = sorted(present - set(labels))
    if unknown:
        raise LabelError(label.path, f"unknown label values {unknown}; expected some of {sorted(labels)}")
