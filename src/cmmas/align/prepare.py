"""Building an atlas set: choose a reference, align every case to it once (ANTs affine, MI),
place the working grid on the union of the aligned atlas labels and store every case on it."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cmmas import preprocess
from cmmas.align import atlas_set, target
from cmmas.align.atlas_set import MANIFEST, AtlasSet, Manifest, SpaceCase
from cmmas.align.mapping import to_space
from cmmas.datasets import open_dataset
from cmmas.datasets.base import Case
from cmmas.datasets.loading import load_case
from cmmas.errors import AtlasSetError, CmmasError, DatasetError, LabelError
from cmmas.io import Geometry, Image, atomic_write_text, write_image

log = logging.getLogger(__name__)


def choose_reference(cases: Sequence[Case], labels: dict[int, str]) -> Case:
    """The labelled case of median total label volume (a typical anatomy, no outlier)."""
    labelled = [c for c in cases if c.label_path is not None]
    if not labelled:
        raise AtlasSetError(None, "no labelled case to choose a reference from")
    volumes = []
    for case in labelled:
        _, label = load_case(case, labels)
        voxel_ml = float(np.prod(label.spacing_zyx)) / 1000.0
        volumes.append(np.count_nonzero(label.array) * voxel_ml)
    order = np.argsort(volumes)
    return labelled[int(order[len(order) // 2])]


def _at_spacing(image: Image, spacing_mm: float) -> Image:
    return preprocess.resample(image, spacing_zyx=(spacing_mm,) * 3, kind="linear")


def working_grid(
    union_mask: Image, shape_zyx: Sequence[int], spacing_zyx: Sequence[float], margin_mm: float
) -> Geometry:
    """The working grid: ``shape_zyx`` voxels of ``spacing_zyx`` mm centred on the mask's box."""
    roi = preprocess.roi_from_mask(union_mask, union_mask.array > 0, margin_mm=margin_mm)
    geometry = preprocess.working_geometry(roi.center_mm, tuple(spacing_zyx), tuple(shape_zyx))
    extent = np.asarray(shape_zyx) * np.asarray(spacing_zyx)
    if np.any(np.asarray(roi.size_mm) > extent):
        log.warning(
            "atlas labels plus %.0f mm margin span %s mm, more than the working grid's %s mm: "
            "structures may be cut; enlarge --shape or --spacing",
            margin_mm,
            np.round(roi.size_mm).tolist(),
            extent.tolist(),
        )
    return geometry


