"""The classical baseline's first stage: ANTs pre-alignment of every atlas onto every target.

Each atlas is registered onto each target with :func:`cmmas.align.ants.register` (rigid then
affine, Mattes mutual information, started from the centres of mass; or rigid, affine and SyN
with ``kind="syn"``). The atlas image is moved with linear interpolation and its label with
generic-label interpolation onto the target's grid, where fusion (:mod:`cmmas.fuse`) and
evaluation (:mod:`cmmas.evaluate`) read them.

Grid: with ``spacing_mm`` the target is first resampled to that isotropic spacing (image linear,
label generic-label), keeping its origin, direction and physical extent, and every output lies
on that resampled grid (``target_image.nii.gz``); the atlas image is resampled to the same
spacing before registering (for speed), while the atlas label is warped from its original grid.
Without ``spacing_mm`` the target's own grid is used. Intensities are kept as read (CT in its
stored units, MR as stored): fusion methods standardise what they compare.

On disk, one folder per target under ``out_dir``::

    <target_id>/pairs.json                   settings, label table, and one entry per finished
                                             pair with its registration time (seconds)
    <target_id>/target_image.nii.gz          the target on the working grid
    <target_id>/target_label.nii.gz          its label on that grid (labelled targets only)
    <target_id>/atlases/<atlas_id>_image.nii.gz   atlas image on the target grid (float32)
    <target_id>/atlases/<atlas_id>_label.nii.gz   atlas label on the target grid (int32 codes)
    <target_id>/transforms/<atlas_id>/affine.mat  atlas -> target ANTs transform
                                             (+ warp.nii.gz, inverse_warp.nii.gz for SyN)
    <target_id>/pred_<method>.nii.gz         fused labels, written later by experiments/evaluate.py

A pair counts as done when ``pairs.json`` lists it; ``pairs.json`` is rewritten (atomically)
only after the pair's files are, and every file is written atomically, so an interrupted run
leaves no partial file and a re-run registers only the pairs still missing. A folder prepared
with other settings (kind, spacing, seed, schedule, component) is refused, not mixed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from cmmas import preprocess
from cmmas.align import ants
from cmmas.datasets.base import Case, natural_key
from cmmas.datasets.loading import load_case
from cmmas.errors import CmmasError, DatasetError
from cmmas.io import Image, atomic_write_text, check_same_grid, read_image, read_label, write_image

logger = logging.getLogger(__name__)

#: Registration kinds of the baseline: affine (rigid then affine) or deformable (+ SyN).
KINDS = ("affine", "syn")
MANIFEST = "pairs.json"
VERSION = 1
TARGET_IMAGE = "target_image.nii.gz"
TARGET_LABEL = "target_label.nii.gz"


@dataclasses.dataclass(frozen=True)
class PairSet:
    """What :func:`prealign_pairs` left in one target's folder.

    Attributes:
        folder: ``out_dir/<target_id>``.
        target_id: the target case.
        atlas_ids: every atlas aligned to it (done now or earlier), in natural id order.
        seconds: atlas id -> wall time of its registration, seconds.
        registered: the atlas ids registered by this call (the others were already done).
    """

    folder: Path
    target_id: str
    atlas_ids: tuple[str, ...]
    seconds: dict[str, float]
    registered: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Pairs:
    """One target and its pre-aligned atlases, as read back by :func:`load_pairs`.

    Attributes:
        target_id: the target case.
        target: target image on the working grid, ``(z, y, x)``.
        target_label: its label (int32 codes) or None when the target is unlabelled.
        atlas_ids: atlas ids, natural order; index i of the stacks below.
        atlas_images: ``[N, D, H, W]`` float32, atlas images on the target grid.
        atlas_labels: ``[N, D, H, W]`` int32, atlas labels on the target grid.
        seconds: ``[N]`` registration wall time per atlas, seconds.
        labels: label table, code -> name (background excluded).
        direction: ``"<atlas modality>-><target modality>"``, e.g. ``"ct->mr"``.
        kind: "affine" or "syn".
    """

    target_id: str
    target: Image
    target_label: Image | None
    atlas_ids: tuple[str, ...]
    atlas_images: np.ndarray
    atlas_labels: np.ndarray
    seconds: np.ndarray
    labels: dict[int, str]
    direction: str
    kind: str


@dataclasses.dataclass(frozen=True)
class _Settings:
    """What must agree between runs writing into the same target folder."""

    kind: str
    spacing_mm: float | None
    seed: int
    fast: bool
    component: int | None


@dataclasses.dataclass(frozen=True)
class _Job:
    """One atlas -> target registration, picklable for a worker process."""

    atlas: Case
    folder: str
    labels: dict[int, str]
    settings: _Settings


def prealign_pairs(
    atlases: Sequence[Case],
    target: Case,
    labels: Mapping[int, str],
    out_dir: str | os.PathLike,
    kind: str = "affine",
    spacing_mm: float | None = None,
    seed: int = 0,
    *,
    fast: bool = False,
    component: int | None = None,
    workers: int = 1,
    progress: bool = True,
) -> PairSet:
    """Align every atlas onto one target (see the module docstring for grid and layout).

    Args:
        atlases: labelled atlas cases (any modality).
        target: the target case (labelled or not).
        labels: the data set's label table, code -> name (background excluded).
        out_dir: root folder; the target's folder is ``out_dir/<target.id>``.
        kind: "affine" (rigid then affine) or "syn" (rigid, affine, SyN), Mattes MI.
        spacing_mm: isotropic working spacing in mm, or None for the target's own grid.
        seed: ANTs sampling seed.
        fast: ANTs' short schedule (:data:`cmmas.align.ants.FAST_SCHEDULE`).
        component: keep only this label code (others become background).
        workers: processes registering pairs at once (one ANTs thread each); 1 runs here.
        progress: show a progress bar.

    Returns:
        The target's :class:`PairSet`.

    Raises:
        CmmasError: bad arguments, an unlabelled atlas, a folder made with other settings,
            or a failed registration: the first failure is raised once every other pair has
            run (those stay done; a re-run retries only the failed ones).
    """
    return prealign_targets(
        atlases,
        [target],
        labels,
        out_dir,
        kind,
        spacing_mm,
        seed,
        fast=fast,
        component=component,
        workers=workers,
        progress=progress,
    )[0]


def prealign_targets(
    atlases: Sequence[Case],
    targets: Sequence[Case],
    labels: Mapping[int, str],
    out_dir: str | os.PathLike,
    kind: str = "affine",
    spacing_mm: float | None = None,
    seed: int = 0,
    *,
    fast: bool = False,
    component: int | None = None,
    workers: int = 1,
    progress: bool = True,
) -> list[PairSet]:
    """:func:`prealign_pairs` for several targets, all pairs sharing one pool of workers.

    Returns:
        One :class:`PairSet` per target, in the order of ``targets``.
    """
    settings = _check_arguments(atlases, targets, labels, kind, spacing_mm, seed, fast, component, workers)
    table = {int(k): str(v) for k, v in labels.items()}
    out = Path(out_dir)
    folders = {t.id: _prepare_target(t, table, out / t.id, settings) for t in targets}
    jobs = [
        _Job(atlas, os.fspath(folders[t.id]), table, settings)
        for t in targets
        for atlas in atlases
        if atlas.id not in _read_manifest(folders[t.id])["atlases"]
    ]
    done = len(atlases) * len(targets) - len(jobs)
    if done:
        logger.info("prealign: %d pair(s) already done, %d to register", done, len(jobs))
    registered: dict[str, list[str]] = {t.id: [] for t in targets}
    failures: list[Exception] = []
    for job, outcome in _run(jobs, workers, progress, kind):
        if isinstance(outcome, Exception):
            logger.error("prealign: %s -> %s failed: %s", job.atlas.id, Path(job.folder).name, outcome)
            failures.append(outcome)
            continue
        _record(Path(job.folder), job.atlas, outcome)
        registered[Path(job.folder).name].append(job.atlas.id)
    if failures:
        _raise_first(failures, len(jobs))
    results = []
    for t in targets:
        entries = _read_manifest(folders[t.id])["atlases"]
        ids = tuple(sorted(entries, key=natural_key))
        results.append(
            PairSet(
                folder=folders[t.id],
                target_id=t.id,
                atlas_ids=ids,
                seconds={i: float(entries[i]["seconds"]) for i in ids},
                registered=tuple(sorted(registered[t.id], key=natural_key)),
            )
        )
    return results


def _check_arguments(atlases, targets, labels, kind, spacing_mm, seed, fast, component, workers) -> _Settings:
    if kind not in KINDS:
        raise CmmasError(None, f"registration kind must be one of {KINDS}, got {kind!r}")
    if spacing_mm is not None and not (np.isfinite(spacing_mm) and spacing_mm > 0):
        raise CmmasError(None, f"spacing must be a positive number of mm, got {spacing_mm}")
    if workers < 1:
        raise CmmasError(None, f"workers must be at least 1, got {workers}")
    if seed < 0:
        raise CmmasError(None, f"seed must be non-negative, got {seed}")
    if not atlases:
        raise DatasetError(None, "no atlases given")
    if not targets:
        raise DatasetError(None, "no targets given")
    if not labels:
        raise DatasetError(None, "the label table is empty")
    if component is not None and component not in labels:
        raise DatasetError(None, f"component {component} is not in the label table {sorted(labels)}")
    unlabelled = [a for a in atlases if a.label_path is None]
    if unlabelled:
        raise DatasetError(unlabelled[0].image_path, f"atlas {unlabelled[0].id!r} has no label map")
    ids = [a.id for a in atlases] + [t.id for t in targets]
    both = sorted({a.id for a in atlases} & {t.id for t in targets}, key=natural_key)
    if both:
        raise DatasetError(None, f"case(s) {both} are both atlas and target")
    if len(set(ids)) != len(ids):
        raise DatasetError(None, "an atlas or target is listed twice")
    spacing = None if spacing_mm is None else float(spacing_mm)
    return _Settings(kind, spacing, int(seed), bool(fast), None if component is None else int(component))


# ----------------------------------------------------------------------------- target folders


def _prepare_target(case: Case, labels: dict[int, str], folder: Path, settings: _Settings) -> Path:
    """Write the target on the working grid and an empty manifest, unless already there."""
    table = labels if settings.component is None else {settings.component: labels[settings.component]}
    if (folder / MANIFEST).exists():
        manifest = _read_manifest(folder)
        _check_same(folder, manifest, case, table, settings)
        missing = [n for n in _target_files(case) if not (folder / n).exists()]
        if missing:
            raise DatasetError(folder / missing[0], "missing although pairs.json exists; delete the folder to redo it")
        return folder
    image, label = load_case(case, labels, settings.component)
    if settings.spacing_mm is not None:
        image = preprocess.resample(image, spacing_zyx=settings.spacing_mm, kind="linear")
        if label is not None:
            label = preprocess.resample(label, geometry=image.geometry, kind="label")
    write_image(image, folder / TARGET_IMAGE)
    if label is not None:
        write_image(label.with_array(label.array.astype(np.int32)), folder / TARGET_LABEL)
    manifest = {
        "version": VERSION,
        "target": case.id,
        "target_modality": case.modality,
        "target_image": os.path.abspath(case.image_path),
        "target_label": None if case.label_path is None else os.path.abspath(case.label_path),
        "settings": dataclasses.asdict(settings),
        "labels": {str(k): v for k, v in table.items()},
        "atlases": {},
    }
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1))
    return folder


def _target_files(case: Case) -> list[str]:
    return [TARGET_IMAGE] + ([] if case.label_path is None else [TARGET_LABEL])


def _check_same(folder: Path, manifest: dict, case: Case, table: dict[int, str], settings: _Settings) -> None:
    if manifest.get("target") != case.id:
        raise DatasetError(folder, f"holds pairs of target {manifest.get('target')!r}, not {case.id!r}")
    stored = manifest.get("settings", {})
    wanted = dataclasses.asdict(settings)
    differ = [f"{k} {stored.get(k)!r} (asked {v!r})" for k, v in wanted.items() if stored.get(k) != v]
    if differ:
        raise DatasetError(
            folder, f"was prepared with other settings: {', '.join(differ)}; use another output folder"
        )
    if {int(k): v for k, v in manifest.get("labels", {}).items()} != table:
        raise DatasetError(folder, f"was prepared with another label table: {manifest.get('labels')}")


def _read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DatasetError(folder, f"no {MANIFEST}: not a folder of pre-aligned pairs (run experiments/prealign.py)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(path, f"unreadable manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("version") != VERSION:
        raise DatasetError(path, f"not a version-{VERSION} pairs manifest")
    missing = [k for k in ("target", "target_modality", "settings", "labels", "atlases") if k not in manifest]
    if missing:
        raise DatasetError(path, f"manifest lacks {missing}")
    return manifest


def _record(folder: Path, atlas: Case, seconds: float) -> None:
    """Mark one pair as done (after its files are written)."""
    manifest = _read_manifest(folder)
    manifest["atlases"][atlas.id] = {"modality": atlas.modality, "seconds": round(float(seconds), 3)}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1))


def atlas_files(folder: str | os.PathLike, atlas_id: str) -> tuple[Path, Path, Path]:
    """``(image, label, transform folder)`` paths of one atlas in a target's folder."""
    folder = Path(folder)
    return (
        folder / "atlases" / f"{atlas_id}_image.nii.gz",
        folder / "atlases" / f"{atlas_id}_label.nii.gz",
        folder / "transforms" / atlas_id,
    )


