"""Segment one target scan with an atlas set: the library's front door.

``segment`` aligns the target once to the atlas set's reference (ANTs affine, MI), resamples
it onto the set's working grid (the ROI around the union of the aligned atlas labels: no target
label involved), registers every (selected) atlas to it with BiRegNet, fuses the warped atlas
labels (SimNet or any fusion preset of :mod:`cmmas.evaluation`) and maps the result back onto
the target's original grid: the label map, per-label probabilities and the atlas-agreement map
all carry the target's spacing, origin and direction.

``prepare_atlases`` checks every atlas of a data-set folder first (readable 3D image, label on
the image's grid, codes of the label table, a non-empty label) and then builds the atlas set
(:func:`cmmas.atlas_set.prepare`).

A *bundle* is one folder holding the atlas set (``atlas_set/``, or the folder itself) and the
models ``reg_model.keras`` and ``simnet.keras``, so that a user passes one path.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cmmas import atlas_set as atlas_sets
from cmmas.atlas_set import AtlasSet
from cmmas.datasets.base import Case, load_case
from cmmas.errors import AtlasSetError, CmmasError, DatasetError, LabelError, ModelError
from cmmas.io import IMAGE_SUFFIXES, Image, label_dtype, read_image, write_image

log = logging.getLogger(__name__)

#: Names inside a bundle folder.
BUNDLE_ATLAS_SET = "atlas_set"
BUNDLE_REG_MODEL = "reg_model.keras"
BUNDLE_SIMNET = "simnet.keras"
#: The learned fusion; every other name is a preset of :data:`cmmas.evaluation.PRESETS`.
SIMNET = "simnet"


def fusion_names() -> list[str]:
    """Every name ``segment(fusion=...)`` accepts: "simnet" and the fusion presets."""
    from cmmas.evaluation import PRESETS

    return [SIMNET, *PRESETS]


# ----------------------------------------------------------------------------- bundle


@dataclasses.dataclass(frozen=True)
class Bundle:
    """Where the atlas set and the two trained models are (a model may be absent: None)."""

    atlas_set: Path
    reg_model: Path | None
    fusion_model: Path | None


def resolve_bundle(
    bundle: str | os.PathLike | None = None,
    atlas_set: str | os.PathLike | None = None,
    reg_model: str | os.PathLike | None = None,
    fusion_model: str | os.PathLike | None = None,
) -> Bundle:
    """Combine a bundle folder with explicit paths; an explicit path wins over the bundle's.

    The bundle's atlas set is ``bundle/atlas_set/`` or, when that is absent and ``bundle``
    holds a ``manifest.json``, the bundle folder itself.

    Raises:
        AtlasSetError: the bundle folder is missing, or no atlas set is given at all.
    """
    root = None if bundle is None else Path(bundle)
    if root is not None and not root.is_dir():
        raise AtlasSetError(root, "bundle folder not found")

    def pick(explicit, name: str) -> Path | None:
        if explicit is not None:
            return Path(explicit)
        if root is not None and (root / name).exists():
            return root / name
        return None

    chosen = pick(atlas_set, BUNDLE_ATLAS_SET)
    if chosen is None and root is not None and (root / atlas_sets.MANIFEST).is_file():
        chosen = root
    if chosen is None:
        where = root if root is not None else None
        raise AtlasSetError(where, f"no atlas set given (--atlas-set, or a bundle holding {BUNDLE_ATLAS_SET}/)")
    return Bundle(chosen, pick(reg_model, BUNDLE_REG_MODEL), pick(fusion_model, BUNDLE_SIMNET))


# ----------------------------------------------------------------------------- atlas sets


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
    from cmmas.datasets import open_dataset

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
    return atlas_sets.prepare(
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


def atlas_ids_of(aset: AtlasSet, modality: str | None = None) -> list[str]:
    """The atlases of a set: its labelled "train" cases of ``modality``.

    ``modality`` defaults to the reference's (the reference is one of the atlases), so that a
    space holding cases of both modalities (``experiments/prealign.py --mode reference``) uses
    the atlas modality's cases only.
    """
    modality = modality or aset.case(aset.manifest.reference).modality
    ids = aset.ids(modality=modality, role="train", labelled=True)
    if not ids:
        raise AtlasSetError(aset.root, f"the atlas set holds no labelled {modality} atlas")
    return ids


def select_atlases(atlas_images: np.ndarray, target: np.ndarray, ids: Sequence[str], k: int | None) -> list[str]:
    """The ``k`` atlases most similar to the aligned target, most similar first.

    Similarity is the global mutual information (:func:`cmmas.fusion.global_similarity`) of
    each atlas image ``[N, D, H, W]`` with the target ``[D, H, W]`` on the working grid. With
    ``k`` None (or at least N) every atlas is kept, in the given order.
    """
    ids = list(ids)
    if k is not None and int(k) < 1:
        raise CmmasError(None, f"the number of atlases must be at least 1, got {k}")
    if k is None or k >= len(ids):
        return ids
    from cmmas.fusion import global_similarity

    scores = global_similarity(target, atlas_images, similarity="mi")
    order = np.argsort(-scores, kind="stable")
    return [ids[i] for i in order[: int(k)]]


# ----------------------------------------------------------------------------- segmenting


@dataclasses.dataclass(frozen=True)
class Segmentation:
    """What :func:`segment` produced.

    Attributes:
        label: fused label map (data-set codes, int32) on the target's original grid.
        probabilities: code -> probability map (float32 in [0, 1], background included,
            summing to 1 over codes) on the target's grid; outside the working grid the
            background has probability 1. None when :func:`segment` ran with ``maps=False``.
        agreement: fraction of atlases whose label equals the fused label (1 = unanimous), on
            the target's grid; 0 outside the working grid, where no atlas voted. None when
            :func:`segment` ran with ``maps=False``.
        atlas_ids: the atlases used (most similar first when ``atlases=K`` chose them).
        seconds: wall time of each step and in all, seconds: "load" (the target, the atlas
            set's manifest and the models given as files), "align", "register" (reading,
            choosing and warping the atlases), "fuse", "map_back", "total".
        working: the fused label on the working grid (int32 codes).
        target_working: the aligned target on the working grid (normalised to [0, 1]).
        codes: the atlas set's label codes, the background 0 first.
    """

    label: Image
    probabilities: dict[int, Image] | None
    agreement: Image | None
    atlas_ids: list[str]
    seconds: dict[str, float]
    working: Image
    target_working: Image
    codes: list[int]


def _check_file(model, what: str) -> None:
    """A model given as a path must exist (checked before TensorFlow is imported)."""
    if isinstance(model, (str, os.PathLike)) and not Path(model).is_file():
        raise ModelError(model, f"{what} model file not found")


def _load(model, loader):
    return loader(model) if isinstance(model, (str, os.PathLike)) else model


def segment(
    target: Image | str | os.PathLike,
    atlas_set: AtlasSet | str | os.PathLike,
    reg_model=None,
    fusion_model=None,
    fusion: str = SIMNET,
    atlases: int | None = None,
    modality: str | None = None,
    prealign: bool = True,
    transform_dir: str | os.PathLike | None = None,
    batch_size: int = 2,
    fusion_options: dict | None = None,
    progress: bool = True,
    maps: bool = True,
) -> Segmentation:
    """Segment ``target`` with the atlases of ``atlas_set``.

    Steps: align the target to the set's reference (ANTs affine, Mattes MI, at the set's
    alignment spacing) and resample it onto the working grid; keep the ``atlases`` most similar
    atlases; warp them with BiRegNet (in batches of ``batch_size``); fuse; map the fused
    foreground probabilities back to the target's grid (linear) and take the label as the argmax
    of the probabilities there; with ``maps``, the probability and agreement maps too.

    Args:
        target: the scan (an :class:`Image`, or a NIfTI/MHA/NRRD file or DICOM folder).
        atlas_set: a prepared atlas set (object or folder).
        reg_model: a BiRegNet (keras model or ``.keras`` path) of the working-grid shape; None
            fuses the atlases as affinely aligned.
        fusion_model: a SimNet (model or path), needed when ``fusion`` is "simnet".
        fusion: "simnet" or a preset of :data:`cmmas.evaluation.PRESETS` (mv, staple, global,
            lwv, lwv_ncc, jlf, jlf_r2).
        atlases: use the K atlases most similar to the aligned target (all if None).
        modality: the atlases' modality (default: the reference's; see :func:`atlas_ids_of`).
        prealign: align the target to the reference first; False means the target already
            lies in the reference space (its physical coordinates are used as they are).
        transform_dir: where to keep the target -> reference transform (temporary if None).
        batch_size: atlases per network batch. Per atlas a pass costs about the same at 1-5
            on a 2-core CPU; the last, shorter batch runs padded, so 2 wastes at most one atlas
            pass (4 ran 10 atlases as 12: 0.6 s more per target, measured).
        fusion_options: options of the fusion method, merged over the preset's.
        progress: show a progress bar over the steps.
        maps: map the probabilities and the agreement back onto the target's grid too; False
            maps the label only (what ``cmmas segment --no-extras`` writes): on a CT grid of
            257 x 257 x 97 voxels 0.2-0.5 s instead of 0.35-1.1 s, and 150 MB less memory.

    Returns:
        :class:`Segmentation`.

    Raises:
        ImageReadError: unreadable target.
        AtlasSetError: bad atlas set, or no atlas in it.
        ModelError: missing/unloadable model, or a model that does not fit the working grid.
        CmmasError: unknown fusion name or option.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    target = target if isinstance(target, Image) else read_image(target)
    aset = atlas_set if isinstance(atlas_set, AtlasSet) else AtlasSet(atlas_set)
    codes = [0, *sorted(aset.labels)]
    if fusion not in fusion_names():
        raise CmmasError(None, f"unknown fusion {fusion!r}; choose one of {', '.join(fusion_names())}")
    if fusion == SIMNET and fusion_model is None:
        raise ModelError(None, "fusion 'simnet' needs a SimNet model (--fusion-model, or a bundle with simnet.keras)")
    candidates = atlas_ids_of(aset, modality)
    reg_net, simnet = load_models(reg_model, fusion_model if fusion == SIMNET else None, aset)
    seconds = {"load": time.perf_counter() - start}

    bar = tqdm(total=4, desc="align", unit="step", disable=not progress)
    with tempfile.TemporaryDirectory(prefix="cmmas-segment-") as tmp:
        t0 = time.perf_counter()
        transforms, working = _align(target, aset, Path(transform_dir or tmp), prealign)
        seconds["align"] = time.perf_counter() - t0
        bar.set_description("register")
        bar.update()

        t0 = time.perf_counter()
        images, labels = aset.arrays(candidates)
        chosen = select_atlases(images, working.array, candidates, atlases)
        keep = [candidates.index(i) for i in chosen]
        images, labels = images[keep], labels[keep]
        if reg_net is not None:
            from cmmas import registration

            images, labels, _ = registration.warp_atlases(
                reg_net, images, labels, working.array, codes, batch_size=batch_size
            )
        seconds["register"] = time.perf_counter() - t0
        bar.set_description("fuse")
        bar.update()

        t0 = time.perf_counter()
        fused = _fuse(fusion, simnet, working.array, images, labels, codes, batch_size, fusion_options or {})
        seconds["fuse"] = time.perf_counter() - t0
        bar.set_description("map back")
        bar.update()

        t0 = time.perf_counter()
        label, probabilities, agreement = _map_back(fused, working, transforms, target, maps)
        seconds["map_back"] = time.perf_counter() - t0
        bar.update()
    bar.close()
    seconds["total"] = time.perf_counter() - start
    return Segmentation(
        label=label,
        probabilities=probabilities,
        agreement=agreement,
        atlas_ids=chosen,
        seconds=seconds,
        working=working.with_array(fused.label.astype(np.int32)),
        target_working=working,
        codes=codes,
    )


