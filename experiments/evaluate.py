"""Evaluate label fusion: score the fused labels, write the report and the figures. Three modes:

--pairs DIR (the classical baseline): reads every target folder that experiments/prealign.py
  (pairwise mode) wrote under DIR, fuses its atlases with each of --methods (names of
  cmmas.evaluation.PRESETS), writes each prediction next to the pairs
  (DIR/<target>/pred_<method>.nii.gz, on the target grid), and, for labelled targets, scores
  them with the single-atlas-mean and oracle bounds. Predictions of other methods (e.g. a
  network's) are scored too when --predictions P holds P/<target>/pred_<name>.nii.gz on the
  same grid.

--space DIR (the networks; cmmas.evaluation.evaluate_space): every labelled held-out
  --target_modality case of the prepared space (experiments/prealign.py --mode reference) is
  segmented with the --atlas_modality training cases: "affine+mv" (majority vote of the
  pre-aligned atlases), each of --methods on the atlases warped by --reg_model (BiRegNet) and
  "simnet" (--fusion_model; skipped without one). Every prediction is mapped back onto the
  target's original grid and scored against its original label file; predictions are written
  to OUT/<target>/pred_<method>.nii.gz with the target's header, and jacobian.csv holds the
  folding statistics of the BiRegNet fields.

--aggregate RUN (after every fold and direction; cmmas.evaluation.aggregate): concatenates
  RUN/*/fold*/eval/results.csv (and their timings.csv, jacobian.csv) into OUT.

Writes to --out: results.csv (one row per case x structure x method), timings.csv (seconds per
registration and per fusion), summary.json, boxplot_dice.png, boxplot_hd95.png (one per
direction when there are several) and, in the first two modes, overlay figures of the best,
median and worst case (overlay_<direction>_<tag>_<case>.png); prints the tables (Markdown).

Examples:
  python experiments/evaluate.py --pairs runs/prealign/ct2mr_affine --out runs/eval/ct2mr_affine \
      --methods mv,staple,lwv,jlf
  python experiments/evaluate.py --space runs/demo/ct2mr/fold1/space \
      --reg_model runs/demo/ct2mr/fold1/reg/model.keras \
      --fusion_model runs/demo/ct2mr/fold1/fusion/simnet.keras \
      --atlas_modality ct --target_modality mr --out runs/demo/ct2mr/fold1/eval
  python experiments/evaluate.py --aggregate runs/demo --out runs/demo
"""

from __future__ import annotations

import logging
import random

from absl import app, flags

from cmmas.scripts import absl_main

FLAGS = flags.FLAGS

flags.DEFINE_string("pairs", None, "Folder of pre-aligned pairs (experiments/prealign.py --mode pairwise).")
flags.DEFINE_string("space", None, "Prepared space (experiments/prealign.py --mode reference): evaluate its held-out targets.")
flags.DEFINE_string("aggregate", None, "Run folder: concatenate RUN/*/fold*/eval/results.csv.")
flags.DEFINE_string("reg_model", None, "--space: trained BiRegNet (.keras).")
flags.DEFINE_string("fusion_model", None, "--space: trained SimNet (.keras); without it 'simnet' is skipped.")
flags.DEFINE_enum("atlas_modality", "ct", ["ct", "mr"], "--space: modality of the atlases.")
flags.DEFINE_enum("target_modality", "mr", ["ct", "mr"], "--space: modality of the targets.")
flags.DEFINE_integer("batch_size", 2, "--space: atlases per network call.", lower_bound=1)
flags.DEFINE_string("predictions", None, "--pairs: folder of other predictions, DIR/<target>/pred_<name>.nii.gz.")
flags.DEFINE_list("methods", ["mv", "staple", "lwv", "jlf"], "Fusion presets (cmmas.evaluation.PRESETS).")
flags.DEFINE_enum("lwv_similarity", "mi", ["mi", "ncc"], "Similarity of the 'lwv' preset.")
flags.DEFINE_integer("jlf_rad", 1, "Patch radius of the 'jlf' preset (voxels).", lower_bound=0)
flags.DEFINE_integer("jlf_search", 1, "Search radius of the 'jlf' preset (voxels).", lower_bound=0)
flags.DEFINE_bool("bounds", True, "Also score the single-atlas mean and the oracle.")
flags.DEFINE_bool("plots", True, "Draw box plots and best/median/worst overlays.")
flags.DEFINE_string("overlay_method", None, "Method ranking the overlay cases (default: simnet with --fusion_model, "
                    "else the first of --methods).")