def prediction_path(folder: str | os.PathLike, method: str) -> Path:
    """Where a fused label of ``method`` for the target of ``folder`` goes (on the target grid)."""
    return Path(folder) / f"pred_{method}.nii.gz"


# ----------------------------------------------------------------------------- registering pairs


@dataclasses.dataclass(frozen=True)
class _Failure:
    """A CmmasError raised in a worker, carried back as plain values (it does not pickle)."""

    kind: type
    source: str | None
    problem: str


def _register_pair(job: _Job) -> float | _Failure:
    """Register one atlas onto its target's working image and write the results; seconds."""
    folder = Path(job.folder)
    settings = job.settings
    try:
        target = read_image(folder / TARGET_IMAGE)
        image, label = load_case(job.atlas, job.labels, settings.component)
        if settings.spacing_mm is not None:
            image = preprocess.resample(image, spacing_zyx=settings.spacing_mm, kind="linear")
        image_path, label_path, transform_dir = atlas_files(folder, job.atlas.id)
        result = ants.register(
            image, target, kind=settings.kind, seed=settings.seed, out_dir=transform_dir, fast=settings.fast
        )
        warped_label = ants.apply(result.forward, label, target.geometry, kind="label")
        write_image(result.warped.with_array(result.warped.array.astype(np.float32)), image_path)
        write_image(warped_label.with_array(warped_label.array.astype(np.int32)), label_path)
    except CmmasError as err:
        return _Failure(type(err), err.source, err.problem)
    return result.seconds


