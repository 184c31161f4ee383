"""Whole multi-atlas segmentation of real targets: classical ANTs pipeline against `cmmas segment`.

For each target (a labelled scan of --data, segmented with atlases of the other modality):
  (a) classical: every atlas registered onto the target with ANTs (rigid, affine, then SyN;
      Mattes MI; cmmas.align.pairwise.prealign_pairs on the target resampled to --spacing mm), then
      fused by each of --classical_fusions (fusions of cmmas.fuse.registry: majority vote, joint
      label fusion, ...) and mapped back to the target's grid;
  (b) cmmas: the engine (cmmas.segment.Segmenter) with the prepared atlas set (target aligned once to the
      reference, BiRegNet for every atlas, then each fusion of --fusions, map back: the label
      map, as (a) makes, or with --maps the probability and agreement maps too), timed per
      fusion. A learned fusion (simnet, dlf, unet) without its network in --fusion_model is
      dropped from --fusions (majority vote if nothing is left) and it says so; without
      --reg_model (b) uses the affine alignment only.
      (b) runs once per --alignments variant (each in its own process, ITK's thread count being
      fixed at a process's first registration): "robust", what `cmmas segment` does (several
      starts, one ANTs thread); "robust_mt" (--fast-nondeterministic); "single_mt" (one start on
      the default threads: the alignment before the multi-start one); "robust_atlas"
      (--atlas-affine). The first variant picks the atlases and is the one the goals judge.
(b) runs first and picks the --atlases most similar atlases; (a) uses the same atlases.

Each part of each target runs in a fresh process (multiprocessing, spawn), so its peak memory
(VmHWM of the process plus its largest child's ru_maxrss: _peak_mb) and time are its own. Timed: (b) each
segmentation (reading the scan to the map-back: the engine's "total"), after the imports, the
model and atlas loading and one warm-up pass of each network at the batch shape it runs and of
the TensorFlow JLF graph (reported as "setup"), --repeats times per fusion: the median is reported, with the range, and the first call's labels are scored (ANTs's
affine uses random sampling on two threads, so a repeat may differ slightly); (a) registration
of every pair plus each fusion and the mapping back, after the imports, once. Dice per organ is
computed on the target's original grid against its label.

Printed: per target, seconds, peak memory and Dice per organ of each pipeline and fusion, the
ratio of times, and whether the goals hold ((b) under 10 s, at least 50x faster than (a), Dice
per organ at least (a)'s best fusion, peak memory under 4 GB). --out writes bench_mas.csv (one
row per target x pipeline x fusion x organ) and bench_mas.md (the printed tables).

The atlas sets are prepared beforehand (`cmmas prepare-atlases`, or the Makefile's space,
experiments/prealign.py --mode reference), one per direction; each target is paired with the
set whose atlases are of the other modality. Without --targets, each set's held-out ("test")
cases of the other modality are used (at most --max_targets per set).

Example:
  python bench/bench_mas.py \
      --atlas_set=runs/abdomen/ct2mr/fold1/space,runs/abdomen/mr2ct/fold1/space \
      --reg_model=runs/abdomen/ct2mr/fold1/reg/model.keras,runs/abdomen/mr2ct/fold1/reg/model.keras \
      --fusion_model=runs/abdomen/ct2mr/fold1/fusion/simnet.keras+runs/abdomen/ct2mr/fold1/dlf/dlf.keras,\
runs/abdomen/mr2ct/fold1/fusion/simnet.keras+runs/abdomen/mr2ct/fold1/dlf/dlf.keras --fusions=simnet,dlf,jlf_tf \
      --atlases=10 --out=runs/bench_mas
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from pathlib import Path

from absl import app, flags

from cmmas.scripts import absl_main

FLAGS = flags.FLAGS
_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "abdomen-ctmr"

flags.DEFINE_string("data", str(_DATA), "Data-set root holding the targets (and the classical run's atlases).")
flags.DEFINE_enum("layout", "folder", ["folder", "mmwhs", "chaos"], "On-disk layout of --data.")
flags.DEFINE_list("atlas_set", None, "Prepared atlas set(s), one per direction (e.g. CT atlases, MR atlases).")
flags.DEFINE_list("reg_model", [], "BiRegNet .keras per atlas set (same order); none: affine alignment only.")
flags.DEFINE_list("fusion_model", [], "The learned fusions' networks per atlas set (same order; several joined by "
                  "'+': simnet.keras+dlf.keras); none: (b) runs no learned fusion.")
flags.DEFINE_list("targets", None, "Target case ids of --data (default: each set's test cases).")
flags.DEFINE_integer("max_targets", 1, "Without --targets: at most this many test cases per atlas set.", lower_bound=1)
flags.DEFINE_integer("atlases", 10, "Atlases per target (the most similar after alignment).", lower_bound=1)
flags.DEFINE_bool("classical", True, "Run (a), the classical ANTs pipeline.")
flags.DEFINE_list("classical_fusions", ["mv", "jlf"], "Fusions of (a) (cmmas.fuse.registry names).")
flags.DEFINE_list("fusions", ["simnet", "jlf", "jlf_tf"], "Fusions of (b): segment(fusion=...) names.")
flags.DEFINE_integer("repeats", 3, "Timed segment() calls per fusion of (b); seconds are their median.", lower_bound=1)
flags.DEFINE_float("spacing", 3.0, "Isotropic spacing (mm) the classical registrations run at.", lower_bound=0.1)
flags.DEFINE_bool("classical_fast", False, "ANTs' short schedule for (a) instead of its default one.")
flags.DEFINE_integer("workers", 1, "Pairs (a) registers at once (processes, one ANTs thread each).", lower_bound=1)
flags.DEFINE_integer("batch_size", 2, "Atlases per network batch in (b).", lower_bound=1)
flags.DEFINE_bool("maps", False, "(b) maps the probability and agreement maps back too (segment(maps=True), what "
                  "`cmmas segment` writes without --no-extras); off: the label map only, as (a) makes.")
flags.DEFINE_string("out", None, "Folder for bench_mas.csv and bench_mas.md (and the predicted label maps).")
flags.DEFINE_integer("seed", 0, "Seed of ANTs' sampling.", lower_bound=0)
flags.DEFINE_list("alignments", ["robust"], "Variants of (b)'s alignment, each timed in its own process, of "
                  "robust, robust_mt, single_mt, robust_atlas (the module docstring).")

#: (b)'s alignment variants: (multi-start, one ANTs thread, each atlas's own affine stage).
ALIGNMENTS = {"robust": (True, True, False), "robust_mt": (True, False, False), "single_mt": (False, False, False),
              "robust_atlas": (True, True, True)}

#: Goals of the issue: seconds per target of (b), speed-up over (a), peak memory (MB).
GOAL_SECONDS = 10.0
GOAL_SPEEDUP = 50.0
GOAL_PEAK_MB = 4096.0


@dataclasses.dataclass(frozen=True)
class Job:
    """One target and what segments it (plain values: it crosses to a spawned process)."""

    target: object  # cmmas.datasets.Case
    atlas_set: str
    reg_model: str | None
    fusion_model: tuple[str, ...]
    atlas_modality: str


def _peak_mb() -> float:
    """Peak resident memory of this process plus that of its largest finished child, MB.

    This process's own peak is VmHWM (/proc/self/status), which starts afresh at exec: its
    ru_maxrss would carry over the parent's resident memory at the fork into a spawned process
    (each run here is one), overstating it by the parent's size. A child's ru_maxrss carries
    this process's memory at its fork the same way (conservative)."""
    import resource

    own_kb = None
    try:
        with open("/proc/self/status") as handle:
            own_kb = next((int(row.split()[1]) for row in handle if row.startswith("VmHWM:")), None)
    except OSError:
        pass
    if own_kb is None:  # no /proc (not Linux): the overstating figure
        own_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own_kb + children) / 1024.0


