"""The classical baseline: every atlas registered onto every target with ANTs (pairwise, see
:mod:`cmmas.align.pairwise`), fused and scored, as users of ANTs would do it.

:func:`evaluate_pairs` scores a folder of pre-registered pairs (``experiments/prealign.py``
pairwise mode) with every fusion; :func:`classical_segment` runs the whole classical pipeline
on one target (register, fuse, back onto the target's grid), as the speed benchmark compares.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from cmmas import preprocess
from cmmas.align import pairwise
from cmmas.datasets.base import Case
from cmmas.evaluate.plots import write_figures
from cmmas.evaluate.report import EvaluationReport, extended_report, write_report
from cmmas.evaluate.scoring import fuse_and_score
from cmmas.fuse import registry
from cmmas.io import Image, read_image, read_label, write_image

logger = logging.getLogger(__name__)


def _other_predictions(pairs: pairwise.Pairs, folder: str | os.PathLike | None) -> dict[str, tuple[np.ndarray, Path]]:
    """name -> (label ``[D, H, W]``, path) of ``folder/<target>/pred_<name>.nii.gz`` on the pairs' grid."""
    if folder is None:
        return {}
    root = Path(folder) / pairs.target_id
    found = sorted(root.glob("pred_*.nii.gz")) if root.is_dir() else []
    if not found:
        logger.warning("no prediction in %s for target %s", root, pairs.target_id)
    return {path.name[len("pred_"): -len(".nii.gz")]: (read_label(path, allowed=pairs.labels, like=pairs.target).array,
                                                       path) for path in found}


def evaluate_pairs(
    pairs_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    methods: Sequence[str] = ("mv", "staple", "lwv", "jlf"),
    options: Mapping[str, Mapping] | None = None,
    *,
    bounds: bool = True,
    predictions: str | os.PathLike | None = None,
    plots: bool = True,
    overlay_method: str | None = None,
    progress: bool = True,
) -> EvaluationReport:
    """Fuse and score every target folder of a pairwise run.

    Each target's atlases (registered onto it by ANTs) are fused with every fusion of
    ``methods``; each prediction is written beside the pairs
    (``pairs_dir/<target>/pred_<method>.nii.gz``, on the pairs' grid) and, for labelled targets,
    scored with the single-atlas-mean and oracle bounds. Predictions of other methods (e.g. a
    network's) are scored too when ``predictions`` holds ``<target>/pred_<name>.nii.gz``.

    Writes ``results.csv``, ``timings.csv``, ``summary.json`` and, with ``plots``, box plots and
    best/median/worst overlays (ranked by ``overlay_method``, default the first method) to ``out_dir``.
    """
    registry.check_names(methods, options)
    rows, timings, sources = [], [], {}
    for folder in tqdm(pairwise.target_folders(pairs_dir), desc="fuse and score", unit="target", disable=not progress):
        pairs = pairwise.load_pairs(folder)
        extra = _other_predictions(pairs, predictions)
        scored = fuse_and_score(
            None if pairs.target_label is None else pairs.target_label.array,
            pairs.atlas_labels, pairs.atlas_images, pairs.target.array, pairs.labels, pairs.target.spacing_zyx,
            methods, {name: array for name, (array, _) in extra.items()},
            options=options, bounds=bounds, case=pairs.target_id, direction=pairs.direction,
        )
        for method in methods:
            write_image(pairs.target.with_array(scored.predictions[method]), pairwise.prediction_path(folder, method))
        case = {"case": pairs.target_id, "direction": pairs.direction}
        timings += [{**case, "step": "registration", "method": pairs.kind, "seconds": float(s)} for s in pairs.seconds]
        timings += [{**case, "step": "fusion", "method": m, "seconds": s} for m, s in scored.seconds.items()]
        if pairs.target_label is None:
            logger.warning("%s: unlabelled target, predictions written but not scored", pairs.target_id)
            continue
        rows += scored.rows
        paths = {m: pairwise.prediction_path(folder, m) for m in methods}
        paths.update({name: path for name, (_, path) in extra.items()})
        sources[(pairs.direction, pairs.target_id)] = _overlay_loader(Path(folder), paths)
    report = write_report(rows, out_dir, timings)
    figures = write_figures(rows, Path(out_dir), sources, overlay_method or methods[0]) if plots else []
    return extended_report(report, None, figures)


def _overlay_loader(folder: Path, paths: Mapping[str, Path]):
    return lambda: (read_image(folder / pairwise.TARGET_IMAGE), read_label(folder / pairwise.TARGET_LABEL).array,
                    {name: read_label(path).array for name, path in paths.items()})


class ClassicalResult(NamedTuple):
    """What :func:`classical_segment` made.

    Attributes:
        register_seconds: wall time of all the pairwise registrations, seconds.
        seconds: fusion -> wall time of the registrations plus that fusion and its mapping back.
        labels: fusion -> label map on the target's own grid (nearest-label resampling).
    """

    register_seconds: float
    seconds: dict[str, float]
    labels: dict[str, Image]


def classical_segment(
    atlases: Sequence[Case],
    target: Case,
    labels: Mapping[int, str],
    work_dir: str | os.PathLike | None = None,
    *,
    kind: str = "syn",
    spacing_mm: float = 3.0,
    fast: bool = False,
    seed: int = 0,
    workers: int = 1,
    fusions: Sequence[str] = ("mv", "jlf"),
) -> ClassicalResult:
    """The classical pipeline on one target: every atlas registered onto it with ANTs (rigid,
    affine, then SyN with ``kind="syn"``; Mattes MI; on the target resampled to ``spacing_mm``),
    fused with each of ``fusions`` and resampled back onto the target's own grid.

    Args:
        work_dir: where the registered pairs are written (a temporary folder if None).
    """
    registry.check_names(fusions)
    with tempfile.TemporaryDirectory(prefix="cmmas-classical-") as tmp:
        folder = Path(work_dir or tmp)
        t0 = time.perf_counter()
        pairwise.prealign_pairs(list(atlases), target, dict(labels), folder, kind=kind, spacing_mm=spacing_mm,
                                seed=seed, fast=fast, workers=workers, progress=False)
        pairs = pairwise.load_pairs(folder / target.id)
        register_s = time.perf_counter() - t0
        grid = read_image(target.image_path).geometry
        codes = [0, *sorted(pairs.labels)]
        seconds, out = {}, {}
        for name in fusions:
            t0 = time.perf_counter()
            fused = registry.fuse_named(name, pairs.target.array, pairs.atlas_images, pairs.atlas_labels, codes)
            out[name] = preprocess.back_to_grid(pairs.target.with_array(fused.label.astype(np.int32)), grid, kind="label")
            seconds[name] = register_s + time.perf_counter() - t0
    return ClassicalResult(register_s, seconds, out)
