"""Evaluating an atlas set's held-out targets through the engine, and aggregating the reports of
a whole run.

:func:`evaluate_atlas_set` takes each labelled held-out ("test") case of a prepared atlas set as
a target, with the set's labelled training cases of the atlas modality as atlases, and segments
it with a :class:`cmmas.segment.Segmenter` (the alignment stored when the set was prepared, the
engine's settings: ``--atlases K``, ``--atlas-affine``, ``--refine-steps`` ...) by each fusion of
the evaluation: the label it scores for a fusion is the label ``cmmas segment --fusion <name>
--transform <the stored alignment>`` with the same settings writes. Scores are computed on the
target's original grid against its original label file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from cmmas.align import mapping
from cmmas.align.atlas_set import AtlasSet
from cmmas.datasets.base import Case, natural_key
from cmmas.datasets.loading import load_case
from cmmas.datasets.mmwhs import MMWHS_ALIASES
from cmmas.datasets.splits import simnet_holdout
from cmmas.errors import AtlasSetError, CmmasError
from cmmas.evaluate.plots import OverlaySource, write_figures
from cmmas.evaluate.report import (
    JACOBIAN_COLUMNS,
    EvaluationReport,
    extended_report,
    read_jacobian,
    read_results,
    read_timings,
    summarize_jacobian,
    to_csv,
    write_report,
)
from cmmas.evaluate.scoring import score, stream_bound_rows
from cmmas.fuse import registry
from cmmas.io import Image, atomic_write_text, read_label
from cmmas.outputs import write_label
from cmmas.models import learned_models
from cmmas.segment import SegmentConfig, Segmentation, Segmenter, Warped
from cmmas.metrics import jacobian_stats

logger = logging.getLogger(__name__)

#: Method name of the majority vote of the affinely pre-aligned atlases (no deep registration).
AFFINE_MV = "affine+mv"
#: Name of the BiRegNet registration in ``timings.csv``.
BIREGNET = "biregnet"
#: The learned fusions whose results rank the overlay cases by default, the first evaluated.
OVERLAY_PREFERENCE = ("dlf", "simnet", "unet")

#: What ``summary.json`` says about how :func:`evaluate_atlas_set` scored (its ``"notes"`` entry).
NOTES = {
    "scoring": "every prediction is the label cmmas segment writes: the fusion's probabilities mapped back onto "
    "the target's original grid through the inverse of its stored affine alignment (linear) and their arg-max "
    "there (cmmas.align.mapping.map_back), scored against the original label file",
    AFFINE_MV: "majority vote of the fused atlases before deformable registration (affinely aligned; the K chosen "
    "with --atlases K, each given its own affine stage with --atlas-affine)",
    "bounds": "single-atlas mean and oracle use the BiRegNet-warped atlases, each mapped back to the original "
    "grid the same way (its one-hot as probabilities); the oracle takes the original truth wherever a "
    "mapped-back atlas holds it, the mapped-back majority vote elsewhere; oracle10 wherever at least 10 % of "
    "them (at least one) hold it",
    "timings": "registration: BiRegNet seconds per atlas (batched, after one warm-up call); refinement (when it ran): "
    "seconds per target; fusion: seconds per target on the working grid; mapping back is not timed",
}


def direction_name(atlas_modality: str, target_modality: str) -> str:
    """The ``direction`` column of a run, e.g. ``"ct->mr"``."""
    return f"{atlas_modality}->{target_modality}"


def original_target(aset: AtlasSet, case_id: str) -> tuple[Image, Image]:
    """A case's image and label read from its original files, on its original grid.

    Label codes outside the atlas set's table become background (a set prepared with one
    ``component`` keeps only that structure, and so must the truth), except the data sets' known
    alias codes (MM-WHS 421 for 420), rewritten as when the atlas set was prepared.

    Raises:
        AtlasSetError: no original label, or an original file is not found.
    """
    entry = aset.case(case_id)
    if entry.source_label is None:
        raise AtlasSetError(aset.root, f"case {case_id!r} has no original label file to score against")
    for source in (entry.source_image, entry.source_label):
        if not Path(source).exists():
            raise AtlasSetError(aset.root, f"case {case_id!r}: original file {source} not found (the manifest "
                                "keeps the path prealign was given: run from the same folder)")
    aliases = tuple((a, b) for a, b in MMWHS_ALIASES if a not in aset.labels and b in aset.labels)
    case = Case(case_id, entry.modality, Path(entry.source_image), Path(entry.source_label), aliases)
    image, label = load_case(case)
    dropped = sorted(set(np.unique(label.array).tolist()) - {0} - set(aset.labels))
    if dropped:
        logger.info("%s: codes %s are not in the atlas set's label table: scored as background", label.path, dropped)
        label = label.with_array(np.where(np.isin(label.array, dropped), 0, label.array).astype(np.int32))
    return image, label


def fused_atlases(aset: AtlasSet, atlas_modality: str, target_modality: str, holdout: int = 0) -> list[str]:
    """The atlases fused at test time: the labelled training cases of ``atlas_modality``, less the
    last ``holdout`` withheld from BiRegNet for SimNet (:func:`cmmas.datasets.splits.simnet_holdout`,
    the original's 11 of 15 with ``holdout`` 4)."""
    atlases = aset.ids(atlas_modality, role="train", labelled=True)
    if not holdout:
        return atlases
    targets = aset.ids(target_modality, role="train", labelled=True)
    return list(simnet_holdout(atlases, targets, holdout).reg_atlases)


def evaluation_cases(aset: AtlasSet, atlas_modality: str, target_modality: str,
                     holdout: int = 0) -> tuple[list[str], list[str]]:
    """The labelled held-out targets (role "test") and the fused atlases (:func:`fused_atlases`).

    Raises:
        AtlasSetError: no such target, or no atlas.
    """
    targets = aset.ids(target_modality, role="test", labelled=True)
    atlases = fused_atlases(aset, atlas_modality, target_modality, holdout)
    if not targets:
        raise AtlasSetError(aset.root, f"no labelled held-out {target_modality} target (role 'test') to evaluate")
    if not atlases:
        raise AtlasSetError(aset.root, f"no labelled {atlas_modality} atlas (role 'train')")
    return targets, atlases


def make_segmenter(aset: AtlasSet, atlases: Sequence[str], reg_model, fusion_model, methods: Sequence[str],
                   config: SegmentConfig, finder_model=None) -> tuple[Segmenter, list[str]]:
    """The engine an evaluation segments with (the atlases ``atlases``, ``config``'s settings, the
    organ finder ``finder_model`` if any, the label only: no maps), warmed up on its fusions, and
    the fusions it evaluates: ``methods`` less the learned fusions, then each learned fusion
    ``fusion_model`` holds a network for (:func:`cmmas.models.learned_models`), in the order of
    :data:`cmmas.fuse.registry.LEARNED`."""
    methods = [m for m in methods if m not in registry.LEARNED]
    config = dataclasses.replace(config, fusion=methods[0] if methods else "mv", maps=False)
    segmenter = Segmenter(aset, reg_model, fusion_model, config, atlas_ids=atlases, finder_model=finder_model)
    methods = [*methods, *(name for name in registry.LEARNED if name in segmenter.fusion_nets)]
    segmenter.warm_up(methods or ["mv"])
    return segmenter, methods


def unregistered(warped: Warped) -> Warped:
    """``warped`` with the atlases as they were before the network (aligned, chosen and given
    their per-atlas affine stage): fused by the engine, the "affine+mv" / "crop+mv" baselines."""
    return dataclasses.replace(warped, images=warped.aligned_images, labels=warped.aligned_labels, fields=None,
                               refinement=None)


def record(segmenter: Segmenter, methods: Sequence[str], targets: Sequence[str], holdout: int,
           run: Mapping | None, realign: bool = False) -> dict:
    """The ``"provenance"`` entry of an evaluation's ``summary.json``: the engine's record (code
    commit, its config, model hashes, atlas set and atlases) with the evaluation's own settings,
    the scored targets and, from ``run``, the script's ``command`` and ``flags``."""
    return {**segmenter.provenance, "evaluation": {"methods": list(methods), "holdout": holdout, "realign": realign},
            "targets": list(targets), **dict(run or {})}


class _TargetResult(NamedTuple):
    rows: list[dict]
    timings: list[dict]
    jacobian: dict
    paths: dict[str, Path]
    qc: list[dict]


def qc_rows(segmented: Mapping[str, Segmentation], scores: Sequence[dict], case: dict) -> list[dict]:
    """A target's QC record per fusion, as ``cmmas segment`` writes it in ``<stem>_qc.json`` (its
    flag, the alignment's flag and organ overlap when this evaluation aligned the target; the organ
    finder's Dice with the fusion's label per structure and the doubtful ones, with a finder), beside the label's true Dice per
    structure (from the score rows ``scores``): what a QC threshold is chosen from."""
    rows = []
    for name, result in segmented.items():
        alignment = result.alignment or {}
        dice = {r["name"]: r["dice"] for r in scores if r["method"] == name}
        rows.append({**case, "method": name, "flagged": result.flagged, "alignment_flagged": result.alignment_flagged,
                     "doubtful": result.doubtful, "organ_overlap": alignment.get("organ_overlap"),
                     "agreement": result.organ_agreement, "dice": dice})
    return rows


def jacobian_row(ddfs: np.ndarray, case: dict) -> dict:
    """Folding statistics of a target's BiRegNet fields ``[N, D, H, W, 3]`` (means over the atlases)."""
    stats = [jacobian_stats(ddf) for ddf in ddfs]
    logs = np.asarray([s["std_log_jac"] for s in stats])
    return {
        **case,
        "n_atlases": len(stats),
        "folding_percent": float(np.mean([s["folding_percent"] for s in stats])),
        "std_log_jac": float(np.mean(logs[np.isfinite(logs)])) if np.isfinite(logs).any() else float("nan"),
        "min_det": float(min(s["min_det"] for s in stats)),
        "max_det": float(max(s["max_det"] for s in stats)),
    }


def evaluate_target(aset: AtlasSet, target_id: str, segmenter: Segmenter, methods: Sequence[str], direction: str,
                    bounds: bool, folder: Path, realign: bool = False) -> _TargetResult:
    """Segment one held-out target with the engine, by every fusion of ``methods`` (and
    "affine+mv"), as ``cmmas segment --fusion <name> --transform <its stored alignment>`` with the
    engine's settings writes it (``realign``: as ``cmmas segment`` without ``--transform``, the
    target aligned anew to the reference); write each label to ``folder/pred_<method>.nii.gz`` and
    score it on the target's original grid."""
    image, truth = original_target(aset, target_id)
    codes = segmenter.codes
    case = {"case": target_id, "direction": direction}
    warped = segmenter.warp(image, folder, alignment=None if realign else aset.transform(target_id),
                            exclude=[target_id])
    segmented = {name: segmenter.fuse(warped, name) for name in methods}
    placement = warped.placement

    def on_scan(maps) -> np.ndarray:
        return segmenter.on_scan(placement, maps)[0].array

    affine = segmenter.fuse(unregistered(warped), "mv")
    labels = {AFFINE_MV: (affine.label, affine.seconds["fuse"])}
    labels.update({name: (result.label, result.seconds["fuse"]) for name, result in segmented.items()})
    rows, paths = [], {}
    for name, (label, seconds) in labels.items():
        paths[name] = write_label(label, folder / f"pred_{name}.nii.gz", codes)
        rows += score(label.array, truth.array, aset.labels, truth.spacing_zyx, method=name, seconds=seconds, **case)
    if bounds:
        majority = labels["mv"][0].array if "mv" in labels else \
            on_scan(registry.fuse_all(warped.labels, codes, methods=("mv",))["mv"].result)
        each = (on_scan(mapping.one_hot_maps(a, codes)) for a in warped.labels)
        rows += stream_bound_rows(each, truth.array, aset.labels, truth.spacing_zyx, majority=majority, **case)

    per_atlas = warped.seconds["register"] / len(warped.atlas_ids)
    timings = [{**case, "step": "registration", "method": BIREGNET, "seconds": per_atlas}]
    if "refine" in warped.seconds:
        timings.append({**case, "step": "refinement", "method": "mind", "seconds": warped.seconds["refine"]})
    timings += [{**case, "step": "fusion", "method": name, "seconds": seconds} for name, (_, seconds) in labels.items()]
    jacobian = jacobian_row(warped.fields, case) if warped.fields is not None else {}
    return _TargetResult(rows, timings, jacobian, paths, qc_rows(segmented, rows, case))


def _overlay_loader(aset: AtlasSet, case_id: str, paths: Mapping[str, Path]) -> OverlaySource:
    """Reads the original image and truth of a target and its written predictions."""

    def load() -> tuple[Image, np.ndarray, dict[str, np.ndarray]]:
        image, truth = original_target(aset, case_id)
        return image, truth.array, {name: read_label(path, like=image).array for name, path in paths.items()}

    return load


def evaluate_atlas_set(
    atlas_set: AtlasSet | str | os.PathLike,
    reg_model,
    fusion_model,
    out_dir: str | os.PathLike,
    *,
    atlas_modality: str = "ct",
    target_modality: str = "mr",
    methods: Sequence[str] = ("mv", "staple", "lwv", "jlf"),
    options: Mapping[str, Mapping] | None = None,
    direction: str | None = None,
    bounds: bool = True,
    plots: bool = True,
    overlay_method: str | None = None,
    batch_size: int = 2,
    progress: bool = True,
    holdout: int = 0,
    config: SegmentConfig | None = None,
    run: Mapping | None = None,
    realign: bool = False,
    finder_model=None,
) -> EvaluationReport:
    """Segment every held-out target of a prepared atlas set and score it on its original grid.

    For each labelled "test" case of ``target_modality``, the labelled "train" cases of
    ``atlas_modality`` are the atlases (the target itself excluded), less the last ``holdout``
    when BiRegNet was trained with that SimNet hold-out (:func:`fused_atlases`). The predictions, by name:

    * ``"affine+mv"``: majority vote of the pre-aligned atlases (no deformable registration);
    * each fusion of ``methods`` (names of :func:`cmmas.fuse.registry.names`) on the atlases
      warped by BiRegNet;
    * each learned fusion (``"simnet"``, ``"dlf"``, ``"unet"``) with a network in ``fusion_model``
      (:func:`cmmas.models.learned_models`: one network or path, a list of them, or a mapping);
    * with ``bounds``, the single-atlas mean and the oracle of the warped atlases.

    Every label is mapped back as ``cmmas segment`` maps it (module docstring) and scored
    against the original label file (:func:`original_target`). With ``realign`` each target is
    aligned anew (``config``'s starts, by organs with ``config.organ_alignment``) instead of
    placed by its stored alignment; an organ finder ``finder_model`` (``.keras`` path or
    network) gives each QC record its agreement per structure.

    Writes to ``out_dir``: ``<target>/pred_<method>.nii.gz`` (original grid and header),
    ``results.csv``, ``summary.json`` (with ``"jacobian"`` and ``"notes"`` entries),
    ``timings.csv``, ``jacobian.csv`` and, with ``plots``, box plots and best/median/worst
    overlays ranked by ``overlay_method`` (default: the first of :data:`OVERLAY_PREFERENCE`
    evaluated, else the first of ``methods``).

    ``summary.json`` holds a ``"provenance"`` entry (:func:`record`) and a ``"qc"`` entry, a
    record per target and fusion (:func:`qc_rows`).

    Raises:
        AtlasSetError: no held-out target or no atlas; an original file is missing.
        ModelError: a network does not fit the atlas set.
        CmmasError: an unknown method.
    """
    aset = atlas_set if isinstance(atlas_set, AtlasSet) else AtlasSet(atlas_set)
    methods = [m for m in methods if m not in registry.LEARNED]
    registry.check_names(methods, options)
    targets, atlases = evaluation_cases(aset, atlas_modality, target_modality, holdout)
    direction = direction or direction_name(atlas_modality, target_modality)
    evaluated = [AFFINE_MV, *methods, *learned_models(fusion_model)]
    if overlay_method is not None and overlay_method not in evaluated:
        raise CmmasError(None, f"overlay method {overlay_method!r} is not evaluated (evaluated: {', '.join(evaluated)})")
    if config is not None and (options or batch_size != 2):
        raise CmmasError(None, "give the fusion options and the batch size in the config, not beside it")
    config = config or SegmentConfig(fusion_options=dict(options or {}), batch_size=batch_size)
    segmenter, methods = make_segmenter(aset, atlases, reg_model, fusion_model, methods, config, finder_model)
    out = Path(out_dir)
    rows, timings, jacobians, sources, qc = [], [], [], {}, []
    for target_id in tqdm(targets, desc=f"evaluate {direction}", unit="target", disable=not progress):
        result = evaluate_target(aset, target_id, segmenter, methods, direction, bounds, out / target_id, realign)
        rows += result.rows
        timings += result.timings
        qc += result.qc
        if result.jacobian:
            jacobians.append(result.jacobian)
        sources[(direction, target_id)] = _overlay_loader(aset, target_id, result.paths)
    extra = {"jacobian": summarize_jacobian(jacobians), "notes": NOTES} if jacobians else {"notes": NOTES}
    extra["provenance"] = record(segmenter, methods, targets, holdout, run, realign)
    extra["qc"] = qc
    report = write_report(rows, out, timings, extra=extra)
    jacobian_csv = atomic_write_text(out / "jacobian.csv", to_csv(jacobians, JACOBIAN_COLUMNS)) if jacobians else None
    figures: list[Path] = []
    if plots:
        learned = [m for m in OVERLAY_PREFERENCE if m in methods]
        ranked_by = overlay_method or (learned[0] if learned else methods[0] if methods else AFFINE_MV)
        figures = write_figures(rows, out, sources, ranked_by)
    return extended_report(report, jacobian_csv, figures)


#: Where :func:`aggregate` finds each fold's results: the original grid, or an oracle set's crop
#: (:mod:`cmmas.evaluate.oracle`).
GRIDS = {"original": "eval/results.csv", "crop": "eval/crop/results.csv"}


def aggregate(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, plots: bool = True,
              grid: str = "original") -> EvaluationReport:
    """Concatenate the reports of every fold and direction of a run and summarise them.

    Reads ``RUN/*/fold*/eval/results.csv`` (``grid`` "crop": ``.../eval/crop/results.csv``, an
    oracle run's crop scores; :data:`GRIDS`) and the ``timings.csv`` and ``jacobian.csv``
    beside each, when present, in natural order, and writes to ``out_dir`` (default ``RUN``)
    ``results.csv``, ``timings.csv``, ``jacobian.csv``, ``summary.json`` (with a ``"sources"``
    entry listing the files read) and, with ``plots``, box plots per direction.

    Raises:
        CmmasError: no results file under ``run_dir``.
    """
    run = Path(run_dir)
    if grid not in GRIDS:
        raise CmmasError(None, f"unknown grid {grid!r}; expected one of {sorted(GRIDS)}")
    found = sorted(run.glob(f"*/fold*/{GRIDS[grid]}"), key=lambda p: natural_key(str(p.relative_to(run))))
    if not found:
        raise CmmasError(run, f"no */fold*/{GRIDS[grid]} under it: evaluate the folds first")
    rows, timings, jacobians = [], [], []
    for path in found:
        rows += read_results(path)
        if (path.parent / "timings.csv").is_file():
            timings += read_timings(path.parent / "timings.csv")
        if (path.parent / "jacobian.csv").is_file():
            jacobians += read_jacobian(path.parent / "jacobian.csv")
    keys = [(r["direction"], r["case"], r["method"], r["label"]) for r in rows]
    if len(set(keys)) != len(keys):
        logger.warning("%s: some (direction, case, method, structure) occur in several folds", run)
    out = Path(out_dir) if out_dir is not None else run
    extra: dict = {"sources": [str(p.relative_to(run)) for p in found]}
    if jacobians:
        extra["jacobian"] = summarize_jacobian(jacobians)
    report = write_report(rows, out, timings, extra)
    jacobian_csv = atomic_write_text(out / "jacobian.csv", to_csv(jacobians, JACOBIAN_COLUMNS)) if jacobians else None
    return extended_report(report, jacobian_csv, write_figures(rows, out) if plots else [])
