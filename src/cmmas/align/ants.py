"""ANTs pre-alignment of one image onto another (rigid, affine, SyN; Mattes mutual information).

The atlas-to-target (or target-to-reference) pre-alignment that precedes BiRegNet. Images are
:class:`cmmas.io.Image` values; conversion to and from ANTs happens here only, with the
geometry kept exactly (ANTs indexes arrays ``(x, y, z)``, ours are ``(z, y, x)``; spacing,
origin and direction use the ITK convention in both, so physical LPS space is shared with
SimpleITK).

Stages (each multi-resolution, Mattes mutual information by default, so cross-modality pairs
work):

- ``"rigid"``: one rigid stage, started from the translation that aligns the images' centres of
  mass (antspyx's default initial transform).
- ``"affine"``: the rigid stage, then an affine stage started from its result.
- ``"syn"``: rigid, affine, then a SyN (symmetric diffeomorphic) stage.
- ``"affine_only"``: the affine stage alone, for a start a rigid stage has already found.

Schedules (:class:`Schedule`) are antspyx's defaults or a fast preset, adapted to small grids
(too-coarse levels dropped, metric sampling raised; :meth:`Schedule.fitted`).

ANTs collapses each stage's initial transform into its output, so a linear result is one
``.mat`` file and a SyN result is ``[warp, affine]`` (forward) / ``[affine, inverse warp]``
(inverse), the lists :func:`apply` takes.

Reproducibility (measured with antspyx 0.6.3): ``seed`` fixes ANTs' metric sampling, but
multi-threaded mutual information still varies in the last digits between runs. Runs are
bit-identical only with one ITK thread, which must be chosen before ANTs' first registration in
the process: see :func:`set_threads`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from cmmas.errors import CmmasError, ImageReadError, LabelError
from cmmas.io import Geometry, Image, atomic_path, check_same_grid

if TYPE_CHECKING:
    import ants

logger = logging.getLogger(__name__)

KINDS = ("rigid", "affine", "syn", "affine_only")
#: A multi-resolution level must leave at least this many voxels along every axis.
MIN_LEVEL_VOXELS = 8
#: The coarsest level's metric must see at least this many samples (a 32-bin joint histogram
#: from a few hundred samples let affine stages drift; antsRegistrationSyN on a 1 mm brain gets ~3500).
MIN_METRIC_SAMPLES = 2000
#: Metrics ANTs accepts for the linear stages; "mattes" (mutual information) suits cross-modality.
METRICS = ("mattes", "GC", "meansquares")
#: Interpolators of :func:`apply` by kind of image.
INTERPOLATORS = {"linear": "linear", "label": "genericLabel"}


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Multi-resolution schedule and metric sampling of the registration stages.

    Attributes:
        shrink_factors: downsampling factor of each linear level, coarse to fine.
        smoothing_sigmas: Gaussian smoothing of each linear level, in voxels.
        iterations: maximum optimiser iterations of each linear level.
        sampling: fraction of voxels (regular grid, randomly jittered) the linear metric uses.
        syn_iterations: SyN iterations per level; levels are shrunk by 2**k, coarse to fine.
        fine_sampling: the finest linear level's fraction when it differs from ``sampling``
            (None: the same). That level has the most voxels and only refines what the coarser
            ones found, so it can sample fewer; antspyx takes one fraction per call, so a stage
            then runs as two ANTs calls, the second started from the first's result.
    """

    shrink_factors: tuple[int, ...] = (6, 4, 2, 1)
    smoothing_sigmas: tuple[int, ...] = (3, 2, 1, 0)
    iterations: tuple[int, ...] = (2100, 1200, 1200, 10)
    sampling: float = 0.2
    syn_iterations: tuple[int, ...] = (40, 20, 0)
    fine_sampling: float | None = None

    def __post_init__(self) -> None:
        levels = {len(self.shrink_factors), len(self.smoothing_sigmas), len(self.iterations)}
        if len(levels) != 1:
            raise ValueError(
                "shrink_factors, smoothing_sigmas and iterations need one entry per level, got "
                f"{self.shrink_factors}, {self.smoothing_sigmas}, {self.iterations}"
            )
        for name, rate in (("sampling", self.sampling), ("fine_sampling", self.fine_sampling)):
            if rate is not None and not 0.0 < rate <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {rate}")

    def fitted(
        self,
        geometry: Geometry,
        min_voxels: int = MIN_LEVEL_VOXELS,
        min_samples: int = MIN_METRIC_SAMPLES,
    ) -> "Schedule":
        """This schedule adapted to a fixed grid that may be small.

        A linear level is kept when the grid, shrunk by its factor, still spans ``min_voxels``
        voxels along every axis (the finest level is always kept), and the sampling fraction is
        raised (up to 1) until the coarsest level gets ``min_samples`` metric samples. Without
        both, affine stages drifted on 40^3 volumes: mutual information estimated from a few
        hundred samples let scale and shear run away. ``fine_sampling`` is raised likewise until
        the finest level gets ``min_samples``, and dropped (None) when it would equal
        ``sampling`` or when a single level is left (that level is also the coarsest).
        """
        extent = np.asarray(geometry.size, dtype=np.float64) * np.asarray(geometry.spacing)
        finest = float(np.min(geometry.spacing))
        keep = [i for i, f in enumerate(self.shrink_factors) if np.min(extent) / (f * finest) >= min_voxels]
        keep = keep or [len(self.shrink_factors) - 1]

        def raised(rate: float, shrink: int) -> float:
            voxels = float(np.prod(extent / np.maximum(geometry.spacing, shrink * finest)))
            return min(1.0, max(rate, min_samples / voxels))

        sampling = raised(self.sampling, self.shrink_factors[keep[0]])
        fine = None
        if self.fine_sampling is not None and len(keep) > 1:
            fine = raised(self.fine_sampling, self.shrink_factors[keep[-1]])
        return dataclasses.replace(
            self,
            shrink_factors=tuple(self.shrink_factors[i] for i in keep),
            smoothing_sigmas=tuple(self.smoothing_sigmas[i] for i in keep),
            iterations=tuple(self.iterations[i] for i in keep),
            sampling=sampling,
            fine_sampling=None if fine == sampling else fine,
        )

    def calls(self) -> list[tuple[slice, float]]:
        """The linear levels each ANTs call of a stage runs and the fraction it samples:
        ``[(levels, sampling)]``, one call unless ``fine_sampling`` splits off the finest level."""
        levels = len(self.shrink_factors)
        if self.fine_sampling is None or self.fine_sampling == self.sampling or levels == 1:
            return [(slice(0, levels), self.sampling)]
        return [(slice(0, levels - 1), self.sampling), (slice(levels - 1, levels), self.fine_sampling)]


