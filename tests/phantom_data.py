"""Folder-layout data sets of phantom subjects, shared by the tests that need files on disk, and
the one phantom atlas set with untrained, carded networks (:func:`make_phantom_world`) that the
session fixture ``phantom`` of conftest.py builds once."""

import dataclasses
import json
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from cmmas.align.atlas_set import AtlasSet
from cmmas.datasets.mmwhs import MMWHS_LABELS
from cmmas.datasets.phantom import make_subject
from cmmas.io import Image, read_label, write_image

#: The working grid of the shared phantom atlas set, (z, y, x) voxels of 4 mm.
GRID = (24, 24, 24)
#: The label codes of the phantom (MM-WHS), the background first: the networks' channel order.
CODES = (0, *sorted(MMWHS_LABELS))
#: Phantom seed of the shared MR target (mr_00).
TARGET_SEED = 100


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


def write_folder(root: Path, n: int = 3, modality: str = "ct", seed: int = 0,
                 labels: Mapping[int, str] = MMWHS_LABELS) -> Path:
    """A folder-layout data set of ``n`` phantom subjects of one modality (seeds from ``seed``), 40^3 voxels."""
    return write_phantom_folder(root, numbered(modality, range(seed, seed + n)), labels=labels)


@dataclasses.dataclass(frozen=True)
class PhantomWorld:
    """The shared phantom: a data set, its prepared CT atlas set and untrained carded networks.

    Attributes:
        root: the folder holding everything below (read-only for the tests).
        data: folder-layout data set: CT atlases ct_00..ct_02 (seeds 0-2) and the labelled MR
            target mr_00 (seed :data:`TARGET_SEED`, a rotated grid), 40^3 voxels each.
        aset: the atlas set of the three CT cases on :data:`GRID` at 4 mm.
        reg, sim: untrained BiRegNet (zero fields) and SimNet (equal weights) for :data:`GRID`,
            saved as .keras with model cards (CT atlases, MR targets), as the training scripts write them.
        target: the MR target's image file.
        truth: the MR target's label map.
    """

    root: Path
    data: Path
    aset: AtlasSet
    reg: Path
    sim: Path
    target: Path
    truth: Image


def make_phantom_world(root: Path) -> PhantomWorld:
    """Write the data set, prepare its CT atlas set and save carded untrained networks under ``root``."""
    from cmmas.align import cards, prepare
    from cmmas.nn import training
    from cmmas.nn.networks import build_biregnet, build_simnet

    data = write_phantom_folder(root / "data", {**numbered("ct", range(3)), "mr_00": TARGET_SEED})
    aset = prepare.prepare_atlases(data, "ct", root / "atlas_set", shape_zyx=GRID, spacing_zyx=(4.0,) * 3,
                                   progress=False)
    reg = training.save_model(build_biregnet(GRID, c0=4, levels=2), root / "reg.keras",
                              cards.card_from_atlas_set(aset, "biregnet", "ct", "mr"))
    sim = training.save_model(build_simnet(GRID, len(CODES), c0=4, levels=2), root / "simnet.keras",
                              cards.card_from_atlas_set(aset, "simnet", "ct", "mr"))
    target = data / "mr" / "mr_00_image.nii.gz"
    return PhantomWorld(root, data, aset, reg, sim, target, read_label(data / "mr" / "mr_00_label.nii.gz"))


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
