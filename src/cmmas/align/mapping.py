"""Between a scan's own grid and the atlas set's working grid, both ways.

Into the working grid: a scan goes through its affine alignment to the reference
(:func:`to_working`); atlases were stored there when the set was prepared. Back onto the scan:
:func:`map_back` is THE map-back of the pipeline: ``cmmas segment`` writes what it returns, and
the evaluation scores exactly that. The label on the scan's grid is the arg-max (ties to the
lowest code) of the fused per-label probabilities interpolated linearly through the inverse
alignment, never a nearest-neighbour resampling of the working-grid label.

A clinical scan has hundreds of millions of voxels and the working grid a few hundred thousand,
so both directions touch the scan's grid as little as they can: into the working grid only the
box of the scan that the working grid samples is read (in the scan's own dtype); back, only the
box that the atlases' structures can reach is labelled, and there most voxels take the label of
their working-grid cell without any interpolation (:func:`map_back`).

Transforms are ANTs affine files of the scan -> reference alignment (empty: the scan already
lies in the reference space). Arrays are numpy ``(z, y, x)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk

from cmmas import preprocess
from cmmas.align import ants
from cmmas.io import PROBABILITY_SCALE, Geometry, Image, label_dtype, reference_image, to_sitk

#: Percentiles clipped before min-max scaling to [0, 1] (CT and MR alike).
PERCENTILES = (0.5, 99.5)
#: A working voxel whose foreground probabilities sum to at most this is "quiet": a scan voxel
#: whose every neighbour on the working grid is quiet interpolates to background (below 0.5,
#: with room for rounding).
QUIET = 0.49
#: A working voxel is "dominant" when its top score beats every other by more than this: a scan
#: voxel whose neighbours are all dominant with the same label takes that label (the margin
#: covers rounding, ~1e-7, by far).
MARGIN = 1e-3
#: Cell value asking for the exact interpolation (:func:`_cell_labels`).
_REFINE = 255
#: Scan voxels interpolated at once (bounds the memory of :func:`_labels_at`).
_CHUNK = 1 << 20


class WorkingMaps(NamedTuple):
    """What :func:`map_back` maps: per-label scores on the working grid (a fusion's
    :class:`cmmas.fuse.vote.FusionResult` is one).

    Attributes:
        labels: label codes, ascending, the background 0 first.
        probabilities: ``[L, D, H, W]`` per-label probabilities, in the order of ``labels``.
        agreement: ``[D, H, W]`` fraction of atlases agreeing with the fused label.
    """

    labels: tuple[int, ...]
    probabilities: np.ndarray
    agreement: np.ndarray


def normalize(image: Image, mask: np.ndarray | None = None) -> Image:
    """Percentile clip then min-max to [0, 1], float32 (the networks' input convention)."""
    return preprocess.normalize_intensity(image, method="minmax", percentiles=PERCENTILES, mask=mask)


def alignment_matrix(transforms: Sequence[str]) -> np.ndarray:
    """The affine transform files as one ``[4, 4]`` homogeneous matrix acting on physical points
    ``(x, y, z, 1)`` in mm: reference points to scan points (ITK's direction, as
    :func:`cmmas.align.ants.transform_points`); the identity without transforms."""
    if not transforms:
        return np.eye(4)
    basis = np.vstack([np.zeros(3), np.eye(3)])
    moved = ants.transform_points(list(transforms), basis)
    matrix = np.eye(4)
    matrix[:3, :3] = (moved[1:] - moved[0]).T
    matrix[:3, 3] = moved[0]
    return matrix


def _index_matrix(geometry: Geometry) -> np.ndarray:
    """``[4, 4]``: continuous index ``(x, y, z, 1)`` of ``geometry`` -> physical point (mm)."""
    matrix = np.eye(4)
    matrix[:3, :3] = geometry.direction_matrix * np.asarray(geometry.spacing)
    matrix[:3, 3] = geometry.origin
    return matrix


def _resampled(image: Image, matrix: np.ndarray, geometry: Geometry, interpolator: int, pixel_type: int,
               default: float = 0.0) -> sitk.Image:
    """``image`` sampled on ``geometry`` through ``matrix`` (output physical point -> input
    physical point), by SimpleITK: the input in its own dtype (bool and float16 as float32)."""
    if image.array.dtype in (np.bool_, np.float16):
        image = image.with_array(image.array.astype(np.float32))
    transform = sitk.AffineTransform(3)
    transform.SetMatrix([float(v) for v in matrix[:3, :3].ravel()])
    transform.SetTranslation([float(v) for v in matrix[:3, 3]])
    return sitk.Resample(to_sitk(image), reference_image(geometry, pixel_type), transform, interpolator,
                         float(default), pixel_type)


def _resample(image: Image, matrix: np.ndarray, geometry: Geometry, interpolator: int, pixel_type: int,
              default: float = 0.0) -> np.ndarray:
    """:func:`_resampled` as a numpy array ``(z, y, x)``."""
    return sitk.GetArrayFromImage(_resampled(image, matrix, geometry, interpolator, pixel_type, default))


def _moved(image: Image, transforms: Sequence[str], geometry: Geometry, default: float) -> Image:
    """``image`` resampled linearly onto ``geometry`` (float32) through the alignment, reading only
    the box of ``image`` that ``geometry`` samples; ``default`` where it lies outside ``image``."""
    box = reached_box(geometry, transforms, image.geometry)
    if box is None:
        return Image(np.full(geometry.shape, default, dtype=np.float32), geometry, image.path)
    crop = Image(image.array[box], image.geometry.sub_grid(box), image.path)
    moved = _resample(crop, alignment_matrix(transforms), geometry, sitk.sitkLinear, sitk.sitkFloat32, default)
    return Image(moved, geometry, image.path)


def to_space(image: Image, transforms: Sequence[str], geometry: Geometry, kind: str) -> Image:
    """Resample a case's image ("linear", normalised after) or label ("label") onto the working grid."""
    if kind == "label":
        return ants.apply(list(transforms), image, geometry, kind=kind)
    return normalize(_moved(image, transforms, geometry, default=0.0))


def to_working(target: Image, transforms: Sequence[str], geometry: Geometry) -> Image:
    """The scan on the working grid ``geometry``, normalised to [0, 1] (float32).

    Through its alignment ``transforms`` (scan -> reference; outside the scan 0); with none, its
    physical coordinates are taken as they are (outside the scan its minimum). Only the box of
    the scan that the working grid samples is read, in the scan's own dtype.
    """
    if transforms:
        return to_space(target, transforms, geometry, kind="linear")
    return normalize(_moved(target, [], geometry, default=float(target.array.min())))


def reached_box(
    geometry: Geometry, transforms: Sequence[str], target: Geometry
) -> tuple[slice, slice, slice] | None:
    """The voxel box ``(z, y, x)`` of the target grid that values on ``geometry`` (a working grid
    or a box of it) reach when mapped back, or that ``geometry`` samples when the target is
    mapped onto it; None when it lies outside the target.

    ``transforms`` are the target -> reference affine files (empty: none); the grid's corners
    (voxel edges, as far as linear interpolation reaches) are mapped into the target's space and
    their bounding box taken, one voxel wider, clipped to the target.
    """
    return _box(geometry, alignment_matrix(transforms), target)


def _clip_unit(values: np.ndarray, out: np.ndarray) -> None:
    """``out[...] = clip(values, 0, 1)`` (np.clip is several times slower on large float32 arrays)."""
    np.minimum(values, 1.0, out=out)
    np.maximum(out, 0.0, out=out)


def _first_argmax(scores: np.ndarray) -> np.ndarray:
    """``np.argmax(scores, axis=0)`` of ``[L, ...]`` (first of tied maxima), in L vectorised passes:
    numpy's arg-max along the first axis of a large array is ~3x slower."""
    best = scores[0].copy()
    index = np.zeros(best.shape, dtype=np.intp)
    for k in range(1, len(scores)):
        better = scores[k] > best
        index[better] = k
        np.maximum(best, scores[k], out=best)
    return index


def working_label(fused: WorkingMaps) -> np.ndarray:
    """The label ``[D, H, W]`` (codes) of working-grid scores: a fusion's own label when it has one
    (:class:`cmmas.fuse.vote.FusionResult`), else the arg-max of its probabilities (ties to the
    lowest code)."""
    label = getattr(fused, "label", None)
    if label is not None:
        return np.asarray(label)
    return np.asarray([int(c) for c in fused.labels])[_first_argmax(np.asarray(fused.probabilities))]


def one_hot_maps(label: np.ndarray, codes: Sequence[int]) -> WorkingMaps:
    """A working-grid label map ``[D, H, W]`` as :class:`WorkingMaps` (its one-hot, agreement 1), so
    that a single label map (one atlas, a bound) is mapped back exactly as a fused one."""
    codes = sorted(int(c) for c in codes)
    label = np.asarray(label)
    probabilities = np.stack([label == c for c in codes]).astype(np.float32)
    return WorkingMaps(tuple(codes), probabilities, np.ones(label.shape, np.float32))


def _scores(foreground: np.ndarray) -> np.ndarray:
    """``[L, ...]`` label scores from foreground probabilities ``[L - 1, ...]``: each clipped to
    [0, 1], the background first as ``clip(1 - their sum, 0, 1)``."""
    clipped = np.clip(foreground, 0.0, 1.0)
    return np.concatenate([np.clip(1.0 - clipped.sum(axis=0), 0.0, 1.0)[None], clipped])


def _cell_labels(foreground: np.ndarray) -> np.ndarray:
    """The label index (0 = background) that every point of each working-grid cell interpolates
    to, or :data:`_REFINE` where the cell needs the exact interpolation.

    ``foreground`` is ``[L - 1, D, H, W]``. Cell ``j`` (``[D + 1, H + 1, W + 1]``) spans the
    continuous working index ``[j - 1, j]`` per axis; its corners are the voxels ``j - 1`` and ``j``
    clamped to the grid, as linear interpolation clamps them within half a voxel of the edge. A
    cell whose 8 corners are all quiet (:data:`QUIET`) is background; one whose corners all hold
    probabilities in [0, 1] summing to at most 1 and share one dominant label (:data:`MARGIN`) has
    that label everywhere inside (interpolation is then a convex combination of the corners'
    scores). Cells on the grid's edge reach outside it, where every point is background: they are
    background or refined.
    """
    scores = _scores(foreground)
    top = _first_argmax(scores)
    best = np.take_along_axis(scores, top[None], axis=0)[0]
    np.put_along_axis(scores, top[None], -np.inf, axis=0)
    clean = np.all((foreground >= 0) & (foreground <= 1), axis=0) & (foreground.sum(axis=0) <= 1)
    dominant = np.where(clean & (best - scores.max(axis=0) > MARGIN), top, -1).astype(np.int16)
    quiet = (np.maximum(foreground, 0).sum(axis=0) <= QUIET).astype(np.int8)
    dominant, quiet = np.pad(dominant, 1, mode="edge"), np.pad(quiet, 1, mode="edge")
    cells_shape = np.asarray(dominant.shape) - 1
    corners = [tuple(slice(a, a + n) for a, n in zip(offset, cells_shape)) for offset in np.ndindex(2, 2, 2)]
    low = np.min([dominant[c] for c in corners], axis=0)
    high = np.max([dominant[c] for c in corners], axis=0)
    all_quiet = np.min([quiet[c] for c in corners], axis=0) == 1
    cells = np.full(low.shape, _REFINE, dtype=np.uint8)
    uniform = (low == high) & (low >= 0)
    cells[uniform] = low[uniform]
    edge = np.ones(cells.shape, dtype=bool)
    edge[1:-1, 1:-1, 1:-1] = False
    cells[edge & (cells != 0)] = _REFINE
    cells[all_quiet] = 0
    return cells


def _cell_geometry(working: Geometry) -> Geometry:
    """The grid of :func:`_cell_labels`: voxel ``j`` centred at working index ``j - 0.5``, so that
    nearest-neighbour sampling finds the cell ``floor(index) + 1`` of a point."""
    origin = working.index_to_physical(np.full(3, -0.5))
    return Geometry(size=tuple(s + 1 for s in working.size), spacing=working.spacing,  # type: ignore[arg-type]
                    origin=tuple(float(o) for o in origin), direction=working.direction)  # type: ignore[arg-type]


def _labels_at(foreground: np.ndarray, index_matrix: np.ndarray, points_zyx: Sequence[np.ndarray]) -> np.ndarray:
    """The label index at scan voxels ``points_zyx`` (three integer arrays ``[N]``), exactly: the
    foreground ``[L - 1, D, H, W]`` interpolated linearly at each voxel's working index
    (``index_matrix``: scan index (x, y, z, 1) -> working index), clamped to the grid within half a
    voxel of its edge and 0 beyond (as ITK's linear interpolation), then :func:`_scores`' arg-max.
    The working indices, weights and values are single precision: their rounding (~1e-7 relative,
    ~1e-4 of a working voxel on a 1000-voxel scan axis) is far below :data:`MARGIN`.
    """
    size = np.asarray(foreground.shape[1:][::-1])  # x, y, z
    rows = np.ascontiguousarray(np.moveaxis(foreground, 0, -1).reshape(-1, foreground.shape[0]), np.float32)
    rows_of_matrix = index_matrix.astype(np.float32)
    out = np.zeros(len(points_zyx[0]), dtype=np.uint8)
    for start in range(0, len(out), _CHUNK):
        part = slice(start, start + _CHUNK)
        index = [np.asarray(p[part], np.float32) for p in points_zyx[::-1]]  # x, y, z
        inside = np.ones(len(index[0]), dtype=bool)
        low, high, frac = [], [], []
        for axis in range(3):
            u = (rows_of_matrix[axis, 0] * index[0] + rows_of_matrix[axis, 1] * index[1]
                 + rows_of_matrix[axis, 2] * index[2] + rows_of_matrix[axis, 3])
            inside &= (u >= -0.5) & (u < size[axis] - 0.5)
            np.clip(u, 0, size[axis] - 1, out=u)
            base = np.minimum(u.astype(np.intp), max(size[axis] - 2, 0))  # u >= 0: truncation is floor
            low.append(base)
            high.append(np.minimum(base + 1, size[axis] - 1))
            frac.append(u - base.astype(np.float32))
        values = np.zeros((len(index[0]), foreground.shape[0]), dtype=np.float32)
        for dz, dy in np.ndindex(2, 2):
            plane = ((high[2] if dz else low[2]) * size[1] + (high[1] if dy else low[1])) * size[0]
            weight_zy = (frac[2] if dz else 1 - frac[2]) * (frac[1] if dy else 1 - frac[1])
            for dx in (0, 1):
                weight = weight_zy * (frac[0] if dx else 1 - frac[0])
                values += weight[:, None] * rows[plane + (high[0] if dx else low[0])]
        values[~inside] = 0.0
        out[part] = _first_argmax(_scores(values.T))
    return out


def _label(foreground: np.ndarray, working: Geometry, matrix: np.ndarray,
           target: Geometry) -> tuple[np.ndarray, tuple[slice, slice, slice]] | None:
    """The label index (0 = background) of the scan voxels :func:`map_back` labels: cells sampled
    by nearest neighbour onto the box of the scan they reach, the cells' refined voxels
    interpolated. Returns ``(index, box)``, ``index`` the box's ``[d, h, w]``; outside the box every
    voxel is background. None when no cell can hold a structure on the scan."""
    cells = _cell_labels(foreground)
    if not cells.any():
        return None
    cell_grid = _cell_geometry(working)
    box = _box(cell_grid.sub_grid(preprocess.bounding_box(cells)), matrix, target)
    if box is None:
        return None
    sampled = _resample(Image(cells, cell_grid), np.linalg.inv(matrix), target.sub_grid(box),
                        sitk.sitkNearestNeighbor, sitk.sitkUInt8)
    refine = np.nonzero(sampled == _REFINE)
    if refine[0].size:
        index_matrix = np.linalg.inv(_index_matrix(working)) @ np.linalg.inv(matrix) @ _index_matrix(target)
        points = [p + cut.start for p, cut in zip(refine, box)]
        sampled[refine] = _labels_at(foreground, index_matrix, points)
    return sampled, box


def _probability_map(values: np.ndarray, working: Geometry, inverse: np.ndarray, target: Geometry,
                     support: np.ndarray | None) -> tuple[np.ndarray, tuple[slice, slice, slice] | None]:
    """Fractions ``[D, H, W]`` on the working grid as a uint8 map on the scan's grid (value /
    :data:`cmmas.io.PROBABILITY_SCALE`, rounded): clipped to [0, 1] and scaled on the working grid,
    then interpolated linearly (``inverse``: scan point -> reference point) onto the box of the
    scan that ``support`` (working voxels, default all) reaches; 0 elsewhere. Returns the map and
    that box (None: the map is 0 everywhere)."""
    out = np.zeros(target.shape, dtype=np.uint8)  # untouched pages stay the kernel's zero page
    if support is not None and not support.any():
        return out, None
    grid = working if support is None else working.sub_grid(preprocess.bounding_box(support, margin_vox=1))
    box = _box(grid, np.linalg.inv(inverse), target)
    if box is None:
        return out, None
    scaled = np.clip(values, 0.0, 1.0) * PROBABILITY_SCALE + 0.5  # truncated to uint8 by ITK: rounded
    moved = _resampled(Image(scaled.astype(np.float32), working), inverse, target.sub_grid(box), sitk.sitkLinear,
                       sitk.sitkUInt8)
    out[box] = sitk.GetArrayViewFromImage(moved)
    return out, box


def _background_map(foreground: Sequence[tuple[np.ndarray, tuple[slice, slice, slice] | None]],
                    shape: tuple[int, ...]) -> np.ndarray:
    """The background's uint8 map: :data:`cmmas.io.PROBABILITY_SCALE` minus the foreground maps'
    sum (0 where they reach it), so that the maps of a voxel sum to the scale (more only where the
    foreground maps' roundings alone exceed it); ``foreground``
    holds each map with its box (:func:`_probability_map`). Interpolation is linear, so this is the
    background's working-grid fraction interpolated, up to the foreground maps' rounding; outside
    every box the background is 1."""
    out = np.full(shape, PROBABILITY_SCALE, dtype=np.uint8)
    boxes = [box for _, box in foreground if box is not None]
    if not boxes:
        return out
    union = tuple(slice(min(b[axis].start for b in boxes), max(b[axis].stop for b in boxes)) for axis in range(3))
    total = np.zeros(tuple(cut.stop - cut.start for cut in union), dtype=np.uint16)
    for values, box in foreground:
        if box is not None:
            inner = tuple(slice(b.start - u.start, b.stop - u.start) for b, u in zip(box, union))
            total[inner] += values[box]
    out[union] = PROBABILITY_SCALE - np.minimum(total, PROBABILITY_SCALE)
    return out


def _box(geometry: Geometry, matrix: np.ndarray, target: Geometry) -> tuple[slice, slice, slice] | None:
    """:func:`reached_box` through an alignment matrix (:func:`alignment_matrix`)."""
    corners = matrix @ np.vstack([geometry.corners().T, np.ones(8)])
    index_xyz = target.physical_to_index(corners[:3].T)
    low = np.clip(np.floor(index_xyz.min(axis=0)) - 1, 0, target.size).astype(int)
    high = np.clip(np.ceil(index_xyz.max(axis=0)) + 2, 0, target.size).astype(int)
    if np.any(high <= low):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(low[::-1], high[::-1]))  # type: ignore[return-value]


