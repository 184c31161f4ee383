"""The generated tables of docs/results.md and the README: Markdown from the runs' JSON records.

Every table is built from records under ``runs/`` (an evaluation's ``summary.json``, a bench's
JSON) and sits between markers in its page::

    <!-- results:NAME -->
    ...generated...
    <!-- /results:NAME -->

Each table says where its numbers came from: the commit and command recorded in the record's
provenance (:mod:`cmmas.provenance`; an evaluation's ``summary.json["provenance"]["command"]``, a
bench's top-level ``"command"``), and whether that code still stands: *current* when no file under
:data:`WATCHED` changed between that commit and HEAD, *code changed since* otherwise. A table
whose records are absent reads "not run at this commit".

The renderers are pure functions of the records (and of a ``changed(commit) -> bool | None``
callable); only :func:`load_records`, :func:`code_changed` and the script touch the disk or git.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from cmmas.errors import CmmasError

#: Paths whose change between a run's commit and HEAD makes its table stale.
WATCHED = ("src", "experiments", "bench", "Makefile")

#: The evaluations of ``make reproduce-abdomen`` fold 1, per direction (relative to ``runs/``).
CHAIN = {"ct->mr": "abdomen/ct2mr/fold1/eval/summary.json", "mr->ct": "abdomen/mr2ct/fold1/eval/summary.json"}
#: The bench records (relative to ``runs/``).
BENCH = {"bench_mas": "bench_mas/bench_mas.json", "bench_alignment": "bench_alignment/bench_alignment.json",
         "bench_accuracy": "bench_accuracy/bench_accuracy.json", "bench_training": "bench_training/bench_training.json",
         "bench_cohort": "bench_cohort/bench_cohort.json",
         "bench_cohort_abdomen": "bench_cohort_abdomen/bench_cohort.json",
         "bench_alignment_organs": "bench_alignment_organs/bench_alignment.json"}
#: The contrast-agnostic comparison (#32): reproduce-abdomen's settings, each its own run folder.
SETTINGS = {"today": "abdomen", "labelmix": "abdomen-labelmix", "zero": "abdomen-zero"}
#: Fusions of the contrast-agnostic table.
SETTING_METHODS = ("jlf_tf", "simnet")
#: The training-precision check (#35): the chain's BiRegNet and SimNet in float32 (two seeds: the
#: spread between trainings) and with bfloat16 convolutions, same steps, each its own run folder.
PRECISION_RUNS = {"float32, seed 0": "abdomen", "float32, seed 1": "abdomen-seed1",
                  "mixed_bfloat16, seed 0": "abdomen-bf16"}
#: DLF's training pairs (#34): warped by the chain's BiRegNet (its own training targets) or by
#: cross-fitted BiRegNets (``CROSSFIT=2``), the U-Net beside them (the same network in both runs).
CROSSFIT_RUNS = {"the chain's BiRegNet": "abdomen", "cross-fitted (2 folds)": "abdomen-crossfit"}
CROSSFIT_METHODS = ("dlf", "unet")
#: DLF's ablation (#34): the chain's DLF, its weighted-voting subnet alone (``--nofine_tune``) and
#: its fine-tuning subnet without the atlases' label mask (``--nomask``), on the same pairs.
ABLATION_RUNS = {"DLF": "abdomen", "voting subnet only": "abdomen-dlf-vote",
                 "fine-tuning without the mask": "abdomen-dlf-nomask"}
ABLATION_METHODS = ("dlf",)
#: The labelled-scan curve (DLF issue): ``make reproduce-abdomen LABELLED=K`` leaves its evaluations
#: under ``runs/abdomen-labelledK``, ``SETTING=zero`` (no labelled scan) under ``runs/abdomen-zero``;
#: "all" is the full chain's (:data:`CHAIN`).
LABELLED_COUNTS = (0, 2, 4, "all")
#: The curve's figure under its table (written by experiments/make_results.py, relative to docs/).
LABELLED_FIGURE = "![Mean (solid) and worst-target (dashed) Dice against the labelled scans](figures/labelled_curve.png)"
#: Methods compared on the labelled curve, in its column order.
CURVE_METHODS = ("unet", "jlf_tf", "dlf")
#: The organ finders' own scores (#33), per (direction, training): a finder trained on the atlas
#: modality only (fold 1), scored on the fold's targets (relative to ``runs/``); the chain's 1,200
#: steps and ``experiments/configs/abdomen-finder-long``'s 3,000.
FINDER = {("ct->mr", "1,200 steps"): "finder/ct/fold1/eval_mr/evaluate_finder.json",
          ("mr->ct", "1,200 steps"): "finder/mr/fold1/eval_ct/evaluate_finder.json",
          ("ct->mr", "3,000 steps"): "abdomen-finder-long/ct2mr/fold1/finder/eval_mr/evaluate_finder.json",
          ("mr->ct", "3,000 steps"): "abdomen-finder-long/mr2ct/fold1/finder/eval_ct/evaluate_finder.json"}
#: The QC benchmark (#33): fold 1's targets aligned anew as `cmmas segment` aligns them, by mutual
#: information or by the organs the finder found, the finder's agreement with each segmentation
#: recorded (``experiments/evaluate.py --realign --finder_model ... --align_seed S``), per
#: (direction, alignment, alignment seed); "registered": ``--organ_registration`` (the found organs'
#: registration alone); "long finder": the organs of abdomen-finder-long's finder.
ORGAN_QC_SEEDS = (0, 1, 2)
ORGAN_QC = {(direction, name, seed): f"{run}/{folder}/fold1/eval_{variant}_seed{seed}/summary.json"
            for direction, folder in (("ct->mr", "ct2mr"), ("mr->ct", "mr2ct"))
            for name, run, variant in (("mutual information", "abdomen", "realign"), ("organs", "abdomen", "organs"),
                                       ("organs registered", "abdomen", "organreg"),
                                       ("organs, long finder", "abdomen-finder-long", "organs"),
                                       ("organs registered, long finder", "abdomen-finder-long", "organreg"))
            for seed in ORGAN_QC_SEEDS}
#: The fusion whose labels the QC table scores (cmmas segment's default) and the thresholds of the
#: finder's agreement it tries; a target is bad below the first bound, good above the second.
QC_METHOD = "jlf_tf"
QC_THRESHOLDS = (0.3, 0.4, 0.5, 0.6)
QC_BOUNDS = (0.5, 0.7)
#: Methods of the README's headline table, in its row order (those present are shown).
HEADLINE_METHODS = ("affine+mv", "mv", "staple", "lwv", "jlf", "jlf_tf", "simnet", "dlf", "unet")
#: Alignment methods of bench_alignment in their table order.
ALIGNMENT_METHODS = ("single", "robust", "robust_mt", "robust_atlas", "organs", "organs_registered")

NOT_RUN = "not run at this commit"

#: ``changed(commit)``: True when watched code changed since ``commit``, None when unknown.
Changed = Callable[[str], "bool | None"]


@dataclasses.dataclass(frozen=True)
class Record:
    """One JSON record of ``runs/`` and where it lies (``path`` relative to ``runs/``)."""

    path: str
    data: dict

    @property
    def commit(self) -> str | None:
        return ((self.data.get("provenance") or {}).get("code") or {}).get("commit")

    @property
    def dirty(self) -> bool:
        return bool(((self.data.get("provenance") or {}).get("code") or {}).get("dirty"))

    @property
    def command(self) -> str | None:
        return self.data.get("command") or (self.data.get("provenance") or {}).get("command")


def load_records(runs: str | os.PathLike, paths: Sequence[str]) -> dict[str, Record]:
    """path -> :class:`Record` of each of ``paths`` (relative to ``runs``) that exists.

    Raises:
        CmmasError: a file that is not JSON (naming it).
    """
    out = {}
    for rel in paths:
        path = Path(runs) / rel
        if not path.is_file():
            continue
        try:
            out[rel] = Record(rel, json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CmmasError(path, f"not a JSON record: {err}") from None
    return out


def code_changed(commit: str, repo: str | os.PathLike = ".") -> bool | None:
    """Whether a file of :data:`WATCHED` differs between ``commit`` and HEAD (``git diff
    --quiet``); None when git cannot tell (not a checkout, unknown commit)."""
    try:
        done = subprocess.run(["git", "-C", str(repo), "diff", "--quiet", commit, "HEAD", "--", *WATCHED],
                              capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return {0: False, 1: True}.get(done.returncode)


def source_line(records: Sequence[Record], missing: Sequence[str], changed: Changed) -> str:
    """The italic line under a table's markers: per record its file, commit, state and command."""
    parts = []
    for record in records:
        if record.commit is None:
            version = (((record.data.get("provenance") or {}).get("code") or {}).get("version"))
            state = f"installed version {version}, no commit recorded" if version else "no commit recorded"
        else:
            short = record.commit[:10]
            stale = changed(record.commit)
            state = (f"commit {short} (current)" if stale is False else
                     f"from commit {short} (code changed since)" if stale else
                     f"from commit {short} (not in this history)")
            state += ", dirty tree" if record.dirty else ""
        command = f"; command: `{record.command}`" if record.command else "; command not recorded"
        parts.append(f"`runs/{record.path}`: {state}{command}")
    parts += [f"`runs/{path}`: {NOT_RUN}" for path in missing]
    return "_" + "<br>".join(parts) + "_"


