"""Fuse pre-aligned atlases with several methods, score them, and write the report.

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

Two entry points run a whole evaluation: :func:`evaluate_space` (held-out targets of a
prepared space, registered with BiRegNet, fused, mapped back and scored on each target's
original grid) and :func:`aggregate` (the reports of every fold and direction of a run).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from cmmas import preprocess
from cmmas.errors import AtlasSetError, CmmasError, GeometryError, ModelError
from cmmas.io import Geometry, Image, atomic_write_text, read_label, write_image

if TYPE_CHECKING:
    from cmmas.atlas_set import AtlasSet

logger = logging.getLogger(__name__)

#: Named fusion set-ups: name -> (method of :func:`cmmas.fusion.fuse`, its options).
#: Cross-modality defaults: similarity-weighted votes use mutual information, and JLF uses
#: small patches (``rad=1, r_search=1``: seconds instead of minutes, GUIDE section 5).
PRESETS: dict[str, tuple[str, dict]] = {
    "mv": ("mv", {}),
    "staple": ("staple", {}),
    "global": ("global", {"similarity": "mi"}),
    "lwv": ("lwv", {"similarity": "mi"}),
    "lwv_ncc": ("lwv", {"similarity": "ncc"}),
    "jlf": ("jlf", {"rad": 1, "r_search": 1}),
    "jlf_r2": ("jlf", {"rad": 2, "r_search": 2}),
    "jlf_tf": ("jlf_tf", {"rad": 1, "r_search": 1}),
}
SINGLE_ATLAS = "single-atlas mean"
ORACLE = "oracle"
BOUNDS = (SINGLE_ATLAS, ORACLE)
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
#: Columns of ``timings.csv``: step is "registration" (method: the registration kind) or "fusion".
TIMING_COLUMNS = ("case", "direction", "step", "method", "seconds")
#: Columns of ``jacobian.csv``: one row per target, statistics of its atlas -> target fields
#: (:func:`cmmas.metrics.jacobian_stats`): the mean over atlases of the folding percentage and
#: of the std of log det J, the smallest and the largest det J of any atlas.
JACOBIAN_COLUMNS = ("case", "direction", "n_atlases", "folding_percent", "std_log_jac", "min_det", "max_det")
#: Method name of the majority vote of the affinely pre-aligned atlases (no deep registration).
AFFINE_MV = "affine+mv"
#: Method name of the SimNet-weighted vote.
SIMNET = "simnet"
#: Name of the BiRegNet registration in ``timings.csv``.
BIREGNET = "biregnet"


class Fused(NamedTuple):
    """One fusion result: the label map ``[D, H, W]`` (int32 codes) and its wall time, seconds."""

    label: np.ndarray
    seconds: float


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


@dataclasses.dataclass(frozen=True)
class Report:
    """Files written by :func:`write_report` and the table to print."""

    results_csv: Path
    summary_json: Path
    timings_csv: Path | None
    table: str


def resolve(method: str, options: Mapping[str, Mapping] | None = None) -> tuple[str, dict]:
    """The :func:`cmmas.fusion.fuse` method and options of a preset name (options merged over it).

    Raises:
        CmmasError: unknown name.
    """
    if method not in PRESETS:
        raise CmmasError(None, f"unknown fusion method {method!r} (choose from {', '.join(PRESETS)})")
    base, preset = PRESETS[method]
    return base, {**preset, **dict((options or {}).get(method, {}))}


def fuse_all(
    atlas_labels: np.ndarray,
    labels: Iterable[int],
    atlas_images: np.ndarray | None = None,
    target_image: np.ndarray | None = None,
    methods: Sequence[str] = ("mv", "staple", "lwv", "jlf"),
    options: Mapping[str, Mapping] | None = None,
) -> dict[str, Fused]:
    """Fuse the atlases with each preset of ``methods``.

    Args:
        atlas_labels: ``[N, D, H, W]`` atlas labels on the target grid.
        labels: structure codes (background 0 is added when missing).
        atlas_images: ``[N, D, H, W]`` atlas images (needed by global, lwv, jlf).
        target_image: ``[D, H, W]``.
        methods: names of :data:`PRESETS`.
        options: per-preset option overrides, e.g. ``{"jlf": {"rad": 2}}``.

    Returns:
        preset name -> :class:`Fused`, in the order of ``methods``.
    """
    from cmmas import fusion

    for method in methods:
        resolve(method, options)
    codes = sorted({0} | {int(c) for c in labels})
    out = {}
    for method in methods:
        base, kwargs = resolve(method, options)
        start = time.perf_counter()
        result = fusion.fuse(base, atlas_labels, codes, atlas_images, target_image, **kwargs)
        out[method] = Fused(result.label.astype(np.int32), time.perf_counter() - start)
        logger.debug("fusion %s took %.2f s", method, out[method].seconds)
    return out


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
    from cmmas.metrics import evaluate_labels

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
    """Rows of the ``"single-atlas mean"`` and ``"oracle"`` bounds (see the module docstring).

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

    Only one atlas is held at a time (and one boolean map of where any atlas holds the truth),
    so the bounds can be computed on a large original grid.
    """
    truth, majority = np.asarray(truth), np.asarray(majority)
    if majority.shape != truth.shape:
        raise GeometryError(None, f"majority {majority.shape} and truth {truth.shape} disagree")
    per_atlas, reachable = [], np.zeros(truth.shape, dtype=bool)
    for atlas in atlas_labels:
        atlas = np.asarray(atlas)
        if atlas.shape != truth.shape:
            raise GeometryError(None, f"atlas label {atlas.shape} and truth {truth.shape} disagree")
        per_atlas.append(evaluate_cropped(atlas, truth, labels, spacing_zyx))
        reachable |= atlas == truth
    if not per_atlas:
        raise CmmasError(None, "no atlas to compute the bounds from")
    rows = []
    for k, first in enumerate(per_atlas[0]):
        mean = dict(first)
        for key in METRICS + ("volume_pred_ml",):
            values = np.asarray([atlas[k][key] for atlas in per_atlas], dtype=np.float64)
            mean[key] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        rows.append(_row(mean, case, direction, SINGLE_ATLAS, float("nan")))
    oracle = np.where(reachable, truth, majority).astype(np.int32)
    rows += score(oracle, truth, labels, spacing_zyx, method=ORACLE, case=case, direction=direction)
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


# ----------------------------------------------------------------------------- report


def _stats(values: Iterable[float]) -> dict:
    """mean, sample std (0 for one value), median, n (finite values) and n_missing (nan)."""
    values = np.asarray(list(values), dtype=np.float64)
    finite = values[np.isfinite(values)]
    if not finite.size:
        return {"mean": None, "std": None, "median": None, "n": 0, "n_missing": int(values.size)}
    return {
        "mean": float(finite.mean()),
        "std": float(finite.std(ddof=1)) if finite.size > 1 else 0.0,
        "median": float(np.median(finite)),
        "n": int(finite.size),
        "n_missing": int(values.size - finite.size),
    }


def _ordered(values: Iterable) -> list:
    return list(dict.fromkeys(values))


def summarize(rows: Sequence[dict], timings: Sequence[dict] = ()) -> dict:
    """The content of ``summary.json``.

    ``metrics[direction][method][structure][metric]`` and ``metrics[...][method]["mean"][metric]``
    (the per-case mean over structures) hold ``{mean, std, median, n, n_missing}`` over cases;
    ``seconds[direction][step][method]`` the same over the timing records.
    """
    metrics: dict = {}
    for direction in _ordered(r["direction"] for r in rows):
        in_direction = [r for r in rows if r["direction"] == direction]
        metrics[direction] = {}
        for method in _ordered(r["method"] for r in in_direction):
            mine = [r for r in in_direction if r["method"] == method]
            entry = {}
            for name in _ordered(r["name"] for r in mine):
                entry[name] = {m: _stats(r[m] for r in mine if r["name"] == name) for m in METRICS}
            entry["mean"] = {m: _stats(_case_means(mine, m).values()) for m in METRICS}
            metrics[direction][method] = entry
    seconds: dict = {}
    for record in timings:
        seconds.setdefault(record["direction"], {}).setdefault(record["step"], {}).setdefault(
            record["method"], []
        ).append(record["seconds"])
    seconds = {
        d: {s: {m: _stats(v) for m, v in by_method.items()} for s, by_method in steps.items()}
        for d, steps in seconds.items()
    }
    cases = {d: len(_ordered(r["case"] for r in rows if r["direction"] == d)) for d in metrics}
    return {"n_cases": cases, "std": "sample standard deviation over cases", "metrics": metrics, "seconds": seconds}


def _case_means(rows: Sequence[dict], metric: str) -> dict[str, float]:
    """case -> mean of ``metric`` over its structures (nan when any is undefined)."""
    out: dict[str, list[float]] = {}
    for r in rows:
        out.setdefault(r["case"], []).append(r[metric])
    return {case: float(np.mean(v)) for case, v in out.items()}


def case_means(rows: Sequence[dict], method: str, metric: str = "dice", direction: str | None = None) -> dict[str, float]:
    """case -> mean of ``metric`` over structures, for one method (and direction)."""
    mine = [r for r in rows if r["method"] == method and (direction is None or r["direction"] == direction)]
    return _case_means(mine, metric)


def _cell(stats: dict, digits: int) -> str:
    if stats["n"] == 0:
        return "n/a"
    text = f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"
    if stats["n_missing"]:
        text += f" ({stats['n']}/{stats['n'] + stats['n_missing']})"
    return text


def format_table(summary: dict) -> str:
    """Markdown tables from :func:`summarize`: Dice and HD95 (method rows x structure columns), seconds.

    A cell reads ``mean ± std`` over cases; ``(k/n)`` marks distances defined in only k of n
    cases (a structure missing from the prediction).
    """
    blocks = []
    for direction, methods in summary["metrics"].items():
        n = summary["n_cases"][direction]
        for metric, title, digits in (("dice", "Dice", 3), ("hd95", "HD95 (mm)", 1)):
            structures = _ordered(s for entry in methods.values() for s in entry)
            header = f"**{direction} — {title}, mean ± std over {n} target(s)**\n\n"
            lines = ["| method | " + " | ".join(structures) + " |", "|---" * (len(structures) + 1) + "|"]
            for method, entry in methods.items():
                cells = [_cell(entry[s][metric], digits) if s in entry else "" for s in structures]
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
            blocks.append(header + "\n".join(lines))
    if summary["seconds"]:
        lines = ["| direction | step | method | seconds (mean ± std) | n |", "|---|---|---|---|---|"]
        for direction, steps in summary["seconds"].items():
            for step, by_method in steps.items():
                for method, stats in by_method.items():
                    lines.append(f"| {direction} | {step} | {method} | {_cell(stats, 2)} | {stats['n']} |")
        blocks.append("**Wall time per registration (one atlas -> one target) and per fusion (one target)**\n\n" + "\n".join(lines))
    if summary.get("jacobian"):
        lines = ["| direction | folding % | std log\\|J\\| | targets |", "|---|---|---|---|"]
        for direction, entry in summary["jacobian"].items():
            cells = [_cell(entry[k], 3) for k in ("folding_percent", "std_log_jac")]
            lines.append(f"| {direction} | " + " | ".join(cells) + f" | {entry['folding_percent']['n']} |")
        blocks.append("**Deformation regularity of the atlas -> target fields, mean ± std over targets**\n\n"
                      + "\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _csv(records: Sequence[dict], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({c: _csv_value(record[c]) for c in columns})
    return buffer.getvalue()


def _csv_value(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return value


def write_report(
    rows: Sequence[dict],
    out_dir: str | os.PathLike,
    timings: Sequence[dict] = (),
    extra: Mapping[str, object] | None = None,
) -> Report:
    """Write ``results.csv``, ``summary.json`` and (with timings) ``timings.csv`` atomically.

    Args:
        rows: score rows (columns :data:`COLUMNS`; empty distances are written as empty cells).
        out_dir: folder, created if needed.
        timings: records with :data:`TIMING_COLUMNS`.
        extra: more top-level entries of ``summary.json`` (e.g. ``"jacobian"`` from
            :func:`summarize_jacobian`, printed by :func:`format_table`; ``"notes"``).

    Returns:
        :class:`Report` with the paths and the Markdown table (:func:`format_table`).

    Raises:
        CmmasError: no rows, a row lacks a column, or ``extra`` repeats a summary entry.
    """
    if not rows:
        raise CmmasError(out_dir, "no results to report (were the targets labelled?)")
    for columns, records, what in ((COLUMNS, rows, "row"), (TIMING_COLUMNS, timings, "timing record")):
        for record in records:
            missing = [c for c in columns if c not in record]
            if missing:
                raise CmmasError(out_dir, f"a {what} lacks {missing}: {record}")
    out = Path(out_dir)
    results = atomic_write_text(out / "results.csv", _csv(rows, COLUMNS))
    summary = summarize(rows, timings)
    clash = sorted(set(extra or {}) & set(summary))
    if clash:
        raise CmmasError(out_dir, f"extra summary entries {clash} clash with the summary's own")
    summary.update(extra or {})
    summary_path = atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    timings_path = atomic_write_text(out / "timings.csv", _csv(timings, TIMING_COLUMNS)) if timings else None
    return Report(results, summary_path, timings_path, format_table(summary))


def _read_csv(path: str | os.PathLike, columns: Sequence[str], numbers: Sequence[str], integers: Sequence[str] = ()) -> list[dict]:
    """Records of a CSV written by this module: ``numbers`` as float (empty cells nan), ``integers`` as int."""
    path = Path(path)
    if not path.is_file():
        raise CmmasError(path, f"{path.name} not found")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise CmmasError(path, f"not a {path.name} of cmmas: columns {missing} are missing")
        records = []
        for line, raw in enumerate(reader, start=2):
            record = dict(raw)
            try:
                for c in integers:
                    record[c] = int(record[c])
                for c in numbers:
                    record[c] = float(record[c]) if record[c] != "" else float("nan")
            except (TypeError, ValueError):
                raise CmmasError(path, f"line {line}: a number is malformed") from None
            records.append(record)
    return records


def read_results(path: str | os.PathLike) -> list[dict]:
    """Read ``results.csv`` back into rows (numbers as float, empty cells as nan, label as int)."""
    return _read_csv(path, COLUMNS, METRICS + ("seconds", "volume_pred_ml", "volume_true_ml"), ("label",))


def read_timings(path: str | os.PathLike) -> list[dict]:
    """Read ``timings.csv`` back into records (:data:`TIMING_COLUMNS`, seconds as float)."""
    return _read_csv(path, TIMING_COLUMNS, ("seconds",))


def read_jacobian(path: str | os.PathLike) -> list[dict]:
    """Read ``jacobian.csv`` back into records (:data:`JACOBIAN_COLUMNS`)."""
    return _read_csv(path, JACOBIAN_COLUMNS, JACOBIAN_COLUMNS[3:], ("n_atlases",))


def summarize_jacobian(records: Sequence[dict]) -> dict:
    """``{direction: {"folding_percent": stats, "std_log_jac": stats}}`` over the targets of
    ``jacobian.csv`` records (stats as :func:`summarize`'s); the ``"jacobian"`` summary entry."""
    out: dict = {}
    for direction in _ordered(r["direction"] for r in records):
        mine = [r for r in records if r["direction"] == direction]
        out[direction] = {k: _stats(r[k] for r in mine) for k in ("folding_percent", "std_log_jac")}
    return out


# ----------------------------------------------------------------------------- figures

#: Loads what one overlay shows: the image, the truth and name -> prediction, on one grid.
OverlaySource = Callable[[], tuple[Image, np.ndarray, dict[str, np.ndarray]]]


def _tag(direction: str) -> str:
    return direction.replace("->", "2")


def write_figures(
    rows: Sequence[dict],
    out_dir: str | os.PathLike,
    overlays: Mapping[tuple[str, str], OverlaySource] | None = None,
    method: str | None = None,
) -> list[Path]:
    """Box plots of Dice and HD95, and overlays of each direction's best, median and worst case.

    Box plots are ``boxplot_<metric>.png``, or ``boxplot_<metric>_<a>2<t>.png`` per direction
    when the rows hold several. Overlays: for each direction among the keys of ``overlays``
    (``(direction, case) -> loader``), the cases ranked by ``method``'s mean Dice
    (:func:`cmmas.plots.best_median_worst`; default: the first method of the rows), drawn as
    ``overlay_<a>2<t>_<tags>_<case>.png`` (tags such as ``best`` or ``best-median-worst``).

    Returns:
        The files written.
    """
    from cmmas import plots

    out = Path(out_dir)
    written = []
    directions = _ordered(r["direction"] for r in rows)
    for direction in directions:
        mine = [r for r in rows if r["direction"] == direction]
        suffix = "" if len(directions) == 1 else f"_{_tag(direction)}"
        for metric in ("dice", "hd95"):
            if any(np.isfinite(r[metric]) for r in mine):
                title = f"{direction}: {metric} per structure and method"
                written.append(plots.boxplot(mine, metric, out / f"boxplot_{metric}{suffix}.png", title=title))
    overlays = overlays or {}
    for direction in _ordered(d for d, _ in overlays):
        chosen: dict[str, list[str]] = {}
        for tag, case in plots.best_median_worst(rows, method=method, direction=direction).items():
            chosen.setdefault(case, []).append(tag)
        n_cases = len({c for d, c in overlays if d == direction})
        for case, tags in chosen.items():
            if (direction, case) not in overlays:
                logger.warning("no overlay source for %s %s", direction, case)
                continue
            image, truth, preds = overlays[(direction, case)]()
            tag = "-".join(tags)
            title = f"{direction} {case} ({tag} of {n_cases} by {method or rows[0]['method']} Dice)"
            name = f"overlay_{_tag(direction)}_{tag}_{case}.png"
            written.append(plots.overlay(image, truth, preds, out / name, slices="auto", title=title))
    return written


# ----------------------------------------------------------------------------- a prepared space


@dataclasses.dataclass(frozen=True)
class EvaluationReport(Report):
    """:class:`Report` of :func:`evaluate_space` and :func:`aggregate`.

    Attributes:
        jacobian_csv: ``jacobian.csv`` (None when no field statistics were found).
        figures: the PNG files written.
    """

    jacobian_csv: Path | None
    figures: tuple[Path, ...]


#: What ``summary.json`` says about how :func:`evaluate_space` scored (its ``"notes"`` entry).
SPACE_NOTES = {
    "scoring": "every prediction and bound is mapped back onto the target's original grid (inverse of its "
    "affine alignment to the reference, generic-label interpolation; background outside the working grid) "
    "and scored against the original label file",
    AFFINE_MV: "majority vote of the affinely pre-aligned atlases, without deformable registration",
    "bounds": "single-atlas mean and oracle use the BiRegNet-warped atlases, each mapped back to the original "
    "grid; the oracle takes the original truth wherever a mapped-back atlas holds it, the mapped-back "
    "majority vote elsewhere",
    "timings": "registration: BiRegNet seconds per atlas (batched, after one warm-up call); fusion: seconds per "
    "target on the working grid; mapping back is not timed",
}


class _Networks(NamedTuple):
    reg: object
    simnet: object | None


def direction_name(atlas_modality: str, target_modality: str) -> str:
    """The ``direction`` column of a run, e.g. ``"ct->mr"``."""
    return f"{atlas_modality}->{target_modality}"


def original_target(space: "AtlasSet", case_id: str) -> tuple[Image, Image]:
    """A case's image and label read from its original files, on its original grid.

    Label codes outside the space's table become background (a space prepared with one
    ``component`` keeps only that structure, and so must the truth), except the data sets' known
    alias codes (MM-WHS 421 for 420), rewritten as when the space was prepared.

    Raises:
        AtlasSetError: no original label, or an original file is not found.
    """
    from cmmas.datasets.base import Case, load_case
    from cmmas.datasets.mmwhs import MMWHS_ALIASES

    entry = space.case(case_id)
    if entry.source_label is None:
        raise AtlasSetError(space.root, f"case {case_id!r} has no original label file to score against")
    for source in (entry.source_image, entry.source_label):
        if not Path(source).exists():
            raise AtlasSetError(space.root, f"case {case_id!r}: original file {source} not found (the manifest "
                                "keeps the path prealign was given: run from the same folder)")
    aliases = tuple((a, b) for a, b in MMWHS_ALIASES if a not in space.labels and b in space.labels)
    case = Case(case_id, entry.modality, Path(entry.source_image), Path(entry.source_label), aliases)
    image, label = load_case(case)
    dropped = sorted(set(np.unique(label.array).tolist()) - {0} - set(space.labels))
    if dropped:
        logger.info("%s: codes %s are not in the space's label table: scored as background", label.path, dropped)
        label = label.with_array(np.where(np.isin(label.array, dropped), 0, label.array).astype(np.int32))
    return image, label


def _to_original(space: "AtlasSet", case_id: str, label: np.ndarray, geometry: Geometry) -> Image:
    """A working-grid label map ``[D, H, W]`` mapped back onto the case's original grid."""
    from cmmas.atlas_set import back_to_target

    return back_to_target(np.asarray(label, np.int32), space.geometry, space.transform(case_id), geometry, kind="label")


def _load_networks(space: "AtlasSet", reg_model, fusion_model) -> _Networks:
    """The networks (loaded when given as paths), checked against the space's grid and labels."""
    from cmmas import registration

    reg_path = reg_model if isinstance(reg_model, (str, os.PathLike)) else None
    reg = registration.load_model(reg_model) if reg_path is not None else reg_model
    shape = registration.model_shape(reg)
    if shape != space.geometry.shape:
        raise ModelError(reg_path or reg.name, f"BiRegNet takes {shape}, the space's working grid is {space.geometry.shape}")
    if fusion_model is None:
        return _Networks(reg, None)
    from cmmas import similarity

    sim_path = fusion_model if isinstance(fusion_model, (str, os.PathLike)) else None
    simnet = similarity.load_model(fusion_model) if sim_path is not None else fusion_model
    inputs = simnet.input if isinstance(simnet.input, dict) else {}
    if set(inputs) != {"target", "atlas_label"}:
        raise ModelError(sim_path or simnet.name, "not a SimNet: expected inputs 'target' and 'atlas_label'")
    net_shape, channels = tuple(inputs["target"].shape[1:4]), inputs["atlas_label"].shape[-1]
    codes = similarity.channel_codes(space.labels)
    if net_shape != space.geometry.shape or channels != len(codes):
        raise ModelError(sim_path or simnet.name, f"SimNet takes {net_shape} with {channels} label channels; the space "
                         f"has a {space.geometry.shape} grid and {len(codes)} codes {list(codes)}")
    return _Networks(reg, simnet)


def _warm_up(
    nets: _Networks,
    atlas_images: np.ndarray,
    atlas_labels: np.ndarray,
    target: np.ndarray,
    codes: Sequence[int],
    methods: Sequence[str],
    options: Mapping[str, Mapping] | None,
    batch_size: int,
) -> None:
    """Untimed passes, so that one-off set-up is not timed with the first target.

    Each network runs once at the one batch shape the evaluation uses (a shorter last batch
    runs padded to it, :func:`cmmas.registration.pad_batch`), and each fusion method once on
    the central 16^3 voxels of two atlases (the libraries behind them, ANTs for JLF, load on
    first use).
    """
    from cmmas import registration, similarity

    size = min(batch_size, len(atlas_images))
    _, warped, _ = registration.warp_atlases(nets.reg, atlas_images[:size], atlas_labels[:size], target, codes,
                                             batch_size=size)
    if nets.simnet is not None:
        similarity.score_atlases(nets.simnet, target, warped, codes, batch_size=size)
    centre = tuple(slice(max(s // 2 - 8, 0), s // 2 + 8) for s in target.shape)
    few = slice(0, min(2, len(atlas_images)))
    fuse_all(atlas_labels[few][(slice(None), *centre)], codes, atlas_images[few][(slice(None), *centre)],
             target[centre], methods, options)


class _TargetResult(NamedTuple):
    rows: list[dict]
    timings: list[dict]
    jacobian: dict
    paths: dict[str, Path]


def _evaluate_target(
    space: "AtlasSet",
    target_id: str,
    atlas_images: np.ndarray,
    atlas_labels: np.ndarray,
    nets: _Networks,
    codes: Sequence[int],
    methods: Sequence[str],
    options: Mapping[str, Mapping] | None,
    direction: str,
    bounds: bool,
    batch_size: int,
    folder: Path,
) -> _TargetResult:
    """Register, fuse, map back, score and write the predictions of one held-out target."""
    from cmmas import registration, similarity
    from cmmas.metrics import jacobian_stats

    image, truth = original_target(space, target_id)
    target = space.image(target_id).array
    case = {"case": target_id, "direction": direction}
    fused = {AFFINE_MV: fuse_all(atlas_labels, codes, methods=("mv",))["mv"]}
    start = time.perf_counter()
    warped_images, warped_labels, ddfs = registration.warp_atlases(
        nets.reg, atlas_images, atlas_labels, target, codes, batch_size=batch_size)
    per_atlas = (time.perf_counter() - start) / len(atlas_images)
    fused.update(fuse_all(warped_labels, codes, warped_images, target, methods, options))
    if nets.simnet is not None:
        start = time.perf_counter()
        result = similarity.simnet_fuse(nets.simnet, target, warped_labels, codes, batch_size=batch_size)
        fused[SIMNET] = Fused(result.label.astype(np.int32), time.perf_counter() - start)

    rows, paths, majority = [], {}, None
    for name, (label, seconds) in fused.items():
        mapped = _to_original(space, target_id, label, image.geometry)
        paths[name] = write_image(mapped, folder / f"pred_{name}.nii.gz")
        rows += score(mapped.array, truth.array, space.labels, truth.spacing_zyx, method=name, seconds=seconds, **case)
        majority = mapped.array if name == "mv" else majority
    if bounds:
        if majority is None:
            vote = fuse_all(warped_labels, codes, methods=("mv",))["mv"].label
            majority = _to_original(space, target_id, vote, image.geometry).array
        each = (_to_original(space, target_id, a, image.geometry).array for a in warped_labels)
        rows += stream_bound_rows(each, truth.array, space.labels, truth.spacing_zyx, majority=majority, **case)

    timings = [{**case, "step": "registration", "method": BIREGNET, "seconds": per_atlas}]
    timings += [{**case, "step": "fusion", "method": name, "seconds": f.seconds} for name, f in fused.items()]
    stats = [jacobian_stats(ddf) for ddf in ddfs]
    logs = np.asarray([s["std_log_jac"] for s in stats])
    jacobian = {
        **case,
        "n_atlases": len(stats),
        "folding_percent": float(np.mean([s["folding_percent"] for s in stats])),
        "std_log_jac": float(np.mean(logs[np.isfinite(logs)])) if np.isfinite(logs).any() else float("nan"),
        "min_det": float(min(s["min_det"] for s in stats)),
        "max_det": float(max(s["max_det"] for s in stats)),
    }
    return _TargetResult(rows, timings, jacobian, paths)


def _overlay_loader(space: "AtlasSet", case_id: str, paths: Mapping[str, Path]) -> OverlaySource:
    """Reads the original image and truth of a target and its written predictions."""

    def load() -> tuple[Image, np.ndarray, dict[str, np.ndarray]]:
        image, truth = original_target(space, case_id)
        return image, truth.array, {name: read_label(path, like=image).array for name, path in paths.items()}

    return load


def evaluate_space(
    space: "AtlasSet | str | os.PathLike",
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
    batch_size: int = 4,
    progress: bool = True,
) -> EvaluationReport:
    """Segment every held-out target of a prepared space and score it on its original grid.

    For each labelled "test" case of ``target_modality``, the labelled "train" cases of
    ``atlas_modality`` are the atlases (all on the working grid, affinely aligned when the space
    was prepared). The predictions, by method name:

    * ``"affine+mv"``: majority vote of the pre-aligned atlases (no deformable registration);
    * each preset of ``methods`` (:func:`fuse_all`) on the atlases warped by BiRegNet;
    * ``"simnet"``: the SimNet-weighted vote of the warped atlases (with a ``fusion_model``);
    * with ``bounds``, the single-atlas mean and the oracle of the warped atlases.

    Every label map is mapped back onto the target's original grid (the inverse of its alignment,
    :func:`cmmas.atlas_set.back_to_target`) and scored against the original label file
    (:func:`original_target`): the working grid's resampling and ROI cannot flatter the scores.

    Writes to ``out_dir``: ``<target>/pred_<method>.nii.gz`` (original grid and header),
    ``results.csv``, ``summary.json`` (with ``"jacobian"`` and ``"notes"`` entries),
    ``timings.csv`` (BiRegNet seconds per atlas, fusion seconds per method), ``jacobian.csv``
    (:data:`JACOBIAN_COLUMNS`) and, with ``plots``, box plots and best/median/worst overlays on
    the original grid ranked by ``overlay_method`` (default ``"simnet"`` when a fusion model is
    given, else the first of ``methods``).

    Args:
        space: a prepared space (object or folder).
        reg_model: BiRegNet (keras model or ``.keras`` path) for the working grid.
        fusion_model: SimNet (model or path), or None to skip ``"simnet"``.
        out_dir: output folder (created).
        atlas_modality, target_modality: "ct" or "mr".
        methods: names of :data:`PRESETS`.
        options: per-preset option overrides.
        direction: the ``direction`` column (default ``"<atlas>-><target>"``).
        bounds: add the single-atlas-mean and oracle rows.
        plots: draw the figures.
        overlay_method: the method ranking the overlay cases.
        batch_size: atlases per network call.
        progress: show a progress bar over the targets.

    Returns:
        :class:`EvaluationReport`; its table holds the Dice, HD95, timing and Jacobian blocks.

    Raises:
        AtlasSetError: no held-out target or no atlas; an original file is missing.
        ModelError: a network does not fit the space.
        CmmasError: an unknown method.
    """
    from tqdm import tqdm

    from cmmas.atlas_set import AtlasSet
    from cmmas.similarity import channel_codes

    space = space if isinstance(space, AtlasSet) else AtlasSet(space)
    for method in methods:
        resolve(method, options)
    targets = space.ids(target_modality, role="test", labelled=True)
    atlases = space.ids(atlas_modality, role="train", labelled=True)
    if not targets:
        raise AtlasSetError(space.root, f"no labelled held-out {target_modality} target (role 'test') to evaluate")
    if not atlases:
        raise AtlasSetError(space.root, f"no labelled {atlas_modality} atlas (role 'train')")
    direction = direction or direction_name(atlas_modality, target_modality)
    evaluated = [AFFINE_MV, *methods] + ([SIMNET] if fusion_model is not None else [])
    if overlay_method is not None and overlay_method not in evaluated:
        raise CmmasError(None, f"overlay method {overlay_method!r} is not evaluated (evaluated: {', '.join(evaluated)})")
    nets = _load_networks(space, reg_model, fusion_model)
    codes = channel_codes(space.labels)
    atlas_images, atlas_labels = space.arrays(atlases)
    _warm_up(nets, atlas_images, atlas_labels, space.image(targets[0]).array, codes, methods, options, batch_size)
    out = Path(out_dir)
    rows, timings, jacobians, sources = [], [], [], {}
    for target_id in tqdm(targets, desc=f"evaluate {direction}", unit="target", disable=not progress):
        keep = [k for k, a in enumerate(atlases) if a != target_id]
        if not keep:
            raise AtlasSetError(space.root, f"no atlas left for target {target_id!r}")
        result = _evaluate_target(space, target_id, atlas_images[keep], atlas_labels[keep], nets, codes, methods, options,
                                  direction, bounds, batch_size, out / target_id)
        rows += result.rows
        timings += result.timings
        jacobians.append(result.jacobian)
        sources[(direction, target_id)] = _overlay_loader(space, target_id, result.paths)
    report = write_report(rows, out, timings, extra={"jacobian": summarize_jacobian(jacobians), "notes": SPACE_NOTES})
    jacobian_csv = atomic_write_text(out / "jacobian.csv", _csv(jacobians, JACOBIAN_COLUMNS))
    figures: list[Path] = []
    if plots:
        ranked_by = overlay_method or (SIMNET if nets.simnet is not None else methods[0] if methods else AFFINE_MV)
        figures = write_figures(rows, out, sources, ranked_by)
    return _extended(report, jacobian_csv, figures)


def _extended(report: Report, jacobian_csv: Path | None, figures: Sequence[Path]) -> EvaluationReport:
    return EvaluationReport(report.results_csv, report.summary_json, report.timings_csv, report.table,
                            jacobian_csv, tuple(figures))


# ----------------------------------------------------------------------------- a whole run


def aggregate(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, plots: bool = True) -> EvaluationReport:
    """Concatenate the reports of every fold and direction of a run and summarise them.

    Reads ``RUN/*/fold*/eval/results.csv`` (and the ``timings.csv`` and ``jacobian.csv``
    beside each, when present), in natural order, and writes to ``out_dir`` (default ``RUN``)
    ``results.csv``, ``timings.csv``, ``jacobian.csv``, ``summary.json`` (with a ``"sources"``
    entry listing the files read) and, with ``plots``, box plots per direction.

    Raises:
        CmmasError: no results file under ``run_dir``.
    """
    from cmmas.datasets.base import natural_key

    run = Path(run_dir)
    found = sorted(run.glob("*/fold*/eval/results.csv"), key=lambda p: natural_key(str(p.relative_to(run))))
    if not found:
        raise CmmasError(run, "no */fold*/eval/results.csv under it: evaluate the folds first")
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
    jacobian_csv = atomic_write_text(out / "jacobian.csv", _csv(jacobians, JACOBIAN_COLUMNS)) if jacobians else None
    return _extended(report, jacobian_csv, write_figures(rows, out) if plots else [])
