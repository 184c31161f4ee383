"""A new scan's affine alignment to the atlas set's reference: several starts, one answer, a QC record.

ANTs's affine optimisation of mutual information is local: started from the translation that
aligns the centres of mass (antspyx's default), it can lock onto a position several centimetres
off along the cranio-caudal axis, and then every atlas misses every organ together. Here the
alignment is started from several translations along the physical z axis (LPS: the
cranio-caudal axis of any scan), each refined by a coarse rigid stage; the best few distinct
coarse results (by mutual information) run the affine stage of
:data:`cmmas.align.ants.FAST_SCHEDULE`, and the one with the highest mutual information with the
reference is kept (:attr:`Starts.refine`).

With an organ finder (a guide, :class:`cmmas.align.organs.OrganGuide`), the found organs are also
registered onto the atlases' organs (one modality: label maps, no mutual information), started
from the rigid fit of their centroids, and that result competes with the one chosen by mutual
information: the one whose found organs overlap the atlases' more is kept. On fold 1's targets
the found organs' overlap picked the better of the two where mutual information alone could not
(docs/results.md, "The QC end to end").

Quality control: every start's result is compared with the chosen one; the fraction that lands
within :attr:`Starts.agree_mm` of it (``agreement``), the chosen mutual information and its
``margin`` over the best refined start that disagrees are recorded (:class:`TargetAlignment`,
:meth:`TargetAlignment.qc`). A scan whose starts scatter, or whose rival optima score alike,
has no clear optimum: the pipeline warns and writes the record beside its output. (On the
abdomen dev scans neither the margin nor the mutual information itself separated the alignments
whose atlases missed the organs from the good ones better than the agreement: docs/results.md.)

Determinism: ANTs's multi-threaded mutual information sums in a different order on every call;
with one ITK thread (:func:`cmmas.align.ants.set_threads`, before the process's first
registration) and fixed sampling seeds, the same scan gives byte-identical transforms.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from cmmas import preprocess
from cmmas.align import ants, organs
from cmmas.align.organs import OrganGuide
from cmmas.io import Geometry, Image, from_sitk, to_sitk

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Starts:
    """Where the alignment starts and how its quality is judged.

    Attributes:
        shifts: start translations along the physical z axis, as fractions of the reference's
            extent along z, added to the centre-of-mass translation (0: antspyx's own start).
        coarse_iterations: iterations of each start's rigid stage at the coarsest fast level.
        refine: how many distinct coarse results (best mutual information first, none within
            ``agree_mm`` of another) run the full affine stage; the best of those is kept.
        agree_mm: two starts agree when their results move the reference's box by at most
            this much (root mean square over its corners and centre, mm).
        min_agreement: below this fraction of agreeing starts an alignment chosen by mutual
            information is flagged.
        min_organ_overlap: an alignment chosen by organs (with an organ guide) is flagged when its
            organs overlap the reference's less than this (mean Dice). Chosen from bench_alignment's
            organs run (docs/results.md): at 0.3 it flagged 31 of the 32 calls whose atlases ended
            below 0.3 mean Dice and 3 of the 25 above 0.5; the agreement of the starts, which the organ
            start lowers, flagged 101 of the 112 calls that did not collapse.
        organ_registration: with an organ guide that has a start, the alignment is the
            registration of the found organs alone (:meth:`cmmas.align.organs.OrganGuide.register`):
            no start by mutual information competes (faster; docs/results.md, "Alignment by organs").
    """

    shifts: tuple[float, ...] = (0.0, -0.125, 0.125, -0.25, 0.25)
    coarse_iterations: int = 100
    refine: int = 3
    agree_mm: float = 15.0
    min_agreement: float = 0.4
    min_organ_overlap: float = 0.3
    organ_registration: bool = False

    def __post_init__(self) -> None:
        if not self.shifts:
            raise ValueError("shifts is empty: the alignment needs at least one start")
        if (self.coarse_iterations < 1 or self.refine < 1 or self.agree_mm <= 0
                or not 0 <= self.min_agreement <= 1 or not 0 <= self.min_organ_overlap <= 1):
            raise ValueError(f"bad start settings: {self}")


#: One start (antspyx's centre-of-mass translation): today's single-start alignment.
SINGLE = Starts(shifts=(0.0,))
#: The default: five starts along the cranio-caudal axis.
ROBUST = Starts()


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One start: its z shift (mm), the mutual information (nats) after its coarse rigid stage
    (None for a single start, which has none) and, when it was refined, after the full affine
    stage (else None), and how far (mm, RMS over the reference's box) its result (refined if it
    was) lies from the chosen one; with an organ guide, whether it started from the organs'
    centroids (``from_organs``, its ``shift_mm`` then 0) and its refined result's organ overlap
    (:meth:`cmmas.align.organs.OrganGuide.overlap`; None when not refined or unguided)."""

    shift_mm: float
    coarse_mutual_information: float | None
    mutual_information: float | None
    distance_mm: float
    from_organs: bool = False
    organ_overlap: float | None = None


@dataclasses.dataclass(frozen=True)
class TargetAlignment:
    """What :func:`align_to_reference` found.

    Attributes:
        transforms: the scan -> reference transform files (ITK convention: reference points to
            scan points), for :func:`cmmas.align.mapping.to_working` and ``map_back``.
        shift_mm: the chosen start's z shift, mm.
        mutual_information: mutual information of the final alignment with the reference (nats).
        agreement: fraction of starts whose result lies within ``agree_mm`` of the chosen one.
        margin: the chosen mutual information minus that of the best refined start that lies
            farther than ``agree_mm`` from it (None when every refined start agrees).
        candidates: every start.
        seconds: wall time.
        deterministic: whether ANTs ran with one thread (repeatable results).
        flagged: the alignment may be wrong: with an organ guide, the chosen result's organ
            overlap is below :attr:`Starts.min_organ_overlap`; else the agreement is below
            :attr:`Starts.min_agreement`.
        agree_mm: the distance within which a start counted as agreeing, mm.
        organ_overlap: with an organ guide, the chosen result's mean organ Dice with the
            reference's organs (None: unguided); the guide chooses by it, not by mutual information.
    """

    transforms: list[str]
    shift_mm: float
    mutual_information: float
    agreement: float
    margin: float | None
    candidates: tuple[Candidate, ...]
    seconds: float
    deterministic: bool
    flagged: bool
    agree_mm: float
    organ_overlap: float | None = None

    def qc(self) -> dict:
        """The quality-control record (JSON-ready)."""
        return {
            "flagged": self.flagged,
            "agreement": round(self.agreement, 4),
            "agree_mm": self.agree_mm,
            "margin": None if self.margin is None else round(self.margin, 5),
            "mutual_information": round(self.mutual_information, 5),
            "chosen_start_shift_mm": round(self.shift_mm, 2),
            "starts": [dataclasses.asdict(c) for c in self.candidates],
            "seconds": round(self.seconds, 3),
            "deterministic": self.deterministic,
            "organ_overlap": None if self.organ_overlap is None else round(self.organ_overlap, 4),
        }


def centre_of_mass(image: Image) -> np.ndarray:
    """Intensity-weighted centre (above the image's minimum) as a physical point ``[3]`` (x, y, z, mm)."""
    array = np.asarray(image.array, dtype=np.float64)
    weights = array - array.min()
    if not weights.any():
        weights = np.ones_like(array)
    index_zyx = np.asarray(ndimage.center_of_mass(weights))
    return image.geometry.index_to_physical(index_zyx[::-1][None])[0]


def z_extent(image: Image) -> float:
    """The extent of ``image``'s grid along the physical z axis, mm."""
    corners = image.geometry.corners()
    return float(corners[:, 2].max() - corners[:, 2].min())


def write_translation(offset_xyz: Sequence[float], path: str | os.PathLike) -> str:
    """Write a translation (reference point + offset = scan point, mm) as an ANTs/ITK ``.mat`` file."""
    matrix = np.eye(4)
    matrix[:3, 3] = np.asarray(offset_xyz, dtype=np.float64)
    return organs.write_affine(matrix, path)


def box_points(image: Image) -> np.ndarray:
    """The corners and centre of the central half of ``image``'s grid, ``[9, 3]`` mm (x, y, z):
    where two alignments are compared (the organs lie inside the reference, not at its edges)."""
    corners = image.geometry.corners()
    centre = corners.mean(axis=0)
    return np.vstack([centre + 0.5 * (corners - centre), centre])


def distance_mm(a: Sequence[str], b: Sequence[str], points: np.ndarray) -> float:
    """Root-mean-square distance (mm) between where two transform lists send ``points``."""
    return float(np.sqrt(np.mean(np.sum((ants.transform_points(a, points) - ants.transform_points(b, points)) ** 2,
                                        axis=1))))


def mutual_information(fixed: Image, warped: Image, bins: int = 32, stride: int = 2) -> float:
    """Mutual information (nats, higher is better) of two images on the same grid, from a joint
    histogram of ``bins`` x ``bins`` over every ``stride``-th voxel along each axis."""
    step = (slice(None, None, stride),) * 3
    a = np.asarray(fixed.array, dtype=np.float64)[step].ravel()
    b = np.asarray(warped.array, dtype=np.float64)[step].ravel()
    joint, _, _ = np.histogram2d(a, b, bins=bins)
    joint /= joint.sum()
    pa, pb = joint.sum(axis=1, keepdims=True), joint.sum(axis=0, keepdims=True)
    nonzero = joint > 0
    return float(np.sum(joint[nonzero] * np.log(joint[nonzero] / (pa @ pb)[nonzero])))


def describe(found: TargetAlignment) -> str:
    """One line on an alignment's QC: the organs' overlap (when they chose it), how many starts agree,
    the chosen start and the mutual information."""
    agreeing = sum(c.distance_mm <= found.agree_mm for c in found.candidates)
    organs = "" if found.organ_overlap is None else f"organs overlap the reference's by {found.organ_overlap:.2f}, "
    return (f"{organs}{agreeing} of {len(found.candidates)} starts agree within {found.agree_mm:g} mm, chosen start "
            f"{found.shift_mm:+.0f} mm along z, mutual information {found.mutual_information:.3f}"
            + ("" if found.margin is None else f", {found.margin:+.3f} over the best disagreeing start"))


def alignment_grid(geometry: Geometry, spacing_mm: float) -> Geometry:
    """The grid a scan on ``geometry`` is aligned on: isotropic ``spacing_mm``, the scan's
    direction, its points on the lattice of multiples of ``spacing_mm`` along the direction's axes
    (the same points for every grid of the same direction: a scan and its resampling onto a finer
    grid are sampled at the same places), covering the hull of the scan's voxel centres."""
    frame = geometry.direction_matrix
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=np.float64)
    centres = geometry.index_to_physical(corners * (np.asarray(geometry.size) - 1.0)) @ frame
    low = np.ceil(centres.min(axis=0) / spacing_mm - 1e-6)
    high = np.floor(centres.max(axis=0) / spacing_mm + 1e-6)
    size = np.maximum(high - low + 1, 1).astype(int)
    return Geometry(size=tuple(int(n) for n in size), spacing=(float(spacing_mm),) * 3,  # type: ignore[arg-type]
                    origin=tuple(float(v) for v in frame @ (low * spacing_mm)),  # type: ignore[arg-type]
                    direction=geometry.direction)


