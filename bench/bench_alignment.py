"""How well and how repeatably new scans are aligned to an atlas set: affine + majority vote.

Every labelled scan of --data whose modality differs from an atlas set's atlases is a target of
that set. Each target is aligned (cmmas.align.target.align_to_reference) several times:
--repeats calls with seed 0 (the spread between calls), one call per extra --seeds, and one call
each with --blank_mm of its field of view blanked (set to air) at the top and at the bottom
(--blank_fraction instead: that fraction of the scan's own cranio-caudal extent; 1/3 leaves 2/3).
After each alignment the set's atlases, as aligned (no network), are fused by majority vote and
mapped back onto the scan's grid (cmmas.evaluate.alignment.affine_engine); Dice per organ against
the scan's label (inside the unblanked region for the blanked calls).

Methods (each runs in its own process, because ANTs's thread count is fixed at a process's first
registration):
  single     one start (the centre-of-mass translation), ANTs on the default threads: the
             alignment before the multi-start one;
  robust     the default of `cmmas segment`: several starts along the cranio-caudal axis, one
             ANTs thread (deterministic);
  robust_mt  the same on the default threads (`cmmas segment --fast-nondeterministic`);
  robust_atlas  robust, then every atlas given its own affine stage onto the aligned target
             (`cmmas segment --atlas-affine`, cmmas.align.per_atlas);
  organs     robust plus a start from the organs an organ finder (--finder, one per atlas set)
             finds in the target, the result chosen by its organs' overlap with the atlases'
             (`cmmas segment --organ-alignment`, cmmas.align.organs); one ANTs thread;
  organs_registered  the found organs registered onto the atlases' from their centroids, no
             mutual information (cmmas.align.target.Starts.organ_registration); one ANTs thread.

Printed per direction and method: the mean Dice over targets (each target's mean over its
calls), the worst call of any target, collapses (calls with mean organ Dice < 0.3), targets
whose worst call lies more than 0.05 below their median, the largest spread of the mean Dice
between the repeat calls, how many targets gave byte-identical labels in every repeat call,
seconds per alignment (median, max; from the scan to the chosen transform, the organ finder
included; with robust_atlas the atlases' own affine stages added),
the field-of-view figures (Dice between a blanked call and the first call inside the
unblanked region, the lowest organ; mean and worst) and the QC
separation (how many collapsed and how many good calls the alignment flags). --out writes
bench_alignment.json ({"provenance", "command", "rows": every call}; `make results` reads it) and
bench_alignment.md (the tables).

The atlas sets are prepared beforehand, e.g. (10 atlases each; every scan of the other modality
is then a target):
  cmmas prepare-atlases --atlases ../shared/data/abdomen-ctmr --modality ct \
      --ids ct_06,ct_07,ct_08,ct_09,ct_10,ct_11,ct_12,ct_13,ct_14,ct_15 \
      --shape 56,48,64 --spacing 5 --align-spacing 4 --out runs/bench_alignment/ct_atlases
  cmmas prepare-atlases --atlases ../shared/data/abdomen-ctmr --modality mr \
      --ids mr_08,mr_10,mr_13,mr_15,mr_19,mr_20,mr_21,mr_22,mr_31,mr_32 \
      --shape 56,48,64 --spacing 5 --align-spacing 4 --out runs/bench_alignment/mr_atlases
  python bench/bench_alignment.py \
      --atlas_set runs/bench_alignment/ct_atlases,runs/bench_alignment/mr_atlases \
      --out runs/bench_alignment
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from cmmas.evaluate.results_page import alignment_table
from cmmas.scripts import absl_main, write_bench_json

FLAGS = flags.FLAGS
_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "abdomen-ctmr"
METHODS = ("single", "robust", "robust_mt", "robust_atlas", "organs", "organs_registered")
GUIDED = ("organs", "organs_registered")

flags.DEFINE_string("data", str(_DATA), "Data-set root holding the targets.")
flags.DEFINE_enum("layout", "folder", ["folder", "mmwhs", "chaos"], "On-disk layout of --data.")
flags.DEFINE_list("atlas_set", None, "Prepared atlas set(s); each segments the scans of the other modality.")
flags.DEFINE_list("methods", ["single", "robust"], f"Alignment methods to compare, of {METHODS}.")
flags.DEFINE_list("finder", None, "Organ finders (.keras), one per --atlas_set in its order: the organs method's.")
flags.DEFINE_list("targets", None, "Only these target ids (default: every labelled scan of the other modality).")
flags.DEFINE_integer("max_targets", None, "At most this many targets per atlas set.", lower_bound=1)
flags.DEFINE_integer("repeats", 3, "Calls with seed 0 per target (the spread between calls).", lower_bound=1)
flags.DEFINE_list("seeds", ["1"], "Extra ANTs sampling seeds, one call each.")
flags.DEFINE_float("blank_mm", 40.0, "Field of view blanked at the top, then at the bottom (0: skip).", lower_bound=0)
flags.DEFINE_float("blank_fraction", 0.0, "Instead of --blank_mm: this fraction of each scan's cranio-caudal extent "
                   "blanked (0: use --blank_mm).", lower_bound=0, upper_bound=0.9)
flags.DEFINE_float("collapse", 0.3, "A call whose mean organ Dice is below this has collapsed.")
flags.DEFINE_string("out", None, "Folder for bench_alignment.json and bench_alignment.md.")
flags.DEFINE_string("method", None, "Internal: run this one method in this process and write --json.")
flags.DEFINE_string("json", None, "Internal: where --method writes its calls.")


def _calls() -> list[dict]:
    calls = [{"call": f"repeat{i + 1}", "seed": 0} for i in range(FLAGS.repeats)]
    calls += [{"call": f"seed{s}", "seed": int(s)} for s in FLAGS.seeds if s]
    if FLAGS.blank_fraction > 0:
        calls += [{"call": f"{side}{FLAGS.blank_fraction:g}", "seed": 0, "blank": side} for side in ("top", "bottom")]
    elif FLAGS.blank_mm > 0:
        calls += [{"call": f"{side}{FLAGS.blank_mm:g}", "seed": 0, "blank": side} for side in ("top", "bottom")]
    return calls


def _targets(aset, dataset):
    atlas_modality = aset.case(aset.manifest.reference).modality
    atlas_ids = aset.ids(modality=atlas_modality, labelled=True)
    cases = [c for m, cs in dataset.cases.items() if m != atlas_modality for c in cs if c.label_path is not None]
    cases = [c for c in cases if c.id not in aset.ids() and (not FLAGS.targets or c.id in FLAGS.targets)]
    return atlas_ids, cases[: FLAGS.max_targets], f"{atlas_modality}->{cases[0].modality if cases else '?'}"


def _run_method(method: str) -> list[dict]:
    from cmmas.align import ants, target as target_alignment
    from cmmas.align.atlas_set import AtlasSet
    from cmmas.datasets import open_dataset
    from cmmas.datasets.loading import load_case
    from cmmas.evaluate import alignment

    if method in ("robust", "robust_atlas", *GUIDED):
        ants.set_threads(1)
    starts = {"single": target_alignment.SINGLE,
              "organs_registered": dataclasses.replace(target_alignment.ROBUST, organ_registration=True)
              }.get(method, target_alignment.ROBUST)
    dataset = open_dataset(FLAGS.data, FLAGS.layout)
    rows = []
    for n, path in enumerate(FLAGS.atlas_set):
        aset = AtlasSet(path)
        reference = aset.reference_image()
        codes = [0, *sorted(aset.labels)]
        atlas_ids, cases, direction = _targets(aset, dataset)
        engine = alignment.affine_engine(aset, atlas_ids, atlas_affine=method == "robust_atlas")
        guide_of = (_guides(aset, atlas_ids, codes, FLAGS.finder[n]) if method in GUIDED
                    else lambda scan, seen: None)
        for case in cases:
            image, truth = load_case(case, aset.labels)
            first = None
            for call in _calls():
                scan, kept = image, np.ones(image.shape, dtype=bool)
                if "blank" in call:
                    mm = (FLAGS.blank_fraction * target_alignment.z_extent(image) if FLAGS.blank_fraction
                          else FLAGS.blank_mm)
                    scan, kept = alignment.blank_z(image, mm, call["blank"])
                with tempfile.TemporaryDirectory() as tmp:
                    began = time.perf_counter()
                    seen = target_alignment.alignment_image(scan, aset.manifest.align_spacing_mm)
                    found = target_alignment.align_to_reference(
                        scan, reference, tmp, aset.manifest.align_spacing_mm, starts=starts, seed=call["seed"],
                        guide=guide_of(scan, seen), seen=seen)
                    align_seconds = time.perf_counter() - began
                    began = time.perf_counter()
                    label = engine.segment(scan, alignment=found.transforms).label
                    vote_seconds = time.perf_counter() - began
                dice = alignment.organ_dice(label.array, truth.array, codes, kept)
                row = {"method": method, "direction": direction, "target": case.id, **call,
                       "dice": dice, "mean": float(np.mean(list(dice.values()))),
                       "seconds": align_seconds + (vote_seconds if method == "robust_atlas" else 0.0),
                       "vote_seconds": vote_seconds,
                       "qc": found.qc(), "label_md5": hashlib.md5(label.array.tobytes()).hexdigest()}
                if first is None:
                    first = label.array
                elif "blank" in call:
                    row["fov_dice"] = alignment.organ_dice(label.array, first, codes, kept)
                rows.append(row)
                print(f"{method} {direction} {case.id} {call['call']}: mean Dice {row['mean']:.3f}, "
                      f"{align_seconds:.2f} s, agreement {found.agreement:.2f}"
                      + (" FLAGGED" if found.flagged else ""), flush=True)
    return rows


def _guides(aset, atlas_ids, codes, finder_path: str):
    """A function of a scan and its alignment image giving its :class:`cmmas.align.organs.OrganGuide`
    from the finder at ``finder_path`` and the atlases' majority organs."""
    from cmmas.align import finder, organs
    from cmmas.models import load_finder

    net, spacing = load_finder(finder_path, aset)
    reference = organs.reference_organs(aset.arrays(atlas_ids)[1], aset.geometry, codes)

    def guide(scan, seen):
        found = finder.find_organs(net, scan, spacing, codes, seen)
        return organs.OrganGuide.of(found.probabilities, found.geometry, reference, codes)

    return guide


