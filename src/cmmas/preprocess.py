"""Resampling, reorientation, intensity normalisation, cropping and ROIs, with an exact inverse.

Every geometric step here is a change of voxel grid *in the same physical space*: voxels keep
their millimetre positions (LPS, as ITK), only the grid that samples them changes. So a whole
preprocessing chain collapses into one :func:`to_working_grid` call (canonical orientation,
working spacing, network shape, centred on a region of interest), and mapping a prediction back
to the scan is one :func:`back_to_grid` resample onto the scan's original :class:`Geometry`.

Arrays are in SimpleITK order ``(z, y, x)``; spacings given as ``spacing_zyx`` are in that order
too, in millimetres. Physical points (``center_mm``, origins) are ``(x, y, z)`` in millimetres.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from cmmas.errors import CmmasError, GeometryError, LabelError
from cmmas.io import Geometry, Image, from_sitk, reference_image, to_sitk

Kind = Literal["linear", "nearest", "label", "bspline"]

#: Identity direction cosines: voxel axes x, y, z point to patient Left, Posterior, Superior.
IDENTITY_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

_INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "label": sitk.sitkLabelGaussian,
    "bspline": sitk.sitkBSpline,
}
_AXIS_LETTERS = ({"L", "R"}, {"A", "P"}, {"S", "I"})
# Relative spacing difference below which two grids count as the same lattice.
_SPACING_RTOL = 1e-5
# Distance (in voxels) below which a grid point counts as lying on another grid's voxel centre.
_LATTICE_ATOL = 1e-3


def _source(data: object) -> str | None:
    return data.path if isinstance(data, Image) else None


def _triple(
    values: float | Sequence[float], what: str, source: str | None, positive: bool | None = True
) -> tuple[float, float, float]:
    """Three finite floats (a scalar is repeated): positive (True), non-negative (False) or any (None)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(3, float(arr))
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise GeometryError(source, f"{what} must be 3 finite numbers, got {values!r}")
    if positive is True and not np.all(arr > 0):
        raise GeometryError(source, f"{what} must be positive, got {values!r}")
    if positive is False and not np.all(arr >= 0):
        raise GeometryError(source, f"{what} must not be negative, got {values!r}")
    return tuple(float(v) for v in arr)  # type: ignore[return-value]


def _shape(values: Sequence[int], what: str, source: str | None) -> tuple[int, int, int]:
    arr = np.asarray(values)
    if arr.shape != (3,) or not np.all(arr == np.round(arr)) or not np.all(arr >= 1):
        raise GeometryError(source, f"{what} must be 3 positive integers, got {values!r}")
    return tuple(int(v) for v in arr)  # type: ignore[return-value]


def _check_kind(kind: str, source: str | None) -> None:
    if kind not in _INTERPOLATORS:
        raise CmmasError(
            source, f"unknown interpolation kind {kind!r}; expected one of {sorted(_INTERPOLATORS)}"
        )


def physical_center(geometry: Geometry) -> np.ndarray:
    """Physical position ``(x, y, z)`` in millimetres of the centre of the grid's voxel box."""
    return geometry.index_to_physical((np.asarray(geometry.size, dtype=np.float64) - 1.0) / 2.0)


def working_geometry(
    center_mm: Sequence[float],
    spacing_zyx: float | Sequence[float],
    shape_zyx: Sequence[int],
    direction: Sequence[float] | np.ndarray = IDENTITY_DIRECTION,
) -> Geometry:
    """A grid of ``shape_zyx`` voxels of ``spacing_zyx`` mm whose box is centred at ``center_mm``.

    Args:
        center_mm: physical centre ``(x, y, z)`` in millimetres.
        spacing_zyx: voxel size in array order ``(z, y, x)``, millimetres (a scalar: isotropic).
        shape_zyx: array shape ``(z, y, x)``.
        direction: 3x3 direction cosines (9 floats row-major, or a ``[3, 3]`` array); identity
            gives the canonical LPS orientation.
    """
    center = np.asarray(_triple(center_mm, "center_mm", None, positive=None))
    spacing_xyz = np.asarray(_triple(spacing_zyx, "spacing_zyx", None)[::-1])
    size_xyz = np.asarray(_shape(shape_zyx, "shape_zyx", None)[::-1])
    matrix = np.asarray(direction, dtype=np.float64).reshape(-1)
    square = matrix.reshape(3, 3) if matrix.shape == (9,) else None
    if square is None or not np.allclose(square @ square.T, np.eye(3), atol=1e-6):
        raise GeometryError(None, f"direction must be an orthonormal 3x3 matrix, got {direction!r}")
    half = (size_xyz - 1.0) / 2.0 * spacing_xyz
    origin = center - square @ half
    return Geometry(
        size=tuple(int(s) for s in size_xyz),  # type: ignore[arg-type]
        spacing=tuple(float(s) for s in spacing_xyz),  # type: ignore[arg-type]
        origin=tuple(float(o) for o in origin),  # type: ignore[arg-type]
        direction=tuple(float(d) for d in matrix),
    )


