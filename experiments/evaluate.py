"""Evaluate label fusion: score the fused labels, write the report and the figures. Three modes:

--pairs DIR (the classical baseline, cmmas.evaluate.baseline.evaluate_pairs): reads every target
  folder that experiments/prealign.py (pairwise mode) wrote under DIR, fuses its atlases with each
  of --methods (fusion names of cmmas.fuse.registry), writes each prediction next to the pairs
  (DIR/<target>/pred_<method>.nii.gz, on the target grid), and, for labelled targets, scores
  them with the single-atlas-mean and oracle bounds. Predictions of other methods (e.g. a
  network's) are scored too when --predictions P holds P/<target>/pred_<name>.nii.gz on the
  same grid.

--atlas_set DIR (the networks; cmmas.evaluate.runs.evaluate_atlas_set): every labelled held-out
  --target_modality case of the prepared atlas set (experiments/prealign.py --mode reference) is
  segmented with the --atlas_modality training cases: "affine+mv" (majority vote of the
  pre-aligned atlases), each of --methods on the atlases warped by --reg_model (BiRegNet) and
  each learned fusion with a network in --fusion_model (simnet, dlf, unet). Every prediction is mapped back onto the
  target's original grid and scored against its original label file; predictions are written
  to OUT/<target>/pred_<method>.nii.gz with the target's header, and jacobian.csv holds the
  folding statistics of the BiRegNet fields.

  An oracle atlas set (experiments/prealign.py --roi oracle, the paper's setting;
  cmmas.evaluate.oracle.evaluate_oracle_set) is evaluated on each target's own crop instead:
  scores on the crop in OUT/crop/ (Dice, HD95 and ASSD: the original's "HD" column was ASSD) and,
  beside them, on the original grid through the exact oracle inverse in OUT/; "crop+mv" is the
  majority vote of the unregistered cropped atlases. --simnet_holdout K fuses the atlases
  BiRegNet trained on only (the original's 11 of 15 with K 4), in either kind of set.

--aggregate RUN (after every fold and direction; cmmas.evaluate.runs.aggregate): concatenates
  RUN/*/fold*/eval/results.csv (--aggregate_grid crop: RUN/*/fold*/eval/crop/results.csv) and
  their timings.csv, jacobian.csv into OUT.

Writes to --out: results.csv (one row per case x structure x method), timings.csv (seconds per
registration and per fusion), summary.json, boxplot_dice.png, boxplot_hd95.png (one per
direction when there are several) and, in the first two modes, overlay figures of the best,
median and worst case (overlay_<direction>_<tag>_<case>.png); prints the tables (Markdown).

Examples:
  python experiments/evaluate.py --pairs runs/prealign/ct2mr_affine --out runs/eval/ct2mr_affine \
      --methods mv,staple,lwv,jlf
  python experiments/evaluate.py --atlas_set runs/demo/ct2mr/fold1/atlas_set \
      --reg_model runs/demo/ct2mr/fold1/reg/model.keras \
      --fusion_model runs/demo/ct2mr/fold1/fusion/simnet.keras \
      --atlas_modality ct --target_modality mr --out runs/demo/ct2mr/fold1/eval
  python experiments/evaluate.py --aggregate runs/demo --out runs/demo
"""

from __future__ import annotations

import random

from absl import app, flags

from cmmas.scripts import absl_main, atlas_set_flag, define_atlas_set

FLAGS = flags.FLAGS

flags.DEFINE_string("pairs", None, "Folder of pre-aligned pairs (experiments/prealign.py --mode pairwise).")
define_atlas_set("Prepared atlas set (experiments/prealign.py --mode reference): evaluate its held-out targets.")
flags.DEFINE_string("aggregate", None, "Run folder: concatenate RUN/*/fold*/eval/results.csv.")
flags.DEFINE_enum("aggregate_grid", "original", ["original", "crop"], "--aggregate: the original-grid scores, or "
                  "an oracle run's crop scores.")
flags.DEFINE_integer("simnet_holdout", 0, "--atlas_set: do not fuse the last K training atlases (withheld from "
                     "BiRegNet by train_reg.py --simnet_holdout K).", lower_bound=0)