def load_models(reg_model, fusion_model, aset: AtlasSet):
    """``(BiRegNet, SimNet)`` loaded from paths (objects pass through; None stays None), checked
    against the atlas set's working grid and label table: load them once to segment several scans.

    Raises:
        ModelError: a missing or unloadable file, or a model that does not fit the atlas set.
    """
    shape = tuple(aset.geometry.shape)
    _check_file(reg_model, "BiRegNet")
    _check_file(fusion_model, "SimNet")
    reg_net = simnet = None
    if reg_model is not None:
        from cmmas import registration

        reg_net = _load(reg_model, registration.load_model)
        found = registration.model_shape(reg_net)
        if found != shape:
            raise ModelError(
                reg_model if isinstance(reg_model, (str, os.PathLike)) else reg_net.name,
                f"BiRegNet takes a {found} grid but the atlas set's working grid is {shape} "
                f"(prepare the atlas set with --shape {','.join(map(str, found))})",
            )
    if fusion_model is not None:
        from cmmas import similarity

        simnet = _load(fusion_model, similarity.load_model)
        found = tuple(int(n) for n in simnet.input["target"].shape[1:4])
        channels = int(simnet.input["atlas_label"].shape[-1])
        where = fusion_model if isinstance(fusion_model, (str, os.PathLike)) else simnet.name
        if found != shape:
            raise ModelError(where, f"SimNet takes a {found} grid but the atlas set's working grid is {shape}")
        if channels != len(aset.labels) + 1:
            raise ModelError(where, f"SimNet has {channels} label channels; the atlas set has "
                                    f"{len(aset.labels) + 1} codes {[0, *sorted(aset.labels)]}")
    return reg_net, simnet


