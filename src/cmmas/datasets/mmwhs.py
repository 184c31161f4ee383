"""MM-WHS 2017 whole-heart CT/MR, in the layout the challenge distributes.

Files are named ``{ct,mr}_{train,test}_<number>_image.nii.gz`` with a ``_label.nii.gz`` beside
each training image, and may sit in the root folder or one or two folders below it
(``root/ct_train/ct_train_1001_image.nii.gz``). Case ids drop the split word: ``"ct_1001"``.
Only the training cases are read: the challenge's ``*_test_*`` images (released without labels)
are skipped with a note in the log, so they never enter a fold.

Labels keep the challenge's codes (:data:`MMWHS_LABELS`). Some released label files hold a
few voxels of code 421 next to the left atrium (420); every MM-WHS case reads 421 as 420
(:attr:`cmmas.datasets.base.Case.label_aliases`), so those voxels count as left atrium.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from cmmas.datasets.base import Case, Dataset, group_by_modality
from cmmas.errors import DatasetError

log = logging.getLogger(__name__)

#: MM-WHS label code -> structure (background 0 excluded).
MMWHS_LABELS = {
    205: "myocardium",
    420: "left atrium",
    500: "left ventricle blood cavity",
    550: "right atrium",
    600: "right ventricle",
    820: "ascending aorta",
    850: "pulmonary artery",
}

#: Codes found in released label files -> the code they stand for.
MMWHS_ALIASES = ((421, 420),)

_NAME = re.compile(r"^(ct|mr)_(train|test)_(\d+)_(image|label)\.nii(\.gz)?$")
_EXPECTED = "files like ct_train_1001_image.nii.gz / ct_train_1001_label.nii.gz in it or one or two folders below"


def open_mmwhs(root: Path) -> Dataset:
    """Find every MM-WHS image (and its label, if present) under ``root``.

    Raises:
        DatasetError: no MM-WHS image found, a case found twice, or a label without its image.
    """
    images: dict[str, Path] = {}
    labels: dict[str, Path] = {}
    skipped: list[Path] = []
    for path in _candidates(root):
        match = _NAME.match(path.name)
        if match is None:
            continue
        modality, split, number, kind, _ = match.groups()
        if split == "test":
            skipped.append(path)
            continue
        found = images if kind == "image" else labels
        case_id = f"{modality}_{number}"
        if case_id in found:
            raise DatasetError(path, f"MM-WHS case {case_id} found twice (also {found[case_id]})")
        found[case_id] = path
    if skipped:
        log.info("MM-WHS: skipped %d challenge test file(s) (*_test_*, e.g. %s): only training cases are read",
                 len(skipped), skipped[0].name)
    if not images:
        raise DatasetError(root, f"no MM-WHS images found; expected {_EXPECTED}")
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise DatasetError(labels[orphans[0]], f"label without an image for case(s) {orphans}")
    cases = [
        Case(case_id, case_id[:2], path, labels.get(case_id), MMWHS_ALIASES)
        for case_id, path in images.items()
    ]
    return Dataset("mmwhs", root, dict(MMWHS_LABELS), group_by_modality(cases))


def _candidates(root: Path) -> list[Path]:
    """Files in ``root`` and up to two folder levels below it, skipping hidden entries."""
    out = []
    for pattern in ("*", "*/*", "*/*/*"):
        out.extend(
            p for p in root.glob(pattern)
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
    return sorted(out)
