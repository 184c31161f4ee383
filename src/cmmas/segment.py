"""The engine: a :class:`Segmenter` turns a scan into a label map on the scan's own grid.

Like nnU-Net's predictor, a :class:`Segmenter` is built once from an atlas set, the trained
networks and a frozen :class:`SegmentConfig` (every choice of a segmentation, one set of
defaults), then segments one scan or many. ``cmmas segment``, the evaluations
(:mod:`cmmas.evaluate.runs`, :mod:`cmmas.evaluate.oracle`) and the benchmarks all call it, so
that what is scored and timed is what ``cmmas segment`` writes. The steps, in this module only:

1. **place** the scan on the working grid: its affine alignment to the set's reference (ANTs,
   MI, several starts, with a QC record: :mod:`cmmas.align.target`; or a given alignment), then
   :func:`cmmas.align.mapping.to_working`; in an oracle set (the paper's setting) a case's own
   crop stored in the set;
2. **choose** the K atlases most similar to it (:func:`select_atlases`) and, optionally, give
   each its own affine stage onto it (:mod:`cmmas.align.per_atlas`);
3. **register** them with BiRegNet (:mod:`cmmas.register.apply`) and, optionally, **refine**
   every field on the scan (:mod:`cmmas.register.refine`);
4. **fuse** the warped labels (:func:`cmmas.fuse.registry.fuse_named`);
5. **map back** onto the scan's grid, by the kind of atlas set: through the inverse alignment
   (:func:`cmmas.align.mapping.map_back`), or the oracle crop's exact inverse
   (:func:`cmmas.datasets.oracle_roi.label_to_original`).

Steps 1-3 give a :class:`Warped` (:meth:`Segmenter.warp`), steps 4-5 a :class:`Segmentation`
(:meth:`Segmenter.fuse`), so that an evaluation fuses the same warped atlases by several fusions.
Writing the files is :mod:`cmmas.outputs`' job, reading a bundle :mod:`cmmas.bundle`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cmmas.align import finder, mapping, organs, per_atlas
from cmmas.align.finder import FoundOrgans
from cmmas.align import target as target_alignment
from cmmas.align.atlas_set import AtlasSet
from cmmas.datasets import oracle_roi
from cmmas.errors import AtlasSetError, CmmasError
from cmmas.fuse import registry
from cmmas.fuse.vote import FusionResult
from cmmas.fuse.weights import global_similarity
from cmmas.io import Image, read_image
from cmmas.models import check_atlas_count, learned_models, load_finder, load_models
from cmmas.provenance import provenance

log = logging.getLogger(__name__)

#: The fusion of ``cmmas segment`` and of :class:`SegmentConfig` when none is chosen (a bundle
#: records its own): the fusion measured best on the dev folds of both directions among those
#: that need no network of their own (docs/results.md).
DEFAULT_FUSION = "jlf_tf"
#: The alignment's start sets by name (:class:`SegmentConfig`'s ``starts``).
STARTS = {"robust": target_alignment.ROBUST, "single": target_alignment.SINGLE}


@dataclasses.dataclass(frozen=True)
class SegmentConfig:
    """Every choice of a segmentation, with the one set of defaults (``cmmas segment``'s).

    Attributes:
        fusion: the fusion (:func:`cmmas.fuse.registry.names`): the learned simnet, dlf, unet
            (each needs its network) or mv, staple, global, lwv, lwv_ncc, jlf, jlf_r2, jlf_tf,
            lwv_mind, jlf_mind; default :data:`DEFAULT_FUSION`.
        fusion_options: options of each fusion by name, merged over its preset's
            (e.g. ``{"jlf": {"rad": 2}}``).
        atlases: use the K atlases most similar to the placed scan (None: all).
        modality: the atlases' modality (None: the reference's; :func:`atlas_ids_of`).
        prealign: align the scan to the reference; False: it already lies in the reference space.
        starts: the alignment's starts, a key of :data:`STARTS` ("robust": five along the
            cranio-caudal axis; "single": the centre-of-mass translation only).
        organ_alignment: with an organ finder and robust starts, the found organs are also
            registered onto the atlases' organs, and that result or the one by mutual information,
            whichever overlaps the atlases' organs more, is kept
            (:func:`cmmas.align.target.align_to_reference`'s guide; False: by mutual information).
            ``cmmas segment`` and ``segment-batch`` turn it on wherever they have a finder
            (docs/results.md: it measured better end to end in both directions).
        organ_registration: with ``organ_alignment``, the registration of the found organs alone,
            no alignment by mutual information (:attr:`cmmas.align.target.Starts.organ_registration`).
        align_seed: the alignment's ANTs sampling seed (with one ITK thread, the same seed gives
            the same alignment; another seed samples another, equally valid one).
        atlas_affine: give each chosen atlas its own affine stage onto the scan on the working
            grid before the network (:mod:`cmmas.align.per_atlas`).
        refine_steps: Adam steps refining every field on the scan with MIND-SSC (0: off).
        refine_scale: the refinement's grid / the working grid, voxels per axis.
        refine_smoothness: weight of the refinement's diffusion penalty.
        maps: also map the probability and agreement maps back (False: the label only).
        batch_size: atlases per network batch (a shorter last batch runs padded).
    """

    fusion: str = DEFAULT_FUSION
    fusion_options: Mapping[str, Mapping] = dataclasses.field(default_factory=dict)
    atlases: int | None = None
    modality: str | None = None
    prealign: bool = True
    starts: str = "robust"
    organ_alignment: bool = False
    organ_registration: bool = False
    align_seed: int = 0
    atlas_affine: bool = False
    refine_steps: int = 0
    refine_scale: float = 0.5
    refine_smoothness: float = 0.1
    maps: bool = True
    batch_size: int = 2

    def __post_init__(self) -> None:
        if self.atlases is not None and int(self.atlases) < 1:
            raise CmmasError(None, f"the number of atlases must be at least 1, got {self.atlases}")
        if int(self.align_seed) < 0:
            raise CmmasError(None, f"the alignment seed must be at least 0, got {self.align_seed}")
        if int(self.batch_size) < 1:
            raise CmmasError(None, f"the batch size must be at least 1, got {self.batch_size}")
        if int(self.refine_steps) < 0 or not self.refine_scale > 0 or self.refine_smoothness < 0:
            raise CmmasError(None, "refinement needs steps >= 0, scale > 0 and smoothness >= 0, got "
                                   f"{self.refine_steps}, {self.refine_scale}, {self.refine_smoothness}")
        if self.organ_registration and not self.organ_alignment:
            raise CmmasError(None, "aligning by the organs alone needs the alignment by organs (an organ finder, "
                                   "and not --no-organ-alignment or --single-start)")
        if self.starts not in STARTS:
            raise CmmasError(None, f"unknown alignment starts {self.starts!r}; expected one of {sorted(STARTS)}")
        registry.check_names([self.fusion], {self.fusion: dict(self.fusion_options.get(self.fusion, {}))})

    def to_dict(self) -> dict:
        """The config as plain JSON-serialisable values (what the QC record and reports keep)."""
        values = dataclasses.asdict(self)
        values["fusion_options"] = {k: dict(v) for k, v in self.fusion_options.items()}
        return values

    @classmethod
    def from_dict(cls, values: Mapping) -> SegmentConfig:
        """The config of :meth:`to_dict`'s values (unknown keys refused)."""
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise CmmasError(None, f"unknown segmentation settings {unknown}")
        return cls(**values)

    def options(self, fusion: str) -> dict:
        """The options of ``fusion`` (empty when none are set)."""
        return dict(self.fusion_options.get(fusion, {}))


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
    """The ``k`` atlases most similar to the placed target, most similar first.

    Similarity is the global mutual information (:func:`cmmas.fuse.weights.global_similarity`) of
    each atlas image ``[N, D, H, W]`` with the target ``[D, H, W]`` on the working grid. With
    ``k`` None (or at least N: said in the log) every atlas is kept, in the given order.
    """
    ids = list(ids)
    if k is not None and int(k) < 1:
        raise CmmasError(None, f"the number of atlases must be at least 1, got {k}")
    if k is not None and k > len(ids):
        log.warning("%d atlases asked for, the atlas set has %d: using all of them", k, len(ids))
    if k is None or k >= len(ids):
        return ids
    scores = global_similarity(target, atlas_images, similarity="mi")
    order = np.argsort(-scores, kind="stable")
    return [ids[i] for i in order[: int(k)]]


