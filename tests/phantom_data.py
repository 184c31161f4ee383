"""Folder-layout data sets of phantom subjects, shared by the tests that need files on disk."""

import json
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from cmmas.datasets.mmwhs import MMWHS_LABELS
from cmmas.datasets.phantom import make_subject
from cmmas.io import write_image


def numbered(modality: str, seeds: Iterable[int]) -> dict[str, int]:
    """``{"<modality>_00": seeds[0], "<modality>_01": seeds[1], ...}``."""
    return {f"{modality}_{k:02d}": int(seed) for k, seed in enumerate(seeds)}


def write_phantom_folder(
    root: Path, subjects: Mapping[str, int], shape: int = 40, labels: Mapping[int, str] = MMWHS_LABELS
) -> Path:
    """Write ``root/<modality>/<id>_image.nii.gz`` and ``_label.nii.gz`` per subject, and ``labels.json``.

    Args:
        root: data-set folder (created).
        subjects: case id -> phantom seed; the modality is the id's prefix before ``_``.
        shape: voxels per axis of each phantom.
        labels: the structure codes and names (the background 0 is added).

    Returns:
        ``root``.
    """
    root = Path(root)
    for case_id, seed in subjects.items():
        modality = case_id.split("_")[0]
        (root / modality).mkdir(parents=True, exist_ok=True)
        image, label = make_subject(modality, seed, shape=shape)
        write_image(image, root / modality / f"{case_id}_image.nii.gz")
        write_image(label, root / modality / f"{case_id}_label.nii.gz")
    table = {"0": "background", **{str(code): name for code, name in labels.items()}}
    (root / "labels.json").write_text(json.dumps(table))
    return root


#: The codes of :func:`nested_spheres`, the background first.
SPHERE_CODES = (0, 3, 7)


def nested_spheres(shape=(20, 20, 20), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Two nested spheres (codes 7 and 3 inside) and a textured [0, 1] image following them."""
    rng = np.random.default_rng(seed)
    r2 = sum((c - n / 2) ** 2 for c, n in zip(np.indices(shape), shape))
    label = np.zeros(shape, dtype=np.int32)
    label[r2 < 40] = 7
    label[r2 < 10] = 3
    image = np.clip(0.2 + 0.3 * (label > 0) + 0.2 * (label == 3) + rng.normal(0.0, 0.05, shape), 0.0, 1.0)
    return label, image.astype(np.float32)