def _init_worker() -> None:
    ants.set_threads(1)


def _run(jobs: list[_Job], workers: int, progress: bool, kind: str):
    """Yield ``(job, seconds or the exception it raised)`` as registrations finish.

    Runs here when ``workers`` is 1, else in a pool of spawned processes (one ANTs thread
    each). A failed pair does not stop the others.
    """
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc=f"prealign {kind}", unit="pair", disable=not progress or not jobs)
    try:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                bar.set_postfix_str(f"{job.atlas.id} -> {Path(job.folder).name}")
                try:
                    outcome = _register_pair(job)
                except Exception as err:  # reported with the others by prealign_targets
                    outcome = err
                yield job, _outcome(outcome)
                bar.update()
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context, initializer=_init_worker) as pool:
            futures = {pool.submit(_register_pair, job): job for job in jobs}
            try:
                for future in as_completed(futures):
                    job = futures[future]
                    bar.set_postfix_str(f"{job.atlas.id} -> {Path(job.folder).name}")
                    try:
                        outcome = future.result()
                    except Exception as err:  # reported with the others by prealign_targets
                        outcome = err
                    yield job, _outcome(outcome)
                    bar.update()
            finally:
                for future in futures:
                    future.cancel()
    finally:
        bar.close()


def _outcome(value: float | _Failure | Exception) -> float | Exception:
    """Seconds, or the exception a pair raised (a worker's CmmasError rebuilt from its parts)."""
    if isinstance(value, _Failure):
        return value.kind(value.source, value.problem)
    return value