@dataclasses.dataclass(frozen=True)
class Placement:
    """A scan placed on the working grid (step 1).

    Attributes:
        target: the scan on its own grid (the grid every output lies on).
        working: the scan on the working grid, normalised to [0, 1] (an oracle set: z-scored).
        transforms: the scan -> reference alignment files (empty: none); they must exist until
            the last :meth:`Segmenter.on_scan` of this placement.
        alignment: the alignment's QC record (:meth:`cmmas.align.target.TargetAlignment.qc`),
            None when no alignment ran here.
        oracle: the working image is an oracle set's crop (mapped back by its exact inverse).
        organs: the organ finder's labels of the scan (:class:`cmmas.align.finder.FoundOrgans`),
            None without a finder.
    """

    target: Image
    working: Image
    transforms: tuple[str, ...]
    alignment: dict | None
    oracle: bool = False
    organs: FoundOrgans | None = None


@dataclasses.dataclass(frozen=True)
class Warped:
    """The chosen atlases on the placed scan (steps 1-3).

    Attributes:
        placement: where the scan lies (:class:`Placement`).
        atlas_ids: the atlases, most similar first when ``atlases=K`` chose them.
        aligned_images, aligned_labels: ``[N, D, H, W]`` the atlases before the network (after
            the per-atlas affine stage when it ran).
        images, labels: ``[N, D, H, W]`` the atlases as fused (warped, refined).
        fields: ``[N, D, H, W, 3]`` displacement fields in working-grid voxels (``ij`` order)
            that took the aligned atlases to the fused ones; None without a network.
        refinement: MIND distance and folding % before and after the refinement, None when off.
        seconds: wall time, seconds, of "read" (the scan, when given as a file), "align",
            "choose" (choosing the atlases and their per-atlas affine stage), "register" (the
            network) and, when it ran, "refine".
    """

    placement: Placement
    atlas_ids: list[str]
    aligned_images: np.ndarray
    aligned_labels: np.ndarray
    images: np.ndarray
    labels: np.ndarray
    fields: np.ndarray | None
    refinement: dict | None
    seconds: dict[str, float]


