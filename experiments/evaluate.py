"""Fuse pre-aligned atlases, score the fused labels, write the report and the figures.

Reads every target folder that experiments/prealign.py (pairwise mode) wrote under --pairs,
fuses its atlases with each of --methods (names of cmmas.evaluation.PRESETS), writes each
prediction next to the pairs (PAIRS/<target>/pred_<method>.nii.gz, on the target grid), and,
for labelled targets, scores them with the single-atlas-mean and oracle bounds. Predictions of
other methods (e.g. a network's) are scored too when --predictions DIR holds
DIR/<target>/pred_<name>.nii.gz on the same grid.

Writes to --out: results.csv (one row per case x structure x method), timings.csv (seconds per
registration and per fusion), summary.json, boxplot_dice.png, boxplot_hd95.png and overlay
figures of the best, median and worst case (overlay_<direction>_<tag>_<case>.png); prints the
tables (Markdown).

Example:
  python experiments/evaluate.py --pairs runs/prealign/ct2mr_affine --out runs/eval/ct2mr_affine \
      --methods mv,staple,lwv,jlf
"""

from __future__ import annotations

import logging
import random
import sys

from absl import app, flags

FLAGS = flags.FLAGS

flags.DEFINE_string("pairs", None, "Folder of pre-aligned pairs (experiments/prealign.py --mode pairwise).")
flags.DEFINE_string("predictions", None, "Folder of other predictions: DIR/<target>/pred_<name>.nii.gz.")
flags.DEFINE_list("methods", ["mv", "staple", "lwv", "jlf"], "Fusion presets (cmmas.evaluation.PRESETS).")
flags.DEFINE_enum("lwv_similarity", "mi", ["mi", "ncc"], "Similarity of the 'lwv' preset.")
flags.DEFINE_integer("jlf_rad", 1, "Patch radius of the 'jlf' preset (voxels).", lower_bound=0)
flags.DEFINE_integer("jlf_search", 1, "Search radius of the 'jlf' preset (voxels).", lower_bound=0)
flags.DEFINE_bool("bounds", True, "Also score the single-atlas mean and the oracle.")
flags.DEFINE_bool("plots", True, "Draw box plots and best/median/worst overlays.")
flags.DEFINE_string("overlay_method", None, "Method ranking the overlay cases (default: the first of --methods).")
flags.DEFINE_string("out", None, "Output folder of the report.")
flags.DEFINE_integer("seed", 0, "Seed of Python and numpy.", lower_bound=0)
flags.DEFINE_bool("progress", True, "Show a progress bar.")


def _main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from cmmas.errors import CmmasError

    try:
        return _run()
    except CmmasError as err:
        print(f"evaluate: {err}", file=sys.stderr)
        return 1


def _extra(pairs) -> dict:
    """name -> (label array, path) of the other predictions for this target (--predictions)."""
    from pathlib import Path

    from cmmas.io import read_label

    if FLAGS.predictions is None:
        return {}
    root = Path(FLAGS.predictions) / pairs.target_id
    found = sorted(root.glob("pred_*.nii.gz")) if root.is_dir() else []
    if not found:
        logging.warning("no prediction in %s for target %s", root, pairs.target_id)
    extra = {}
    for path in found:
        label = read_label(path, allowed=pairs.labels, like=pairs.target)
        extra[path.name[len("pred_") : -len(".nii.gz")]] = (label.array, path)
    return extra


def _run() -> int:
    from pathlib import Path

    import numpy as np
    from tqdm import tqdm

    from cmmas import classical, evaluation
    from cmmas.io import write_image

    random.seed(FLAGS.seed)
    np.random.seed(FLAGS.seed)
    options = {"lwv": {"similarity": FLAGS.lwv_similarity}, "jlf": {"rad": FLAGS.jlf_rad, "r_search": FLAGS.jlf_search}}
    for method in FLAGS.methods:
        evaluation.resolve(method, options)
    folders = classical.target_folders(FLAGS.pairs)
    rows, timings, where = [], [], {}
    for folder in tqdm(folders, desc="fuse and score", unit="target", disable=not FLAGS.progress):
        pairs = classical.load_pairs(folder)
        extra = _extra(pairs)
        scored = evaluation.fuse_and_score(
            None if pairs.target_label is None else pairs.target_label.array,
            pairs.atlas_labels,
            pairs.atlas_images,
            pairs.target.array,
            pairs.labels,
            pairs.target.spacing_zyx,
            FLAGS.methods,
            {name: array for name, (array, _) in extra.items()},
            options=options,
            bounds=FLAGS.bounds,
            case=pairs.target_id,
            direction=pairs.direction,
        )
        for method in FLAGS.methods:
            write_image(pairs.target.with_array(scored.predictions[method]), classical.prediction_path(folder, method))
        case = {"case": pairs.target_id, "direction": pairs.direction}
        timings += [{**case, "step": "registration", "method": pairs.kind, "seconds": float(s)} for s in pairs.seconds]
        timings += [{**case, "step": "fusion", "method": m, "seconds": s} for m, s in scored.seconds.items()]
        if pairs.target_label is None:
            logging.warning("%s: unlabelled target, predictions written but not scored", pairs.target_id)
            continue
        rows += scored.rows
        paths = {m: classical.prediction_path(folder, m) for m in FLAGS.methods}
        paths.update({name: path for name, (_, path) in extra.items()})
        where[(pairs.direction, pairs.target_id)] = (folder, paths)
    report = evaluation.write_report(rows, FLAGS.out, timings)
    print(report.table)
    print(f"evaluate: {len(rows)} rows from {len(where)} target(s) in {report.results_csv}; summary {report.summary_json}")
    if FLAGS.plots:
        for path in _plots(rows, where, Path(FLAGS.out)):
            print(f"evaluate: figure {path}")
    return 0


def _plots(rows, where, out):
    import numpy as np

    from cmmas import classical, plots
    from cmmas.io import read_image, read_label

    written = [plots.boxplot(rows, metric, out / f"boxplot_{metric}.png") for metric in ("dice", "hd95")
               if any(np.isfinite(r[metric]) for r in rows)]
    method = FLAGS.overlay_method or FLAGS.methods[0]
    for direction in dict.fromkeys(d for d, _ in where):
        chosen: dict[str, list[str]] = {}
        for tag, case in plots.best_median_worst(rows, method=method, direction=direction).items():
            chosen.setdefault(case, []).append(tag)
        for case, tags in chosen.items():
            tag = "-".join(tags)
            folder, paths = where[(direction, case)]
            image = read_image(folder / classical.TARGET_IMAGE)
            truth = read_label(folder / classical.TARGET_LABEL)
            preds = {n: read_label(p).array for n, p in paths.items()}
            name = f"overlay_{direction.replace('->', '2')}_{tag}_{case}.png"
            title = f"{direction} {case} ({tag} of {len({c for d, c in where if d == direction})} by {method} Dice)"
            written.append(plots.overlay(image, truth, preds, out / name, slices="auto", title=title))
    return written


if __name__ == "__main__":
    flags.mark_flags_as_required(["pairs", "out"])
    app.run(_main)
