"""Evaluation metrics: overlap, surface distance and Jacobian statistics.

Masks and label maps are numpy arrays in array order ``(z, y, x)``; spacing is given in the
same order, in millimetres. Surface distances are in millimetres.

Surface-distance definitions (:func:`hd95`, :func:`assd`):

* The surface of a mask is its voxels with at least one 6-connected neighbour outside the
  mask (voxels on the edge of the array count as surface).
* The directed distances from A to B are, for every surface voxel of A, the Euclidean
  distance in millimetres (voxel centres) to the nearest surface voxel of B.
* HD95 is the 95th percentile (numpy's linear interpolation) of the union of both directed
  sets; ASSD is the mean of that union. Both are symmetric.

An empty mask makes surface distances undefined: they are ``nan`` with an
:class:`EmptyMaskWarning`. Dice/Jaccard of one empty mask are 0, of two empty masks 1
(with a warning).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from cmmas.errors import GeometryError, LabelError


class EmptyMaskWarning(UserWarning):
    """A metric was asked about an empty mask and returned its defined fallback value."""


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise GeometryError(None, f"masks differ in shape: {a.shape} vs {b.shape}")
    return a, b


def _spacing(spacing_zyx: Sequence[float], ndim: int) -> tuple[float, ...]:
    spacing = tuple(float(s) for s in spacing_zyx)
    if len(spacing) != ndim or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise GeometryError(None, f"spacing must be {ndim} positive numbers (mm), got {spacing_zyx}")
    return spacing


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap ``2 |A & B| / (|A| + |B|)`` of two boolean masks (1 if both are empty)."""
    a, b = _pair(a, b)
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        warnings.warn("dice: both masks are empty, returning 1.0", EmptyMaskWarning, stacklevel=2)
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard index ``|A & B| / |A | B|`` of two boolean masks (1 if both are empty)."""
    a, b = _pair(a, b)
    union = int(np.logical_or(a, b).sum())
    if union == 0:
        warnings.warn("jaccard: both masks are empty, returning 1.0", EmptyMaskWarning, stacklevel=2)
        return 1.0
    return int(np.logical_and(a, b).sum()) / union


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure, border_value=0)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray | None:
    """Both directed surface-distance sets concatenated (A to B, then B to A), millimetres.

    Returns None (with an :class:`EmptyMaskWarning`) when either mask is empty.
    """
    a, b = _pair(a, b)
    spacing = _spacing(spacing_zyx, a.ndim)
    if not a.any() or not b.any():
        which = "both masks are" if not (a.any() or b.any()) else "a mask is"
        warnings.warn(f"surface distance: {which} empty, returning nan", EmptyMaskWarning, stacklevel=3)
        return None
    surface_a, surface_b = _surface(a), _surface(b)
    to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)
    to_a = ndimage.distance_transform_edt(~surface_a, sampling=spacing)
    return np.concatenate([to_b[surface_a], to_a[surface_b]])


def hd95(a: np.ndarray, b: np.ndarray, spacing_zyx: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance in millimetres (see module docstring).

    ``nan`` with an :class:`EmptyMaskWarning` when either mask is empty.
    """
    distances = surface_distances(a, b, spacing_zyx)
    return float("nan") if distances is None else float(np.percentile(distances, 95))


def assd(a: np.ndarray, b: np.ndarray, spacing_zyx: Sequence[float]) -> float:
    """Average symmetric surface distance in millimetres (see module docstring).

    ``nan`` with an :class:`EmptyMaskWarning` when either mask is empty.
    """
    distances = surface_distances(a, b, spacing_zyx)
    return float("nan") if distances is None else float(np.mean(distances))


