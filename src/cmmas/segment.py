"""Segment one scan with an atlas set: the library's front door.

:func:`segment` runs the pipeline on one scan, step by step through the functions below, which
the evaluation (:mod:`cmmas.evaluate.runs`) calls in the same order so that it scores exactly
what ``cmmas segment`` writes:

1. :func:`align_target`: the scan's affine alignment to the set's reference (ANTs, MI, several
   starts, with a QC record: :mod:`cmmas.align.target`) and the scan on the working grid
   (:func:`cmmas.align.mapping.to_working`);
2. :func:`select_atlases`: the K atlases most similar to it (optionally each given its own
   affine stage onto it: :mod:`cmmas.align.per_atlas`);
3. :func:`register_atlases`: every atlas warped onto it by BiRegNet;
4. :func:`cmmas.fuse.registry.fuse_named`: the warped labels fused (SimNet or a classic fusion);
5. :func:`cmmas.align.mapping.map_back`: the fusion mapped onto the scan's own grid.

Every output carries the scan's spacing, origin and direction. A *bundle* is one folder
holding the atlas set (``atlas_set/``, or the folder itself) and the models ``reg_model.keras``
and ``simnet.keras``, so that a user passes one path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from cmmas import outputs
from cmmas.align import cards, mapping, per_atlas
from cmmas.align import target as target_alignment
from cmmas.align.atlas_set import MANIFEST, AtlasSet
from cmmas.errors import AtlasSetError, CmmasError, ModelError
from cmmas.fuse import registry
from cmmas.fuse.weights import global_similarity
from cmmas.io import IMAGE_SUFFIXES, Image, atomic_write_text, label_dtype, read_image, write_image
from cmmas.nn import model_card

if TYPE_CHECKING:  # TensorFlow: imported only when refinement runs
    from cmmas.register.refine import Refinement

log = logging.getLogger(__name__)

#: Names inside a bundle folder.
BUNDLE_ATLAS_SET = "atlas_set"
BUNDLE_REG_MODEL = "reg_model.keras"
BUNDLE_SIMNET = "simnet.keras"
#: The learned fusion, the default; every other fusion is a preset of :data:`cmmas.fuse.registry.PRESETS`.
SIMNET = registry.SIMNET


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
    if chosen is None and root is not None and (root / MANIFEST).is_file():
        chosen = root
    if chosen is None:
        where = root if root is not None else None
        raise AtlasSetError(where, f"no atlas set given (--atlas-set, or a bundle holding {BUNDLE_ATLAS_SET}/)")
    return Bundle(chosen, pick(reg_model, BUNDLE_REG_MODEL), pick(fusion_model, BUNDLE_SIMNET))


def atlas_ids_of(aset: AtlasSet, modality: str | None = None) -> list[str]:
    """The atlases of a set: its labelled "train" cases of ``modality``.

    ``modality`` defaults to the reference's (the reference is one of the atlases), so that a
    set holding cases of both modalities (``experiments/prealign.py --mode reference``) uses
    the atlas modality's cases only.
    """
    modality = modality or aset.case(aset.manifest.reference).modality
    ids = aset.ids(modality=modality, role="train", labelled=True)
    if not ids:
        raise AtlasSetError(aset.root, f"the atlas set holds no labelled {modality} atlas")
    return ids


def select_atlases(atlas_images: np.ndarray, target: np.ndarray, ids: Sequence[str], k: int | None) -> list[str]:
    """The ``k`` atlases most similar to the aligned target, most similar first.

    Similarity is the global mutual information (:func:`cmmas.fuse.weights.global_similarity`) of
    each atlas image ``[N, D, H, W]`` with the target ``[D, H, W]`` on the working grid. With
    ``k`` None (or at least N) every atlas is kept, in the given order.
    """
    ids = list(ids)
    if k is not None and int(k) < 1:
        raise CmmasError(None, f"the number of atlases must be at least 1, got {k}")
    if k is None or k >= len(ids):
        return ids
    scores = global_similarity(target, atlas_images, similarity="mi")
    order = np.argsort(-scores, kind="stable")
    return [ids[i] for i in order[: int(k)]]


@dataclasses.dataclass(frozen=True)
class Segmentation:
    """What :func:`segment` produced.

    Attributes:
        label: fused label map (data-set codes, in the smallest integer type that holds them,
            :func:`cmmas.io.label_dtype`) on the target's original grid.
        probabilities: code -> probability map on the target's grid, uint8: value /
            :data:`cmmas.io.PROBABILITY_SCALE` (255) is the probability (background included,
            summing to ~1 over codes); outside the working grid the background has probability 1.
            None when :func:`segment` ran with ``maps=False``.
        agreement: fraction of atlases whose label equals the fused label (1 = unanimous), on
            the target's grid, uint8 scaled as the probabilities; 0 outside the working grid,
            where no atlas voted. None when :func:`segment` ran with ``maps=False``.
        atlas_ids: the atlases used (most similar first when ``atlases=K`` chose them).
        seconds: wall time of each step and in all, seconds: "load" (the target, the atlas
            set's manifest and the models given as files), "align", "register" (reading,
            choosing and warping the atlases), "fuse", "map_back", "total".
        working: the fused label on the working grid (int32 codes).
        target_working: the aligned target on the working grid (normalised to [0, 1]).
        target: the scan as given, on its own grid (the grid of ``label``).
        codes: the atlas set's label codes, the background 0 first.
        names: the atlas set's label table, code -> structure name (0 excluded).
        alignment: the alignment's QC record (:meth:`cmmas.align.target.TargetAlignment.qc`),
            None when no alignment ran (``alignment=`` or ``prealign=False``).
        refinement: what the test-time refinement did (MIND distance and folding % before and
            after, :class:`cmmas.register.refine.Refined`), None when it did not run.
    """

    label: Image
    probabilities: dict[int, Image] | None
    agreement: Image | None
    atlas_ids: list[str]
    seconds: dict[str, float]
    working: Image
    target_working: Image
    target: Image
    codes: list[int]
    names: dict[int, str]
    alignment: dict | None = None
    refinement: dict | None = None

    @property
    def flagged(self) -> bool:
        """The alignment's QC flagged it: the atlases may have been placed wrongly."""
        return bool(self.alignment and self.alignment["flagged"])

    def qc(self) -> dict:
        """The QC record written beside the label map (``<stem>_qc.json``): the alignment's
        record, the atlases used and the seconds of each step."""
        return {"flagged": self.flagged, "alignment": self.alignment, "atlas_ids": list(self.atlas_ids),
                "refinement": self.refinement, "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


def load_models(reg_model, fusion_model, aset: AtlasSet):
    """``(BiRegNet, SimNet)`` loaded from paths (objects pass through; None stays None), checked
    against the atlas set's working grid and label table (by a model's card, naming the flags
    that would fit, before the network loads; else by its input shape): load them once to segment
    several scans.

    Raises:
        ModelError: a missing or unloadable file, or a model that does not fit the atlas set.
    """
    shape = tuple(aset.geometry.shape)
    for model, what in ((reg_model, "BiRegNet"), (fusion_model, "SimNet")):
        if isinstance(model, (str, os.PathLike)):  # before TensorFlow is imported
            if not Path(model).is_file():
                raise ModelError(model, f"{what} model file not found")
            card = model_card.read_card(model)
            problem = card and cards.mismatch(card, aset, model)
            if problem:
                raise ModelError(model, problem)
    if reg_model is None and fusion_model is None:
        return None, None
    from cmmas.nn import training  # TensorFlow: imported only when a network runs

    def load(model, kind: str):
        if model is None:
            return None, None
        where = model if isinstance(model, (str, os.PathLike)) else None
        net = training.load_model(model, kind) if where is not None else model
        return net, where or net.name

    reg_net, where = load(reg_model, "biregnet")
    if reg_net is not None:
        found = training.input_grid(reg_net, "biregnet")
        if found != shape:
            raise ModelError(where, f"BiRegNet takes a {found} grid but the atlas set's working grid is {shape} "
                                    f"(prepare the atlas set with --shape {','.join(map(str, found))})")
    simnet, where = load(fusion_model, "simnet")
    if simnet is not None:
        found = training.input_grid(simnet, "simnet")
        channels = int(simnet.input["atlas_label"].shape[-1])
        if found != shape:
            raise ModelError(where, f"SimNet takes a {found} grid but the atlas set's working grid is {shape}")
        if channels != len(aset.labels) + 1:
            raise ModelError(where, f"SimNet has {channels} label channels; the atlas set has "
                                    f"{len(aset.labels) + 1} codes {[0, *sorted(aset.labels)]}")
    return reg_net, simnet


def align_target(
    target: Image,
    aset: AtlasSet,
    transform_dir: str | os.PathLike,
    prealign: bool = True,
    alignment: Sequence[str | os.PathLike] | None = None,
    starts: target_alignment.Starts = target_alignment.ROBUST,
) -> tuple[list[str], Image, target_alignment.TargetAlignment | None]:
    """The scan -> reference transform files, the scan on the working grid (normalised to [0, 1])
    and what the alignment found (None when no alignment ran).

    Args:
        target: the scan on its own grid.
        aset: the atlas set.
        transform_dir: where the new alignment's transform is written.
        prealign: align the scan (:func:`cmmas.align.target.align_to_reference` at the set's
            alignment spacing); False: the scan already lies in the reference space (no transform).
        alignment: transform files of an alignment made before (e.g. the one stored when the
            atlas set was prepared): used instead of aligning again.
        starts: the alignment's starts (:data:`cmmas.align.target.ROBUST`, or ``SINGLE``).
    """
    found = None
    if alignment is not None:
        transforms = [str(a) for a in alignment]
    elif prealign:
        found = target_alignment.align_to_reference(target, aset.reference_image(), transform_dir,
                                                    aset.manifest.align_spacing_mm, starts=starts)
        transforms = list(found.transforms)
    else:
        transforms = []
    return transforms, mapping.to_working(target, transforms, aset.geometry), found


def register_atlases(reg_net, images: np.ndarray, labels: np.ndarray, target: np.ndarray, codes: Sequence[int],
                     batch_size: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Atlases ``[N, D, H, W]`` (images, labels) warped onto the target ``[D, H, W]`` by BiRegNet:
    ``(images, labels, fields [N, D, H, W, 3])``; without a network (None) they stay as aligned
    and the fields are None."""
    if reg_net is None:
        return images, labels, None
    from cmmas.register import apply  # TensorFlow: imported only when a network runs

    return apply.warp_atlases(reg_net, images, labels, target, codes, batch_size=batch_size)


def refine_atlases(target: np.ndarray, images: np.ndarray, labels: np.ndarray, fields: np.ndarray | None,
                   codes: Sequence[int], refinement: Refinement):
    """Atlases ``[N, D, H, W]`` as aligned (before the network) warped onto ``target`` by their
    refined fields (``fields`` from the network, or None): ``(images, labels, Refined)``."""
    from cmmas.register import apply, refine  # TensorFlow: imported only when refinement runs

    refined = refine.refine_fields(target, images, fields, refinement)
    warped_images, warped_labels = apply.warp_by_fields(images, labels, refined.fields, codes)
    return warped_images, warped_labels, refined


def warm_up(reg_net, simnet, aset: AtlasSet, atlas_ids: Sequence[str], fusions: Sequence[str], batch_size: int = 2,
            options: dict | None = None) -> None:
    """Untimed passes, so that one-off set-up (graph tracing, libraries loading on first use) is
    not timed with the first scan.

    Each network runs once at the one batch shape :func:`segment` runs (``min(batch_size, N)``
    atlases; a shorter last batch runs padded to it), and each fusion of ``fusions`` once on the
    central 16^3 voxels of two atlases of ``atlas_ids`` (the first one standing in as target).
    """
    codes = [0, *sorted(aset.labels)]
    size = min(batch_size, len(atlas_ids))
    images, labels = aset.arrays(list(atlas_ids)[: max(size, 2)])
    target = images[0]
    warped_images, warped_labels, _ = register_atlases(reg_net, images[:size], labels[:size], target, codes, size)
    centre = tuple(slice(max(s // 2 - 8, 0), s // 2 + 8) for s in target.shape)
    few = (slice(0, 2), *centre)
    for name in fusions:
        if name == SIMNET:
            if simnet is not None:
                registry.fuse_named(SIMNET, target, warped_images, warped_labels, codes, simnet=simnet,
                                    batch_size=size)
            continue
        registry.fuse_named(name, target[centre], images[few], labels[few], codes, options=(options or {}).get(name))


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
    alignment: Sequence[str | os.PathLike] | None = None,
    batch_size: int = 2,
    fusion_options: dict | None = None,
    progress: bool = True,
    maps: bool = True,
    starts: target_alignment.Starts = target_alignment.ROBUST,
    atlas_affine: bool = False,
    refinement: Refinement | None = None,
) -> Segmentation:
    """Segment ``target`` with the atlases of ``atlas_set`` (the steps of the module docstring).

    Args:
        target: the scan (an :class:`Image`, or a NIfTI/MHA/NRRD file or DICOM folder).
        atlas_set: a prepared atlas set (object or folder).
        reg_model: a BiRegNet (keras model or ``.keras`` path) of the working-grid shape; None
            fuses the atlases as affinely aligned.
        fusion_model: a SimNet (model or path), needed when ``fusion`` is "simnet".
        fusion: a name of :func:`cmmas.fuse.registry.names` ("simnet", mv, staple, global, lwv,
            lwv_ncc, jlf, jlf_r2, jlf_tf, lwv_mind, jlf_mind).
        atlases: use the K atlases most similar to the aligned target (all if None).
        modality: the atlases' modality (default: the reference's; see :func:`atlas_ids_of`).
        prealign: align the target to the reference first; False means the target already
            lies in the reference space (its physical coordinates are used as they are).
        transform_dir: where to keep the target -> reference transform (temporary if None).
        alignment: the target -> reference transform files of an earlier alignment, used
            instead of aligning (see :func:`align_target`).
        batch_size: atlases per network batch (the last, shorter batch runs padded).
        fusion_options: options of the fusion, merged over the preset's.
        progress: show a progress bar over the steps.
        maps: map the probability and agreement maps back too; False maps the label only
            (what ``cmmas segment --no-extras`` writes).
        starts: the alignment's starts (:mod:`cmmas.align.target`). The same scan gives the same
            label map on every call when ANTs runs on one thread in this process
            (:func:`cmmas.align.ants.set_threads`, before its first registration; ``cmmas
            segment`` does so unless ``--fast-nondeterministic``).
        atlas_affine: give each chosen atlas its own affine stage onto the target on the working
            grid before the network (:mod:`cmmas.align.per_atlas`): one trapped alignment then
            costs one atlas (about 0.1 s per atlas).
        refinement: refine every atlas's field on this target with MIND-SSC before fusing
            (:mod:`cmmas.register.refine`; ``cmmas segment --refine-steps``); None or 0 steps: off.

    Returns:
        :class:`Segmentation`.

    Raises:
        ImageReadError: unreadable target.
        AtlasSetError: bad atlas set, or no atlas in it.
        ModelError: missing/unloadable model, or a model that does not fit the working grid.
        CmmasError: unknown fusion name or option.
    """
    start = time.perf_counter()
    target = target if isinstance(target, Image) else read_image(target, dtype=None)
    aset = atlas_set if isinstance(atlas_set, AtlasSet) else AtlasSet(atlas_set)
    aset.require_alignment()
    codes = [0, *sorted(aset.labels)]
    registry.check_names([fusion], {fusion: fusion_options or {}})
    registry.check_model(fusion, fusion_model)  # before the alignment's seconds are spent
    candidates = atlas_ids_of(aset, modality)
    reg_net, simnet = load_models(reg_model, fusion_model if fusion == SIMNET else None, aset)
    seconds = {"load": time.perf_counter() - start}

    bar = tqdm(total=4, desc="align", unit="step", disable=not progress)
    with tempfile.TemporaryDirectory(prefix="cmmas-segment-") as tmp:
        t0 = time.perf_counter()
        transforms, working, found = align_target(target, aset, Path(transform_dir or tmp), prealign, alignment,
                                                  starts)
        seconds["align"] = time.perf_counter() - t0
        if found is not None and found.flagged:
            log.warning("%s: the alignment to the atlas set is uncertain (%s); check the segmentation",
                        target.path or "target", target_alignment.describe(found))
        bar.set_description("register")
        bar.update()

        t0 = time.perf_counter()
        images, labels = aset.arrays(candidates)
        chosen = select_atlases(images, working.array, candidates, atlases)
        keep = [candidates.index(i) for i in chosen]
        images, labels = images[keep], labels[keep]
        if atlas_affine:
            corrected = per_atlas.correct_atlases(images, labels, working, aset.geometry)
            images, labels = corrected.images, corrected.labels
        aligned_images, aligned_labels = images, labels
        images, labels, fields = register_atlases(reg_net, images, labels, working.array, codes, batch_size)
        seconds["register"] = time.perf_counter() - t0
        refined = None
        if refinement is not None and refinement.steps > 0:
            t0 = time.perf_counter()
            images, labels, refined = refine_atlases(working.array, aligned_images, aligned_labels, fields, codes,
                                                     refinement)
            seconds["refine"] = time.perf_counter() - t0
        bar.set_description("fuse")
        bar.update()

        t0 = time.perf_counter()
        fused = registry.fuse_named(fusion, working.array, images, labels, codes, simnet=simnet,
                                    batch_size=batch_size, options=fusion_options)
        seconds["fuse"] = time.perf_counter() - t0
        bar.set_description("map back")
        bar.update()

        t0 = time.perf_counter()
        label, probabilities, agreement = mapping.map_back(fused, working, transforms, target, maps)
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
        target=target,
        codes=codes,
        names=dict(aset.labels),
        alignment=None if found is None else found.qc(),
        refinement=None if refined is None else {"mind_distance": list(refined.distance),
                                                 "folding_percent": list(refined.folding_percent)},
    )


def write_label(label: Image, path: str | os.PathLike, codes: Sequence[int]) -> Path:
    """Write a label map atomically as the smallest integer type holding ``codes``
    (:func:`cmmas.io.label_dtype`; a map already of that type is not copied): how every label
    map of the pipeline is written."""
    return write_image(label.with_array(label.array.astype(label_dtype(codes), copy=False)), path)


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
    """Where :func:`write_segmentation` puts each file, in the order it writes them: "label",
    "prob_<code>", "agreement", "volumes", "itksnap", "slicer", "preview", "qc". The probability
    and agreement maps take the label map's format (its ending of :data:`cmmas.io.IMAGE_SUFFIXES`:
    ``.nii.gz``, or the uncompressed ``.nii`` / ``.mha``; ``.nii.gz`` when it has none of them)."""
    out = Path(out)
    ending = next((e for e in sorted(IMAGE_SUFFIXES, key=len, reverse=True) if out.name.endswith(e)), None)
    stem = out.name[: -len(ending)] if ending else out.stem
    ending = ending or ".nii.gz"
    paths = {"label": out}
    paths.update({f"prob_{int(c)}": out.with_name(f"{stem}_prob_{int(c)}{ending}") for c in codes})
    paths["agreement"] = out.with_name(f"{stem}_agreement{ending}")
    paths["volumes"] = out.with_name(f"{stem}_volumes.csv")
    paths["itksnap"] = out.with_name(f"{stem}_labels.itksnap.txt")
    paths["slicer"] = out.with_name(f"{stem}_labels.ctbl")
    paths["preview"] = out.with_name(f"{stem}_preview.png")
    paths["qc"] = out.with_name(f"{stem}_qc.json")
    return paths


def write_segmentation(result: Segmentation, out: str | os.PathLike, extras: bool = True,
                       preview: bool = False) -> list[Path]:
    """Write the label map to ``out`` (as :func:`cmmas.io.label_dtype` of its codes) and beside it,
    each atomically (:func:`output_paths`; the image format follows ``out``'s ending):

    - with ``extras``, ``<stem>_prob_<code>.nii.gz`` and ``<stem>_agreement.nii.gz`` (on the
      target's grid; uint8, value / 255 = the fraction: :data:`cmmas.io.PROBABILITY_SCALE`);
    - ``<stem>_volumes.csv``, each structure's voxels, millilitres and mean agreement (empty when
      the segmentation has no agreement map), ``<stem>_labels.itksnap.txt`` and
      ``<stem>_labels.ctbl``, the label names and colours for ITK-SNAP and 3D Slicer
      (:mod:`cmmas.outputs`);
    - with ``preview``, ``<stem>_preview.png``: three slices of the scan with the labels filled;
    - ``<stem>_qc.json``, the QC record (:meth:`Segmentation.qc`).

    Returns:
        The paths written, the label map first, the QC record last.

    Raises:
        CmmasError: ``extras`` asked of a segmentation made without its maps (``maps=False``).
    """
    if extras and (result.probabilities is None or result.agreement is None):
        raise CmmasError(out, "this segmentation has no probability or agreement maps (segment(maps=False)); "
                              "write it with extras=False")
    paths = output_paths(out, result.codes)
    written = [write_label(result.label, paths["label"], result.codes)]
    if extras:
        for code, prob in result.probabilities.items():
            written.append(write_image(prob, paths[f"prob_{code}"]))
        written.append(write_image(result.agreement, paths["agreement"]))
    rows = outputs.label_volumes(result.label, result.names, result.agreement)
    written.append(outputs.write_volumes_csv(rows, paths["volumes"]))
    written.append(outputs.write_itksnap_labels(result.names, paths["itksnap"]))
    written.append(outputs.write_slicer_color_table(result.names, paths["slicer"]))
    if preview:
        written.append(outputs.write_preview(result.target, result.label, result.names, paths["preview"]))
    written.append(atomic_write_text(paths["qc"], json.dumps(result.qc(), indent=1) + "\n"))
    return written
