"""Placing a scan by its organs: their centroids, the similarity transform that carries one set
of organ centroids onto another (the start of an alignment that needs no image similarity
across modalities), and the overlap of the scan's organs with the reference's through an
alignment (how an alignment by organs is judged: :class:`OrganGuide`).

Points are physical ``(x, y, z)`` in mm (ITK's LPS); a transform maps reference points to scan
points, as every alignment of :mod:`cmmas.align.target` (ITK's direction for resampling).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from cmmas.align import ants
from cmmas.errors import GeometryError
from cmmas.io import Geometry, Image, atomic_path
from cmmas.metrics import dice


def centroids_mm(probabilities: np.ndarray, codes: Sequence[int], geometry: Geometry,
                 min_ml: float = 1.0) -> dict[int, tuple[np.ndarray, float]]:
    """Each foreground organ's probability-weighted centroid (mm) and volume (ml) on ``geometry``.

    Args:
        probabilities: ``[L, D, H, W]`` per-label probabilities (or a one-hot label map) in the
            order of ``codes``, the background 0 first.
        codes: the label codes.
        geometry: the grid of the maps.
        min_ml: organs with less volume are left out (not found).

    Returns:
        ``{code: (centroid [3] mm, volume ml)}`` for the organs found.
    """
    if probabilities.shape[0] != len(codes) or tuple(probabilities.shape[1:]) != tuple(geometry.shape):
        raise GeometryError("centroids", f"maps {probabilities.shape} do not fit {len(codes)} codes on "
                            f"a {geometry.shape} grid")
    voxel_ml = float(np.prod(geometry.spacing)) / 1000.0
    grid = np.indices(geometry.shape, dtype=np.float64)  # z, y, x
    found = {}
    for k, code in enumerate(codes):
        if not code:
            continue
        weights = np.asarray(probabilities[k], np.float64)
        mass = weights.sum()
        if mass * voxel_ml < min_ml:
            continue
        index_zyx = np.array([(grid[axis] * weights).sum() / mass for axis in range(3)])
        found[int(code)] = (geometry.index_to_physical(index_zyx[::-1][None])[0], float(mass * voxel_ml))
    return found


def similarity_fit(source: np.ndarray, target: np.ndarray, weights: Sequence[float] | None = None,
                   scale: bool = True) -> np.ndarray:
    """The weighted least-squares similarity (rotation, one isotropic scale when ``scale``,
    translation) carrying the points ``source`` ``[N, 3]`` onto ``target`` ``[N, 3]`` (Umeyama,
    1991), as a ``[4, 4]`` homogeneous matrix: ``target ~ M @ (source, 1)``. No reflection.
    With one point: the translation; with two: also their common direction's rotation is
    underdetermined, so the rotation is the identity.

    Raises:
        GeometryError: no point, or shapes that differ.
    """
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    if source.ndim != 2 or source.shape != target.shape or source.shape[1] != 3 or not len(source):
        raise GeometryError("similarity_fit", f"need two [N, 3] point sets, got {source.shape} and {target.shape}")
    w = np.ones(len(source)) if weights is None else np.asarray(weights, np.float64)
    w = w / w.sum()
    mean_s, mean_t = w @ source, w @ target
    matrix = np.eye(4)
    if len(source) >= 3:
        s, t = source - mean_s, target - mean_t
        covariance = (t * w[:, None]).T @ s
        u, singular, vt = np.linalg.svd(covariance)
        sign = np.eye(3)
        sign[2, 2] = np.sign(np.linalg.det(u @ vt)) or 1.0
        rotation = u @ sign @ vt
        variance = float(w @ np.sum(s**2, axis=1))
        factor = float(np.trace(np.diag(singular) @ sign) / variance) if scale and variance > 0 else 1.0
        matrix[:3, :3] = factor * rotation
    matrix[:3, 3] = mean_t - matrix[:3, :3] @ mean_s
    return matrix


def organ_start(reference: Mapping[int, tuple[np.ndarray, float]], scan: Mapping[int, tuple[np.ndarray, float]],
                scale: bool = False) -> np.ndarray | None:
    """The rigid transform (with ``scale``: the similarity) carrying the reference's organ centroids
    onto the scan's (organs found in both, weighted by the smaller of their two volumes), ``[4, 4]``;
    None when no organ is in both. Rigid by default: a finder that overgrows an organ pulls its
    centroid, and the scale fitted to four such centroids came out near 0.6 on fold 1's MR scans."""
    common = sorted(set(reference) & set(scan))
    if not common:
        return None
    return similarity_fit(np.array([reference[c][0] for c in common]), np.array([scan[c][0] for c in common]),
                          [min(reference[c][1], scan[c][1]) for c in common], scale=scale and len(common) >= 3)