def _axis_map(source: Geometry, target: Geometry) -> list[int] | None:
    """For each voxel axis of ``target``, the parallel axis of ``source``; None if not axis-aligned."""
    relative = np.linalg.inv(source.direction_matrix) @ target.direction_matrix
    rounded = np.round(relative)
    if not np.allclose(relative, rounded, atol=1e-6):
        return None
    if not (np.all(np.abs(rounded).sum(axis=0) == 1) and np.all(np.abs(rounded).sum(axis=1) == 1)):
        return None
    return [int(np.argmax(np.abs(rounded[:, k]))) for k in range(3)]


def _same_spacing(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_SPACING_RTOL)


def _on_lattice(source: Geometry, target: Geometry) -> bool:
    """True when every voxel centre of ``target`` coincides with a voxel centre of ``source``."""
    axes = _axis_map(source, target)
    if axes is None:
        return False
    if not all(_same_spacing(target.spacing[k], source.spacing[j]) for k, j in enumerate(axes)):
        return False
    index = source.physical_to_index(np.asarray(target.origin))
    return bool(np.allclose(index, np.round(index), atol=_LATTICE_ATOL))


def _snap_to_lattice(target: Geometry, source: Geometry) -> Geometry:
    """Shift ``target`` by less than half a voxel so that it samples ``source``'s voxel centres.

    Only along the axes where both grids are parallel with equal spacing; elsewhere unchanged.
    """
    axes = _axis_map(source, target)
    if axes is None:
        return target
    index = source.physical_to_index(np.asarray(target.origin))
    for k, j in enumerate(axes):
        if _same_spacing(target.spacing[k], source.spacing[j]):
            index[j] = np.round(index[j])
    origin = source.index_to_physical(index)
    return dataclasses.replace(target, origin=tuple(float(o) for o in origin))


def _respaced(geometry: Geometry, spacing_zyx: float | Sequence[float], source: str | None) -> Geometry:
    """Same origin and direction, new spacing, size ``ceil(old extent / new spacing)``."""
    new = np.asarray(_triple(spacing_zyx, "spacing_zyx", source)[::-1])
    extent = np.asarray(geometry.size) * np.asarray(geometry.spacing)
    size = np.maximum(1, np.ceil(extent / new - 1e-6)).astype(int)
    return Geometry(
        size=tuple(int(s) for s in size),  # type: ignore[arg-type]
        spacing=tuple(float(s) for s in new),  # type: ignore[arg-type]
        origin=geometry.origin,
        direction=geometry.direction,
    )


def _sitk_ready(image: Image, kind: str) -> tuple[Image, Callable[[np.ndarray], np.ndarray]]:
    """The image in a pixel type SimpleITK can interpolate with ``kind``, and how to restore the dtype.

    Intensities keep their own dtype (SimpleITK interpolates any numeric type in double precision
    and writes float32): an int16 CT is not first copied to float32."""
    array = image.array
    if kind in ("linear", "bspline"):
        if array.dtype in (np.bool_, np.float16):
            return image.with_array(array.astype(np.float32)), lambda out: out
        return image, lambda out: out
    if array.dtype == np.bool_:
        return image.with_array(array.astype(np.uint8)), lambda out: out.astype(np.bool_)
    if kind == "label" and not np.issubdtype(array.dtype, np.integer):
        if not np.all(array == np.round(array)):
            raise LabelError(image.path, "label resampling needs integer values; the array holds fractions")
        return image.with_array(array.astype(np.int32)), lambda out: out
    return image, lambda out: out