#: antspyx's defaults (finest level at full resolution).
DEFAULT_SCHEDULE = Schedule()
#: Coarse and short, for aligning a new target to a reference in a few seconds: the finest level
#: is at half resolution. Measured on real CT -> MR abdomen (ct_00 -> mr_01, 4 mm, 4 seeds):
#: liver Dice 0.74-0.77 (0.70 unregistered) for ~3 s CPU, against 0.70-0.75 for ~6 s with the
#: defaults. An 8x shrink level was as good there but drifted on 40^3 volumes. The finest level
#: samples 10 %: on the 10 held-out abdomen targets aligned to their atlas sets' references
#: (4 mm, then BiRegNet and joint label fusion) the alignment took 1.3 instead of 1.7-1.8 s
#: (median) and the mean Dice rose from 0.68 to 0.70-0.71 (docs/results.md).
FAST_SCHEDULE = Schedule(
    shrink_factors=(4, 2),
    smoothing_sigmas=(2, 1),
    iterations=(100, 50),
    sampling=0.25,
    syn_iterations=(20, 10, 0),
    fine_sampling=0.1,
)


@dataclasses.dataclass
class Registration:
    """What :func:`register` found.

    Attributes:
        warped: the moving image resampled onto the fixed grid (linear interpolation), float32.
        warped_label: the moving label on the fixed grid (generic-label interpolation, values
            are codes of the input label or 0), or None when no label was given.
        forward: transform files mapping moving onto fixed, for ``apply(forward, ...)``.
        inverse: transform files mapping fixed onto moving, for ``apply(inverse, ..., invert=True)``.
        seconds: wall time of :func:`register`.
        kind: "rigid", "affine" or "syn".
    """

    warped: Image
    warped_label: Image | None
    forward: list[str]
    inverse: list[str]
    seconds: float
    kind: str
    _workdir: tempfile.TemporaryDirectory | None = dataclasses.field(default=None, repr=False)

    def cleanup(self) -> None:
        """Delete the temporary transform files (no-op when they were written to ``out_dir``)."""
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None