flags.DEFINE_string("out", None, "Output folder of the report.")
flags.DEFINE_integer("seed", 0, "Seed of Python and numpy.", lower_bound=0)
flags.DEFINE_bool("progress", True, "Show a progress bar.")


def _run() -> int:
    if FLAGS.aggregate is not None:
        return _aggregate()
    if FLAGS.space is not None:
        return _space()
    return _pairs()


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


def _pairs() -> int:
    from pathlib import Path

    import numpy as np
    from tqdm import tqdm

    from cmmas import classical, evaluation
    from cmmas.io import write_image

    random.seed(FLAGS.seed)
    np.random.seed(FLAGS.seed)
    options = _options()
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
    """Box plots and overlays of the pairs mode (cmmas.evaluation.write_figures)."""
    from cmmas import classical, evaluation
    from cmmas.io import read_image, read_label

    def loader(folder, paths):
        return lambda: (read_image(folder / classical.TARGET_IMAGE), read_label(folder / classical.TARGET_LABEL).array,
                        {n: read_label(p).array for n, p in paths.items()})

    sources = {key: loader(folder, paths) for key, (folder, paths) in where.items()}
    return evaluation.write_figures(rows, out, sources, FLAGS.overlay_method or FLAGS.methods[0])


def _options() -> dict:
    return {"lwv": {"similarity": FLAGS.lwv_similarity}, "jlf": {"rad": FLAGS.jlf_rad, "r_search": FLAGS.jlf_search}}


def _space() -> int:
    import numpy as np

    from cmmas import evaluation
    from cmmas.atlas_set import AtlasSet
    from cmmas.errors import CmmasError

    random.seed(FLAGS.seed)
    np.random.seed(FLAGS.seed)
    if FLAGS.reg_model is None:
        raise CmmasError("--reg_model", "--space needs a trained BiRegNet")
    space = AtlasSet(FLAGS.space)  # fails fast, before TensorFlow is imported
    for method in FLAGS.methods:
        evaluation.resolve(method, _options())
    import keras

    keras.utils.set_random_seed(FLAGS.seed)
    report = evaluation.evaluate_space(
        space,
        FLAGS.reg_model,
        FLAGS.fusion_model,
        FLAGS.out,
        atlas_modality=FLAGS.atlas_modality,
        target_modality=FLAGS.target_modality,
        methods=FLAGS.methods,
        options=_options(),
        bounds=FLAGS.bounds,
        plots=FLAGS.plots,
        overlay_method=FLAGS.overlay_method,
        batch_size=FLAGS.batch_size,
        progress=FLAGS.progress,
    )
    print(report.table)
    _footer(report)
    return 0


def _aggregate() -> int:
    from cmmas import evaluation

    report = evaluation.aggregate(FLAGS.aggregate, FLAGS.out, plots=FLAGS.plots)
    print(report.table)
    _footer(report)
    return 0


def _footer(report) -> None:
    print(f"evaluate: results {report.results_csv}; summary {report.summary_json}"
          + (f"; jacobian {report.jacobian_csv}" if report.jacobian_csv else ""))
    for path in report.figures:
        print(f"evaluate: figure {path}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["out"])
    flags.mark_flags_as_mutual_exclusive(["pairs", "space", "aggregate"], required=True)
    app.run(absl_main("evaluate", _run))