def resample(
    image: Image,
    spacing_zyx: float | Sequence[float] | None = None,
    geometry: Geometry | None = None,
    kind: Kind = "linear",
    default: float = 0.0,
) -> Image:
    """Resample onto a new spacing or onto an explicit grid; physical positions are kept.

    Args:
        image: the input image.
        spacing_zyx: new voxel size ``(z, y, x)`` in millimetres (a scalar: isotropic). The origin
            (centre of voxel 0) and direction stay; the size becomes ``ceil(old extent / new
            spacing)`` per axis, so the new grid covers the old physical extent. When upsampling,
            the last sample along an axis lies half an old voxel or more past the last old voxel
            centre, outside what ITK interpolates, and takes ``default``.
        geometry: the output grid instead (give exactly one of ``spacing_zyx`` and ``geometry``).
        kind: ``"linear"`` and ``"bspline"`` give float32; ``"nearest"`` keeps the dtype;
            ``"label"`` (SimpleITK's label-Gaussian vote, like ANTs' generic label) keeps integer
            dtypes (integer-valued float arrays come back as int32, bool stays bool). Where every
            output voxel centre coincides with an input voxel centre (same spacing, parallel axes,
            whole-voxel offset), ``"label"`` copies voxels exactly instead of smoothing.
        default: value of output voxels outside the input image.

    Returns:
        :class:`Image` on the new grid (``path`` kept for messages).
    """
    _check_kind(kind, image.path)
    if (spacing_zyx is None) == (geometry is None):
        raise GeometryError(image.path, "resample needs exactly one of spacing_zyx or geometry")
    target = _respaced(image.geometry, spacing_zyx, image.path) if geometry is None else geometry
    interpolator = _INTERPOLATORS[kind]
    if kind == "label" and _on_lattice(image.geometry, target):
        interpolator = sitk.sitkNearestNeighbor
    ready, restore = _sitk_ready(image, kind)
    src = to_sitk(ready)
    pixel = sitk.sitkFloat32 if kind in ("linear", "bspline") else src.GetPixelID()
    integer = pixel != sitk.sitkFloat32 and np.issubdtype(ready.array.dtype, np.integer)
    fill = float(round(default)) if integer else float(default)
    out = sitk.Resample(src, reference_image(target, pixel), sitk.Transform(), interpolator, fill, pixel)
    return Image(restore(sitk.GetArrayFromImage(out)), target, image.path)


def reorient(image: Image, orientation: str = "LPS") -> Image:
    """Permute/flip the voxel axes so that they point along ``orientation`` (default ``"LPS"``).

    The three letters say where voxel axes x, y, z point (``"LPS"``: x to patient Left, y to
    Posterior, z to Superior, i.e. the identity direction). Only the array layout, origin and
    direction change: every voxel keeps its value *and its physical position* in millimetres.
    An oblique image is permuted to the closest orientation and stays oblique.
    """
    code = str(orientation).upper()
    if len(code) != 3 or any(sum(c in letters for c in code) != 1 for letters in _AXIS_LETTERS):
        raise GeometryError(
            image.path, f"invalid orientation {orientation!r}; use one letter of L/R, A/P and S/I, e.g. 'LPS'"
        )
    ready, restore = _sitk_ready(image, "nearest")
    out = from_sitk(sitk.DICOMOrient(to_sitk(ready), code), image.path)
    return Image(restore(out.array), out.geometry, image.path)


def _mask_array(mask: np.ndarray | Image, shape: tuple[int, ...], source: str | None) -> np.ndarray:
    array = mask.array if isinstance(mask, Image) else np.asarray(mask)
    if array.shape != tuple(shape):
        raise GeometryError(
            _source(mask) or source, f"mask shape {array.shape} does not match image shape {tuple(shape)}"
        )
    return array != 0


#: Voxels :func:`sample` keeps at most: percentiles of a clinical scan from every voxel would sort
#: hundreds of millions of values; a regular subsample of this size estimates them within a
#: fraction of a grey level.
SAMPLE_VOXELS = 1 << 21