#: ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` as it was at this process's first registration (ITK
#: reads it then, once); None until then.
_threads_at_first_use: list[str | None] = []


def single_threaded() -> bool:
    """Whether this process's ANTs registrations run (or, before the first, will run) on one
    thread, the setting under which seeded registrations repeat byte for byte."""
    value = _threads_at_first_use[0] if _threads_at_first_use else os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
    return value == "1"


def set_threads(threads: int) -> None:
    """Choose how many threads ANTs (ITK) uses in this process.

    ITK reads ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` once, at the first registration: call
    this before any ANTs registration runs in the process (at a script's start). One thread
    makes seeded registrations bit-identical between runs. A later call cannot change the
    setting: it logs a warning.
    """
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    if _threads_at_first_use and _threads_at_first_use[0] != str(int(threads)):
        logger.warning("ANTs already ran in this process with ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=%s; "
                       "asking for %d thread(s) now has no effect", _threads_at_first_use[0], threads)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(int(threads))


def to_ants(image: Image) -> "ants.ANTsImage":
    """Convert to a float32 ANTs image on the same grid.

    The ANTs array is indexed ``(x, y, z)``, i.e. ``image.array.transpose(2, 1, 0)``; spacing,
    origin and direction are copied unchanged (ITK convention in both).
    """
    import ants

    array_xyz = np.ascontiguousarray(np.asarray(image.array, dtype=np.float32).transpose(2, 1, 0))
    g = image.geometry
    return ants.from_numpy(
        array_xyz, origin=tuple(g.origin), spacing=tuple(g.spacing), direction=g.direction_matrix
    )


def from_ants(img: "ants.ANTsImage", path: str | os.PathLike | None = None) -> Image:
    """Convert a 3D scalar ANTs image to an :class:`Image` (array ``(z, y, x)``, same geometry)."""
    src = None if path is None else os.fspath(path)
    if img.dimension != 3 or img.components != 1:
        raise ImageReadError(
            src, f"expected a 3D scalar image, got {img.dimension}D with {img.components} components"
        )
    array = np.ascontiguousarray(img.numpy().transpose(2, 1, 0))
    geometry = Geometry(
        size=tuple(int(s) for s in img.shape),  # type: ignore[arg-type]
        spacing=tuple(float(s) for s in img.spacing),  # type: ignore[arg-type]
        origin=tuple(float(o) for o in img.origin),  # type: ignore[arg-type]
        direction=tuple(float(d) for d in np.asarray(img.direction, dtype=np.float64).ravel()),
    )
    return Image(array, geometry, src)