def write_affine(matrix: np.ndarray, path: str | os.PathLike) -> str:
    """Write a ``[4, 4]`` affine (reference point -> scan point, mm) as an ANTs/ITK ``.mat`` file."""
    transform = sitk.AffineTransform(3)
    transform.SetMatrix([float(v) for v in np.asarray(matrix)[:3, :3].ravel()])
    transform.SetTranslation([float(v) for v in np.asarray(matrix)[:3, 3]])
    with atomic_path(path, suffix=".mat") as tmp:
        sitk.WriteTransform(transform, tmp)
    return os.fspath(path)


def organ_map(probabilities: np.ndarray) -> np.ndarray:
    """One image of a scan's organs for an intensity registration between label maps: each voxel
    the expected organ rank, ``sum_k k * p_k`` over the foreground labels ``k = 1 .. L-1`` of the
    probabilities ``[L, D, H, W]`` (background 0 first; a one-hot label map gives its ranks),
    ``[D, H, W]`` float32. Two scans' organ maps are alike where their organs coincide, whatever
    their modalities."""
    ranks = np.arange(probabilities.shape[0], dtype=np.float32).reshape(-1, *([1] * (probabilities.ndim - 1)))
    return (np.asarray(probabilities, np.float32) * ranks).sum(axis=0)


@dataclasses.dataclass(frozen=True)
class OrganGuide:
    """What guides an alignment by organs: the scan's organs as the finder found them and the
    reference's organs, both as label maps (codes) and as organ maps (:func:`organ_map`).

    Attributes:
        scan_label: the finder's label of the scan, on the finder's grid (the scan's space).
        reference_label: the organs in the reference's space (e.g. the atlases' majority on the
            working grid, :func:`reference_organs`).
        start: the rigid transform carrying the reference's organ centroids onto the scan's
            (:func:`organ_start`), ``[4, 4]``; None when no organ is in both.
        scan_map: the organ map of the finder's probabilities, on the finder's grid.
        reference_map: the organ map of ``reference_label``, on its grid.
    """

    scan_label: Image
    reference_label: Image
    start: np.ndarray | None
    scan_map: Image
    reference_map: Image

    @classmethod
    def of(cls, scan_probabilities: np.ndarray, scan_geometry: Geometry, reference_label: Image,
           codes: Sequence[int]) -> "OrganGuide":
        """The guide of a scan's organ probabilities ``[L, D, H, W]`` (the finder's, codes ``codes``
        with the background 0 first) against the reference's organ label."""
        codes = [int(c) for c in codes]
        label = np.asarray(codes)[np.argmax(scan_probabilities, axis=0)]
        reference = np.stack([reference_label.array == c for c in codes]).astype(np.float32)
        start = organ_start(centroids_mm(reference, codes, reference_label.geometry),
                            centroids_mm(np.asarray(scan_probabilities), codes, scan_geometry))
        return cls(Image(label.astype(np.int16), scan_geometry), reference_label, start,
                   Image(organ_map(scan_probabilities), scan_geometry),
                   Image(organ_map(reference), reference_label.geometry))

    def register(self, initial: str | os.PathLike, seed: int = 0) -> list[str]:
        """An affine registration (ANTs, mean squares, the fast schedule) of the scan's organ map
        onto the reference's from the transform file ``initial`` (e.g. :attr:`start` written by
        :func:`write_affine`): one modality, no mutual information. Returns the transform files
        (reference point -> scan point), in the folder of ``initial``."""
        reg = ants.register(self.scan_map, self.reference_map, kind="affine_only", metric="meansquares", seed=seed,
                            fast=True, initial=[initial], out_dir=os.path.dirname(os.fspath(initial)))
        return list(reg.forward)

    def overlap(self, transforms: Sequence[str]) -> float:
        """Mean Dice over the reference's organs between its label and the scan's finder label
        brought into the reference's space through ``transforms`` (reference point -> scan point)."""
        moved = ants.apply(list(transforms), self.scan_label, self.reference_label.geometry, kind="label").array
        codes = [int(c) for c in np.unique(self.reference_label.array) if c]
        return float(np.mean([dice(self.reference_label.array == c, moved == c) for c in codes])) if codes else 0.0


def reference_organs(labels: np.ndarray, geometry: Geometry, codes: Sequence[int]) -> Image:
    """The organs in the reference's space: the majority (ties to the lowest code) of the atlases'
    labels ``[N, D, H, W]`` (codes) on the working grid ``geometry``."""
    votes = np.stack([(np.asarray(labels) == c).sum(axis=0) for c in codes])
    return Image(np.asarray(codes, np.int16)[np.argmax(votes, axis=0)], geometry)
