"""Cases, data sets, splits and loading one case from disk, whatever the on-disk layout.

A :class:`Case` only names files; :func:`load_case` reads them into :class:`cmmas.io.Image`
values (array order ``(z, y, x)``, geometry in millimetres) and checks that the label map lies
on the image grid and holds only codes of the data set's label table. A :class:`Dataset` is
what a layout module (``mmwhs``, ``chaos``, ``folder``) finds under a root folder.

SimpleITK is imported only when a case is loaded, so listing a data set stays cheap.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cmmas.errors import DatasetError, LabelError

if TYPE_CHECKING:
    from cmmas.io import Image

log = logging.getLogger(__name__)

#: Modalities a case may have.
MODALITIES = ("ct", "mr")


def natural_key(text: str) -> tuple:
    """Sort key that orders embedded numbers by value: ``"case2" < "case10"``."""
    parts = re.split(r"(\d+)", text)
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts))


@dataclasses.dataclass(frozen=True)
class Case:
    """One subject's scan and (optionally) its label map, as files on disk.

    Attributes:
        id: unique name within the data set, e.g. ``"ct_1001"``.
        modality: ``"ct"`` or ``"mr"``.
        image_path: image file, or a folder of DICOM slices (CHAOS).
        label_path: label file, a folder of PNG masks (CHAOS), or None when unlabelled.
        label_aliases: ``(found, meant)`` code pairs rewritten on loading, for known defects
            of a data set's label files (MM-WHS: a stray 421 means 420).
    """

    id: str
    modality: str
    image_path: Path
    label_path: Path | None
    label_aliases: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise DatasetError(
                self.image_path, f"case {self.id!r}: modality {self.modality!r} is not one of {MODALITIES}"
            )


@dataclasses.dataclass(frozen=True)
class Dataset:
    """The cases a layout reader found under ``root``.

    Attributes:
        name: the layout's name (``"mmwhs"``, ``"chaos"``, ``"folder"``).
        root: the folder that was scanned.
        labels: label code -> structure name, background (0) excluded.
        cases: modality -> cases of that modality, in natural order of their ids.
    """

    name: str
    root: Path
    labels: Mapping[int, str]
    cases: Mapping[str, tuple[Case, ...]]

    def of(self, modality: str) -> tuple[Case, ...]:
        """The cases of one modality; DatasetError when the data set has none."""
        found = self.cases.get(modality, ())
        if not found:
            have = sorted(m for m, c in self.cases.items() if c)
            raise DatasetError(self.root, f"no {modality!r} cases in this {self.name} data set (it has {have})")
        return found

    def case(self, case_id: str) -> Case:
        """Look a case up by id; DatasetError when absent."""
        for cases in self.cases.values():
            for case in cases:
                if case.id == case_id:
                    return case
        raise DatasetError(self.root, f"no case {case_id!r} in this {self.name} data set")

    def load(self, case: Case, component: int | None = None) -> tuple[Image, Image | None]:
        """:func:`load_case` with this data set's label table."""
        return load_case(case, self.labels, component)


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
        from cmmas.datasets.chaos import read_chaos_case

        return read_chaos_case(case)
    from cmmas import io

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


def _check_unique_ids(cases: Sequence[Case]) -> None:
    counts = Counter(c.id for c in cases)
    dup = sorted((i for i, n in counts.items() if n > 1), key=natural_key)
    if dup:
        raise DatasetError(None, f"case ids occur more than once: {dup}")


def fold_split(cases: Sequence[Case], fold: int, n_folds: int = 4) -> tuple[tuple[Case, ...], tuple[Case, ...]]:
    """Cross-validation split: fold ``k`` holds the k-th contiguous chunk of the cases as targets.

    Cases are put in natural order of their ids and cut into ``n_folds`` contiguous chunks whose
    sizes differ by at most one (the first ones larger). With 20 cases and 4 folds, as in the
    paper, fold k (1..4) holds cases ``5(k-1) .. 5(k-1)+4`` as targets and the other 15 as atlases.

    Args:
        cases: cases of one modality (unique ids).
        fold: 1-based fold number, ``1 <= fold <= n_folds``.
        n_folds: number of folds, at most ``len(cases)``.

    Returns:
        ``(targets, atlases)``, each in natural id order.
    """
    _check_unique_ids(cases)
    if n_folds < 2:
        raise DatasetError(None, f"n_folds must be at least 2, got {n_folds}")
    if not 1 <= fold <= n_folds:
        raise DatasetError(None, f"fold must be in 1..{n_folds}, got {fold}")
    if len(cases) < n_folds:
        raise DatasetError(None, f"{len(cases)} case(s) cannot be split into {n_folds} folds")
    ordered = sorted(cases, key=lambda c: natural_key(c.id))
    size, extra = divmod(len(ordered), n_folds)
    start = (fold - 1) * size + min(fold - 1, extra)
    stop = start + size + (1 if fold - 1 < extra else 0)
    return tuple(ordered[start:stop]), tuple(ordered[:start] + ordered[stop:])


def explicit_split(
    cases: Sequence[Case], targets: Iterable[str], atlases: Iterable[str]
) -> tuple[tuple[Case, ...], tuple[Case, ...]]:
    """Split by case ids.

    Args:
        cases: the cases to choose from (unique ids).
        targets: ids of the target cases (non-empty).
        atlases: ids of the atlas cases (non-empty, disjoint from ``targets``).

    Returns:
        ``(targets, atlases)`` as cases, in the order the ids were given.

    Raises:
        DatasetError: unknown, repeated or overlapping ids, or an empty side.
    """
    _check_unique_ids(cases)
    by_id = {c.id: c for c in cases}
    targets, atlases = list(targets), list(atlases)
    unknown = [i for i in targets + atlases if i not in by_id]
    if unknown:
        known = sorted(by_id, key=natural_key)
        shown = ", ".join(known[:8]) + (", ..." if len(known) > 8 else "")
        raise DatasetError(None, f"unknown case id(s) {unknown}; known ids: {shown}")
    for side, ids in (("targets", targets), ("atlases", atlases)):
        if not ids:
            raise DatasetError(None, f"no {side} given")
        if len(set(ids)) != len(ids):
            raise DatasetError(None, f"{side} list a case more than once: {ids}")
    both = sorted(set(targets) & set(atlases), key=natural_key)
    if both:
        raise DatasetError(None, f"case(s) {both} are both target and atlas")
    return tuple(by_id[i] for i in targets), tuple(by_id[i] for i in atlases)


def group_by_modality(cases: Iterable[Case]) -> dict[str, tuple[Case, ...]]:
    """Cases per modality, each in natural order of ids; DatasetError on repeated ids."""
    cases = list(cases)
    _check_unique_ids(cases)
    out = {}
    for modality in MODALITIES:
        found = sorted((c for c in cases if c.modality == modality), key=lambda c: natural_key(c.id))
        if found:
            out[modality] = tuple(found)
    return out
