"""Cases and data sets: a :class:`Case` only names files (reading them is
:func:`cmmas.datasets.loading.load_case`); a :class:`Dataset` is what a layout module
(``mmwhs``, ``chaos``, ``folder``) finds under a root folder. No image library is imported here,
so listing a data set stays cheap.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cmmas.errors import DatasetError

if TYPE_CHECKING:
    pass


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



def check_unique_ids(cases: Sequence[Case]) -> None:
    counts = Counter(c.id for c in cases)
    dup = sorted((i for i, n in counts.items() if n > 1), key=natural_key)
    if dup:
        raise DatasetError(None, f"case ids occur more than once: {dup}")


def group_by_modality(cases: Iterable[Case]) -> dict[str, tuple[Case, ...]]:
    """Cases per modality, each in natural order of ids; DatasetError on repeated ids."""
    cases = list(cases)
    check_unique_ids(cases)
    out = {}
    for modality in MODALITIES:
        found = sorted((c for c in cases if c.modality == modality), key=lambda c: natural_key(c.id))
        if found:
            out[modality] = tuple(found)
    return out
