"""Tables and files of an evaluation: summaries over cases, Markdown tables, ``results.csv``,
``timings.csv``, ``jacobian.csv`` and ``summary.json``, and reading them back."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cmmas.errors import CmmasError
from cmmas.evaluate.scoring import COLUMNS, METRICS
from cmmas.io import atomic_write_text

if TYPE_CHECKING:
    pass


logger = logging.getLogger(__name__)

#: Columns of ``timings.csv``: step is "registration" (method: the registration kind) or "fusion".
TIMING_COLUMNS = ("case", "direction", "step", "method", "seconds")

#: Columns of ``jacobian.csv``: one row per target, statistics of its atlas -> target fields
#: (:func:`cmmas.metrics.jacobian_stats`): the mean over atlases of the folding percentage and
#: of the std of log det J, the smallest and the largest det J of any atlas.
JACOBIAN_COLUMNS = ("case", "direction", "n_atlases", "folding_percent", "std_log_jac", "min_det", "max_det")


@dataclasses.dataclass(frozen=True)
class Report:
    """Files written by :func:`write_report` and the table to print."""

    results_csv: Path
    summary_json: Path
    timings_csv: Path | None
    table: str


def _stats(values: Iterable[float]) -> dict:
    """mean, sample std (0 for one value), median, min, max, n (finite values) and n_missing (nan)."""
    values = np.asarray(list(values), dtype=np.float64)
    finite = values[np.isfinite(values)]
    if not finite.size:
        return {"mean": None, "std": None, "median": None, "min": None, "max": None, "n": 0,
                "n_missing": int(values.size)}
    return {
        "mean": float(finite.mean()),
        "std": float(finite.std(ddof=1)) if finite.size > 1 else 0.0,
        "median": float(np.median(finite)),
        "min": float(finite.min()),
        "max": float(finite.max()),
        "n": int(finite.size),
        "n_missing": int(values.size - finite.size),
    }


def _ordered(values: Iterable) -> list:
    return list(dict.fromkeys(values))


def summarize(rows: Sequence[dict], timings: Sequence[dict] = ()) -> dict:
    """The content of ``summary.json``.

    ``metrics[direction][method][structure][metric]`` and ``metrics[...][method]["mean"][metric]``
    (the per-case mean over structures) hold ``{mean, std, median, min, max, n, n_missing}`` over cases;
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
    """Markdown tables from :func:`summarize`: Dice, HD95 and ASSD (method rows x structure columns), seconds.

    A cell reads ``mean ± std`` over cases; ``(k/n)`` marks distances defined in only k of n
    cases (a structure missing from the prediction). The Dice table's last column is the worst
    target: the lowest per-case mean Dice over structures.
    """
    blocks = []
    for direction, methods in summary["metrics"].items():
        n = summary["n_cases"][direction]
        for metric, title, digits in (("dice", "Dice", 3), ("hd95", "HD95 (mm)", 1), ("assd", "ASSD (mm)", 1)):
            structures = _ordered(s for entry in methods.values() for s in entry)
            header = f"**{direction} — {title}, mean ± std over {n} target(s)**\n\n"
            worst = ["worst target"] if metric == "dice" else []
            columns = structures + worst
            lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
            for method, entry in methods.items():
                cells = [_cell(entry[s][metric], digits) if s in entry else "" for s in structures]
                if worst:
                    low = entry["mean"][metric].get("min")
                    cells.append("n/a" if low is None else f"{low:.{digits}f}")
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


def to_csv(records: Sequence[dict], columns: Sequence[str]) -> str:
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
    results = atomic_write_text(out / "results.csv", to_csv(rows, COLUMNS))
    summary = summarize(rows, timings)
    clash = sorted(set(extra or {}) & set(summary))
    if clash:
        raise CmmasError(out_dir, f"extra summary entries {clash} clash with the summary's own")
    summary.update(extra or {})
    summary_path = atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    timings_path = atomic_write_text(out / "timings.csv", to_csv(timings, TIMING_COLUMNS)) if timings else None
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


@dataclasses.dataclass(frozen=True)
class EvaluationReport(Report):
    """:class:`Report` of :func:`evaluate_atlas_set` and :func:`aggregate`.

    Attributes:
        jacobian_csv: ``jacobian.csv`` (None when no field statistics were found).
        figures: the PNG files written.
    """

    jacobian_csv: Path | None
    figures: tuple[Path, ...]


def extended_report(report: Report, jacobian_csv: Path | None, figures: Sequence[Path]) -> EvaluationReport:
    return EvaluationReport(report.results_csv, report.summary_json, report.timings_csv, report.table,
                            jacobian_csv, tuple(figures))
