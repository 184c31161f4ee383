"""Building an atlas set: choose a reference, align every case to it once (ANTs affine, MI),
place the working grid on the union of the aligned atlas labels and store every case on it
(:func:`prepare`); or, for the paper's setting only, crop every case around its own label
without any alignment (:func:`prepare_oracle`)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cmmas import preprocess
from cmmas.align import atlas_set, target
from cmmas.align.atlas_set import MANIFEST, AtlasSet, Manifest, SpaceCase
from cmmas.align.mapping import to_space
from cmmas.datasets import open_dataset
from cmmas.datasets import oracle_roi
from cmmas.datasets.base import Case
from cmmas.datasets.loading import load_case
from cmmas.errors import AtlasSetError, CmmasError, DatasetError, LabelError, ModelError
from cmmas.io import Geometry, Image, atomic_write_text, read_image, write_image
from cmmas.nn.model_card import SPACING_TOLERANCE_MM, flag_value, require_card

log = logging.getLogger(__name__)

#: Working-grid shape in voxels (array order) when neither given nor taken from a model.
DEFAULT_SHAPE_ZYX = (64, 64, 64)

#: Working-grid spacing in mm (array order) when neither given nor taken from a model.
DEFAULT_SPACING_ZYX = (4.0, 4.0, 4.0)

#: Isotropic spacing of the affine alignments in mm when neither given nor taken from a model.
DEFAULT_ALIGN_SPACING_MM = 3.0


class Settings(NamedTuple):
    """How to prepare an atlas set (:func:`resolve_settings`).

    Attributes:
        shape_zyx: working-grid shape, voxels, array order.
        spacing_zyx: working-grid spacing, mm, array order.
        align_spacing_mm: isotropic spacing of the affine alignments, mm.
        component: keep only this label code (None: every label).
        codes: the label codes the set must hold (a model's), None when any will do.
    """

    shape_zyx: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float]
    align_spacing_mm: float
    component: int | None
    codes: tuple[int, ...] | None


def resolve_settings(
    like: str | os.PathLike | None = None,
    shape_zyx: Sequence[int] | None = None,
    spacing_zyx: Sequence[float] | None = None,
    align_spacing_mm: float | None = None,
    component: int | None = None,
) -> Settings:
    """The grid to prepare on: given values, else the model card of ``like``, else the defaults.

    With ``like`` (a trained ``.keras`` model with a card, :mod:`cmmas.nn.model_card`), the
    shape, spacing and alignment spacing are the card's, and so is the component of a model
    trained on one structure; the set must then hold the card's label codes.

    Args:
        like: a model whose training grid to reproduce, or None.
        shape_zyx: working-grid shape, voxels, array order (None: the card's or 64^3).
        spacing_zyx: working-grid spacing, mm, array order (None: the card's or 4 mm).
        align_spacing_mm: isotropic alignment spacing, mm (None: the card's or 3 mm).
        component: keep only this label code (None: the card's single code, or every label).

    Raises:
        ModelError: ``like`` has no (valid) card, or a given value disagrees with it (naming ``like``).
    """
    if like is None:
        return Settings(
            tuple(int(n) for n in (DEFAULT_SHAPE_ZYX if shape_zyx is None else shape_zyx)),
            tuple(float(s) for s in (DEFAULT_SPACING_ZYX if spacing_zyx is None else spacing_zyx)),
            float(DEFAULT_ALIGN_SPACING_MM if align_spacing_mm is None else align_spacing_mm),
            component,
            None,
        )
    card = require_card(like)
    given = (("--shape", shape_zyx, card.shape_zyx), ("--spacing", spacing_zyx, card.spacing_zyx),
             ("--align-spacing", None if align_spacing_mm is None else (align_spacing_mm,), (card.align_spacing_mm,)))
    for flag, value, wanted in given:
        if value is not None and (len(value) != len(wanted) or
                                  not np.allclose(value, wanted, rtol=0.0, atol=SPACING_TOLERANCE_MM)):
            raise ModelError(like, f"was trained with {flag} {flag_value(wanted)}, but {flag} {flag_value(value)} "
                                   "was given: drop it or drop --like")
    single = next(iter(card.labels)) if len(card.labels) == 1 else None
    return Settings(card.shape_zyx, card.spacing_zyx, card.align_spacing_mm,
                    single if component is None else component, tuple(sorted(card.labels)))


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


def prepare_oracle(
    cases: Sequence[Case],
    labels: dict[int, str],
    out_dir: str | os.PathLike,
    shape_zyx: Sequence[int],
    roles: dict[str, str] | None = None,
    margin_mm: float = oracle_roi.MARGIN_MM,
    component: int | None = None,
    progress: bool = True,
) -> AtlasSet:
    """An oracle atlas set, the original cmmas's setting: every case (atlas AND target) cropped
    around its OWN ground-truth structure, without any alignment.

    Each case's box is its label's (``component``, else every structure) plus ``margin_mm`` on
    each side, identity direction, stretched to ``shape_zyx`` voxels; its image is linearly
    resampled and z-scored over the box, its label resampled by nearest neighbour
    (:func:`cmmas.datasets.oracle_roi.crop_case`). The set is an :class:`AtlasSet` with
    ``roi == "oracle"`` (see :mod:`cmmas.align.atlas_set`); re-running keeps the cases already
    written. It needs every case's label, the targets' included: it is for reproducing the
    paper's numbers, never for segmenting a new scan.

    Args:
        cases: the cases (any modality), each with a label.
        labels: the data set's label table (code -> name).
        out_dir: the set's root folder.
        shape_zyx: voxels of every case's box, array order (the networks' input shape).
        roles: case id -> "train" or "test"; default "train" for all.
        margin_mm: margin around each label's tight box, mm (the original: 10 voxels at 1 mm).
        component: keep only this label code (others set to 0) and crop around it.
        progress: show a progress bar.

    Returns:
        The prepared :class:`AtlasSet`.

    Raises:
        AtlasSetError: a case without a label, an unknown component or role.
        LabelError: a case whose label lacks the structure (naming its file).
    """
    from tqdm import tqdm

    out = Path(out_dir)
    if component is not None and component not in labels:
        raise AtlasSetError(None, f"component {component} is not in the label table {labels}")
    unlabelled = [c.id for c in cases if c.label_path is None]
    if unlabelled:
        raise AtlasSetError(out, f"the oracle ROI needs every case's label; none for {unlabelled}")
    bad_roles = sorted(set((roles or {}).values()) - {"train", "test"})
    if bad_roles:
        raise AtlasSetError(out, f"roles must be 'train' or 'test', got {bad_roles}")
    codes = None if component is None else (component,)
    entries, spacings = [], []
    for case in tqdm(cases, desc="oracle crop", unit="case", disable=not progress):
        image_rel, label_rel = f"images/{case.id}.nii.gz", f"labels/{case.id}.nii.gz"
        if (out / image_rel).exists() and (out / label_rel).exists():
            spacings.append(read_image(out / image_rel).spacing_zyx)
        else:
            image, label = _load(case, labels, component)
            geometry = oracle_roi.oracle_geometry(label, codes, margin_mm, shape_zyx)
            cropped, cropped_label = oracle_roi.crop_case(image, label, geometry)
            write_image(cropped_label, out / label_rel)
            write_image(cropped, out / image_rel)
            spacings.append(cropped.spacing_zyx)
        entries.append(SpaceCase(
            id=case.id, modality=case.modality, image=image_rel, label=label_rel, transform="",
            source_image=str(Path(case.image_path).resolve()), source_label=str(Path(case.label_path).resolve()),
            role=(roles or {}).get(case.id, "train"),
        ))
    # float32, as a NIfTI header stores them: a resumed run (reading them back) gives the same grid
    spacing_zyx = np.median(np.asarray(spacings, dtype=np.float32), axis=0).astype(np.float64)
    nominal = Geometry(size=tuple(int(n) for n in tuple(shape_zyx)[::-1]),
                       spacing=tuple(float(s) for s in spacing_zyx[::-1]),
                       origin=(0.0, 0.0, 0.0), direction=preprocess.IDENTITY_DIRECTION)
    manifest = Manifest(reference="", labels=dict(labels) if component is None else {component: labels[component]},
                        geometry=nominal, align_spacing_mm=0.0, roi_margin_mm=float(margin_mm),
                        cases=tuple(entries), roi="oracle")
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
    shape_zyx: Sequence[int] | None = None,
    spacing_zyx: Sequence[float] | None = None,
    margin_mm: float = 15.0,
    align_spacing_mm: float | None = None,
    component: int | None = None,
    progress: bool = True,
    like: str | os.PathLike | None = None,
) -> AtlasSet:
    """Validate the labelled ``modality`` atlases of a data-set folder and prepare an atlas set.

    The grid is the given one, else that of the model ``like`` (:func:`resolve_settings`), else
    64^3 voxels at 4 mm aligned at 3 mm.

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
        like: a trained ``.keras`` model whose card gives the grid (and label codes) to prepare on.

    Raises:
        DatasetError: no such atlas; or an atlas is unreadable/inconsistent (see
            :func:`validate_atlases`), naming its file.
        ModelError: ``like`` has no card, a given value disagrees with it, or the atlases' label
            codes are not the model's (before any alignment runs).
    """
    settings = resolve_settings(like, shape_zyx, spacing_zyx, align_spacing_mm, component)
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
    kept = [code for code in sorted(labels) if settings.component in (None, code)]
    if settings.codes is not None and tuple(kept) != settings.codes:
        component = "" if settings.component is None else f", of which --component {settings.component} keeps {kept}"
        raise ModelError(like, f"was trained on label codes {list(settings.codes)}, but the {modality} atlases of "
                               f"{dataset.root} hold {sorted(labels)}{component}")
    validate_atlases(cases, labels)
    return prepare(
        cases,
        labels,
        out,
        shape_zyx=settings.shape_zyx,
        spacing_zyx=settings.spacing_zyx,
        reference=reference,
        roi_margin_mm=margin_mm,
        align_spacing_mm=settings.align_spacing_mm,
        component=settings.component,
        progress=progress,
    )


def raw_atlas_set(
    atlases: str | os.PathLike,
    modality: str | None,
    out: str | os.PathLike,
    shape_zyx: Sequence[int] | None = None,
    spacing_zyx: Sequence[float] | None = None,
    progress: bool = True,
    like: str | os.PathLike | None = None,
) -> AtlasSet:
    """An atlas set for a folder of raw atlases (folder layout), prepared once into ``out``.

    ``modality`` defaults to the only modality with labelled cases. The grid is ``shape_zyx``
    (voxels) at ``spacing_zyx`` (mm), else the card's of the model ``like``, else the defaults
    (:func:`resolve_settings`). A set already in ``out`` is reused when it was prepared from the
    same atlas files on the same grid.

    Raises:
        DatasetError: no modality given while both have labelled cases.
        AtlasSetError: ``out`` holds a set made from other atlases or on another grid.
        ModelError: ``like`` has no card or disagrees with a given value.
    """
    settings = resolve_settings(like, shape_zyx, spacing_zyx)
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
        same_grid = existing.geometry.shape == settings.shape_zyx and np.allclose(
            existing.geometry.spacing_zyx, settings.spacing_zyx, atol=SPACING_TOLERANCE_MM)
        if have != wanted or not same_grid:
            raise AtlasSetError(out, f"holds an atlas set of other atlases or another grid than {atlases}; "
                                     "remove it or write the output elsewhere")
        return existing
    return prepare_atlases(dataset.root, modality, out, shape_zyx=shape_zyx, spacing_zyx=spacing_zyx,
                           progress=progress, like=like)