def _align(target: Image, aset: AtlasSet, transform_dir: Path, prealign: bool) -> tuple[list[str], Image]:
    """The target -> reference transform files (empty without prealign) and the target on the working grid."""
    if not prealign:
        from cmmas import preprocess

        moved = preprocess.resample(target, geometry=aset.geometry, kind="linear", default=float(target.array.min()))
        return [], atlas_sets.normalize(moved)
    reg = atlas_sets.align(target, aset.reference_image(), transform_dir, aset.manifest.align_spacing_mm)
    transforms = list(reg.forward)
    return transforms, atlas_sets.to_space(target, transforms, aset.geometry, kind="linear")


def _fuse(fusion: str, simnet, target: np.ndarray, images: np.ndarray, labels: np.ndarray,
          codes: list[int], batch_size: int, options: dict):
    if fusion == SIMNET:
        from cmmas import similarity

        unknown = sorted(set(options) - {"top_k"})
        if unknown:
            raise CmmasError(None, f"unknown option(s) {unknown} for fusion 'simnet' (allowed: ['top_k'])")
        return similarity.simnet_fuse(simnet, target, labels, codes, batch_size=batch_size, **options)
    from cmmas import evaluation
    from cmmas import fusion as fusion_lib

    method, preset = evaluation.PRESETS[fusion]
    return fusion_lib.fuse(method, labels, codes, atlas_images=images, target_image=target, **{**preset, **options})


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