flags.DEFINE_string("reg_model", None, "--atlas_set: trained BiRegNet (.keras).")
flags.DEFINE_list("fusion_model", [], "--atlas_set: trained networks of the learned fusions (.keras: SimNet, DLF, "
                  "U-Net; each file's kind names its fusion, which is then evaluated); none: no learned fusion.")
flags.DEFINE_enum("atlas_modality", "ct", ["ct", "mr"], "--atlas_set: modality of the atlases.")
flags.DEFINE_enum("target_modality", "mr", ["ct", "mr"], "--atlas_set: modality of the targets.")
flags.DEFINE_integer("batch_size", 2, "--atlas_set: atlases per network call.", lower_bound=1)
flags.DEFINE_integer("atlases", None, "--atlas_set: fuse the K atlases most similar to each target (cmmas segment "
                     "--atlases K; default all).", lower_bound=1)
flags.DEFINE_bool("atlas_affine", False, "--atlas_set: each atlas's own affine stage onto the target first (cmmas "
                  "segment --atlas-affine).")
flags.DEFINE_bool("realign", False, "--atlas_set: align each target anew to the reference as cmmas segment does "
                  "(instead of its alignment stored when the set was prepared).")
flags.DEFINE_integer("align_seed", 0, "--atlas_set with --realign: the alignment's ANTs sampling seed (one ITK "
                     "thread: a seed gives one alignment, several seeds a spread).", lower_bound=0)
flags.DEFINE_string("finder_model", None, "--atlas_set: an organ finder (.keras, experiments/train_finder.py): each "
                    "target's QC record gets the finder's Dice with each fusion's label per structure.")
flags.DEFINE_bool("organ_alignment", False, "--atlas_set with --realign and --finder_model: align by the found "
                  "organs too (cmmas segment --organ-alignment).")
flags.DEFINE_bool("organ_registration", False, "--organ_alignment: align by the registration of the found organs "
                  "onto the atlases' alone (no alignment by mutual information competes).")
flags.DEFINE_integer("refine_steps", 0, "--atlas_set: refine every field on the target with MIND-SSC (cmmas segment "
                     "--refine-steps; 0: off).", lower_bound=0)
flags.DEFINE_float("refine_scale", 0.5, "--atlas_set: the refinement's grid / the working grid (cmmas segment "
                   "--refine-scale).")
flags.DEFINE_string("predictions", None, "--pairs: folder of other predictions, DIR/<target>/pred_<name>.nii.gz.")
flags.DEFINE_list("methods", ["mv", "staple", "lwv", "jlf"], "Fusions (names of cmmas.fuse.registry.names()).")
flags.DEFINE_enum("lwv_similarity", "mi", ["mi", "ncc"], "Similarity of the 'lwv' fusion.")
flags.DEFINE_integer("jlf_rad", 1, "Patch radius of the 'jlf' fusion (voxels).", lower_bound=0)
flags.DEFINE_integer("jlf_search", 1, "Search radius of the 'jlf' fusion (voxels).", lower_bound=0)
flags.DEFINE_bool("bounds", True, "Also score the single-atlas mean and the oracle.")
flags.DEFINE_bool("plots", True, "Draw box plots and best/median/worst overlays.")
flags.DEFINE_string("overlay_method", None, "Method ranking the overlay cases (default: dlf, simnet or unet, the first evaluated, "
                    "else the first of --methods).")
flags.DEFINE_string("out", None, "Output folder of the report.")
flags.DEFINE_integer("seed", 0, "Seed of Python and numpy (and TensorFlow with --atlas_set).", lower_bound=0)
flags.DEFINE_bool("progress", True, "Show a progress bar.")


def _options() -> dict:
    return {"lwv": {"similarity": FLAGS.lwv_similarity}, "jlf": {"rad": FLAGS.jlf_rad, "r_search": FLAGS.jlf_search}}


def _run_record() -> dict:
    """This call's command and flags, for the provenance of summary.json."""
    from cmmas.scripts import command_line, flag_config

    return {"command": command_line(), "flags": flag_config()}