def evaluate_labels(
    pred: np.ndarray,
    truth: np.ndarray,
    labels: Mapping[int, str],
    spacing_zyx: Sequence[float],
) -> list[dict]:
    """One row per structure comparing a predicted and a true label map ``[D, H, W]``.

    Args:
        pred, truth: integer label maps in data-set codes, same shape.
        labels: code -> structure name, in the order of the rows (usually without 0).
        spacing_zyx: voxel size in millimetres.

    Returns:
        ``[{"label", "name", "dice", "jaccard", "hd95", "assd", "volume_pred_ml",
        "volume_true_ml"}, ...]``; distances in mm (``nan`` where a structure is empty).
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise GeometryError(
            None, f"prediction shape {pred.shape} differs from ground truth {truth.shape}"
        )
    spacing = _spacing(spacing_zyx, pred.ndim)
    if not labels:
        raise LabelError(None, "no structures to evaluate")
    voxel_ml = float(np.prod(spacing)) / 1000.0
    rows = []
    for code, name in labels.items():
        p, t = pred == code, truth == code
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", EmptyMaskWarning)
            row = {
                "label": int(code),
                "name": str(name),
                "dice": dice(p, t),
                "jaccard": jaccard(p, t),
                "hd95": hd95(p, t, spacing),
                "assd": assd(p, t, spacing),
                "volume_pred_ml": int(p.sum()) * voxel_ml,
                "volume_true_ml": int(t.sum()) * voxel_ml,
            }
        if caught:
            empty = [side for side, m in (("prediction", p), ("ground truth", t)) if not m.any()]
            warnings.warn(
                f"structure {code} ({name}) is empty in the {' and the '.join(empty)}",
                EmptyMaskWarning,
                stacklevel=2,
            )
        rows.append(row)
    return rows


def jacobian_determinant(ddf: np.ndarray) -> np.ndarray:
    """Determinant of the Jacobian of ``x -> x + u(x)``, ``[D, H, W]``.

    Args:
        ddf: ``[D, H, W, 3]`` displacement in voxels, channel k along array axis k (``ij``).

    ``J = I + grad u`` with ``grad u[k, m] = d u_k / d x_m`` from ``np.gradient`` (central
    differences inside, one-sided at the edges); exact for affine fields.
    """
    ddf = np.asarray(ddf, dtype=np.float64)
    if ddf.ndim != 4 or ddf.shape[-1] != 3:
        raise GeometryError("displacement field", f"expected [D, H, W, 3], got shape {ddf.shape}")
    if min(ddf.shape[:3]) < 2:
        raise GeometryError("displacement field", f"needs at least 2 voxels per axis, got {ddf.shape}")
    if not np.all(np.isfinite(ddf)):
        raise GeometryError("displacement field", "holds NaN/inf values")
    jac = np.empty(ddf.shape[:3] + (3, 3), dtype=np.float64)
    for k in range(3):
        for m, gradient in enumerate(np.gradient(ddf[..., k])):
            jac[..., k, m] = gradient
    jac += np.eye(3)
    return np.linalg.det(jac)


def jacobian_stats(ddf: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """Folding and smoothness statistics of a displacement field ``[D, H, W, 3]`` (voxels, ``ij``).

    Args:
        mask: optional ``[D, H, W]`` boolean region; statistics over its voxels only.

    Returns:
        ``folding_percent``: percentage of voxels with det J <= 0;
        ``std_log_jac``: standard deviation of log det J over the voxels with det J > 0
        (folded voxels have no logarithm and are counted by ``folding_percent`` instead;
        ``nan`` if every voxel folds);
        ``min_det``, ``max_det``: extremes of det J.
    """
    det = jacobian_determinant(ddf)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != det.shape:
            raise GeometryError("mask", f"shape {mask.shape} differs from the field's {det.shape}")
        if not mask.any():
            raise LabelError("mask", "is empty")
        det = det[mask]
    positive = det[det > 0]
    return {
        "folding_percent": 100.0 * float(np.mean(det <= 0)),
        "std_log_jac": float(np.std(np.log(positive))) if positive.size else float("nan"),
        "min_det": float(det.min()),
        "max_det": float(det.max()),
    }