@dataclasses.dataclass(frozen=True)
class Segmentation:
    """One fusion of a :class:`Warped`, on the scan's grid.

    Attributes:
        label: fused label map (data-set codes, :func:`cmmas.io.label_dtype`) on the target's grid.
        probabilities: code -> probability map on the target's grid, uint8: value /
            :data:`cmmas.io.PROBABILITY_SCALE` (255) is the probability (background included,
            summing to ~1 over codes); outside the working grid the background has probability 1.
            None without maps (``SegmentConfig.maps`` False, or an oracle set).
        agreement: fraction of atlases whose label equals the fused label (1 = unanimous), on
            the target's grid, uint8 scaled as the probabilities; None as ``probabilities``.
        fusion: the fusion's name.
        fused: the fusion on the working grid (:class:`cmmas.fuse.vote.FusionResult`).
        warped: what was fused (:class:`Warped`).
        seconds: wall time of each step, seconds: those of :class:`Warped` and "fuse",
            "map_back"; "total" from reading the scan to this fusion's map-back (for several
            fusions of one warp, to the last one's); "load", the engine's one-off set-up (reading
            the atlas set and the models), is in the results of a Segmenter's first scan only
            (0 after) and not part of "total".
        codes: the atlas set's label codes, the background 0 first.
        names: the atlas set's label table, code -> structure name (0 excluded).
        config: the engine's config (its ``fusion`` may differ from ``fusion`` in an evaluation).
        models: "reg_model" and "<fusion>_model" of each learned fusion given ("simnet_model",
            "dlf_model", ...) -> the file used (None: an in-memory model).
        provenance: the engine's :func:`cmmas.provenance.provenance` record (code commit, config,
            model hashes, atlas set and atlases).
    """

    label: Image
    probabilities: dict[int, Image] | None
    agreement: Image | None
    fusion: str
    fused: FusionResult
    warped: Warped
    seconds: dict[str, float]
    codes: list[int]
    names: dict[int, str]
    config: SegmentConfig
    models: dict[str, str | None]
    provenance: dict

    @property
    def target(self) -> Image:
        """The scan as given, on its own grid (the grid of ``label``)."""
        return self.warped.placement.target

    @property
    def target_working(self) -> Image:
        """The placed scan on the working grid."""
        return self.warped.placement.working

    @property
    def working(self) -> Image:
        """The fused label on the working grid (int32 codes)."""
        return self.target_working.with_array(np.asarray(self.fused.label).astype(np.int32))

    @property
    def atlas_ids(self) -> list[str]:
        """The atlases used."""
        return self.warped.atlas_ids

    @property
    def alignment(self) -> dict | None:
        """The alignment's QC record, None when no alignment ran."""
        return self.warped.placement.alignment

    @property
    def alignment_flagged(self) -> bool:
        """The alignment's QC flagged it: the atlases may have been placed wrongly."""
        return bool(self.alignment and self.alignment["flagged"])

    @property
    def doubtful(self) -> list[str]:
        """The structures (by name) the organ finder disagrees with: its Dice with this
        segmentation below :data:`cmmas.align.finder.DOUBTFUL_BELOW` (empty without a finder)."""
        return finder.doubtful(self.organ_agreement or {})

    @property
    def flagged(self) -> bool:
        """The QC flagged it: the alignment (:attr:`alignment_flagged`) or a doubtful structure."""
        return self.alignment_flagged or bool(self.doubtful)

    @functools.cached_property
    def organ_agreement(self) -> dict[str, float | None] | None:
        """Per structure (by name), the Dice between the organ finder's label of the scan and this
        segmentation (:func:`cmmas.align.finder.organ_agreement`); None without a finder."""
        found = self.warped.placement.organs
        if found is None:
            return None
        return {self.names[code]: value for code, value in finder.organ_agreement(found, self.label).items()}

    def qc(self) -> dict:
        """The QC record written beside the label map (``<stem>_qc.json``): the alignment's
        record, the organ finder's agreement per structure (with a finder) and the structures it
        doubts (:attr:`doubtful`; a doubtful one flags the segmentation), the atlases, the
        refinement, the models and the config used, any warning about the scan's header, the
        seconds of each step and the provenance (code commit, model hashes)."""
        return {"flagged": self.flagged, "alignment": self.alignment, "organs": self.organ_agreement,
                "doubtful": self.doubtful,
                "atlas_ids": list(self.atlas_ids),
                "registration": self.warped.fields is not None, "refinement": self.warped.refinement,
                "fusion": self.fusion, "models": dict(self.models), "config": self.config.to_dict(),
                "target": self.target.path, "target_warnings": list(self.target.warnings),
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}, "provenance": self.provenance}


