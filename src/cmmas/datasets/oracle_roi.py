"""The original cmmas's region of interest, an oracle: each case cropped around its OWN label.

The original (NanYoMy/cmmas ``proj/learn2reg/prepare_mmwhs.py``, ``crop_img_lab``,
``rotate_img_to_same_direction``, ``resize_img_lab``) resamples every atlas and every target to
1 mm, cuts the bounding box of its ground-truth structure plus 10 voxels (clipped to the image),
turns it to the identity direction and stretches the box to 96^3 voxels (anisotropic spacing).
It needs the target's ground truth, so it is only for reproducing the paper's setting (the
``paper`` preset), never for segmenting a new scan; it also hands the networks each
structure's position and size. docs/fidelity.md compares it with our ROI.

Here the same box is one grid (:func:`oracle_geometry`): the label's tight bounding box (voxel
edges, in millimetres) grown by ``margin_mm`` on each side (the original's 10 voxels at 1 mm),
clipped to the image, identity direction, ``shape_zyx`` voxels covering it edge to edge. The
case is resampled onto it once (:func:`crop_case`) instead of three times, and a label on it maps
back onto the case's own grid with :func:`label_to_original`. Where the box is no more than
``shape_zyx`` of the case's voxels along each axis (the grid is finer than the case's), the
round trip ``label -> box -> original grid`` returns the label exactly (nearest neighbour both
ways); a larger box is downsampled and the round trip loses detail.

Arrays are ``(z, y, x)``; physical points ``(x, y, z)`` in millimetres (LPS, as ITK).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cmmas import preprocess
from cmmas.errors import LabelError
from cmmas.io import Geometry, Image, check_same_grid

#: The original's margin around the structure: 10 voxels at its 1 mm working spacing.
MARGIN_MM = 10.0

#: The original's network input: the box stretched to 96^3 voxels.
SHAPE_ZYX = (96, 96, 96)


def oracle_geometry(
    label: Image,
    codes: Sequence[int] | None = None,
    margin_mm: float = MARGIN_MM,
    shape_zyx: Sequence[int] = SHAPE_ZYX,
) -> Geometry:
    """The grid of ``shape_zyx`` voxels stretched over the box of the label's own structure(s).

    Args:
        label: the case's ground-truth label map on its own grid.
        codes: the structures whose box is taken (the original: its one ``--component``);
            None: every non-zero voxel.
        margin_mm: added on each side of the tight box (voxel edges), millimetres.
        shape_zyx: voxels of the output grid ``(z, y, x)``.

    Returns:
        A :class:`Geometry` with identity direction whose voxel box (edges) is the grown box
        clipped to the image; spacing ``box extent / shape`` per axis, in millimetres.

    Raises:
        LabelError: none of ``codes`` (or no structure at all) is in the label.
    """
    mask = label.array != 0 if codes is None else np.isin(label.array, list(codes))
    if not mask.any():
        what = "no structure" if codes is None else f"none of the codes {list(codes)}"
        raise LabelError(label.path, f"{what} in the label: no oracle box")
    box = preprocess.bounding_box(mask)
    low_index = np.array([s.start for s in box][::-1], dtype=np.float64) - 0.5  # (x, y, z) voxel edges
    high_index = np.array([s.stop for s in box][::-1], dtype=np.float64) - 0.5
    tight = _physical_box(label.geometry, low_index, high_index)
    whole = _physical_box(label.geometry, np.full(3, -0.5), np.asarray(label.geometry.size) - 0.5)
    low = np.maximum(tight[0] - margin_mm, whole[0])
    high = np.minimum(tight[1] + margin_mm, whole[1])
    size_xyz = np.asarray(tuple(int(n) for n in shape_zyx)[::-1])
    spacing = (high - low) / size_xyz
    return Geometry(
        size=tuple(int(n) for n in size_xyz),  # type: ignore[arg-type]
        spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        origin=tuple(float(o) for o in low + spacing / 2.0),  # type: ignore[arg-type]
        direction=preprocess.IDENTITY_DIRECTION,
    )


def _physical_box(geometry: Geometry, low_index: np.ndarray, high_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The axis-aligned physical box ``(low, high)`` (x, y, z) mm enclosing an index box's 8 corners."""
    corners = np.array([[a, b, c] for a in (low_index[0], high_index[0])
                        for b in (low_index[1], high_index[1]) for c in (low_index[2], high_index[2])])
    points = geometry.index_to_physical(corners)
    return points.min(axis=0), points.max(axis=0)


def crop_case(image: Image, label: Image, geometry: Geometry) -> tuple[Image, Image]:
    """A case on its oracle grid: the image linearly resampled then z-scored over the whole box
    (the original rescales and z-scores each crop), the label by nearest neighbour.

    Args:
        image: the scan on its own grid.
        label: its label map on the same grid.
        geometry: the case's :func:`oracle_geometry`.

    Returns:
        ``(image, label)`` on ``geometry``: float32 z-scores, and the label's codes and dtype.
    """
    check_same_grid(image, label, "label")
    moved = preprocess.resample(image, geometry=geometry, kind="linear", default=float(image.array.min()))
    normalised = preprocess.normalize_intensity(moved, method="zscore", percentiles=None)
    return normalised, preprocess.resample(label, geometry=geometry, kind="nearest", default=0)


def label_to_original(label: Image, original: Geometry) -> Image:
    """A label map on an oracle grid mapped back onto the case's own grid (nearest neighbour;
    0 outside the box)."""
    return preprocess.back_to_grid(label, original, kind="nearest", default=0.0)