def _map_back(fused, working: Image, transforms: list[str], target: Image,
              maps: bool = True) -> tuple[Image, dict[int, Image] | None, Image | None]:
    """Label, and with ``maps`` probabilities and agreement, on the target's grid (see
    :class:`Segmentation`).

    With transforms, only the box of the target grid that the atlases' foreground reaches is
    resampled for the foreground probabilities (then the label), and only the box that the
    working grid covers for the agreement: outside the first every foreground probability is 0,
    outside the second the background has probability 1 and the agreement is 0, exactly as a
    resampling of the whole grid would give. On a CT grid the foreground box is a fraction of
    the covered one, and resampling and filling the target-sized maps is most of this step.
    """
    from cmmas import prealign, preprocess

    codes = np.asarray([int(c) for c in fused.labels], dtype=np.int32)  # ascending: the background 0 first
    foreground = [working.with_array(np.asarray(a, dtype=np.float32)) for a in fused.probabilities[1:]]
    if transforms:
        support = np.any([image.array > 0 for image in foreground], axis=0)
        box = None
        if support.any():  # one voxel wider: as far as linear interpolation reaches
            support_grid = working.geometry.sub_grid(preprocess.bounding_box(support, margin_vox=1))
            box = atlas_sets.reached_box(support_grid, transforms, target.geometry)
        moved = [] if box is None else prealign.apply_many(
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
        covered = atlas_sets.covered_box(working.geometry, transforms, target.geometry, target.path)
        [moved_agreement] = prealign.apply_many(transforms, [agreement], target.geometry.sub_grid(covered),
                                                kind="linear", invert=True)
        _clip_unit(moved_agreement.array, out=stack[(-1, *covered)])
    else:
        _clip_unit(preprocess.back_to_grid(agreement, target.geometry, kind="linear").array, out=stack[-1])
    probabilities = {int(code): target.with_array(stack[k]) for k, code in enumerate(codes)}
    return target.with_array(label), probabilities, target.with_array(stack[-1])


def label_paths(targets: Sequence[str | os.PathLike], out: str | os.PathLike) -> list[Path]:
    """Where each target's label map goes: ``out`` itself for one target; for several, ``out`` is
    a folder and each map is ``out/<scan name>.nii.gz`` (the file name without its image
    ending, :data:`cmmas.io.IMAGE_SUFFIXES`; a DICOM folder keeps its name).

    Raises:
        CmmasError: several targets and ``out`` names a .nii/.nii.gz file, or two targets share a
            name (their maps would overwrite each other).
    """
    out = Path(out)
    if len(targets) == 1:
        return [out]
    if out.name.endswith((".nii", ".nii.gz")):
        raise CmmasError(out, f"{len(targets)} targets: --out must be a folder, not a .nii.gz file")
    names = []
    for target in targets:
        name = Path(target).name
        ending = next((e for e in IMAGE_SUFFIXES if name.lower().endswith(e)), "")
        names.append(name[: len(name) - len(ending)])
    shared = sorted({n for n in names if names.count(n) > 1})
    if shared:
        raise CmmasError(out, f"targets share the name(s) {shared}: their label maps would overwrite each other")
    return [out / f"{name}.nii.gz" for name in names]


def output_paths(out: str | os.PathLike, codes: Sequence[int]) -> dict[str, Path]:
    """Where :func:`write_segmentation` puts each map: "label", "prob_<code>", "agreement"."""
    out = Path(out)
    stem = out.name[: -len(".nii.gz")] if out.name.endswith(".nii.gz") else out.stem
    paths = {"label": out}
    paths.update({f"prob_{int(c)}": out.with_name(f"{stem}_prob_{int(c)}.nii.gz") for c in codes})
    paths["agreement"] = out.with_name(f"{stem}_agreement.nii.gz")
    return paths


def write_segmentation(result: Segmentation, out: str | os.PathLike, extras: bool = True) -> list[Path]:
    """Write the label map to ``out`` (as :func:`cmmas.io.label_dtype` of its codes) and, with
    ``extras``, ``<stem>_prob_<code>.nii.gz`` and ``<stem>_agreement.nii.gz`` beside it (each
    atomically, all on the target's grid).

    Returns:
        The paths written, the label map first.

    Raises:
        CmmasError: ``extras`` asked of a segmentation made without its maps (``maps=False``).
    """
    if extras and (result.probabilities is None or result.agreement is None):
        raise CmmasError(out, "this segmentation has no probability or agreement maps (segment(maps=False)); "
                              "write it with extras=False")
    paths = output_paths(out, result.codes)
    label = result.label.with_array(result.label.array.astype(label_dtype(result.codes)))
    written = [write_image(label, paths["label"])]
    if extras:
        for code, prob in result.probabilities.items():
            written.append(write_image(prob, paths[f"prob_{code}"]))
        written.append(write_image(result.agreement, paths["agreement"]))
    return written


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
    from cmmas.datasets import open_dataset

    dataset = open_dataset(atlases, "folder")
    if modality is None:
        found = [m for m, cases in dataset.cases.items() if any(c.label_path is not None for c in cases)]
        if len(found) != 1:
            raise DatasetError(dataset.root, f"labelled atlases of {found or 'no'} modality: "
                                             "say which (--atlas-modality)")
        modality = found[0]
    out = Path(out)
    if (out / atlas_sets.MANIFEST).is_file():
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