def block_mean(image: Image, factors_xyz: Sequence[int]) -> Image:
    """``image`` averaged over blocks of ``factors_xyz`` voxels, float32, as ``sitk.BinShrink``
    places them (a block's value at its centre; voxels past the last whole block dropped), but
    from the array as it is: no copy of the full-size array, no rounding to its integer dtype.
    One pass over the full resolution (the first axis reduced first, as the array lies in memory)."""
    factors_zyx = [int(f) for f in factors_xyz][::-1]
    array = image.array
    if all(f == 1 for f in factors_zyx):
        return image.with_array(array.astype(np.float32))
    for axis, f in enumerate(factors_zyx):
        if f == 1:
            continue
        whole = array.shape[axis] // f * f
        if whole == 0:
            raise ValueError(f"a block of {f} voxels is larger than the image along axis {axis}")
        cut = array[(slice(None),) * axis + (slice(0, whole),)]
        array = cut.reshape(cut.shape[:axis] + (whole // f, f) + cut.shape[axis + 1:]).sum(axis=axis + 1,
                                                                                            dtype=np.float32)
    array /= np.float32(np.prod(factors_zyx))
    g = image.geometry
    origin = g.index_to_physical((np.asarray(factors_xyz, dtype=np.float64) - 1.0) / 2.0)
    geometry = Geometry(size=tuple(int(n) for n in array.shape[::-1]),  # type: ignore[arg-type]
                        spacing=tuple(float(s * f) for s, f in zip(g.spacing, factors_xyz)),  # type: ignore[arg-type]
                        origin=tuple(float(o) for o in origin), direction=g.direction)  # type: ignore[arg-type]
    return Image(array, geometry, image.path)


def alignment_image(image: Image, spacing_mm: float) -> Image:
    """The scan as its alignment sees it: float32 on :func:`alignment_grid`, at the resolution of
    ``spacing_mm`` voxels whatever the scan's own, cut to its content.

    1. Averaged over blocks of ``floor(spacing_mm / spacing)`` voxels per axis (:func:`block_mean`,
       as ``sitk.BinShrink``): the one pass over a clinical scan's full resolution.
    2. Cut to the box of the blocks that hold more than the scan's minimum (a block averages to
       the minimum only when all its voxels hold it): air or padding around the field of view
       goes, up to a block. A box holding one value throughout (a uniform object in an empty
       scan) is not cut: it would leave a constant image, nothing to align.
    3. Smoothed (Gaussian, on the small image) by what a block lacks of a ``spacing_mm`` voxel:
       variance ``(spacing_mm**2 - block**2) / 12`` mm^2 per axis (a box of width ``w`` has
       variance ``w**2 / 12``), so that a 1.2 mm and a 0.7 mm scan of the same body end at the
       same resolution and their samples at ``spacing_mm`` stand for their neighbourhood alike
       instead of aliasing each in its own way.
    4. Sampled linearly at the points of :func:`alignment_grid` within the box (the same physical
       points for every grid of the scan's direction).

    So a scan and the same scan resampled onto a 0.7 mm grid of a larger field of view give
    nearly the same image (tests/align/test_target_input.py), an alignment whose moving image is
    the same size for both (ANTs's cost grows with the moving image's voxels), and a slab of air
    added to a scan changes nothing."""
    spacing = np.asarray(image.geometry.spacing)
    factors = np.minimum(np.maximum(1, np.floor(spacing_mm / spacing + 1e-6)), image.geometry.size).astype(int)
    blocks = block_mean(image, factors)
    busy = blocks.array > blocks.array.min()  # a block is the minimum only when all its voxels are
    box = preprocess.bounding_box(busy) if busy.any() else None  # None: a constant scan (the alignment refuses it)
    if box is not None and blocks.array[box].min() < blocks.array[box].max():  # a uniform box stays in its scan
        blocks = Image(blocks.array[box], blocks.geometry.sub_grid(box), image.path)
    small = to_sitk(blocks)
    variance = np.maximum(spacing_mm ** 2 - (factors * spacing) ** 2, 0.0) / 12.0
    if np.any(variance > 0):
        small = sitk.DiscreteGaussian(small, [float(v) for v in variance], 32, 0.01, True)
    source = from_sitk(small, image.path)
    return preprocess.resample(source, geometry=alignment_grid(source.geometry, spacing_mm), kind="linear",
                               default=float(source.array.min()))


def align_to_reference(
    image: Image,
    reference: Image,
    out_dir: str | os.PathLike,
    align_spacing_mm: float,
    starts: Starts = ROBUST,
    fast: bool = True,
    seed: int = 0,
    guide: OrganGuide | None = None,
    seen: Image | None = None,
) -> TargetAlignment:
    """Align a scan to the reference from several starts and keep the best (module docstring).

    Args:
        image: the scan, any grid.
        reference: the atlas set's reference image (at ``align_spacing_mm``).
        out_dir: where the chosen transform is written (``affine.mat``).
        align_spacing_mm: the spacing the scan is aligned at (:func:`alignment_image`), mm.
        starts: the starts and the QC threshold (:data:`ROBUST`; :data:`SINGLE`: one start).
        fast: the final affine stage runs :data:`cmmas.align.ants.FAST_SCHEDULE` (else antspyx's
            default schedule); the starts' coarse rigid stages always run the fast one's coarsest level.
        seed: ANTs's sampling seed.
        guide: the scan's organs as an organ finder found them (:class:`cmmas.align.organs.OrganGuide`):
            the alignment by mutual information (as without a guide) and the registration of the
            found organs onto the reference's compete, and the one whose found organs overlap the
            reference's more is kept (module docstring). None: by mutual information alone.
            Multi-start only.
        seen: the scan's :func:`alignment_image` at ``align_spacing_mm`` where it is already
            computed (the organ finder reads the same image); None: computed here.

    Returns:
        :class:`TargetAlignment`.
    """
    start = time.perf_counter()
    moving = alignment_image(image, align_spacing_mm) if seen is None else seen
    base = centre_of_mass(moving) - centre_of_mass(reference)
    extent = z_extent(reference)
    points = box_points(reference)
    with tempfile.TemporaryDirectory(prefix="cmmas-align-") as tmp:
        if len(starts.shifts) == 1:
            shift = float(starts.shifts[0]) * extent
            initial = write_translation(base + np.array([0.0, 0.0, shift]), Path(tmp) / "start.mat")
            final = ants.register(moving, reference, kind="affine", seed=seed, fast=fast, initial=[initial],
                                  out_dir=out_dir)
            mi = mutual_information(reference, final.warped)
            candidates = (Candidate(round(shift, 2), None, round(mi, 5), 0.0),)
            return _found(final.forward, shift, mi, candidates, starts, start)
        organ = None
        if guide is not None and guide.start is not None:
            organ = _organs_registered(moving, reference, guide, seed, Path(tmp) / "organs")
            if starts.organ_registration:
                transforms, _ = ants.export(organ.transforms, [], out_dir)
                return _found(transforms, 0.0, organ.mutual_information, (organ.candidate(0.0),), starts, start,
                              organ.overlap)
        coarse = [_coarse_rigid(moving, reference, base, float(f) * extent, starts, seed, Path(tmp) / f"start{n}")
                  for n, f in enumerate(starts.shifts)]
        order = sorted(range(len(coarse)), key=lambda i: (-coarse[i][2], abs(coarse[i][0])))
        refined: dict[int, tuple[list[str], float]] = {}
        for i in order:
            if len(refined) == starts.refine:
                break
            if any(distance_mm(coarse[i][1], coarse[j][1], points) <= starts.agree_mm for j in refined):
                continue
            reg = ants.register(moving, reference, kind="affine_only", seed=seed, fast=fast, initial=coarse[i][1],
                                out_dir=Path(tmp) / f"final{i}")
            refined[i] = (list(reg.forward), mutual_information(reference, reg.warped))
        best = max(refined, key=lambda i: (refined[i][1], -abs(coarse[i][0])))
        chosen, shift, mi = refined[best][0], coarse[best][0], refined[best][1]
        overlap = mi_overlap = None if organ is None else guide.overlap(chosen)
        if organ is not None and organ.overlap > mi_overlap:
            chosen, shift, mi, overlap = organ.transforms, 0.0, organ.mutual_information, organ.overlap
        candidates = tuple(
            Candidate(shift_mm=round(c_shift, 2), coarse_mutual_information=round(c_mi, 5),
                      mutual_information=round(refined[i][1], 5) if i in refined else None,
                      distance_mm=round(distance_mm(refined[i][0] if i in refined else tfm, chosen, points), 2),
                      organ_overlap=round(mi_overlap, 4) if mi_overlap is not None and i == best else None)
            for i, (c_shift, tfm, c_mi) in enumerate(coarse)
        ) + (() if organ is None else (
            organ.candidate(distance_mm(organ.transforms, chosen, points)),))
        transforms, _ = ants.export(chosen, [], out_dir)
    return _found(transforms, shift, mi, candidates, starts, start, overlap)


def _coarse_rigid(moving: Image, reference: Image, base: np.ndarray, shift: float, starts: Starts, seed: int,
                  folder: Path) -> tuple[float, list[str], float]:
    """One start: the centre-of-mass translation shifted by ``shift`` mm along z, refined by a rigid
    stage at the fast schedule's coarsest level: ``(shift, transforms, mutual information)``."""
    folder.mkdir(parents=True)
    initial = write_translation(base + np.array([0.0, 0.0, shift]), folder / "start.mat")
    return (shift, *_rigid_stage(moving, reference, initial, starts, seed, folder))


class _ByOrgans(NamedTuple):
    """The alignment by the found organs alone: its transform files, its mutual information with
    the reference (nats) and its organ overlap (:meth:`OrganGuide.overlap`)."""

    transforms: list[str]
    mutual_information: float
    overlap: float

    def candidate(self, distance: float) -> Candidate:
        """Its :class:`Candidate`, ``distance`` mm from the chosen result."""
        return Candidate(0.0, None, round(self.mutual_information, 5), round(distance, 2), from_organs=True,
                         organ_overlap=round(self.overlap, 4))


def _organs_registered(moving: Image, reference: Image, guide: OrganGuide, seed: int, folder: Path) -> _ByOrgans:
    """The found organs registered onto the reference's from their centroids' rigid fit
    (:meth:`OrganGuide.register`)."""
    folder.mkdir(parents=True)
    transforms = guide.register(organs.write_affine(guide.start, folder / "start.mat"), seed=seed)
    mi = mutual_information(reference, ants.apply(transforms, moving, reference))
    return _ByOrgans(transforms, mi, guide.overlap(transforms))


def _rigid_stage(moving: Image, reference: Image, initial: str, starts: Starts, seed: int,
                 folder: Path) -> tuple[list[str], float]:
    """A rigid stage at the fast schedule's coarsest level from the transform file ``initial``:
    ``(transforms, mutual information)``."""
    reg = ants.register(moving, reference, kind="rigid", seed=seed, fast=True, initial=[initial],
                        aff_shrink_factors=ants.FAST_SCHEDULE.shrink_factors[:1],
                        aff_smoothing_sigmas=ants.FAST_SCHEDULE.smoothing_sigmas[:1],
                        aff_iterations=(starts.coarse_iterations,), out_dir=folder)
    return list(reg.forward), mutual_information(reference, reg.warped)


def _found(transforms: list[str], shift: float, mi: float, candidates: tuple[Candidate, ...], starts: Starts,
           began: float, organ_overlap: float | None = None) -> TargetAlignment:
    """The :class:`TargetAlignment` of a chosen result, its QC figures computed from ``candidates``."""
    agreement = float(np.mean([c.distance_mm <= starts.agree_mm for c in candidates]))
    rivals = [c.mutual_information for c in candidates
              if c.mutual_information is not None and c.distance_mm > starts.agree_mm]
    margin = mi - max(rivals) if rivals else None
    if organ_overlap is not None:
        flagged = organ_overlap < starts.min_organ_overlap
    else:
        flagged = len(candidates) > 1 and agreement < starts.min_agreement
    return TargetAlignment(transforms=list(transforms), shift_mm=shift, mutual_information=mi, agreement=agreement,
                           margin=margin, candidates=candidates, seconds=time.perf_counter() - began,
                           deterministic=ants.single_threaded(), flagged=flagged, agree_mm=starts.agree_mm,
                           organ_overlap=organ_overlap)