def sample(values: np.ndarray, limit: int = SAMPLE_VOXELS) -> np.ndarray:
    """A regular subsample of ``values`` (every k-th of the flattened array, in its own dtype) of at
    most ``limit`` values; all of them (flattened) when there are no more."""
    flat = values.reshape(-1)
    step = -(-flat.size // limit)
    return flat[::step] if step > 1 else flat


def normalize_intensity(
    data: np.ndarray | Image,
    method: Literal["zscore", "minmax"] = "zscore",
    percentiles: tuple[float, float] | None = (0.5, 99.5),
    mask: np.ndarray | Image | None = None,
) -> np.ndarray | Image:
    """Clip to intensity percentiles, then z-score or scale to ``[0, 1]``.

    Args:
        data: a 3D array or :class:`Image` (any shape works for arrays).
        method: ``"zscore"`` (zero mean, unit standard deviation) or ``"minmax"`` (``[0, 1]``).
        percentiles: ``(low, high)`` in percent; values are clipped to these percentiles
            first. None: no clipping.
        mask: where to measure percentiles, mean, std, min and max (same shape); the whole
            array is transformed. None: everywhere.

    The statistics come from at most :data:`SAMPLE_VOXELS` voxels (of the mask), a regular
    subsample beyond that (:func:`sample`); the array is transformed in single precision,
    without a double-precision copy.

    Returns:
        float32 values of the same type as ``data`` (array or Image on the same grid).
        A constant input (after clipping) gives zeros, never NaN.
    """
    source = _source(data)
    array = data.array if isinstance(data, Image) else np.asarray(data)
    if method not in ("zscore", "minmax"):
        raise CmmasError(source, f"unknown normalisation {method!r}; expected 'zscore' or 'minmax'")
    picked = array if mask is None else array[_mask_array(mask, array.shape, source)]
    if picked.size == 0:
        raise LabelError(_source(mask) or source, "normalisation mask is empty")
    values = sample(picked).astype(np.float64)
    out = array.astype(np.float32)
    if percentiles is not None:
        low, high = (float(p) for p in percentiles)
        if not 0.0 <= low < high <= 100.0:
            raise CmmasError(source, f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles!r}")
        lo, hi = np.percentile(values, [low, high])
        np.clip(values, lo, hi, out=values)
        np.clip(out, lo, hi, out=out)
    smin, smax = float(values.min()), float(values.max())
    if smax <= smin:
        out[...] = 0.0
    elif method == "zscore":
        out -= values.mean()
        out /= values.std()
    else:
        out -= smin
        out /= smax - smin
        np.clip(out, 0.0, 1.0, out=out)
    return data.with_array(out) if isinstance(data, Image) else out


def crop_or_pad(
    image: Image,
    shape_zyx: Sequence[int],
    center_zyx: Sequence[int] | None = None,
    pad_value: float = 0,
) -> Image:
    """Cut (or pad to) a ``shape_zyx`` box around a centre voxel, keeping physical positions.

    Output voxel ``j`` is input voxel ``center - shape // 2 + j`` (per axis); voxels outside the
    input take ``pad_value``. The origin moves so that every kept voxel stays where it was in
    millimetres; spacing, direction and dtype are unchanged.

    Args:
        image: the input image.
        shape_zyx: output array shape ``(z, y, x)``.
        center_zyx: integer voxel index ``(z, y, x)`` of the centre; default the middle voxel
            ``size // 2``.
        pad_value: value of padded voxels.
    """
    shape = np.asarray(_shape(shape_zyx, "shape_zyx", image.path))
    size = np.asarray(image.shape)
    if center_zyx is None:
        center = size // 2
    else:
        center = np.asarray(center_zyx)
        if center.shape != (3,) or not np.all(center == np.round(center)):
            raise GeometryError(image.path, f"center_zyx must be 3 integer voxel indices, got {center_zyx!r}")
        center = center.astype(int)
    start = center - shape // 2
    src_lo = np.clip(start, 0, size)
    src_hi = np.clip(start + shape, 0, size)
    out = np.full(tuple(shape), pad_value, dtype=image.array.dtype)
    if np.all(src_hi > src_lo):
        dst = tuple(slice(int(a - s), int(b - s)) for a, b, s in zip(src_lo, src_hi, start))
        out[dst] = image.array[tuple(slice(int(a), int(b)) for a, b in zip(src_lo, src_hi))]
    origin = image.geometry.index_to_physical(start[::-1].astype(np.float64))
    geometry = dataclasses.replace(
        image.geometry,
        size=tuple(int(s) for s in shape[::-1]),
        origin=tuple(float(o) for o in origin),
    )
    return Image(out, geometry, image.path)


def bounding_box(mask: np.ndarray | Image, margin_vox: int | Sequence[int] = 0) -> tuple[slice, slice, slice]:
    """Smallest ``(z, y, x)`` box of slices holding every non-zero voxel, grown by a margin.

    Args:
        mask: 3D array (or :class:`Image`), non-zero inside.
        margin_vox: voxels added on each side (one int, or one per axis ``(z, y, x)``); the box
            is clipped to the array.

    Raises:
        LabelError: the mask is empty.
    """
    source = _source(mask)
    array = (mask.array if isinstance(mask, Image) else np.asarray(mask)) != 0
    if array.ndim != 3:
        raise GeometryError(source, f"expected a 3D mask, got shape {array.shape}")
    margin = np.broadcast_to(np.asarray(margin_vox), (3,))
    if not np.all(margin == np.round(margin)) or np.any(margin < 0):
        raise GeometryError(source, f"margin_vox must be non-negative integers, got {margin_vox!r}")
    if not array.any():
        raise LabelError(source, "mask is empty; no bounding box")
    box = []
    for axis in range(3):
        hits = np.flatnonzero(array.any(axis=tuple(a for a in range(3) if a != axis)))
        lo = max(0, int(hits[0]) - int(margin[axis]))
        hi = min(array.shape[axis], int(hits[-1]) + 1 + int(margin[axis]))
        box.append(slice(lo, hi))
    return tuple(box)  # type: ignore[return-value]


def body_mask(image: Image | np.ndarray, threshold: float | None = None) -> np.ndarray:
    """The body: voxels above a threshold, largest 6-connected component, enclosed holes filled.

    Args:
        image: 3D image or array.
        threshold: intensity threshold; None: Otsu's threshold of the whole image.

    Returns:
        bool array ``(z, y, x)``.

    Raises:
        LabelError: no voxel lies above the threshold.
    """
    from skimage.filters import threshold_otsu

    source = _source(image)
    array = image.array if isinstance(image, Image) else np.asarray(image)
    level = float(threshold_otsu(array)) if threshold is None else float(threshold)
    foreground = array > level
    components, count = ndimage.label(foreground)
    if count == 0:
        raise LabelError(source, f"no voxel above the body threshold {level:.4g}")
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(components == int(np.argmax(sizes)))


@dataclasses.dataclass(frozen=True)
class Roi:
    """A region of interest on an image's grid.

    Attributes:
        center_mm: physical centre ``(x, y, z)`` in millimetres of the mask's bounding box
            (pass it to :func:`to_working_grid`).
        center_zyx: the voxel nearest that centre, ``(z, y, x)`` (pass it to :func:`crop_or_pad`).
        box: ``(z, y, x)`` slices of the region, clipped to the image.
        size_mm: extent ``(z, y, x)`` in millimetres of the mask's bounding box plus the margin
            on both sides (before clipping).
        fits: whether the mask plus margin lies inside ``box`` (False only when a given
            ``shape_zyx`` is too small).
    """

    center_mm: tuple[float, float, float]
    center_zyx: tuple[int, int, int]
    box: tuple[slice, slice, slice]
    size_mm: tuple[float, float, float]
    fits: bool


def roi_from_mask(
    image: Image,
    mask: np.ndarray | Image,
    margin_mm: float | Sequence[float] = 0.0,
    shape_zyx: Sequence[int] | None = None,
) -> Roi:
    """The region around a mask's bounding box, grown by ``margin_mm`` on each side.

    Args:
        image: the image whose grid the mask lives on.
        mask: non-zero inside, same shape as ``image``.
        margin_mm: margin in millimetres (one value, or one per axis ``(z, y, x)``).
        shape_zyx: a fixed box shape in ``image`` voxels, centred on ``center_zyx`` as
            :func:`crop_or_pad` would cut it; None: the bounding box plus margin.

    Raises:
        LabelError: the mask is empty.
    """
    inside = _mask_array(mask, image.shape, image.path)
    margin = np.asarray(_triple(margin_mm, "margin_mm", image.path, positive=False))
    spacing = np.asarray(image.spacing_zyx)
    if not inside.any():
        raise LabelError(_source(mask) or image.path, "mask is empty; no region of interest")
    tight = bounding_box(inside)
    lo = np.array([s.start for s in tight], dtype=np.float64)
    hi = np.array([s.stop - 1 for s in tight], dtype=np.float64)
    middle = (lo + hi) / 2.0
    center_mm = image.geometry.index_to_physical(middle[::-1])
    center_zyx = np.floor(middle + 0.5).astype(int)
    margin_vox = np.ceil(margin / spacing - 1e-6).astype(int)
    need_lo, need_hi = lo.astype(int) - margin_vox, hi.astype(int) + 1 + margin_vox
    if shape_zyx is None:
        start, stop = need_lo, need_hi
    else:
        shape = np.asarray(_shape(shape_zyx, "shape_zyx", image.path))
        start = center_zyx - shape // 2
        stop = start + shape
    size = np.asarray(image.shape)
    box = tuple(slice(int(np.clip(a, 0, n)), int(np.clip(b, 0, n))) for a, b, n in zip(start, stop, size))
    return Roi(
        center_mm=tuple(float(c) for c in center_mm),  # type: ignore[arg-type]
        center_zyx=tuple(int(c) for c in center_zyx),  # type: ignore[arg-type]
        box=box,  # type: ignore[arg-type]
        size_mm=tuple(float(v) for v in (hi - lo + 1) * spacing + 2 * margin),  # type: ignore[arg-type]
        fits=bool(np.all(start <= need_lo) and np.all(stop >= need_hi)),
    )


def to_working_grid(
    image: Image,
    spacing_zyx: float | Sequence[float],
    shape_zyx: Sequence[int],
    center_mm: Sequence[float] | None = None,
    kind: Kind = "linear",
    default: float | None = None,
    snap: bool = True,
) -> Image:
    """Resample onto the network's working grid: LPS, given spacing and shape, centred on a point.

    Reorientation, respacing and cropping/padding happen in this one resample, so the inverse
    is one :func:`back_to_grid` call with the original geometry.

    Args:
        image: the scan (or its label map) on its original grid.
        spacing_zyx: working voxel size ``(z, y, x)`` in millimetres.
        shape_zyx: working array shape ``(z, y, x)``.
        center_mm: physical centre ``(x, y, z)`` of the working box (e.g. :attr:`Roi.center_mm`);
            None: the centre of the image.
        kind: interpolation (see :func:`resample`); ``"label"`` or ``"nearest"`` for label maps.
        default: value outside the scan; None: the image minimum for ``"linear"``/``"bspline"``
            (air in CT, background in MR), 0 for ``"nearest"``/``"label"``.
        snap: move the box by less than half a voxel so that, along every axis where the
            working spacing equals the scan's, working voxels sit on scan voxel centres (then
            labels are copied exactly and intensities are not blurred). Image and label of one
            scan snap identically.

    Returns:
        :class:`Image` on the working grid (identity direction).
    """
    _check_kind(kind, image.path)
    center = physical_center(image.geometry) if center_mm is None else center_mm
    target = working_geometry(center, spacing_zyx, shape_zyx)
    if snap:
        target = _snap_to_lattice(target, image.geometry)
    if default is None:
        default = float(image.array.min()) if kind in ("linear", "bspline") else 0.0
    return resample(image, geometry=target, kind=kind, default=default)


def back_to_grid(pred: Image, geometry: Geometry, kind: Kind = "nearest", default: float = 0.0) -> Image:
    """Map a working-grid prediction onto an original grid (e.g. the scan's :class:`Geometry`).

    Args:
        pred: prediction on the working grid (labels, or probabilities with ``kind="linear"``).
        geometry: the grid to return to.
        kind: ``"nearest"`` (labels, default), ``"label"`` (smoother labels when the working
            grid is coarser), ``"linear"`` (probabilities, intensities).
        default: value where the working grid did not reach (background).
    """
    return resample(pred, geometry=geometry, kind=kind, default=default)


def channel_index(labels: np.ndarray, codes: Sequence[int]) -> np.ndarray:
    """Label codes -> their channel index in ``codes`` (sorted, the background 0 first), as int8."""
    return np.searchsorted(np.asarray(codes), np.asarray(labels)).astype(np.int8)