def _per_target(rows: list[dict]) -> list[str]:
    calls = list(dict.fromkeys(r["call"] for r in rows))
    lines = ["| direction | target | method | " + " | ".join(calls) + " | agreement (first call) |",
             "|---|---|---|" + "---|" * len(calls) + "---|"]
    keys = sorted({(r["direction"], r["target"], r["method"]) for r in rows},
                  key=lambda k: (k[0], k[1], METHODS.index(k[2])))
    for direction, target, method in keys:
        mine = {r["call"]: r for r in rows if (r["direction"], r["target"], r["method"]) == (direction, target, method)}
        cells = [f"{mine[c]['mean']:.3f}" if c in mine else "-" for c in calls]
        lines.append(f"| {direction} | {target} | {method} | " + " | ".join(cells) +
                     f" | {mine[calls[0]]['qc']['agreement']:.2f} |")
    return lines


def _main() -> int:
    if not FLAGS.atlas_set:
        raise app.UsageError("--atlas_set is required")
    unknown = [m for m in FLAGS.methods if m not in METHODS]
    if unknown:
        raise app.UsageError(f"unknown method(s) {unknown}; choose from {METHODS}")
    if set(GUIDED) & set(FLAGS.methods + [FLAGS.method]) and len(FLAGS.finder or []) != len(FLAGS.atlas_set):
        raise app.UsageError("the organs methods need one --finder per --atlas_set")
    if FLAGS.method:
        rows = _run_method(FLAGS.method)
        Path(FLAGS.json).write_text(json.dumps(rows))
        return 0
    out = Path(FLAGS.out or "runs/bench_alignment")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in FLAGS.methods:
        part = out / f"calls_{method}.json"
        args = [f"--data={FLAGS.data}", f"--layout={FLAGS.layout}", f"--atlas_set={','.join(FLAGS.atlas_set)}",
                f"--repeats={FLAGS.repeats}", f"--seeds={','.join(FLAGS.seeds)}", f"--blank_mm={FLAGS.blank_mm}",
                f"--blank_fraction={FLAGS.blank_fraction}"]
        args += [f"--targets={','.join(FLAGS.targets)}"] if FLAGS.targets else []
        args += [f"--max_targets={FLAGS.max_targets}"] if FLAGS.max_targets else []
        args += [f"--finder={','.join(FLAGS.finder)}"] if FLAGS.finder else []
        start = time.perf_counter()
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        subprocess.run([sys.executable, __file__, *args, f"--method={method}", f"--json={part}"], check=True, env=env)
        print(f"{method}: {time.perf_counter() - start:.0f} s", flush=True)
        rows += json.loads(part.read_text())
    write_bench_json(out / "bench_alignment.json", rows, data=FLAGS.data,
                     cases=list(dict.fromkeys(r["target"] for r in rows)))
    summary = alignment_table(rows, FLAGS.collapse)
    text = ["## Summary", "", summary, "", "## Mean organ Dice per call", "", *_per_target(rows)]
    (out / "bench_alignment.md").write_text("\n".join(text) + "\n")
    print(summary)
    return 0


if __name__ == "__main__":
    app.run(absl_main("bench_alignment", _main))
