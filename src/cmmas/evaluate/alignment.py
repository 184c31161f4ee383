"""How good and how stable a scan's alignment to the atlas set is, measured without networks:
the aligned atlases fused by majority vote and mapped back (what an alignment alone gives), and
the same scan with part of its cranio-caudal field of view blanked out."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cmmas.align.atlas_set import AtlasSet
from cmmas.io import Image
from cmmas.metrics import dice
from cmmas.segment import SegmentConfig, Segmenter

SIDES = ("top", "bottom")


def z_axis(image: Image) -> int:
    """The array axis (0, 1 or 2 of ``(z, y, x)``) that runs most nearly along the physical z axis."""
    direction = image.geometry.direction_matrix  # columns: physical direction of voxel axes x, y, z
    return 2 - int(np.argmax(np.abs(direction[2])))


def blank_z(image: Image, mm: float, side: str, fill: float | None = None) -> tuple[Image, np.ndarray]:
    """``image`` with the ``mm`` millimetres at its ``side`` ("top": superior, largest physical z;
    "bottom") set to ``fill`` (default: the image's minimum, i.e. air): a scan whose field of view
    ends earlier, on the same grid.

    Returns:
        The blanked image and the bool mask ``[D, H, W]`` of the voxels kept.
    """
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    axis = z_axis(image)
    count = image.shape[axis]
    spacing = image.geometry.spacing_zyx[axis]
    n = min(int(round(mm / spacing)), count - 1)
    index = np.zeros((1, 3))
    index[0, 2 - axis] = count - 1
    to_physical = image.geometry.index_to_physical
    last_is_top = to_physical(index)[0, 2] > to_physical(np.zeros((1, 3)))[0, 2]
    keep = np.ones(count, dtype=bool)
    if n > 0:
        if (side == "top") == last_is_top:
            keep[count - n:] = False
        else:
            keep[:n] = False
    shape = [1, 1, 1]
    shape[axis] = count
    mask = np.broadcast_to(keep.reshape(shape), image.shape)
    value = float(image.array.min()) if fill is None else float(fill)
    return image.with_array(np.where(mask, image.array, np.asarray(value, image.array.dtype))), np.array(mask)


def affine_engine(aset: AtlasSet, atlas_ids: Sequence[str], atlas_affine: bool = False) -> Segmenter:
    """The engine without a registration network, fusing the atlases of ``atlas_ids`` as aligned
    (with ``atlas_affine`` each given its own affine stage onto the target:
    :mod:`cmmas.align.per_atlas`) by majority vote, the label only: its ``segment(scan,
    alignment=transforms).label`` is what an alignment alone gives on the scan's grid."""
    return Segmenter(aset, None, None, SegmentConfig(fusion="mv", atlas_affine=atlas_affine, maps=False),
                     atlas_ids=atlas_ids)


def organ_dice(pred: np.ndarray, truth: np.ndarray, codes: Sequence[int], mask: np.ndarray | None = None
               ) -> dict[int, float]:
    """Dice per code (background excluded) of two label maps, within ``mask`` if given; a code
    absent from both counts as 1."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if mask is not None:
        pred, truth = pred[mask], truth[mask]
    out = {}
    for code in codes:
        if code == 0:
            continue
        p, t = pred == code, truth == code
        out[int(code)] = 1.0 if not p.any() and not t.any() else float(dice(p, t))
    return out