def _raise_first(failures: list[Exception], total: int) -> None:
    first = failures[0]
    note = f" ({len(failures)} of {total} pair(s) failed; the others are done and a re-run retries the failed)"
    if isinstance(first, CmmasError):
        raise type(first)(first.source, first.problem + note) from None
    raise first


# ----------------------------------------------------------------------------- reading pairs back


def target_folders(root: str | os.PathLike) -> list[Path]:
    """The target folders (those holding ``pairs.json``) under ``root``, natural order of names.

    Raises:
        DatasetError: ``root`` is missing or holds no target folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(root, "folder of pre-aligned pairs not found")
    found = sorted((p for p in root.iterdir() if (p / MANIFEST).is_file()), key=lambda p: natural_key(p.name))
    if not found:
        raise DatasetError(root, f"holds no target folder with a {MANIFEST} (run experiments/prealign.py)")
    return found


def load_pairs(folder: str | os.PathLike, atlas_ids: Sequence[str] | None = None) -> Pairs:
    """Read one target's folder: the target and every finished (or the chosen) atlas.

    Args:
        folder: ``out_dir/<target_id>`` as written by :func:`prealign_pairs`.
        atlas_ids: restrict to these atlases (all must be done); default every finished pair.

    Raises:
        DatasetError: not such a folder, no finished pair, or an unknown atlas id.
        ImageReadError, LabelError, GeometryError: a file is missing, bad, or off the grid.
    """
    folder = Path(folder)
    manifest = _read_manifest(folder)
    table = {int(k): str(v) for k, v in manifest["labels"].items()}
    entries = manifest["atlases"]
    ids = sorted(entries, key=natural_key) if atlas_ids is None else list(atlas_ids)
    unknown = [i for i in ids if i not in entries]
    if unknown:
        raise DatasetError(folder, f"no finished pair for atlas(es) {unknown}; done: {sorted(entries, key=natural_key)}")
    if not ids:
        raise DatasetError(folder, "no pre-aligned atlas yet (run experiments/prealign.py)")
    target = read_image(folder / TARGET_IMAGE)
    target_label = None
    if (folder / TARGET_LABEL).exists():
        target_label = read_label(folder / TARGET_LABEL, allowed=table, like=target)
    images, labels = [], []
    for atlas_id in ids:
        image_path, label_path, _ = atlas_files(folder, atlas_id)
        image = read_image(image_path)
        check_same_grid(target, image, what="atlas image")
        images.append(image.array)
        labels.append(read_label(label_path, allowed=table, like=target).array)
    modalities = "+".join(sorted({entries[i]["modality"] for i in ids}))
    return Pairs(
        target_id=str(manifest["target"]),
        target=target,
        target_label=target_label,
        atlas_ids=tuple(ids),
        atlas_images=np.stack(images).astype(np.float32),
        atlas_labels=np.stack(labels).astype(np.int32),
        seconds=np.asarray([float(entries[i]["seconds"]) for i in ids]),
        labels=table,
        direction=f"{modalities}->{manifest['target_modality']}",
        kind=str(manifest["settings"].get("kind")),
    )
