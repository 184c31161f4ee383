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
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cmmas.errors import CmmasError, GeometryError
from cmmas.io import atomic_write_text

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
    from cmmas.metrics import evaluate_labels

    rows = evaluate_labels(np.asarray(prediction), np.asarray(truth), labels, spacing_zyx)
    return [_row(r, case, direction, method, seconds) for r in rows]


def _row(metrics: dict, case: str, direction: str, method: str, seconds: float) -> dict:
    row = {"case": case, "direction": direction, "method": method, "seconds": float(seconds)}
    row.update(metrics)
    return {c: row[c] for c in COLUMNS}


def oracle_label(atlas_labels: np.ndarray, truth: np.ndarray, majority: np.ndarray) -> np.ndarray:
    """The truth where any atlas holds it, ``majority`` elsewhere (``[D, H, W]``)."""
    atlas_labels, truth = np.asarray(atlas_labels), np.asarray(truth)
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
    from cmmas.metrics import evaluate_labels

    atlas_labels = np.asarray(atlas_labels)
    if majority is None:
        majority = fuse_all(atlas_labels, labels, methods=("mv",))["mv"].label
    per_atlas = [evaluate_labels(a, truth, labels, spacing_zyx) for a in atlas_labels]
    rows = []
    for k, first in enumerate(per_atlas[0]):
        mean = dict(first)
        for key in METRICS + ("volume_pred_ml",):
            values = np.asarray([atlas[k][key] for atlas in per_atlas], dtype=np.float64)
            mean[key] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        rows.append(_row(mean, case, direction, SINGLE_ATLAS, float("nan")))
    oracle = oracle_label(atlas_labels, truth, majority)
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


def write_report(rows: Sequence[dict], out_dir: str | os.PathLike, timings: Sequence[dict] = ()) -> Report:
    """Write ``results.csv``, ``summary.json`` and (with timings) ``timings.csv`` atomically.

    Args:
        rows: score rows (columns :data:`COLUMNS`; empty distances are written as empty cells).
        out_dir: folder, created if needed.
        timings: records with :data:`TIMING_COLUMNS`.

    Returns:
        :class:`Report` with the paths and the Markdown table (:func:`format_table`).

    Raises:
        CmmasError: no rows, or a row lacks a column.
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
    summary_path = atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    timings_path = atomic_write_text(out / "timings.csv", _csv(timings, TIMING_COLUMNS)) if timings else None
    return Report(results, summary_path, timings_path, format_table(summary))


def read_results(path: str | os.PathLike) -> list[dict]:
    """Read ``results.csv`` back into rows (numbers as float, empty cells as nan, label as int)."""
    path = Path(path)
    if not path.is_file():
        raise CmmasError(path, "results file not found")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise CmmasError(path, f"not a results.csv: columns {missing} are missing")
        rows = []
        for raw in reader:
            row = dict(raw)
            row["label"] = int(row["label"])
            for c in METRICS + ("seconds", "volume_pred_ml", "volume_true_ml"):
                row[c] = float(row[c]) if row[c] != "" else float("nan")
            rows.append(row)
    return rows
