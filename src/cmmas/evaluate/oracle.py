"""Evaluating an oracle atlas set (the paper's setting): every held-out target segmented on its
own oracle crop, scored there as the original did and, beside it, on its original grid.

In an oracle set (:func:`cmmas.align.prepare.prepare_oracle`) every case, targets included, lies
on the box of its OWN ground-truth structure stretched to the working shape, z-scored, without
any alignment. :func:`evaluate_oracle_set` segments each held-out target with the engine
(:class:`cmmas.segment.Segmenter`, which places an oracle set's case on its stored crop) by each
fusion by name and SimNet, and scores every fused label twice:

* on the crop (``OUT/crop/``): Dice and ASSD (and HD95) against the cropped truth, in mm of the
  crop's own (anisotropic) spacing, in array order: what the original reported (its column "HD"
  was ASSD, its spacing passed in the wrong axis order);
* on the original grid (``OUT/``): the label mapped back through the exact oracle inverse
  (the engine's map-back of an oracle set, :func:`cmmas.datasets.oracle_roi.label_to_original`,
  nearest neighbour, background outside the box) and scored against the original label file.

Both are oracle numbers (the crop is placed with the target's own truth): comparable with the
paper's, never with our pipeline's.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from tqdm import tqdm

from cmmas.align import mapping
from cmmas.align.atlas_set import AtlasSet
from cmmas.errors import AtlasSetError, CmmasError
from cmmas.evaluate.report import (
    JACOBIAN_COLUMNS,
    EvaluationReport,
    extended_report,
    summarize_jacobian,
    to_csv,
    write_report,
)
from cmmas.evaluate.plots import write_figures
from cmmas.evaluate.runs import (
    BIREGNET,
    direction_name,
    evaluation_cases,
    jacobian_row,
    make_segmenter,
    original_target,
    record,
    unregistered,
)
from cmmas.evaluate.scoring import score, stream_bound_rows
from cmmas.fuse import registry
from cmmas.io import atomic_write_text
from cmmas.outputs import write_label
from cmmas.segment import SegmentConfig

#: Method name of the majority vote of the cropped atlases without registration.
CROP_MV = "crop+mv"

#: Sub-folder of the crop-grid report.
CROP = "crop"

#: What ``summary.json`` says about how :func:`evaluate_oracle_set` scored (its ``"notes"`` entry).
NOTES = {
    "setting": "the original cmmas's oracle setting: every atlas and target cropped around its own ground-truth "
    "structure (+10 mm), stretched to the working shape, z-scored, not aligned",
    "crop": "crop/: every prediction scored on the target's oracle crop (Dice, HD95, ASSD in mm of the crop's "
    "spacing): the original's scores (its 'HD' was ASSD)",
    "original grid": "every prediction mapped back onto the target's original grid through the exact oracle inverse "
    "(nearest neighbour, background outside the box) and scored against the original label file",
    CROP_MV: "majority vote of the cropped atlases without registration (the K chosen with --atlases K)",
    "bounds": "single-atlas mean and oracle of the BiRegNet-warped atlases",
}


def evaluate_oracle_set(
    atlas_set: AtlasSet | str | os.PathLike,
    reg_model,
    fusion_model,
    out_dir: str | os.PathLike,
    *,
    atlas_modality: str = "ct",
    target_modality: str = "mr",
    methods: Sequence[str] = ("mv", "staple", "lwv", "jlf"),
    options: Mapping[str, Mapping] | None = None,
    holdout: int = 0,
    bounds: bool = True,
    plots: bool = True,
    batch_size: int = 2,
    progress: bool = True,
    run: Mapping | None = None,
    config: SegmentConfig | None = None,
) -> EvaluationReport:
    """Segment every labelled held-out target of an oracle set on its crop; score on the crop and
    on the original grid (module docstring).

    Args:
        atlas_set: an oracle :class:`AtlasSet` (``manifest.roi == "oracle"``).
        reg_model, fusion_model: BiRegNet and the learned fusions' networks (paths or models,
            :func:`cmmas.models.learned_models`; may be None).
        out_dir: the report's folder.
        atlas_modality, target_modality: the direction.
        methods: fusions besides the learned ones (:func:`cmmas.fuse.registry.names`).
        options: per-fusion options.
        holdout: atlases withheld from BiRegNet, not fused (:func:`fused_atlases`).
        bounds: also score the single-atlas mean and the oracle of the warped atlases.
        plots: draw box plots.
        batch_size: atlases per network call.
        progress: show a progress bar.
        run: the script's ``command`` and ``flags``, recorded in ``summary.json``'s provenance.
        config: the engine's settings (:class:`cmmas.segment.SegmentConfig`: ``--atlases K``,
            ``--atlas-affine``, ``--refine-steps`` ...; then ``options`` and ``batch_size`` go in it).

    Writes ``OUT/results.csv``, ``summary.json``, ``timings.csv``, ``jacobian.csv`` (original
    grid), ``OUT/crop/results.csv``, ``summary.json`` (crop), predictions
    ``OUT/<target>/pred_<method>.nii.gz`` (original grid) and ``OUT/<target>/crop/pred_<method>.nii.gz``.

    Returns:
        The original-grid report (its ``table`` holds both tables, the crop's first).

    Raises:
        AtlasSetError: not an oracle set, no held-out target or no atlas.
    """
    aset = atlas_set if isinstance(atlas_set, AtlasSet) else AtlasSet(atlas_set)
    if not aset.manifest.oracle:
        raise AtlasSetError(aset.root, "not an oracle atlas set (prealign --roi oracle); evaluate it with its "
                                       "alignment instead (cmmas.evaluate.runs)")
    if config is not None and (options or batch_size != 2):
        raise CmmasError(None, "give the fusion options and the batch size in the config, not beside it")
    config = config or SegmentConfig(fusion_options=dict(options or {}), batch_size=batch_size)
    registry.check_names([m for m in methods if m not in registry.LEARNED], config.fusion_options)
    targets, atlases = evaluation_cases(aset, atlas_modality, target_modality, holdout)
    segmenter, methods = make_segmenter(aset, atlases, reg_model, fusion_model, methods, config)
    codes = segmenter.codes
    direction = direction_name(atlas_modality, target_modality)
    out = Path(out_dir)
    crop_rows, rows, timings, jacobians = [], [], [], []
    for target_id in tqdm(targets, desc=f"evaluate {direction} (oracle)", unit="target", disable=not progress):
        case = {"case": target_id, "direction": direction}
        crop_truth = aset.label(target_id)
        original_image, truth = original_target(aset, target_id)
        warped = segmenter.warp(original_image, out, case_id=target_id, exclude=[target_id])
        segmented = {CROP_MV: segmenter.fuse(unregistered(warped), "mv")}
        segmented.update({name: segmenter.fuse(warped, name) for name in methods})
        timings.append({**case, "step": "registration", "method": BIREGNET,
                        "seconds": warped.seconds["register"] / len(warped.atlas_ids)})
        on_crop = {name: (result.working, result.seconds["fuse"]) for name, result in segmented.items()}
        folder = out / target_id
        for name, (crop_label, seconds) in on_crop.items():
            on_original = segmented[name].label
            write_label(crop_label, folder / CROP / f"pred_{name}.nii.gz", codes)
            write_label(on_original, folder / f"pred_{name}.nii.gz", codes)
            crop_rows += score(crop_label.array, crop_truth.array, aset.labels, crop_truth.spacing_zyx, method=name,
                               seconds=seconds, **case)
            rows += score(on_original.array, truth.array, aset.labels, truth.spacing_zyx, method=name,
                          seconds=seconds, **case)
            timings.append({**case, "step": "fusion", "method": name, "seconds": seconds})
        if bounds:
            majority = on_crop["mv"][0].array if "mv" in on_crop else \
                registry.fuse_all(warped.labels, codes, methods=("mv",))["mv"].label
            crop_rows += stream_bound_rows(warped.labels, crop_truth.array, aset.labels, crop_truth.spacing_zyx,
                                           majority=majority, **case)
            each = (segmenter.on_scan(warped.placement, mapping.one_hot_maps(a, codes))[0].array
                    for a in warped.labels)
            mapped_majority = segmenter.on_scan(warped.placement, mapping.one_hot_maps(majority, codes))[0]
            rows += stream_bound_rows(each, truth.array, aset.labels, truth.spacing_zyx,
                                      majority=mapped_majority.array, **case)
        if warped.fields is not None:
            jacobians.append(jacobian_row(warped.fields, case))
    extra = {"notes": NOTES, "atlases": atlases, "provenance": record(segmenter, methods, targets, holdout, run)}
    if jacobians:
        extra["jacobian"] = summarize_jacobian(jacobians)
    crop_report = write_report(crop_rows, out / CROP, timings, extra={**extra, "grid": "oracle crop"})
    report = write_report(rows, out, timings, extra={**extra, "grid": "original"})
    jacobian_csv = atomic_write_text(out / "jacobian.csv", to_csv(jacobians, JACOBIAN_COLUMNS)) if jacobians else None
    figures = [*write_figures(crop_rows, out / CROP), *write_figures(rows, out)] if plots else []
    table = f"On the oracle crop:\n{crop_report.table}\nOn the original grid:\n{report.table}"
    return extended_report(dataclasses.replace(report, table=table), jacobian_csv, figures)