def _mean_min(stats: Mapping | None) -> tuple[float | None, float | None]:
    if not stats or not stats.get("n"):
        return None, None
    return stats["mean"], stats["min"]


def _f(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _span(values: Sequence[float], digits: int = 1) -> str:
    low, high = min(values), max(values)
    return f"{low:.{digits}f}" if f"{low:.{digits}f}" == f"{high:.{digits}f}" else f"{low:.{digits}f}-{high:.{digits}f}"


def _cases(summary: Mapping, direction: str) -> int:
    return int((summary.get("n_cases") or {}).get(direction, 0))


def headline_table(chain: Mapping[str, Mapping], bench_mas: Mapping | None) -> str:
    """README's table: per direction, mean Dice (worst target) of each method of
    :data:`HEADLINE_METHODS` present, then seconds per scan of each pipeline and fusion of
    bench_mas (the range over its targets of that direction).

    Args:
        chain: direction (``"ct->mr"``) -> that evaluation's ``summary.json`` (absent directions
            left out).
        bench_mas: bench_mas.json (``rows`` with direction, pipeline, fusion, seconds), or None.
    """
    directions = list(CHAIN)
    head = ["| |"] + [f" {d.upper().replace('->', ' -> ')} ({_cases(chain[d], d)} targets) |" if d in chain
                      else f" {d.upper().replace('->', ' -> ')} |" for d in directions]
    lines = ["".join(head), "|---" * (len(directions) + 1) + "|"]
    present = [m for m in HEADLINE_METHODS if any(m in chain[d]["metrics"].get(d, {}) for d in chain)]
    for method in present:
        cells = []
        for d in directions:
            entry = chain[d]["metrics"].get(d, {}).get(method) if d in chain else None
            mean, worst = _mean_min(entry["mean"]["dice"]) if entry else (None, None)
            cells.append(NOT_RUN if d not in chain else "" if entry is None else f"{_f(mean)} (worst {_f(worst)})")
        lines.append(f"| {method}: mean Dice (worst target) | " + " | ".join(cells) + " |")
    rows = (bench_mas or {}).get("rows") or []
    for pipeline, fusion in dict.fromkeys((r["pipeline"], r["fusion"]) for r in rows):
        cells = []
        for d in directions:
            seconds = {r["target"]: r["seconds"] for r in rows
                       if (r["pipeline"], r["fusion"], r["direction"]) == (pipeline, fusion, d)}
            n = len(seconds)
            cells.append(f"{_span(list(seconds.values()))} ({n} target{'s' * (n != 1)})" if seconds else "")
        lines.append(f"| {pipeline} {fusion}: seconds per scan | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chain_table(summary: Mapping, direction: str) -> str:
    """One direction of an evaluation: per method, Dice per structure (mean ± std over targets),
    mean Dice, worst target (lowest per-target mean Dice) and mean HD95 (mm)."""
    methods = summary["metrics"][direction]
    structures = list(dict.fromkeys(s for entry in methods.values() for s in entry if s != "mean"))
    lines = ["| method | " + " | ".join(structures) + " | mean Dice | worst target | mean HD95 (mm) |",
             "|---" * (len(structures) + 4) + "|"]
    for method, entry in methods.items():
        cells = []
        for s in structures:
            stats = (entry.get(s) or {}).get("dice")
            cells.append(f"{_f(stats['mean'])} ± {_f(stats['std'])}" if stats and stats.get("n") else "n/a")
        mean, worst = _mean_min(entry["mean"]["dice"])
        hd95, _ = _mean_min(entry["mean"].get("hd95"))
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {_f(mean)} | {_f(worst)} | {_f(hd95, 1)} |")
    return "\n".join(lines)


def bench_mas_table(record: Mapping) -> str:
    """bench_mas.json's rows (one per target x pipeline x fusion x organ) as one line per target,
    pipeline and fusion: seconds, peak MB, Dice per organ and their mean."""
    rows = record["rows"]
    organs = list(dict.fromkeys(r["name"] for r in rows))
    lines = ["| target | direction | pipeline | fusion | seconds | peak MB | " + " | ".join(organs) + " | mean |",
             "|---" * (len(organs) + 7) + "|"]
    for key in dict.fromkeys((r["target"], r["direction"], r["pipeline"], r["fusion"]) for r in rows):
        mine = [r for r in rows if (r["target"], r["direction"], r["pipeline"], r["fusion"]) == key]
        dice = {r["name"]: r["dice"] for r in mine}
        cells = " | ".join(_f(dice.get(o)) for o in organs)
        lines.append(f"| {' | '.join(key)} | {mine[0]['seconds']:.1f} | {mine[0]['peak_mb']:.0f} | {cells} | "
                     f"{_f(float(np.mean(list(dice.values()))))} |")
    return "\n".join(lines)


def alignment_table(rows: Sequence[Mapping], collapse: float = 0.3) -> str:
    """bench_alignment's summary per direction and method over its calls (rows: method, direction,
    target, call, mean, seconds, qc.flagged, label_md5, fov_dice for the blanked calls)."""
    lines = ["| direction | method | mean Dice | worst call | collapses (< %.2f) | targets worst < median - 0.05 "
             "| largest spread between repeats | identical repeats | s / alignment, median (max) | FOV lowest organ "
             "Dice, mean (worst) | QC flags: collapsed / good |" % collapse,
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {m: k for k, m in enumerate(ALIGNMENT_METHODS)}
    keys = sorted({(r["direction"], r["method"]) for r in rows}, key=lambda k: (k[0], order.get(k[1], len(order))))
    for direction, method in keys:
        mine = [r for r in rows if r["direction"] == direction and r["method"] == method]
        targets = sorted({r["target"] for r in mine})
        per_target = {t: [r for r in mine if r["target"] == t] for t in targets}
        means = [np.mean([r["mean"] for r in rs]) for rs in per_target.values()]
        worst = min(mine, key=lambda r: r["mean"])
        collapsed = [r for r in mine if r["mean"] < collapse]
        good = [r for r in mine if r["mean"] >= collapse]
        unstable = sum(min(r["mean"] for r in rs) < np.median([r["mean"] for r in rs]) - 0.05
                       for rs in per_target.values())
        repeats = {t: [r for r in rs if r["call"].startswith("repeat")] or rs for t, rs in per_target.items()}
        spread = max(max(r["mean"] for r in rs) - min(r["mean"] for r in rs) for rs in repeats.values())
        identical = sum(len({r["label_md5"] for r in rs}) == 1 for rs in repeats.values())
        seconds = [r["seconds"] for r in mine]
        fov = [min(r["fov_dice"].values()) for r in mine if r.get("fov_dice")]
        fov_text = f"{np.mean(fov):.3f} ({min(fov):.3f})" if fov else "-"
        flagged_bad = sum(r["qc"]["flagged"] for r in collapsed)
        flagged_good = sum(r["qc"]["flagged"] for r in good)
        lines.append(
            f"| {direction} | {method} | {np.mean(means):.3f} | {worst['mean']:.3f} ({worst['target']} "
            f"{worst['call']}) | {len(collapsed)} of {len(mine)} | {unstable} of {len(targets)} | {spread:.3f} | "
            f"{identical} of {len(targets)} | {np.median(seconds):.2f} ({max(seconds):.2f}) | {fov_text} | "
            f"{flagged_bad} of {len(collapsed)} / {flagged_good} of {len(good)} |")
    return "\n".join(lines)


def accuracy_table(rows: Sequence[Mapping]) -> str:
    """bench_accuracy's rows (case, direction, method, name, dice, fuse_s, refine_s,
    folding_after) per direction/fold: per variant, Dice per organ (mean over targets), their mean,
    the worst target, seconds of refinement and fusion (x jlf_tf's) and folding %."""
    blocks = []
    for direction in dict.fromkeys(r["direction"] for r in rows):
        part = [r for r in rows if r["direction"] == direction]
        organs = list(dict.fromkeys(r["name"] for r in part))
        cases = list(dict.fromkeys(r["case"] for r in part))
        base = [r["fuse_s"] for r in part if r["method"] == "jlf_tf"]
        lines = [f"**{direction} ({len(cases)} targets)**", "",
                 "| variant | " + " | ".join(organs) + " | mean | worst target | refine s | fuse s (x jlf_tf) | "
                 "folding % |", "|---" * (len(organs) + 6) + "|"]
        for method in dict.fromkeys(r["method"] for r in part):
            sub = [r for r in part if r["method"] == method]
            dice = [float(np.mean([r["dice"] for r in sub if r["name"] == o])) for o in organs]
            worst = min(float(np.mean([r["dice"] for r in sub if r["case"] == c])) for c in cases)
            fuse = float(np.mean([r["fuse_s"] for r in sub]))
            ratio = f" ({fuse / np.mean(base):.1f}x)" if base else ""
            lines.append(f"| {method} | " + " | ".join(f"{d:.3f}" for d in dice) + f" | {np.mean(dice):.3f} | "
                         f"{worst:.3f} | {np.mean([r['refine_s'] for r in sub]):.1f} | {fuse:.2f}{ratio} | "
                         f"{np.mean([r['folding_after'] for r in sub]):.2f} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def labelled_paths() -> dict[tuple[str, int | str], str]:
    """(direction, labelled count) -> the evaluation summary of that run, relative to ``runs/``."""
    out = {}
    for direction, path in CHAIN.items():
        for count in LABELLED_COUNTS:
            run = {"all": "abdomen", 0: "abdomen-zero"}.get(count, f"abdomen-labelled{count}")
            out[(direction, count)] = path.replace("abdomen/", f"{run}/", 1)
    return out


def labelled_points(summaries: Mapping[tuple[str, int | str], Mapping]
                    ) -> dict[str, dict[str, list[tuple[int | str, float, float]]]]:
    """direction -> method -> ``[(labelled count, mean Dice, worst target's mean Dice), ...]`` in
    :data:`LABELLED_COUNTS` order, for the methods of :data:`CURVE_METHODS` each summary holds.

    Args:
        summaries: (direction, count) -> that run's ``summary.json`` (absent runs left out).
    """
    out: dict[str, dict[str, list]] = {}
    for (direction, count), summary in sorted(summaries.items(), key=lambda kv: (
            list(CHAIN).index(kv[0][0]), LABELLED_COUNTS.index(kv[0][1]))):
        methods = summary.get("metrics", {}).get(direction, {})
        for method in CURVE_METHODS:
            mean, worst = _mean_min(((methods.get(method) or {}).get("mean") or {}).get("dice"))
            if mean is not None:
                out.setdefault(direction, {}).setdefault(method, []).append((count, mean, worst))
    return out


def labelled_table(points: Mapping[str, Mapping[str, Sequence[tuple]]]) -> str:
    """The curve as a table: per direction and labelled count, mean Dice (worst target) of each
    method of :data:`CURVE_METHODS` (:func:`labelled_points`' output)."""
    lines = ["| direction | labelled target-modality training scans | "
             + " | ".join(f"{m}: mean Dice (worst target)" for m in CURVE_METHODS) + " |",
             "|---" * (len(CURVE_METHODS) + 2) + "|"]
    for direction, methods in points.items():
        for count in LABELLED_COUNTS:
            cells = []
            for method in CURVE_METHODS:
                found = [(mean, worst) for c, mean, worst in methods.get(method, ()) if c == count]
                cells.append(f"{_f(found[0][0])} (worst {_f(found[0][1])})" if found else "")
            if any(cells):
                lines.append(f"| {direction.upper().replace('->', ' -> ')} | {count} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def settings_paths(settings: Mapping[str, str] = SETTINGS) -> dict[tuple[str, str], str]:
    """(setting, direction) -> that run's fold-1 evaluation summary, relative to ``runs/``
    (``settings``: name -> run folder, :data:`SETTINGS` or :data:`PRECISION_RUNS`)."""
    return {(name, direction): path.replace("abdomen/", f"{run}/", 1)
            for name, run in settings.items() for direction, path in CHAIN.items()}


def settings_table(summaries: Mapping[tuple[str, str], Mapping], settings: Mapping[str, str] = SETTINGS,
                   methods: Sequence[str] = SETTING_METHODS) -> str:
    """Per direction, setting (of ``settings``, in its order) and fusion of ``methods``: Dice per
    organ (mean over targets), mean Dice and worst target, from each setting's evaluation summary."""
    lines = []
    for direction in CHAIN:
        present = [(name, summaries[(name, direction)]) for name in settings if (name, direction) in summaries]
        if not present:
            continue
        organs = list(dict.fromkeys(o for _, summary in present for entry in summary["metrics"][direction].values()
                                    for o in entry if o != "mean"))
        lines += [f"**{direction.upper().replace('->', ' -> ')}**", "",
                  "| setting | fusion | " + " | ".join(organs) + " | mean Dice | worst target |",
                  "|---" * (len(organs) + 4) + "|"]
        for name, summary in present:
            for method in methods:
                entry = summary["metrics"][direction].get(method)
                if entry is None:
                    continue
                cells = " | ".join(_f(((entry.get(o) or {}).get("dice") or {}).get("mean")) for o in organs)
                mean, worst = _mean_min(entry["mean"]["dice"])
                lines.append(f"| {name} | {method} | {cells} | {_f(mean)} | {_f(worst)} |")
        lines.append("")
    return "\n".join(lines).strip()


def finder_table(records: Mapping[tuple[str, str], Sequence[Mapping]]) -> str:
    """Per (direction, training): the finder's Dice per organ (mean over the targets), mean and worst target."""
    lines = []
    for (direction, training), rows in records.items():
        organs = [k for k in rows[0] if k not in ("case", "mean", "seconds")]
        if not lines:
            lines = ["| direction | training | targets | " + " | ".join(organs) + " | mean Dice | worst target | "
                     "s / scan |", "|---" * (len(organs) + 6) + "|"]
        cells = " | ".join(_f(sum(r[o] for r in rows) / len(rows)) for o in organs)
        means = [r["mean"] for r in rows]
        lines.append(f"| {direction} | {training} | {len(rows)} | {cells} | {_f(sum(means) / len(means))} | "
                     f"{_f(min(means))} | {sorted(r['seconds'] for r in rows)[len(rows) // 2]:.2f} |")
    return "\n".join(lines)


def _flag_counts(items: Sequence[tuple[float, bool]], bounds: tuple[float, float] = QC_BOUNDS) -> str:
    """"k of n / k of n": how many of the bad (Dice below ``bounds[0]``) and of the good (above
    ``bounds[1]``) ``(dice, flagged)`` items are flagged."""
    bad = [flag for dice, flag in items if dice < bounds[0]]
    good = [flag for dice, flag in items if dice > bounds[1]]
    return f"{sum(bad)} of {len(bad)} / {sum(good)} of {len(good)}"


def qc_table(records: Mapping[tuple[str, str], Sequence[Sequence[Mapping]]], method: str = QC_METHOD,
             thresholds: Sequence[float] = QC_THRESHOLDS) -> str:
    """The QC's separation from evaluations' ``"qc"`` records, per (direction, alignment), each a
    list of calls (one evaluation's records each, e.g. one per alignment seed): the targets' Dice
    with ``method`` over every call (mean, worst call, calls below 0.3, the largest spread of a
    target's Dice between calls), how many bad / good target calls the alignment's flag, the QC
    flag (the alignment's or a doubtful organ) and a threshold on the finder's lowest organ
    agreement flag; then per alignment, every organ of both directions pooled, how many bad / good
    organs each threshold of the organ's own agreement calls doubtful."""
    head = " | ".join(f"lowest agreement < {t:g}" for t in thresholds)
    lines = [f"| direction | alignment | targets x calls | mean Dice | worst call | below 0.3 | largest spread | "
             f"alignment flag | QC flag | {head} |", "|---" * (9 + len(thresholds)) + "|"]
    organs: dict[str, list[tuple[float, float]]] = {}
    for (direction, alignment), calls in records.items():
        mine = [r for rows in calls for r in rows if r["method"] == method]
        if not mine:
            continue
        means = [float(np.mean(list(r["dice"].values()))) for r in mine]
        by_target: dict[str, list[float]] = {}
        for r, m in zip(mine, means):
            by_target.setdefault(r["case"], []).append(m)
        spread = max(max(v) - min(v) for v in by_target.values())
        lowest = [min((v for v in (r["agreement"] or {}).values() if v is not None), default=0.0) for r in mine]
        organs.setdefault(alignment, []).extend(
            (r["dice"][name], value) for r in mine for name, value in (r["agreement"] or {}).items()
            if value is not None and name in r["dice"])
        cells = " | ".join(_flag_counts([(m, a < t) for m, a in zip(means, lowest)]) for t in thresholds)
        lines.append(f"| {direction} | {alignment} | {len(by_target)} x {len(calls)} | {_f(float(np.mean(means)))} | "
                     f"{_f(min(means))} | {sum(m < 0.3 for m in means)} | {_f(spread)} | "
                     f"{_flag_counts([(m, r['alignment_flagged']) for m, r in zip(means, mine)])} | "
                     f"{_flag_counts([(m, r['flagged']) for m, r in zip(means, mine)])} | {cells} |")
    lines += ["", f"| alignment | organs (pooled) | {' | '.join(f'agreement < {t:g}' for t in thresholds)} |",
              "|---" * (2 + len(thresholds)) + "|"]
    lines += [f"| {alignment} | {len(pairs)} | " + " | ".join(_flag_counts([(d, a < t) for d, a in pairs])
                                                             for t in thresholds) + " |"
              for alignment, pairs in organs.items()]
    return "\n".join(lines)


def training_table(rows: Sequence[Mapping]) -> str:
    """bench_training's rows: seconds and steps per second per variant and trunk precision (float32
    in the runs that predate the precision), the ratio to the run's first row, the speed-up over the
    same variant's first precision and the shares of the step."""
    lines = ["| variant | precision | s / step | steps / s | x first | speed-up | augment | forward | backward | rest "
             "| data s / batch |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        data = f"{r['data_s']:.3f}" if r.get("data_s") is not None else "-"
        speedup = f"{r['speedup']:.2f}" if r.get("speedup") is not None else "-"
        lines.append(f"| {r['variant']} | {r.get('precision', 'float32')} | {r['step_s']:.3f} | {r['steps_per_s']:.2f} "
                     f"| {r['ratio']:.2f} | {speedup} | {r['augment_share']:.0%} | {r['forward_share']:.0%} | "
                     f"{r['backward_share']:.0%} | {r['rest_share']:.0%} | {data} |")
    return "\n".join(lines)


def cohort_table(rows: Sequence[Mapping]) -> str:
    """bench_cohort's rows: per run, scans, wall seconds, scans per hour, ratio to the reference
    run and peak memory of its largest process."""
    lines = ["| run | scans | wall s | scans / hour | x reference | peak MB |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r.get("ratio") is not None else "-"
        lines.append(f"| {r['run']} | {r['scans']} | {r['wall_s']:.1f} | {r['scans_per_hour']:.0f} | {ratio} | "
                     f"{r['peak_mb']:.0f} |")
    return "\n".join(lines)


def _alignment_record_table(data: Mapping) -> str:
    """:func:`alignment_table` of a bench_alignment record, at the collapse threshold it ran with."""
    return alignment_table(data["rows"], float(((data.get("provenance") or {}).get("config") or {}).get("collapse", 0.3)))


def _block(records: Sequence[Record], missing: Sequence[str], changed: Changed, table: str | None) -> str:
    source = source_line(records, missing, changed)
    return source if not table else f"{source}\n\n{table}"


def render_tables(runs_records: Mapping[str, Record], changed: Changed) -> dict[str, str]:
    """name -> Markdown of every generated table (``headline``, ``chain``, ``settings``,
    ``labelled`` and one per bench of :data:`BENCH`), from the records :func:`load_records` found
    (keyed by their path relative to ``runs/``: :data:`CHAIN`, :func:`settings_paths`,
    :func:`labelled_paths` and :data:`BENCH`)."""
    chain_records = [runs_records[p] for p in CHAIN.values() if p in runs_records]
    chain_missing = [p for p in CHAIN.values() if p not in runs_records]
    chain = {d: runs_records[p].data for d, p in CHAIN.items() if p in runs_records}
    bench = {name: runs_records.get(path) for name, path in BENCH.items()}
    tables: dict[str, str] = {}

    headline_records = chain_records + ([bench["bench_mas"]] if bench["bench_mas"] else [])
    headline_missing = chain_missing + ([] if bench["bench_mas"] else [BENCH["bench_mas"]])
    tables["headline"] = _block(headline_records, headline_missing, changed,
                                headline_table(chain, bench["bench_mas"].data if bench["bench_mas"] else None)
                                if chain else None)

    parts = [f"**{d.upper().replace('->', ' -> ')}, {_cases(s, d)} targets**\n\n{chain_table(s, d)}"
             for d, s in chain.items() if d in s.get("metrics", {})]
    tables["chain"] = _block(chain_records, chain_missing, changed, "\n\n".join(parts) or None)

    for block, settings, methods in (("settings", SETTINGS, SETTING_METHODS),
                                     ("precision", PRECISION_RUNS, SETTING_METHODS),
                                     ("crossfit", CROSSFIT_RUNS, CROSSFIT_METHODS),
                                     ("ablation", ABLATION_RUNS, ABLATION_METHODS)):
        paths = settings_paths(settings)
        records = {key: runs_records[p] for key, p in paths.items() if p in runs_records}
        reference = next(iter(settings))
        tables[block] = _block(list(records.values()), [p for p in paths.values() if p not in runs_records], changed,
                               settings_table({k: r.data for k, r in records.items()}, settings, methods)
                               if any(p in runs_records for key, p in paths.items() if key[0] != reference) else None)

    curve = {key: path for key, path in labelled_paths().items() if key[1] != "all"}
    curve_records = [runs_records[p] for p in curve.values() if p in runs_records]
    points = labelled_points({key: runs_records[p].data for key, p in labelled_paths().items() if p in runs_records})
    tables["labelled"] = _block(chain_records + curve_records, chain_missing + [p for p in curve.values()
                                                                                if p not in runs_records],
                                changed, f"{labelled_table(points)}\n\n{LABELLED_FIGURE}" if curve_records else None)

    finders = {d: runs_records[p] for d, p in FINDER.items() if p in runs_records}
    tables["finder"] = _block(list(finders.values()), [p for p in FINDER.values() if p not in runs_records], changed,
                              finder_table({d: r.data["rows"] for d, r in finders.items()}) if finders else None)

    qc = {key: runs_records[p] for key, p in ORGAN_QC.items() if p in runs_records}
    calls: dict[tuple[str, str], list[list[Mapping]]] = {}
    for (direction, alignment, _), found in qc.items():
        calls.setdefault((direction, alignment), []).append(found.data.get("qc") or [])
    tables["organ_qc"] = _block(list(qc.values()), [p for p in ORGAN_QC.values() if p not in runs_records], changed,
                                qc_table(calls) if qc else None)

    renderers = {
        "bench_mas": bench_mas_table,
        "bench_alignment": _alignment_record_table,
        "bench_alignment_organs": _alignment_record_table,
        "bench_accuracy": lambda data: accuracy_table(data["rows"]),
        "bench_training": lambda data: training_table(data["rows"]),
        "bench_cohort": lambda data: cohort_table(data["rows"]),
        "bench_cohort_abdomen": lambda data: cohort_table(data["rows"]),
    }
    for name, render in renderers.items():
        record = bench[name]
        tables[name] = _block([record] if record else [], [] if record else [BENCH[name]], changed,
                              render(record.data) if record and record.data.get("rows") else None)
    return tables


def _pattern(name: str) -> re.Pattern:
    """A block: its opening marker line, any lines, its closing marker line (markers alone on their lines)."""
    return re.compile(rf"(^<!-- results:{re.escape(name)} -->\n)(?:.*?\n)??(^<!-- /results:{re.escape(name)} -->$)",
                      re.S | re.M)


def markers(text: str) -> list[str]:
    """Names of the generated blocks in a page, in order (a marker stands alone on its line)."""
    return re.findall(r"^<!-- results:([\w-]+) -->$", text, re.M)


def replace_blocks(text: str, tables: Mapping[str, str], source: str | os.PathLike = "page") -> str:
    """``text`` with the content between each pair of markers replaced by ``tables[name]``.

    Idempotent: replacing again with the same tables gives the same text.

    Raises:
        CmmasError: a marker without its closing one, or a name with no table (naming ``source``).
    """
    for name in markers(text):
        if name not in tables:
            raise CmmasError(source, f"no generated table is named {name!r} (known: {sorted(tables)})")
        pattern = _pattern(name)
        if not pattern.search(text):
            raise CmmasError(source, f"<!-- results:{name} --> has no <!-- /results:{name} --> after it")
        text = pattern.sub(lambda m: m.group(1) + tables[name] + "\n" + m.group(2), text, count=1)
    return text


def regenerate(runs: str | os.PathLike, pages: Sequence[str | os.PathLike], repo: str | os.PathLike = "."
               ) -> dict[Path, tuple[str, str]]:
    """page -> (its text now, its text with every generated table rebuilt from ``runs``).

    Args:
        runs: the runs folder (records at :data:`CHAIN` and :data:`BENCH` under it).
        pages: Markdown files holding markers.
        repo: the checkout whose HEAD the runs' commits are compared with.

    Raises:
        CmmasError: a page is missing or its markers are malformed; a record is not JSON.
    """
    records = load_records(runs, [*CHAIN.values(), *labelled_paths().values(), *settings_paths().values(),
                                  *settings_paths(PRECISION_RUNS).values(), *settings_paths(CROSSFIT_RUNS).values(),
                                  *settings_paths(ABLATION_RUNS).values(),
                                  *FINDER.values(), *ORGAN_QC.values(),
                                  *BENCH.values()])
    answers: dict[str, bool | None] = {}

    def changed(commit: str) -> bool | None:
        if commit not in answers:
            answers[commit] = code_changed(commit, repo)
        return answers[commit]

    tables = render_tables(records, changed)
    out = {}
    for page in map(Path, pages):
        if not page.is_file():
            raise CmmasError(page, "page not found")
        text = page.read_text(encoding="utf-8")
        out[page] = (text, replace_blocks(text, tables, page))
    return out


def labelled_curve_points(runs: str | os.PathLike) -> dict[str, dict[str, list[tuple]]]:
    """:func:`labelled_points` of the labelled-curve runs found under ``runs`` (empty when the
    curve's own runs, ``LABELLED=K``, are absent: the full chain alone is no curve)."""
    paths = labelled_paths()
    records = load_records(runs, list(paths.values()))
    if not any(key[1] != "all" and path in records for key, path in paths.items()):
        return {}
    return labelled_points({key: records[path].data for key, path in paths.items() if path in records})


def statuses(text: str) -> dict[str, str]:
    """name -> the source line of each generated block of a page ("current", "code changed
    since", "not run at this commit", per record)."""
    out = {}
    for name in markers(text):
        found = _pattern(name).search(text)
        body = text[found.end(1):found.start(2)] if found else ""
        out[name] = body.split("\n", 1)[0]
    return out