def map_back(fused: WorkingMaps, working: Image, transforms: Sequence[str], target: Image,
             maps: bool = True) -> tuple[Image, dict[int, Image] | None, Image | None]:
    """A fusion on the working grid mapped onto the scan's grid: ``(label, probabilities, agreement)``.

    Args:
        fused: the fusion's result on the working grid (its ``labels`` ascending, 0 first).
        working: the scan on the working grid (its geometry is used).
        transforms: the scan -> reference alignment files (empty: none).
        target: the scan on its own grid (its geometry is used).
        maps: also map the probabilities and the agreement (else both None).

    Returns:
        The label (codes, as :func:`cmmas.io.label_dtype` of them), and with ``maps`` code ->
        probability and the agreement, all on the scan's grid, uint8: value /
        :data:`cmmas.io.PROBABILITY_SCALE` (255) is the fraction, rounded to the nearest 1/255.
        A foreground map is its working-grid fractions (clipped to [0, 1]) interpolated linearly,
        resampled only on the box its non-zero working voxels reach; the background map is 255
        minus their sum (the working grid's ``1 -`` their sum interpolated, as :func:`_scores`, up
        to their rounding), so the maps of a voxel sum to 255 (more only where the foreground maps'
        roundings alone exceed it); the agreement is interpolated on
        the box the working grid covers. Outside the working grid the background has probability
        1 (255) and the agreement is 0.

    The label is the arg-max (ties to the lowest code) of the scores of :func:`_scores` (the
    foreground probabilities clipped to [0, 1], the background ``1 -`` their sum) interpolated
    linearly through the inverse alignment, as a resampling of every scan voxel would give it,
    but computed without one: only the box of the scan that the structures' working-grid cells
    reach is labelled (the rest cannot be foreground), and there a voxel whose cell is uniform
    (:func:`_cell_labels`) takes its label from a nearest-neighbour lookup; only voxels of the
    cells along the structures' borders are interpolated.
    """
    codes = np.asarray([int(c) for c in fused.labels])  # ascending: the background 0 first
    foreground = np.asarray(fused.probabilities[1:], dtype=np.float32)
    matrix = alignment_matrix(transforms)
    label = np.zeros(target.shape, dtype=label_dtype(codes))
    labelled = _label(foreground, working.geometry, matrix, target.geometry)
    if labelled is not None:
        index, box = labelled
        label[box] = codes.astype(label.dtype)[index]
    label = target.with_array(label)
    if not maps:
        return label, None, None
    inverse = np.linalg.inv(matrix)
    moved = [_probability_map(values, working.geometry, inverse, target.geometry, values != 0) for values in foreground]
    probabilities = [_background_map(moved, target.shape), *(values for values, _ in moved)]
    agreement, _ = _probability_map(np.asarray(fused.agreement, np.float32), working.geometry, inverse,
                                    target.geometry, None)
    return (label, {int(code): target.with_array(p) for code, p in zip(codes, probabilities)},
            target.with_array(agreement))