def register(
    moving: Image,
    fixed: Image,
    kind: str = "affine",
    metric: str = "mattes",
    seed: int | None = 0,
    moving_label: Image | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    fast: bool = False,
    aff_shrink_factors: Sequence[int] | None = None,
    aff_smoothing_sigmas: Sequence[int] | None = None,
    aff_iterations: Sequence[int] | None = None,
    sampling: float | None = None,
    syn_iterations: Sequence[int] | None = None,
    bins: int = 32,
    grad_step: float = 0.2,
    initial: Sequence[str | os.PathLike] | None = None,
) -> Registration:
    """Register ``moving`` onto ``fixed`` with ANTs and warp the moving image (and label).

    Args:
        moving: image to align (e.g. an atlas), any grid.
        fixed: image defining the target space and output grid.
        kind: "rigid", "affine" (rigid then affine), "syn" (rigid, affine, then SyN) or
            "affine_only" (the affine stage alone, usually with ``initial``).
        metric: "mattes" (mutual information, default; any modality pair), "GC" or
            "meansquares" for the linear stages; SyN uses mutual information unless
            "meansquares" is given.
        seed: seed of ANTs' metric sampling (passed as ``seed + 1``: ANTs reads 0 as "use the
            clock"); None seeds from the clock.
        moving_label: integer label map on ``moving``'s grid, warped with generic-label
            interpolation.
        out_dir: folder to copy the transforms into (``affine.mat``, ``warp.nii.gz``,
            ``inverse_warp.nii.gz``, replaced atomically); by default they stay in a temporary
            folder owned by the result, deleted with it.
        fast: start from :data:`FAST_SCHEDULE` instead of :data:`DEFAULT_SCHEDULE`. Either way,
            and with the overrides below, the schedule is then fitted to ``fixed``'s grid
            (:meth:`Schedule.fitted`: too-coarse levels dropped, sampling raised if sparse).
        aff_shrink_factors: override the schedule's per-level shrink factors (coarse to fine).
        aff_smoothing_sigmas: override the per-level smoothing, voxels.
        aff_iterations: override the per-level iteration limits.
        sampling: override the fraction of voxels sampled by the linear metric (every level).
        syn_iterations: override the SyN per-level iterations.
        bins: histogram bins of mutual information.
        grad_step: SyN gradient step.
        initial: transform files (fixed -> moving, ITK convention) the first stage starts from;
            None: antspyx's default, the translation that aligns the images' centres of mass.

    Returns:
        :class:`Registration` with images on ``fixed``'s grid and the transform files.

    Raises:
        ImageReadError: an image is constant or holds NaN/inf voxels.
        GeometryError: ``moving_label`` is not on ``moving``'s grid.
        LabelError: ``moving_label`` holds non-integer values.
        CmmasError: ANTs failed (one line naming both images).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    schedule = _schedule(
        FAST_SCHEDULE if fast else DEFAULT_SCHEDULE,
        aff_shrink_factors,
        aff_smoothing_sigmas,
        aff_iterations,
        sampling,
        syn_iterations,
    ).fitted(fixed.geometry)
    _check_registrable(moving, "moving")
    _check_registrable(fixed, "fixed")
    if moving_label is not None:
        check_same_grid(moving, moving_label, what="label")
        _check_integer(moving_label)
    if seed is not None and seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")

    import ants

    if not _threads_at_first_use:
        _threads_at_first_use.append(os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"))
    start = time.perf_counter()
    workdir = tempfile.TemporaryDirectory(prefix="cmmas-prealign-")
    fixed_ants, moving_ants = to_ants(fixed), to_ants(moving)
    linear = {"rigid": ["Rigid"], "affine_only": ["Affine"]}.get(kind, ["Rigid", "Affine"])
    calls = [(stage, levels, rate) for stage in linear for levels, rate in schedule.calls()]
    if kind == "syn":
        calls.append(("SyNOnly", slice(None), schedule.sampling))
    initial = None if initial is None else _transform_paths(initial)
    try:
        with _ants_seed(seed):
            for number, (stage, levels, rate) in enumerate(calls):
                t0 = time.perf_counter()
                result = ants.registration(
                    fixed_ants,
                    moving_ants,
                    type_of_transform=stage,
                    initial_transform=initial,
                    outprefix=os.path.join(workdir.name, f"{number}_{stage.lower()}_"),
                    aff_metric=metric,
                    aff_sampling=bins,
                    aff_random_sampling_rate=rate,
                    aff_iterations=schedule.iterations[levels],
                    aff_shrink_factors=schedule.shrink_factors[levels],
                    aff_smoothing_sigmas=schedule.smoothing_sigmas[levels],
                    syn_metric="meansquares" if metric == "meansquares" else "mattes",
                    syn_sampling=bins,
                    reg_iterations=tuple(schedule.syn_iterations),
                    grad_step=grad_step,
                )
                initial = list(result["fwdtransforms"])
                logger.debug("%s stage (levels %s) took %.2f s", stage, schedule.shrink_factors[levels],
                             time.perf_counter() - t0)
            warped_label = None
            if moving_label is not None:
                warped_label = _warp_label(moving_label, fixed_ants, initial, invert=False)
    except RuntimeError as err:
        workdir.cleanup()
        raise CmmasError(_pair_name(moving, fixed), f"ANTs {kind} registration failed: {_one_line(err)}") from None

    forward, inverse = list(result["fwdtransforms"]), list(result["invtransforms"])
    if not forward or not all(os.path.exists(f) for f in forward + inverse):
        workdir.cleanup()
        raise CmmasError(
            _pair_name(moving, fixed),
            f"ANTs {kind} registration wrote no transform files (was its temporary folder removed?)",
        )
    owned: tempfile.TemporaryDirectory | None = workdir
    if out_dir is not None:
        forward, inverse = export(forward, inverse, out_dir)
        workdir.cleanup()
        owned = None
    return Registration(
        warped=from_ants(result["warpedmovout"], moving.path),
        warped_label=warped_label,
        forward=forward,
        inverse=inverse,
        seconds=time.perf_counter() - start,
        kind=kind,
        _workdir=owned,
    )


def apply(
    transforms: Sequence[str | os.PathLike],
    moving: Image,
    fixed_geometry: Image | Geometry,
    kind: str = "linear",
    invert: bool = False,
) -> Image:
    """Resample ``moving`` onto ``fixed_geometry`` through saved ANTs transforms.

    Args:
        transforms: :attr:`Registration.forward` (moving -> fixed), or
            :attr:`Registration.inverse` with ``invert=True`` (fixed -> moving; map a fixed-space
            image back onto the moving grid).
        moving: image on the grid the transforms start from.
        fixed_geometry: output grid (an image or its geometry).
        kind: "linear" for intensities (float32 output) or "label" for integer label maps
            (generic-label interpolation, output in the label's dtype).
        invert: invert the affine matrices of the list (as ANTs does for an inverse list).

    Returns:
        :class:`Image` on ``fixed_geometry``, its ``path`` that of ``moving``.

    Raises:
        ImageReadError: a transform file is missing.
        LabelError: ``kind="label"`` with non-integer values.
        CmmasError: ANTs failed to apply the transforms.
    """
    return apply_many(transforms, [moving], fixed_geometry, kind=kind, invert=invert)[0]


def apply_many(
    transforms: Sequence[str | os.PathLike],
    movings: Sequence[Image],
    fixed_geometry: Image | Geometry,
    kind: str = "linear",
    invert: bool = False,
) -> list[Image]:
    """:func:`apply` for several images through the same transforms onto the same grid.

    The output grid is converted to ANTs once for all of them (on a full-resolution CT grid
    that conversion costs about as much as the resampling).
    """
    if kind not in INTERPOLATORS:
        raise ValueError(f"kind must be one of {tuple(INTERPOLATORS)}, got {kind!r}")
    paths = _transform_paths(transforms)
    geometry = fixed_geometry.geometry if isinstance(fixed_geometry, Image) else fixed_geometry
    reference = to_ants(Image(np.zeros(geometry.shape, dtype=np.float32), geometry))
    out = []
    for moving in movings:
        try:
            if kind == "label":
                _check_integer(moving)
                out.append(_warp_label(moving, reference, paths, invert))
            else:
                out.append(_warp(moving, reference, paths, invert, "linear"))
        except RuntimeError as err:
            raise CmmasError(moving.path or "moving image", f"applying {paths} failed: {_one_line(err)}") from None
    return out


def transform_points(transforms: Sequence[str | os.PathLike], points: np.ndarray) -> np.ndarray:
    """Map physical points ``[N, 3]`` (x, y, z, mm) through a list of affine ANTs transforms.

    The direction is ITK's (and :func:`apply`'s): a :attr:`Registration.forward` list maps
    points of the fixed space to where they lie in the moving image; the last transform of the
    list acts first, as in ANTs.

    Raises:
        ImageReadError: a transform file is missing.
        CmmasError: a transform is not affine (a ``.mat`` file) or cannot be read.
    """
    paths = _transform_paths(transforms)
    deformable = [p for p in paths if not p.endswith(".mat")]
    if deformable:
        raise CmmasError(deformable[0], "only affine (.mat) transforms map points here")
    try:
        composite = sitk.CompositeTransform([sitk.ReadTransform(p) for p in paths])
    except RuntimeError as err:
        raise CmmasError(paths[0], f"cannot read the transforms: {_one_line(err)}") from None
    return np.array([composite.TransformPoint([float(c) for c in p]) for p in np.asarray(points, np.float64)])


def check_transforms(transforms: Sequence[str | os.PathLike]) -> list[str]:
    """The transform files as strings, each checked to exist and to hold an ITK/ANTs transform.

    Raises:
        ImageReadError: naming the first file that is missing or not a transform.
    """
    paths = _transform_paths(transforms)
    for path in paths:
        try:
            sitk.ReadTransform(path)
        except RuntimeError:
            raise ImageReadError(path, "not an ITK/ANTs transform file") from None
    return paths


def _transform_paths(transforms: Sequence[str | os.PathLike]) -> list[str]:
    paths = [os.fspath(t) for t in transforms]
    if not paths:
        raise ValueError("transforms is empty")
    for path in paths:
        if not os.path.isfile(path):
            raise ImageReadError(path, "transform file not found")
    return paths


def _warp(
    moving: Image, reference: "ants.ANTsImage", transforms: list[str], invert: bool, interpolator: str
) -> Image:
    import ants

    out = ants.apply_transforms(
        fixed=reference,
        moving=to_ants(moving),
        transformlist=transforms,
        interpolator=interpolator,
        whichtoinvert=[invert and t.endswith(".mat") for t in transforms],
        singleprecision=True,
    )
    return from_ants(out, moving.path)


def _warp_label(label: Image, reference: "ants.ANTsImage", transforms: list[str], invert: bool) -> Image:
    warped = _warp(label, reference, transforms, invert, INTERPOLATORS["label"])
    dtype = label.array.dtype if np.issubdtype(label.array.dtype, np.integer) else np.int32
    return warped.with_array(np.rint(warped.array).astype(dtype))


def _schedule(
    base: Schedule,
    shrink: Sequence[int] | None,
    sigmas: Sequence[int] | None,
    iterations: Sequence[int] | None,
    sampling: float | None,
    syn_iterations: Sequence[int] | None,
) -> Schedule:
    return Schedule(
        shrink_factors=base.shrink_factors if shrink is None else tuple(int(s) for s in shrink),
        smoothing_sigmas=base.smoothing_sigmas if sigmas is None else tuple(int(s) for s in sigmas),
        iterations=base.iterations if iterations is None else tuple(int(i) for i in iterations),
        sampling=base.sampling if sampling is None else float(sampling),
        syn_iterations=base.syn_iterations if syn_iterations is None else tuple(int(i) for i in syn_iterations),
        fine_sampling=base.fine_sampling if sampling is None else None,
    )


def _check_registrable(image: Image, role: str) -> None:
    array = image.array
    name = image.path or f"{role} image"
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise ImageReadError(name, "image holds NaN or infinite voxels; cannot register")
    low, high = float(array.min()), float(array.max())
    if low == high:
        raise ImageReadError(name, f"the {role} image registered (its {'x'.join(map(str, array.shape))} voxels "
                             f"at {_fmt_mm(image.geometry.spacing_zyx)} mm, origin {_fmt_mm(image.geometry.origin)} mm) "
                             f"is constant (every voxel is {low:g}); cannot register")


def _fmt_mm(values) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def _check_integer(label: Image) -> None:
    array = label.array
    if not np.issubdtype(array.dtype, np.integer) and not np.all(array == np.round(array)):
        raise LabelError(label.path or "label", "label map holds non-integer values")


@contextlib.contextmanager
def _ants_seed(seed: int | None) -> Iterator[None]:
    """Set ``ANTS_RANDOM_SEED`` (ANTs' documented seed variable) for the duration of the block."""
    previous = os.environ.get("ANTS_RANDOM_SEED")
    if seed is None:
        os.environ.pop("ANTS_RANDOM_SEED", None)
    else:
        os.environ["ANTS_RANDOM_SEED"] = str(int(seed) + 1)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("ANTS_RANDOM_SEED", None)
        else:
            os.environ["ANTS_RANDOM_SEED"] = previous


def export(forward: Sequence[str], inverse: Sequence[str], out_dir: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Copy transform files into ``out_dir`` under stable names (``affine.mat``, ``warp.nii.gz``,
    ``inverse_warp.nii.gz``), each atomically; return the new lists."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    renamed: dict[str, str] = {}
    for path in dict.fromkeys([*forward, *inverse]):
        if path.endswith("InverseWarp.nii.gz"):
            name = "inverse_warp.nii.gz"
        elif path.endswith("Warp.nii.gz"):
            name = "warp.nii.gz"
        else:
            name = "affine.mat"
        target = out_dir / name
        with atomic_path(target) as tmp:
            shutil.copyfile(path, tmp)
        renamed[path] = str(target)
    return [renamed[p] for p in forward], [renamed[p] for p in inverse]


def _pair_name(moving: Image, fixed: Image) -> str:
    return f"{moving.path or 'moving image'} -> {fixed.path or 'fixed image'}"


def _one_line(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(err).__name__)[:200]