def prepare(
    cases: Sequence[Case],
    labels: dict[int, str],
    out_dir: str | os.PathLike,
    shape_zyx: Sequence[int],
    spacing_zyx: Sequence[float],
    reference: str = "auto",
    roi_ids: Sequence[str] | None = None,
    roles: dict[str, str] | None = None,
    roi_margin_mm: float = 15.0,
    align_spacing_mm: float = 3.0,
    component: int | None = None,
    starts: target.Starts = target.ROBUST,
    fast: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> AtlasSet:
    """Align every case once to a reference and store it on the working grid.

    Re-running skips the cases already stored (their transform and image exist), so an
    interrupted preparation resumes; outputs are written atomically.

    Args:
        cases: the cases (any modality); the reference is chosen among them.
        labels: the data set's label table (code -> name); every label is checked against it.
        out_dir: the set's root folder.
        shape_zyx: working-grid shape, array order (divisible by 8 for the networks).
        spacing_zyx: working-grid spacing in mm, array order.
        reference: a case id, or "auto" (:func:`choose_reference` among ``roi_ids``' cases).
        roi_ids: cases whose aligned labels define the ROI (the atlases); default: all labelled.
        roles: case id -> "train" or "test" (held-out targets); default "train" for all.
        roi_margin_mm: margin added around the union of those labels.
        align_spacing_mm: isotropic spacing of the affine alignments.
        component: keep only this label code (others set to 0), as the original's single structure.
        starts: how each case's alignment starts (:func:`cmmas.align.target.align_to_reference`,
            the alignment ``cmmas segment`` gives a new scan); its QC record is written beside
            the transform (``transforms/<id>/qc.json``).
        fast: the final affine stage runs the fast ANTs schedule (else antspyx's default one).
        seed: ANTs sampling seed.
        progress: show a progress bar.

    Returns:
        The prepared :class:`AtlasSet`.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    if component is not None and component not in labels:
        raise AtlasSetError(None, f"component {component} is not in the label table {labels}")
    stored_labels = dict(labels) if component is None else {component: labels[component]}
    by_id = {c.id: c for c in cases}
    bad_roles = sorted({r for r in (roles or {}).values()} - {"train", "test"})
    if bad_roles:
        raise AtlasSetError(out, f"roles must be 'train' or 'test', got {bad_roles}")
    if len(by_id) != len(cases):
        raise AtlasSetError(out, "duplicate case ids")
    roi_ids = list(roi_ids) if roi_ids is not None else [c.id for c in cases if c.label_path is not None]
    unknown = [i for i in roi_ids if i not in by_id]
    if unknown:
        raise AtlasSetError(out, f"ROI cases {unknown} are not among the cases")
    if reference == "auto":
        ref_case = choose_reference([by_id[i] for i in roi_ids], labels)
    elif reference in by_id:
        ref_case = by_id[reference]
    else:
        raise AtlasSetError(out, f"reference {reference!r} is not among the cases")

    ref_image, _ = _load(ref_case, labels, component)
    ref_small = _at_spacing(ref_image, align_spacing_mm)
    write_image(ref_small, out / "reference.nii.gz")

    transforms: dict[str, str] = {}
    bar = tqdm(cases, desc="align to reference", unit="case", disable=not progress)
    for case in bar:
        rel = f"transforms/{case.id}/affine.mat"
        if not (out / rel).exists():
            image, _ = _load(case, labels, component)
            found = target.align_to_reference(image, ref_small, out / "transforms" / case.id, align_spacing_mm,
                                              starts=starts, fast=fast, seed=seed)
            atomic_write_text(out / "transforms" / case.id / "qc.json", json.dumps(found.qc(), indent=1))
            if found.flagged:
                log.warning("%s: its alignment to the reference %s is uncertain (%s)", case.id, ref_case.id,
                            target.describe(found))
        transforms[case.id] = rel

    union = None
    for case_id in roi_ids:
        _, label = _load(by_id[case_id], labels, component)
        moved = to_space(label, [str(out / transforms[case_id])], ref_small.geometry, kind="label")
        union = moved.array > 0 if union is None else union | (moved.array > 0)
    if union is None or not union.any():
        raise AtlasSetError(out, "the aligned atlas labels are empty: cannot place the working grid")
    geometry = working_grid(ref_small.with_array(union.astype(np.uint8)), shape_zyx, spacing_zyx, roi_margin_mm)

    entries = []
    for case in tqdm(cases, desc="resample to working grid", unit="case", disable=not progress):
        image_rel, label_rel = f"images/{case.id}.nii.gz", None
        tfm = [str(out / transforms[case.id])]
        image, label = _load(case, labels, component)
        if not (out / image_rel).exists():
            write_image(to_space(image, tfm, geometry, kind="linear"), out / image_rel)
        if label is not None:
            label_rel = f"labels/{case.id}.nii.gz"
            if not (out / label_rel).exists():
                write_image(to_space(label, tfm, geometry, kind="label"), out / label_rel)
        entries.append(
            SpaceCase(
                id=case.id,
                modality=case.modality,
                image=image_rel,
                label=label_rel,
                transform=transforms[case.id],
                source_image=str(Path(case.image_path).resolve()),
                source_label=None if case.label_path is None else str(Path(case.label_path).resolve()),
                role=(roles or {}).get(case.id, "train"),
            )
        )
    manifest = Manifest(
        reference=ref_case.id,
        labels=stored_labels,
        geometry=geometry,
        align_spacing_mm=float(align_spacing_mm),
        roi_margin_mm=float(roi_margin_mm),
        cases=tuple(entries),
    )
    atomic_write_text(out / MANIFEST, manifest.to_json())
    prepared = AtlasSet(out)
    prepared.write_stack()
    return prepared


def _load(case: Case, labels: dict[int, str], component: int | None) -> tuple[Image, Image | None]:
    try:
        return load_case(case, labels, component=component)
    except CmmasError:
        raise
    except (OSError, ValueError) as err:
        raise AtlasSetError(case.image_path, f"cannot load case {case.id}: {err}") from None


def validate_atlases(cases: Sequence[Case], labels: dict[int, str]) -> None:
    """Check every atlas before any registration runs; the first bad one raises.

    An atlas must have a readable 3D image with positive, finite spacing, a label map on the
    image's grid holding only codes of ``labels``, and at least one labelled voxel.

    Raises:
        ImageReadError, GeometryError, LabelError, DatasetError: naming the atlas's file.
    """
    for case in cases:
        if case.label_path is None:
            raise DatasetError(case.image_path, f"atlas {case.id!r} has no label map")
        image, label = load_case(case, labels)
        spacing = np.asarray(image.geometry.spacing)
        if not np.all(np.isfinite(spacing) & (spacing > 0)):
            raise AtlasSetError(case.image_path, f"spacing {tuple(spacing)} mm is not positive")
        if not np.any(label.array):
            raise LabelError(case.label_path, f"atlas {case.id!r} has an empty label map")


def prepare_atlases(
    atlases: str | os.PathLike,
    modality: str,
    out: str | os.PathLike,
    layout: str = "folder",
    reference: str = "auto",
    ids: Sequence[str] | None = None,
    shape_zyx: Sequence[int] = (64, 64, 64),
    spacing_zyx: Sequence[float] = (4.0, 4.0, 4.0),
    margin_mm: float = 15.0,
    align_spacing_mm: float = 3.0,
    component: int | None = None,
    progress: bool = True,
) -> AtlasSet:
    """Validate the labelled ``modality`` atlases of a data-set folder and prepare an atlas set.

    Args:
        atlases: data-set root (``layout``: folder, mmwhs or chaos).
        modality: "ct" or "mr": the atlases' modality.
        out: the atlas set's folder (re-running resumes).
        layout: on-disk layout of ``atlases``.
        reference: "auto" (median label volume) or a case id.
        ids: use only these case ids (default: every labelled case of ``modality``).
        shape_zyx: working-grid shape (voxels, array order); must be the BiRegNet's input shape.
        spacing_zyx: working-grid spacing, mm, array order.
        margin_mm: margin around the union of the aligned atlas labels, mm.
        align_spacing_mm: isotropic spacing of the affine alignments, mm.
        component: keep only this label code.
        progress: show progress bars.

    Raises:
        DatasetError: no such atlas; or an atlas is unreadable/inconsistent (see
            :func:`validate_atlases`), naming its file.
    """
    dataset = open_dataset(atlases, layout)
    if ids:
        cases = [dataset.case(i) for i in ids]
        wrong = [c.id for c in cases if c.modality != modality]
        if wrong:
            raise DatasetError(dataset.root, f"case(s) {wrong} are not {modality} scans")
    else:
        cases = [c for c in dataset.of(modality) if c.label_path is not None]
    if not cases:
        raise DatasetError(dataset.root, f"no labelled {modality} atlas found")
    labels = dict(dataset.labels)
    validate_atlases(cases, labels)
    return prepare(
        cases,
        labels,
        out,
        shape_zyx=tuple(shape_zyx),
        spacing_zyx=tuple(spacing_zyx),
        reference=reference,
        roi_margin_mm=margin_mm,
        align_spacing_mm=align_spacing_mm,
        component=component,
        progress=progress,
    )


def raw_atlas_set(
    atlases: str | os.PathLike,
    modality: str | None,
    out: str | os.PathLike,
    shape_zyx: Sequence[int],
    spacing_zyx: Sequence[float] = (4.0, 4.0, 4.0),
    progress: bool = True,
) -> AtlasSet:
    """An atlas set for a folder of raw atlases (folder layout), prepared once into ``out``.

    ``modality`` defaults to the only modality with labelled cases. A set already in ``out``
    is reused when it was prepared from the same atlas files on the same grid.

    Raises:
        DatasetError: no modality given while both have labelled cases.
        AtlasSetError: ``out`` holds a set made from other atlases or on another grid.
    """
    dataset = open_dataset(atlases, "folder")
    if modality is None:
        found = [m for m, cases in dataset.cases.items() if any(c.label_path is not None for c in cases)]
        if len(found) != 1:
            raise DatasetError(dataset.root, f"labelled atlases of {found or 'no'} modality: "
                                             "say which (--atlas-modality)")
        modality = found[0]
    out = Path(out)
    if (out / atlas_set.MANIFEST).is_file():
        existing = AtlasSet(out)
        wanted = {os.path.abspath(c.image_path) for c in dataset.of(modality) if c.label_path is not None}
        have = {os.path.abspath(c.source_image) for c in existing.manifest.cases}
        same_grid = existing.geometry.shape == tuple(shape_zyx) and np.allclose(
            existing.geometry.spacing_zyx, spacing_zyx, atol=1e-3)
        if have != wanted or not same_grid:
            raise AtlasSetError(out, f"holds an atlas set of other atlases or another grid than {atlases}; "
                                     "remove it or write the output elsewhere")
        return existing
    return prepare_atlases(dataset.root, modality, out, shape_zyx=shape_zyx, spacing_zyx=spacing_zyx,
                           progress=progress)