def _run() -> int:
    import numpy as np

    from cmmas.errors import CmmasError

    random.seed(FLAGS.seed)
    np.random.seed(FLAGS.seed)
    if FLAGS.aggregate is not None:
        from cmmas.evaluate import runs

        report = runs.aggregate(FLAGS.aggregate, FLAGS.out, plots=FLAGS.plots, grid=FLAGS.aggregate_grid)
    elif FLAGS.pairs is not None:
        from cmmas.evaluate import baseline

        report = baseline.evaluate_pairs(FLAGS.pairs, FLAGS.out, FLAGS.methods, _options(), bounds=FLAGS.bounds,
                                         predictions=FLAGS.predictions, plots=FLAGS.plots,
                                         overlay_method=FLAGS.overlay_method, progress=FLAGS.progress)
    else:
        from cmmas.align.atlas_set import AtlasSet
        from cmmas.evaluate import runs
        from cmmas.fuse import registry

        if FLAGS.reg_model is None:
            raise CmmasError("--reg_model", "--atlas_set needs a trained BiRegNet")
        if FLAGS.organ_alignment and not FLAGS.realign:
            raise CmmasError("--organ_alignment", "aligns a target anew: give --realign too")
        if FLAGS.organ_registration and not FLAGS.organ_alignment:
            raise CmmasError("--organ_registration", "registers the found organs: give --organ_alignment too")
        if FLAGS.realign:
            from cmmas.align import ants

            ants.set_threads(1)  # as cmmas segment: before the first registration, the same seed gives the same alignment
        aset = AtlasSet(atlas_set_flag())  # fails fast, before TensorFlow is imported
        registry.check_names(FLAGS.methods, _options())
        import keras

        keras.utils.set_random_seed(FLAGS.seed)
        from cmmas.segment import SegmentConfig

        config = SegmentConfig(fusion_options=_options(), atlases=FLAGS.atlases, modality=FLAGS.atlas_modality,
                               atlas_affine=FLAGS.atlas_affine, refine_steps=FLAGS.refine_steps,
                               refine_scale=FLAGS.refine_scale, batch_size=FLAGS.batch_size,
                               organ_alignment=FLAGS.organ_alignment, organ_registration=FLAGS.organ_registration,
                               align_seed=FLAGS.align_seed)
        if aset.manifest.oracle:
            from cmmas.evaluate import oracle

            if FLAGS.realign or FLAGS.finder_model:
                raise CmmasError(atlas_set_flag(), "an oracle atlas set places its targets by their stored crop: "
                                                   "--realign and --finder_model do not apply")

            report = oracle.evaluate_oracle_set(
                aset, FLAGS.reg_model, FLAGS.fusion_model or None, FLAGS.out, atlas_modality=FLAGS.atlas_modality,
                target_modality=FLAGS.target_modality, methods=FLAGS.methods, holdout=FLAGS.simnet_holdout,
                bounds=FLAGS.bounds, plots=FLAGS.plots, progress=FLAGS.progress, run=_run_record(), config=config,
            )
        else:
            report = runs.evaluate_atlas_set(
                aset, FLAGS.reg_model, FLAGS.fusion_model or None, FLAGS.out, atlas_modality=FLAGS.atlas_modality,
                target_modality=FLAGS.target_modality, methods=FLAGS.methods, bounds=FLAGS.bounds,
                plots=FLAGS.plots, overlay_method=FLAGS.overlay_method, progress=FLAGS.progress,
                holdout=FLAGS.simnet_holdout, config=config, run=_run_record(), realign=FLAGS.realign,
                finder_model=FLAGS.finder_model,
            )
    print(report.table)
    print(f"evaluate: results {report.results_csv}; summary {report.summary_json}"
          + (f"; jacobian {report.jacobian_csv}" if report.jacobian_csv else ""))
    for path in report.figures:
        print(f"evaluate: figure {path}")
    return 0


if __name__ == "__main__":
    flags.mark_flags_as_required(["out"])
    flags.mark_flags_as_mutual_exclusive(["pairs", "atlas_set", "space", "aggregate"], required=True)
    app.run(absl_main("evaluate", _run))
