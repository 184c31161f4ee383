"""Scoring fused labels against the truth: rows of Dice, Jaccard, HD95 and ASSD per structure
and method, and the two bounds that put the methods in perspective.

Arrays are numpy in array order ``(z, y, x)`` on the target's grid; label maps hold the data
set's integer codes; distances are millimetres; times are wall-clock seconds.

Rows (one per case x structure x method) are plain dicts with the columns of
:data:`COLUMNS`. Besides the fusion methods, two bounds put them in perspective:

* ``"single-atlas mean"``: each atlas scored on its own, metrics averaged over the atlases
  (what one registered atlas gives on average; distances averaged over the atlases where
  they are defined).
* ``"oracle"``: a voxel takes the true label wherever at least one atlas holds it there, the
  majority vote elsewhere: the best any per-voxel choice among the atlas labels can do. For
  every structure its Dice is at least that of the majority vote.
* ``"oracle10"``: the same where at least 10 % of the atlases (at least one) hold the truth:
  Deep Label Fusion's bound on what a fusion can reach (equal to ``"oracle"`` with 10 atlases
  or fewer).

Whole evaluations: :mod:`cmmas.evaluate.runs` (held-out targets of an atlas set) and
:mod:`cmmas.evaluate.baseline` (the classical pipeline).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from cmmas import preprocess
from cmmas.errors import CmmasError, GeometryError
from cmmas.fuse.registry import fuse_all
from cmmas.metrics import evaluate_labels

if TYPE_CHECKING:
    pass


logger = logging.getLogger(__name__)

SINGLE_ATLAS = "single-atlas mean"

ORACLE = "oracle"

ORACLE10 = "oracle10"

#: The share of the atlases that must hold the truth at a voxel for ``"oracle10"``.
ORACLE10_SHARE = 0.1

BOUNDS = (SINGLE_ATLAS, ORACLE, ORACLE10)

#: Columns of ``results.csv``, in order.
COLUMNS = (
    "case",
    "direction",
    "method",
    "label",
    "name",
    "dice",
    "jaccard",
    "hd95",
    "assd",
    "seconds",
    "volume_pred_ml",
    "volume_true_ml",
)

METRICS = ("dice", "jaccard", "hd95", "assd")


class Scored(NamedTuple):
    """What :func:`fuse_and_score` returns.

    Attributes:
        rows: one dict per method (and bound) x structure, columns :data:`COLUMNS`.
        seconds: fusion method -> wall time, seconds.
        predictions: fusion method (and extra) -> label map ``[D, H, W]``.
    """

    rows: list[dict]
    seconds: dict[str, float]
    predictions: dict[str, np.ndarray]


def score(
    prediction: np.ndarray,
    truth: np.ndarray,
    labels: Mapping[int, str],
    spacing_zyx: Sequence[float],
    *,
    method: str,
    case: str = "",
    direction: str = "",
    seconds: float = float("nan"),
) -> list[dict]:
    """Rows of one prediction against the truth, one per structure of ``labels``."""
    rows = evaluate_cropped(prediction, truth, labels, spacing_zyx)
    return [_row(r, case, direction, method, seconds) for r in rows]


def evaluate_cropped(
    prediction: np.ndarray, truth: np.ndarray, labels: Mapping[int, str], spacing_zyx: Sequence[float]
) -> list[dict]:
    """:func:`cmmas.metrics.evaluate_labels` on the bounding box of both foregrounds.

    Exact: a foreground voxel on the box's face has a background neighbour outside the box, so
    it is a surface voxel either way, and surfaces, distances and volumes are those of the whole
    volume; the distance transforms only cover the box, which matters on a 512 x 512 x 300 grid.
    """
    prediction, truth = np.asarray(prediction), np.asarray(truth)
    if prediction.shape != truth.shape:
        raise GeometryError(None, f"prediction shape {prediction.shape} differs from ground truth {truth.shape}")
    foreground = (prediction != 0) | (truth != 0)
    if foreground.any():
        box = preprocess.bounding_box(foreground)
        prediction, truth = prediction[box], truth[box]
    return evaluate_labels(prediction, truth, labels, spacing_zyx)


def _row(metrics: dict, case: str, direction: str, method: str, seconds: float) -> dict:
    row = {"case": case, "direction": direction, "method": method, "seconds": float(seconds)}
    row.update(metrics)
    return {c: row[c] for c in COLUMNS}


def oracle_label(atlas_labels: np.ndarray, truth: np.ndarray, majority: np.ndarray) -> np.ndarray:
    """The truth where any atlas holds it, ``majority`` elsewhere (``[D, H, W]``)."""
    atlas_labels, truth, majority = np.asarray(atlas_labels), np.asarray(truth), np.asarray(majority)
    if atlas_labels.shape[1:] != truth.shape or majority.shape != truth.shape:
        raise GeometryError(None, f"atlas labels {atlas_labels.shape}, truth {truth.shape} and majority {majority.shape} disagree")
    reachable = np.any(atlas_labels == truth[None], axis=0)
    return np.where(reachable, truth, majority).astype(np.int32)


def bound_rows(
    atlas_labels: np.ndarray,
    truth: np.ndarray,
    labels: Mapping[int, str],
    spacing_zyx: Sequence[float],
    *,
    majority: np.ndarray | None = None,
    case: str = "",
    direction: str = "",
) -> list[dict]:
    """Rows of the ``"single-atlas mean"``, ``"oracle"`` and ``"oracle10"`` bounds (see the module docstring).

    Args:
        majority: the majority vote of the atlases, if already computed.
    """
    atlas_labels = np.asarray(atlas_labels)
    if majority is None:
        majority = fuse_all(atlas_labels, labels, methods=("mv",))["mv"].label
    return stream_bound_rows(atlas_labels, truth, labels, spacing_zyx, majority=majority, case=case, direction=direction)


def stream_bound_rows(
    atlas_labels: Iterable[np.ndarray],
    truth: np.ndarray,
    labels: Mapping[int, str],
    spacing_zyx: Sequence[float],
    *,
    majority: np.ndarray,
    case: str = "",
    direction: str = "",
) -> list[dict]:
    """:func:`bound_rows` over atlas label maps ``[D, H, W]`` given one at a time.

    Only one atlas is held at a time (and one count of the atlases holding the truth per voxel),
    so the bounds can be computed on a large original grid.
    """
    truth, majority = np.asarray(truth), np.asarray(majority)
    if majority.shape != truth.shape:
        raise GeometryError(None, f"majority {majority.shape} and truth {truth.shape} disagree")
    per_atlas, hits = [], np.zeros(truth.shape, dtype=np.uint16)
    for atlas in atlas_labels:
        atlas = np.asarray(atlas)
        if atlas.shape != truth.shape:
            raise GeometryError(None, f"atlas label {atlas.shape} and truth {truth.shape} disagree")
        per_atlas.append(evaluate_cropped(atlas, truth, labels, spacing_zyx))
        hits += atlas == truth
    if not per_atlas:
        raise CmmasError(None, "no atlas to compute the bounds from")
    rows = []
    for k, first in enumerate(per_atlas[0]):
        mean = dict(first)
        for key in METRICS + ("volume_pred_ml",):
            values = np.asarray([atlas[k][key] for atlas in per_atlas], dtype=np.float64)
            mean[key] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        rows.append(_row(mean, case, direction, SINGLE_ATLAS, float("nan")))
    needed = {ORACLE: 1, ORACLE10: max(1, int(np.ceil(ORACLE10_SHARE * len(per_atlas) - 1e-9)))}
    for method, count in needed.items():
        oracle = np.where(hits >= count, truth, majority).astype(np.int32)
        rows += score(oracle, truth, labels, spacing_zyx, method=method, case=case, direction=direction)
    return rows


def fuse_and_score(
    target_label: np.ndarray,
    atlas_labels: np.ndarray,
    atlas_images: np.ndarray | None,
    target_image: np.ndarray | None,
    labels: Mapping[int, str],
    spacing_zyx: Sequence[float],
    methods: Sequence[str] = ("mv", "staple", "lwv", "jlf"),
    extra: Mapping[str, np.ndarray] | None = None,
    *,
    options: Mapping[str, Mapping] | None = None,
    bounds: bool = True,
    case: str = "",
    direction: str = "",
) -> Scored:
    """Fuse with every method, score each (and the ``extra`` label maps) and the bounds.

    Args:
        target_label: ``[D, H, W]`` ground truth on the target grid, or None for an unlabelled
            target (fused only: no rows).
        atlas_labels, atlas_images, target_image: as :func:`fuse_all`.
        labels: structure code -> name (background excluded): the structures scored.
        spacing_zyx: target voxel size, mm.
        methods: names of :data:`PRESETS`.
        extra: other predictions to score (name -> ``[D, H, W]`` label map), e.g. a network's.
        options: per-preset option overrides.
        bounds: add the single-atlas-mean and oracle rows.
        case, direction: copied into every row.

    Returns:
        :class:`Scored`.
    """
    fused = fuse_all(atlas_labels, labels, atlas_images, target_image, methods, options)
    predictions = {name: f.label for name, f in fused.items()}
    for name, label in (extra or {}).items():
        if name in predictions or name in BOUNDS:
            raise CmmasError(None, f"extra prediction {name!r} clashes with a method of the same name")
        predictions[name] = np.asarray(label)
    seconds = {name: f.seconds for name, f in fused.items()}
    if target_label is None:
        return Scored([], seconds, predictions)
    truth = np.asarray(target_label)
    rows = []
    for name, label in predictions.items():
        rows += score(
            label, truth, labels, spacing_zyx, method=name, case=case, direction=direction,
            seconds=seconds.get(name, float("nan")),
        )
    if bounds:
        majority = predictions["mv"] if "mv" in fused else None
        rows += bound_rows(atlas_labels, truth, labels, spacing_zyx, majority=majority, case=case, direction=direction)
    return Scored(rows, seconds, predictions)