class Segmenter:
    """An atlas set, its networks and a :class:`SegmentConfig`, loaded once; segments scans.

    Args:
        atlas_set: a prepared atlas set (object or folder).
        reg_model: a BiRegNet (keras model or ``.keras`` path) of the working grid; None fuses the
            atlases as affinely aligned (``cmmas segment --no-registration``).
        fusion_model: the learned fusions' networks (:func:`cmmas.models.learned_models`: one network or
            ``.keras`` path, whose kind says its fusion, or a mapping fusion name -> network or
            path), each needed when its fusion is used.
        config: the choices (:class:`SegmentConfig`; default: ``cmmas segment``'s defaults).
        atlas_ids: the atlases to choose from (default :func:`atlas_ids_of` of ``config.modality``;
            an oracle set has no default: it segments its own cases, given by ``case_id``).
        progress: show a progress bar over the steps of each scan.
        finder_model: an organ finder (``.keras`` path with its model card, or a network): each
            scan's organs found on their own give the QC record its agreement per structure
            (:attr:`Segmentation.organ_agreement`); None: no finder.

    Raises:
        AtlasSetError: bad atlas set or no atlas; ModelError: a missing or unfit model, or
        a learned fusion without one; CmmasError: a bad config.
    """

    def __init__(self, atlas_set: AtlasSet | str | os.PathLike, reg_model=None, fusion_model=None,
                 config: SegmentConfig | None = None, *, atlas_ids: Sequence[str] | None = None,
                 progress: bool = False, finder_model=None) -> None:
        start = time.perf_counter()
        self.config = config or SegmentConfig()
        self.aset = atlas_set if isinstance(atlas_set, AtlasSet) else AtlasSet(atlas_set)
        self.codes = [0, *sorted(self.aset.labels)]
        fusion_models = learned_models(fusion_model)
        registry.check_model(self.config.fusion, fusion_models)  # before the alignment's seconds are spent
        if atlas_ids is None:
            self.aset.require_alignment()  # an oracle set segments its own cases only (the evaluation's)
        self.atlas_ids = list(atlas_ids) if atlas_ids is not None else atlas_ids_of(self.aset, self.config.modality)
        if not self.atlas_ids:
            raise AtlasSetError(self.aset.root, "no atlas to segment with")
        if "dlf" in fusion_models:
            check_atlas_count(fusion_models["dlf"], min(self.config.atlases or len(self.atlas_ids), len(self.atlas_ids)))
        self.models = {"reg_model": str(reg_model) if isinstance(reg_model, (str, os.PathLike)) else None,
                       **{f"{name}_model": str(m) if isinstance(m, (str, os.PathLike)) else None
                          for name, m in fusion_models.items()}}
        self.reg_net, self.fusion_nets = load_models(reg_model, fusion_models, self.aset)
        self.finder_net, self.finder_spacing = load_finder(finder_model, self.aset)
        if finder_model is not None:
            self.models["finder_model"] = str(finder_model) if isinstance(finder_model, (str, os.PathLike)) else None
        if self.config.organ_alignment and self.finder_net is None:
            raise CmmasError(None, "the alignment by organs needs an organ finder (--finder-model, or a bundle's)")
        self.provenance = {**provenance(self.config.to_dict(), self.models, self.aset.root), "atlases": self.atlas_ids}
        self.progress = progress
        self._images, self._labels = self.aset.arrays(self.atlas_ids)
        self._reference_organs = (organs.reference_organs(self._labels, self.aset.geometry, self.codes)
                                  if self.config.organ_alignment else None)
        self._starts = dataclasses.replace(STARTS[self.config.starts],
                                           organ_registration=self.config.organ_registration)
        self.load_seconds = time.perf_counter() - start

    def warm_up(self, fusions: Sequence[str] | None = None) -> None:
        """Untimed passes, so that one-off set-up (graph tracing, libraries loading on first use) is
        not timed with the first scan.

        The network runs once at the one batch shape segmenting runs (``min(batch_size, N)``
        atlases), each learned fusion of ``fusions`` (default: the config's) once on as many
        atlases as a scan is fused with (DLF's graph is traced per atlas count), and every other
        fusion once on the central 16^3 voxels of two atlases (the first one standing in as target).
        """
        size = min(self.config.batch_size, len(self.atlas_ids))
        count = min(self.config.atlases or len(self.atlas_ids), len(self.atlas_ids))
        images, labels = self._images[: max(size, 2, count)], self._labels[: max(size, 2, count)]
        target = images[0]
        self._register(images[:size], labels[:size], target)
        centre = tuple(slice(max(s // 2 - 8, 0), s // 2 + 8) for s in target.shape)
        few = (slice(0, 2), *centre)
        for name in fusions or [self.config.fusion]:
            if name in registry.LEARNED:
                if name in self.fusion_nets:
                    registry.fuse_named(name, target, images[:count], labels[:count], self.codes,
                                        models=self.fusion_nets, batch_size=size)
                continue
            registry.fuse_named(name, target[centre], images[few], labels[few], self.codes,
                                options=self.config.options(name))

    def place(self, target: Image, transform_dir: str | os.PathLike, *, alignment: Sequence[str] | None = None,
              case_id: str | None = None) -> Placement:
        """Step 1: the scan on the working grid.

        Args:
            target: the scan on its own grid.
            transform_dir: where a new alignment's transform is written.
            alignment: transform files of an alignment made before (e.g. the atlas set's stored
                ``transforms/<id>``), used instead of aligning.
            case_id: in an oracle set, the case whose stored crop is the working image.
        """
        if self.aset.manifest.oracle:
            if case_id is None:
                self.aset.require_alignment()  # the one refusal: an oracle set segments its own cases only
            return Placement(target, self.aset.image(case_id), (), None, oracle=True)
        found = None
        spacing = self.aset.manifest.align_spacing_mm
        seen = None
        if self.finder_net is not None and alignment is None and self.config.prealign:
            seen = target_alignment.alignment_image(target, spacing)  # read by the alignment (and the finder)
        found_organs = None if self.finder_net is None else finder.find_organs(self.finder_net, target,
                                                                                self.finder_spacing, self.codes, seen)
        if alignment is not None:
            transforms = [str(a) for a in alignment]
        elif self.config.prealign:
            guide = None if self._reference_organs is None else organs.OrganGuide.of(
                found_organs.probabilities, found_organs.geometry, self._reference_organs, self.codes)
            found = target_alignment.align_to_reference(target, self.aset.reference_image(), transform_dir, spacing,
                                                        starts=self._starts, guide=guide, seen=seen,
                                                        seed=self.config.align_seed)
            transforms = list(found.transforms)
            if found.flagged:
                log.warning("%s: the alignment to the atlas set is uncertain (%s); check the segmentation",
                            target.path or "target", target_alignment.describe(found))
        else:
            transforms = []
        working = mapping.to_working(target, transforms, self.aset.geometry)
        return Placement(target, working, tuple(transforms), None if found is None else found.qc(),
                         organs=found_organs)

    def _register(self, images: np.ndarray, labels: np.ndarray, target: np.ndarray):
        if self.reg_net is None:
            return images, labels, None
        from cmmas.register import apply  # TensorFlow: imported only when a network runs

        return apply.warp_atlases(self.reg_net, images, labels, target, self.codes,
                                  batch_size=self.config.batch_size)

    def warp(self, target: Image | str | os.PathLike, transform_dir: str | os.PathLike, *,
             alignment: Sequence[str] | None = None, case_id: str | None = None,
             exclude: Sequence[str] = ()) -> Warped:
        """Steps 1-3: place the scan, choose the atlases (none of ``exclude``), register and
        refine them (see :meth:`place` for the arguments)."""
        t0 = time.perf_counter()
        target = target if isinstance(target, Image) else read_image(target, dtype=None)
        seconds = {"read": time.perf_counter() - t0}
        t0 = time.perf_counter()
        placement = self.place(target, transform_dir, alignment=alignment, case_id=case_id)
        seconds["align"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        excluded = set(exclude)
        keep = [k for k, a in enumerate(self.atlas_ids) if a not in excluded]
        if not keep:
            raise AtlasSetError(self.aset.root, f"no atlas left for target {case_id or target.path!r}")
        candidates = [self.atlas_ids[k] for k in keep]
        pool = self._images if len(keep) == len(self.atlas_ids) else self._images[keep]
        chosen = select_atlases(pool, placement.working.array, candidates, self.config.atlases)
        index = [keep[candidates.index(i)] for i in chosen]
        if index == list(range(len(self.atlas_ids))):
            images, labels = self._images, self._labels
        else:
            images, labels = self._images[index], self._labels[index]
        if self.config.atlas_affine:
            corrected = per_atlas.correct_atlases(images, labels, placement.working, self.aset.geometry)
            images, labels = corrected.images, corrected.labels
        seconds["choose"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        warped_images, warped_labels, fields = self._register(images, labels, placement.working.array)
        seconds["register"] = time.perf_counter() - t0
        refined = None
        if self.config.refine_steps > 0:
            t0 = time.perf_counter()
            warped_images, warped_labels, refined = self._refine(placement.working.array, images, labels, fields)
            fields = refined.fields
            seconds["refine"] = time.perf_counter() - t0
        return Warped(placement, chosen, images, labels, warped_images, warped_labels, fields,
                      None if refined is None else {"mind_distance": list(refined.distance),
                                                    "folding_percent": list(refined.folding_percent)},
                      seconds)

    def _refine(self, target: np.ndarray, images: np.ndarray, labels: np.ndarray, fields: np.ndarray | None):
        from cmmas.register import apply, refine  # TensorFlow: imported only when refinement runs

        settings = refine.Refinement(steps=self.config.refine_steps, scale=self.config.refine_scale,
                                     smoothness=self.config.refine_smoothness)
        refined = refine.refine_fields(target, images, fields, settings)
        warped_images, warped_labels = apply.warp_by_fields(images, labels, refined.fields, self.codes)
        return warped_images, warped_labels, refined

    def on_scan(self, placement: Placement, fused: mapping.WorkingMaps, maps: bool = False
                ) -> tuple[Image, dict[int, Image] | None, Image | None]:
        """Step 5: working-grid scores (a fusion's result, or any :class:`cmmas.align.mapping.WorkingMaps`)
        on the scan's grid: ``(label, probabilities, agreement)``, the maps None unless ``maps``
        (never for an oracle set, whose crop maps back by its exact inverse, nearest neighbour)."""
        if placement.oracle:
            crop = placement.working.with_array(mapping.working_label(fused).astype(np.int32))
            return oracle_roi.label_to_original(crop, placement.target.geometry), None, None
        return mapping.map_back(fused, placement.working, placement.transforms, placement.target, maps)

    def fuse(self, warped: Warped, fusion: str | None = None) -> Segmentation:
        """Steps 4-5: fuse ``warped`` by ``fusion`` (default: the config's) and map it onto the scan."""
        fusion = fusion or self.config.fusion
        registry.check_names([fusion], {fusion: self.config.options(fusion)})
        seconds = dict(warped.seconds)
        t0 = time.perf_counter()
        fused = registry.fuse_named(fusion, warped.placement.working.array, warped.images, warped.labels, self.codes,
                                    models=self.fusion_nets, batch_size=self.config.batch_size,
                                    options=self.config.options(fusion))
        seconds["fuse"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        label, probabilities, agreement = self.on_scan(warped.placement, fused, self.config.maps)
        seconds["map_back"] = time.perf_counter() - t0
        return Segmentation(label, probabilities, agreement, fusion, fused, warped, seconds, list(self.codes),
                            dict(self.aset.labels), self.config, dict(self.models), self.provenance)

    @contextlib.contextmanager
    def _transform_dir(self, transform_dir: str | os.PathLike | None) -> Iterator[Path]:
        if transform_dir is not None:
            yield Path(transform_dir)
            return
        with tempfile.TemporaryDirectory(prefix="cmmas-segment-") as tmp:
            yield Path(tmp)

    def segment_all(self, target: Image | str | os.PathLike, fusions: Sequence[str], *,
                    alignment: Sequence[str] | None = None, transform_dir: str | os.PathLike | None = None,
                    case_id: str | None = None, exclude: Sequence[str] = ()) -> dict[str, Segmentation]:
        """The scan segmented by each fusion of ``fusions`` from one :meth:`warp`: fusion ->
        :class:`Segmentation` (each what :meth:`segment` with that fusion gives).

        Args:
            target: the scan (an :class:`Image`, or a NIfTI/MHA/NRRD file or DICOM folder).
            fusions: fusion names (:func:`cmmas.fuse.registry.names`).
            alignment: the scan -> reference transform files of an earlier alignment.
            transform_dir: where to keep a new alignment's transform (temporary if None).
            case_id: in an oracle set, the case the scan is.
            exclude: atlas ids not to use (e.g. the target itself).
        """
        registry.check_names(fusions, {f: self.config.options(f) for f in fusions})
        start = time.perf_counter()
        bar = tqdm(total=2 + len(fusions), desc="align + register", unit="step", disable=not self.progress)
        with self._transform_dir(transform_dir) as where:
            warped = self.warp(target, where, alignment=alignment, case_id=case_id, exclude=exclude)
            bar.update(2)
            results = {}
            for fusion in fusions:
                bar.set_description(f"fuse {fusion}")
                results[fusion] = self.fuse(warped, fusion)
                bar.update()
        bar.close()
        total = time.perf_counter() - start
        for result in results.values():
            result.seconds.update({"load": self.load_seconds, "total": total})
        self.load_seconds = 0.0
        return results

    def segment(self, target: Image | str | os.PathLike, **where) -> Segmentation:
        """The scan segmented by the config's fusion (:meth:`segment_all`'s keyword arguments)."""
        return self.segment_all(target, [self.config.fusion], **where)[self.config.fusion]


def segment(target: Image | str | os.PathLike, atlas_set: AtlasSet | str | os.PathLike, reg_model=None,
            fusion_model=None, config: SegmentConfig | None = None, *, alignment: Sequence[str] | None = None,
            transform_dir: str | os.PathLike | None = None, progress: bool = True, **settings) -> Segmentation:
    """Segment one scan: a :class:`Segmenter` built for it (``settings`` are :class:`SegmentConfig`
    fields overriding ``config``'s, e.g. ``fusion="mv", atlases=3``; ``fusion_model`` is loaded only
    for a learned fusion).

    Raises:
        ImageReadError: unreadable target; AtlasSetError: bad atlas set, or no atlas in it;
        ModelError: missing/unloadable/unfit model; CmmasError: unknown fusion or setting.
    """
    config = config or SegmentConfig()
    if settings:
        config = SegmentConfig.from_dict({**config.to_dict(), **settings})
    segmenter = Segmenter(atlas_set, reg_model, fusion_model if config.fusion in registry.LEARNED else None, config,
                          progress=progress)
    return segmenter.segment(target, alignment=alignment, transform_dir=transform_dir)
