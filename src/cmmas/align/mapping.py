"""Between a scan's own grid and the atlas set's working grid, both ways.

Into the working grid: a scan goes through its affine alignment to the reference
(:func:`to_working`); atlases were stored there when the set was prepared. Back onto the scan:
:func:`map_back` is THE map-back of the pipeline: ``cmmas segment`` writes what it returns, and
the evaluation scores exactly that. It resamples the fused per-label probabilities linearly
through the inverse alignment and takes the label as their arg-max on the scan's grid (ties to
the lowest code), never a nearest-neighbour resampling of the working-grid label.

Transforms are ANTs affine files of the scan -> reference alignment (empty: the scan already
lies in the reference space). Arrays are numpy ``(z, y, x)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from cmmas import preprocess
from cmmas.align import ants
from cmmas.errors import AtlasSetError
from cmmas.io import Geometry, Image

#: Percentiles clipped before min-max scaling to [0, 1] (CT and MR alike).
PERCENTILES = (0.5, 99.5)


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


def to_space(image: Image, transforms: Sequence[str], geometry: Geometry, kind: str) -> Image:
    """Resample a case's image ("linear", normalised after) or label ("label") onto the working grid."""
    moved = ants.apply(list(transforms), image, geometry, kind=kind)
    if kind == "label":
        return moved
    return normalize(moved)



def covered_box(
    geometry: Geometry, transforms: Sequence[str], target: Geometry, source: str | os.PathLike | None = None
) -> tuple[slice, slice, slice]:
    """The voxel box ``(z, y, x)`` of the target grid that the working grid maps back onto
    (:func:`reached_box`). Mapping back onto this box only gives the same values as onto the
    whole grid: the rest lies outside the working grid (0 after resampling).

    Raises:
        AtlasSetError: the two grids do not overlap at all (named by ``source``, the target's file).
    """
    box = reached_box(geometry, transforms, target)
    if box is None:
        raise AtlasSetError(source, "the atlas set's working grid maps outside this scan: its alignment failed")
    return box


def reached_box(
    geometry: Geometry, transforms: Sequence[str], target: Geometry
) -> tuple[slice, slice, slice] | None:
    """The voxel box ``(z, y, x)`` of the target grid that values on ``geometry`` (a working grid
    or a box of it) reach when mapped back; None when it lies outside the target.

    ``transforms`` are the target -> reference affine files; the grid's corners (voxel edges, as
    far as linear interpolation reaches) are mapped into the target's space and their bounding
    box taken, one voxel wider, clipped to the target.
    """
    index_xyz = target.physical_to_index(ants.transform_points(transforms, geometry.corners()))
    low = np.clip(np.floor(index_xyz.min(axis=0)) - 1, 0, target.size).astype(int)
    high = np.clip(np.ceil(index_xyz.max(axis=0)) + 2, 0, target.size).astype(int)
    if np.any(high <= low):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(low[::-1], high[::-1]))  # type: ignore[return-value]


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


def to_working(target: Image, transforms: Sequence[str], geometry: Geometry) -> Image:
    """The scan on the working grid ``geometry``, normalised to [0, 1] (float32).

    Through its alignment ``transforms`` (scan -> reference); with none, its physical
    coordinates are taken as they are (the scan already lies in the reference space).
    """
    if transforms:
        return to_space(target, transforms, geometry, kind="linear")
    moved = preprocess.resample(target, geometry=geometry, kind="linear", default=float(target.array.min()))
    return normalize(moved)


def one_hot_maps(label: np.ndarray, codes: Sequence[int]) -> WorkingMaps:
    """A working-grid label map ``[D, H, W]`` as :class:`WorkingMaps` (its one-hot, agreement 1), so
    that a single label map (one atlas, a bound) is mapped back exactly as a fused one."""
    codes = sorted(int(c) for c in codes)
    label = np.asarray(label)
    probabilities = np.stack([label == c for c in codes]).astype(np.float32)
    return WorkingMaps(tuple(codes), probabilities, np.ones(label.shape, np.float32))


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
        The label (int32 codes, the arg-max of the mapped probabilities), and with ``maps``
        code -> probability (float32 in [0, 1]; outside the working grid the background has
        probability 1) and the agreement (0 outside the working grid), all on the scan's grid.

    With transforms, only the box of the target grid that the atlases' foreground reaches is
    resampled for the foreground probabilities (then the label), and only the box that the
    working grid covers for the agreement: outside the first every foreground probability is 0,
    outside the second the background has probability 1 and the agreement is 0, exactly as a
    resampling of the whole grid would give. On a CT grid the foreground box is a fraction of
    the covered one, and resampling and filling the target-sized maps is most of this step.
    """
    codes = np.asarray([int(c) for c in fused.labels], dtype=np.int32)  # ascending: the background 0 first
    foreground = [working.with_array(np.asarray(a, dtype=np.float32)) for a in fused.probabilities[1:]]
    if transforms:
        support = np.any([image.array > 0 for image in foreground], axis=0)
        box = None
        if support.any():  # one voxel wider: as far as linear interpolation reaches
            support_grid = working.geometry.sub_grid(preprocess.bounding_box(support, margin_vox=1))
            box = reached_box(support_grid, transforms, target.geometry)
        moved = [] if box is None else ants.apply_many(
            transforms, foreground, target.geometry.sub_grid(box), kind="linear", invert=True)
    else:
        box = (slice(None),) * 3
        moved = [preprocess.back_to_grid(image, target.geometry, kind="linear") for image in foreground]
    stack = None
    if maps:  # [background, *foreground, agreement]: the label's scores are written into it in place
        stack = np.zeros((len(codes) + 1, *target.shape), dtype=np.float32)
        stack[0] = 1.0
    label = np.zeros(target.shape, dtype=np.int32)
    if moved:  # [background, *foreground] on the box
        if stack is None:
            scores = np.empty((len(codes), *moved[0].shape), dtype=np.float32)
        else:
            scores = stack[(slice(0, len(codes)), *box)]
        for k, image in enumerate(moved, start=1):
            _clip_unit(image.array, out=scores[k])
        _clip_unit(1.0 - scores[1:].sum(axis=0), out=scores[0])
        label[box] = codes[_first_argmax(scores)]
    if stack is None:
        return target.with_array(label), None, None
    agreement = working.with_array(np.asarray(fused.agreement, dtype=np.float32))
    if transforms:
        covered = covered_box(working.geometry, transforms, target.geometry, target.path)
        [moved_agreement] = ants.apply_many(transforms, [agreement], target.geometry.sub_grid(covered),
                                            kind="linear", invert=True)
        _clip_unit(moved_agreement.array, out=stack[(-1, *covered)])
    else:
        _clip_unit(preprocess.back_to_grid(agreement, target.geometry, kind="linear").array, out=stack[-1])
    probabilities = {int(code): target.with_array(stack[k]) for k, code in enumerate(codes)}
    return target.with_array(label), probabilities, target.with_array(stack[-1])