def _in_fresh_process(fn, *args):
    """Run ``fn(*args)`` in a new (spawned) process and return its result."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


# ----------------------------------------------------------------------------- (b) cmmas


def run_cmmas(job: Job, atlases: int, batch_size: int, fusions: list[str], repeats: int, maps: bool,
              out: str | None, alignment: str = "robust") -> dict:
    """(b) in this process: setup (imports, models, one warmed-up cmmas.segment.Segmenter), then
    ``repeats`` timed segmentations per fusion, aligned as the :data:`ALIGNMENTS` variant ``alignment``."""
    start = time.perf_counter()
    import ants  # noqa: F401  (imported in the setup, as the CLI's first registration would)
    import numpy as np

    from cmmas import models, outputs, segment
    from cmmas.align import ants as cmmas_ants
    from cmmas.align.atlas_set import AtlasSet

    multi_start, one_thread, atlas_affine = ALIGNMENTS[alignment]
    if one_thread:
        cmmas_ants.set_threads(1)

    aset = AtlasSet(job.atlas_set)
    paths = models.learned_models(list(job.fusion_model))
    if "dlf" in paths:
        models.check_atlas_count(paths["dlf"], min(atlases, len(segment.atlas_ids_of(aset, job.atlas_modality))))
    reg, nets = models.load_models(job.reg_model, paths, aset)
    config = segment.SegmentConfig(fusion=fusions[0], atlases=atlases, modality=job.atlas_modality,
                                   batch_size=batch_size, maps=maps, atlas_affine=atlas_affine,
                                   starts="robust" if multi_start else "single")
    engine = segment.Segmenter(aset, reg, nets, config)
    engine.warm_up(fusions)
    setup = time.perf_counter() - start
    found = {"seconds": {}, "range": {}, "steps": {}, "write_seconds": {}, "labels": {}, "setup_seconds": setup}
    for fusion in fusions:
        call = functools.partial(engine.segment_all, str(job.target.image_path), [fusion])
        result = call()[fusion]  # the first call's labels are scored and written
        steps = [result.seconds] + [call()[fusion].seconds for _ in range(repeats - 1)]  # target-sized maps not kept
        t0 = time.perf_counter()
        if out:
            outputs.write_segmentation(result, Path(out) / job.target.id / f"cmmas_{alignment}_{fusion}.nii.gz",
                                       extras=maps)
        found["write_seconds"][fusion] = time.perf_counter() - t0 if out else float("nan")
        totals = [seconds["total"] for seconds in steps]
        found["seconds"][fusion] = float(np.median(totals))
        found["range"][fusion] = (min(totals), max(totals))
        found["steps"][fusion] = {k: float(np.median([seconds[k] for seconds in steps])) for k in result.seconds}
        found["labels"][fusion] = result.label.array.astype(np.int16)
        found.setdefault("atlas_ids", result.atlas_ids)  # the first call's choice, which (a) uses too
        del result
    found["peak_mb"] = _peak_mb()
    return found


# ----------------------------------------------------------------------------- (a) classical


def run_classical(atlases: list, target, labels: dict, spacing: float, fast: bool, workers: int,
                  fusions: list[str], seed: int, out: str | None) -> dict:
    """(a) in this process: cmmas.evaluate.baseline.classical_segment (ANTs SyN for every pair,
    each fusion, back onto the target's grid)."""
    import ants  # noqa: F401  (import before the clock starts)
    import numpy as np

    from cmmas.evaluate.baseline import classical_segment
    from cmmas.io import write_image

    result = classical_segment(atlases, target, labels, kind="syn", spacing_mm=spacing, fast=fast, seed=seed,
                               workers=workers, fusions=fusions)
    if out:
        for name, label in result.labels.items():
            write_image(label, Path(out) / target.id / f"classical_{name}.nii.gz")
    return {"register_seconds": result.register_seconds, "seconds": result.seconds,
            "labels": {name: label.array.astype(np.int16) for name, label in result.labels.items()},
            "peak_mb": _peak_mb()}


# ----------------------------------------------------------------------------- the report


def _jobs(dataset) -> list[Job]:
    """Pair every target with the atlas set of the other modality."""
    from cmmas.align.atlas_set import AtlasSet
    from cmmas.errors import CmmasError

    sets = list(FLAGS.atlas_set)
    for name, values in (("reg_model", FLAGS.reg_model), ("fusion_model", FLAGS.fusion_model)):
        if values and len(values) != len(sets):
            raise CmmasError(None, f"--{name} needs one path per --atlas_set ({len(sets)}), got {len(values)}")
    by_modality = {}
    for k, path in enumerate(sets):
        aset = AtlasSet(path)
        modality = aset.case(aset.manifest.reference).modality
        if modality in by_modality:
            raise CmmasError(path, f"a second atlas set of {modality} atlases; give one per direction")
        model = FLAGS.reg_model[k] if FLAGS.reg_model else None
        networks = tuple(p for p in FLAGS.fusion_model[k].split("+") if p) if FLAGS.fusion_model else ()
        by_modality[modality] = (aset, model, networks)
    if FLAGS.targets:
        targets = [dataset.case(i) for i in FLAGS.targets]
    else:
        targets = []
        for modality, (aset, _, _) in by_modality.items():
            other = [i for i in aset.ids(role="test", labelled=True) if aset.case(i).modality != modality]
            targets += [dataset.case(i) for i in other[: FLAGS.max_targets]]
        if not targets:
            raise CmmasError(None, "the atlas sets hold no labelled test case: name the targets (--targets)")
    jobs = []
    for target in targets:
        if target.label_path is None:
            raise CmmasError(target.image_path, f"target {target.id} has no label to score against")
        choices = [m for m in by_modality if m != target.modality]
        if not choices:
            raise CmmasError(None, f"no atlas set of another modality than {target.modality} for target {target.id}")
        aset, model, networks = by_modality[choices[0]]
        if target.id in aset.ids(role="train"):
            raise CmmasError(aset.root, f"target {target.id} is one of the set's atlases/training cases")
        jobs.append(Job(target, str(aset.root), model, networks, choices[0]))
    return jobs


def _dice_rows(prediction, truth, labels: dict) -> dict[int, float]:
    from cmmas.evaluate.alignment import organ_dice

    return organ_dice(prediction, truth, labels)


def _report(results: list[dict], labels: dict) -> tuple[str, list[dict]]:
    """The Markdown table (:func:`cmmas.evaluate.results_page.bench_mas_table`, as ``make results``
    renders it) with the goals below it, and the CSV rows (one per target, pipeline, fusion, organ)."""
    from cmmas.evaluate.results_page import bench_mas_table

    rows, notes = [], []
    for res in results:
        best_classical = {}
        parts = [("classical", res.get("classical"))] + [(f"cmmas {a}", o) for a, o in res["cmmas"].items()]
        for part, out in parts:
            if out is None:
                continue
            for fusion, dice in out["dice"].items():
                for code in labels:
                    rows.append({"target": res["target"], "direction": res["direction"], "pipeline": part,
                                 "fusion": fusion, "label": code, "name": labels[code], "dice": dice[code],
                                 "seconds": out["seconds"][fusion], "peak_mb": out["peak_mb"],
                                 "setup_seconds": out.get("setup_seconds", float("nan")),
                                 "atlases": len(res["atlas_ids"])})
                if part == "classical":
                    for code in labels:
                        best_classical[code] = max(best_classical.get(code, -1.0), dice[code])
        notes.append(_goals(res, best_classical, labels))
    return "\n".join([bench_mas_table({"rows": rows}), ""] + notes), rows


def _goals(res: dict, best_classical: dict, labels: dict) -> str:
    alignment, ours = next(iter(res["cmmas"].items()))
    theirs = res.get("classical")
    text = [f"{res['target']} ({res['direction']}, {len(res['atlas_ids'])} atlases): setup "
            f"{ours['setup_seconds']:.1f} s untimed, peak {ours['peak_mb']:.0f} MB (peak under "
            f"{GOAL_PEAK_MB / 1024:.0f} GB: {'yes' if ours['peak_mb'] < GOAL_PEAK_MB else 'NO'})"]
    if theirs is not None:
        fastest = min(theirs["seconds"], key=theirs["seconds"].get)
        ratios = ", ".join(f"{name} {s:.1f} s" for name, s in theirs["seconds"].items())
        text.append(f"  classical: registration {theirs['register_seconds']:.1f} s; with fusion {ratios}; "
                    f"peak {theirs['peak_mb']:.0f} MB")
    for other, theirs_too in list(res["cmmas"].items())[1:]:
        for fusion, seconds in theirs_too["seconds"].items():
            steps = ", ".join(f"{k} {v:.1f}" for k, v in theirs_too["steps"][fusion].items() if k != "total")
            text.append(f"  cmmas {other} {fusion}: {seconds:.1f} s ({seconds / ours['seconds'][fusion]:.2f}x "
                        f"{alignment}; median steps {steps})")
    for fusion, seconds in ours["seconds"].items():
        steps = ", ".join(f"{k} {v:.1f}" for k, v in ours["steps"][fusion].items() if k != "total")
        low, high = ours["range"][fusion]
        text.append(f"  cmmas {alignment} {fusion}: {seconds:.1f} s, median of {FLAGS.repeats} (range {low:.1f}-{high:.1f} s; "
                    f"median steps {steps}; writing its output {ours['write_seconds'][fusion]:.1f} s)")
        text.append(f"    goal under {GOAL_SECONDS:.0f} s: {'yes' if seconds < GOAL_SECONDS else 'NO'}")
        if theirs is None:
            continue
        ratio = theirs["seconds"][fastest] / seconds
        text.append(f"    goal at least {GOAL_SPEEDUP:.0f}x faster than (a) ({fastest}, its fastest): {ratio:.0f}x "
                    f"{'yes' if ratio >= GOAL_SPEEDUP else 'NO'}")
        dice = ours["dice"][fusion]
        short = [f"{labels[c]} {dice[c]:.3f} < {best_classical[c]:.3f}" for c in labels if dice[c] < best_classical[c]]
        text.append("    goal Dice per organ at least (a)'s best fusion: "
                    + ("yes" if not short else "NO (" + "; ".join(short) + ")"))
    return "\n".join(text)


def _write(out: Path, table: str, rows: list[dict]) -> None:
    """bench_mas.csv, bench_mas.md and bench_mas.json ({"provenance", "command", "rows"}: what
    `make results` reads; the models hashed with their cards)."""
    import csv
    import io

    from cmmas.io import atomic_write_text
    from cmmas.scripts import write_bench_json

    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(out / "bench_mas.csv", buffer.getvalue())
    atomic_write_text(out / "bench_mas.md", table + "\n")
    models = {f"{kind}{k}": path
              for kind, paths in (("reg_model", FLAGS.reg_model),
                                  ("fusion_model", [p for entry in FLAGS.fusion_model for p in entry.split("+") if p]))
              for k, path in enumerate(paths)}
    write_bench_json(out / "bench_mas.json", rows, models=models, data=FLAGS.data,
                     cases=list(dict.fromkeys(r["target"] for r in rows)))


def _run() -> int:
    from cmmas.datasets import open_dataset
    from cmmas.fuse import registry
    from cmmas.io import read_label
    from cmmas.models import learned_models

    registry.check_names(FLAGS.classical_fusions)
    registry.check_names(FLAGS.fusions)
    unknown = [a for a in FLAGS.alignments if a not in ALIGNMENTS]
    if unknown or not FLAGS.alignments:
        raise app.UsageError(f"--alignments must name some of {tuple(ALIGNMENTS)}, got {FLAGS.alignments}")
    dataset = open_dataset(FLAGS.data, FLAGS.layout)
    labels = dict(dataset.labels)
    jobs = _jobs(dataset)
    schedule = "fast" if FLAGS.classical_fast else "default"
    classical = (f"ANTs rigid+affine+SyN at {FLAGS.spacing:g} mm ({schedule} schedule), fusions "
                 f"{','.join(FLAGS.classical_fusions)}" if FLAGS.classical else "skipped (--noclassical)")
    print(f"bench_mas: {len(jobs)} target(s), {FLAGS.atlases} atlases each, {os.cpu_count()} CPU(s); (a) {classical}")
    available = {}
    for job in jobs:
        if not job.reg_model:
            print(f"bench_mas: no --reg_model for the {job.atlas_modality} atlases: "
                  "(b) fuses the affinely aligned atlases")
        available[job.atlas_modality] = set(learned_models(list(job.fusion_model)))
        missing = [f for f in FLAGS.fusions if f in registry.LEARNED and f not in available[job.atlas_modality]]
        if missing:
            print(f"bench_mas: no --fusion_model network for {', '.join(missing)} with the {job.atlas_modality} "
                  "atlases: (b) leaves them out")
    results = []
    for job in jobs:
        direction = f"{job.atlas_modality}->{job.target.modality}"
        truth = read_label(job.target.label_path, allowed=labels).array
        fusions = [f for f in FLAGS.fusions
                   if f not in registry.LEARNED or f in available[job.atlas_modality]] or ["mv"]
        variants = {}
        for alignment in FLAGS.alignments:
            ours = _in_fresh_process(run_cmmas, job, FLAGS.atlases, FLAGS.batch_size, fusions, FLAGS.repeats,
                                     FLAGS.maps, FLAGS.out, alignment)
            ours["dice"] = {f: _dice_rows(pred, truth, labels) for f, pred in ours.pop("labels").items()}
            variants[alignment] = ours
            timings = ", ".join(f"{fusion} {seconds:.1f} s" for fusion, seconds in ours["seconds"].items())
            print(f"bench_mas: {job.target.id}: cmmas ({alignment}) {timings} with atlases {ours['atlas_ids']}")
        first = variants[FLAGS.alignments[0]]
        res = {"target": job.target.id, "direction": direction, "atlas_ids": first["atlas_ids"], "cmmas": variants}
        if FLAGS.classical:
            atlases = [dataset.case(i) for i in ours["atlas_ids"]]
            theirs = _in_fresh_process(run_classical, atlases, job.target, labels, FLAGS.spacing,
                                       FLAGS.classical_fast, FLAGS.workers, list(FLAGS.classical_fusions),
                                       FLAGS.seed, FLAGS.out)
            theirs["dice"] = {f: _dice_rows(pred, truth, labels) for f, pred in theirs.pop("labels").items()}
            res["classical"] = theirs
            print(f"bench_mas: {job.target.id}: classical registration {theirs['register_seconds']:.1f} s")
        results.append(res)
    table, rows = _report(results, labels)
    print(table)
    if FLAGS.out:
        _write(Path(FLAGS.out), table, rows)
        print(f"bench_mas: wrote {Path(FLAGS.out) / 'bench_mas.csv'} and {Path(FLAGS.out) / 'bench_mas.md'}")
    return 0


if __name__ == "__main__":
    flags.mark_flags_as_required(["atlas_set"])
    app.run(absl_main("bench_mas", _run))
