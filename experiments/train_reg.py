"""Train BiRegNet on random atlas x target pairs of a prepared atlas set (cmmas.align.atlas_set).

Atlases are the labelled "train" cases of --atlas_modality, targets the labelled "train" cases
of --target_modality (held-out "test" cases are never read). The schedule and loss defaults are
the original cmmas's: Adam 1e-3 decayed x0.96 every 100 steps (staircase), 1503 steps of batch 2,
c0 4, the multi-scale Dice loss in both directions plus 0.1 x cycle consistency. Two defaults are
ours (docs/fidelity.md): the network (--arch cmmas, 4 levels; --arch original is the original's
5-level design, cmmas.nn.original) and one random affine per pair applied to atlas and target
alike (--augment_mode pair; --augment_mode image draws the original's, one per image).
--labelmix P gives each image, with probability P, a random contrast drawn from its label map
(cmmas.nn.labelmix: the network cannot learn the training scans' intensities); --pairs atlas_only
trains on pairs of atlas-modality scans only, each side with its own random contrast, so that a
model exists before any scan of the target modality is labelled (the model card records it). The
architecture is saved in model.keras (and config.json), so evaluate and `cmmas segment` load it
as trained. --simnet_holdout=K withholds the last K
atlases and targets from BiRegNet, as the original (4), so that SimNet trains on warps of cases
BiRegNet never saw (experiments/train_fusion.py warps every training atlas onto every training
target). --withhold_fold I/K withholds cross-fitting fold I of K of the training targets (every
K-th from the I-th): the K such networks warp DLF's training pairs (train_dlf.py --crossfit).
Writes OUT/model.keras (+ model.keras.json, its model card: the atlas set's grid,
spacing and labels; config.json, history.csv, curves.png, checkpoints/, tensorboard/); killed and
re-run with the same flags, it resumes from the last finished epoch.

Example:
  python experiments/train_reg.py --atlas_set runs/atlas_set --out runs/reg --shape 64 --steps 300
  python experiments/train_reg.py --flagfile experiments/configs/reg_ct2mr.flags
"""

from __future__ import annotations


from absl import app, flags

from cmmas.scripts import (absl_main, atlas_set_flag, define_atlas_set, define_labelled_targets, define_precision,
                           define_training_pairs, pair_targets, parse_shape)

FLAGS = flags.FLAGS

define_atlas_set("Prepared atlas set (experiments/prealign.py --mode reference).")
define_labelled_targets()
define_training_pairs()
define_precision()
flags.DEFINE_string("atlas_modality", "ct", "Modality of the atlases.")
flags.DEFINE_string("target_modality", "mr", "Modality of the targets.")
flags.DEFINE_string("out", None, "Run folder (model.keras, history.csv, ...).")
flags.DEFINE_string("shape", "96", "Working-grid shape in voxels: one integer or z,y,x; must equal the atlas set's grid.")
flags.DEFINE_enum("arch", "cmmas", ["cmmas", "original"], "Network: ours, or the original cmmas's (5 levels, "
                  "per-channel attention gates; docs/fidelity.md).")
flags.DEFINE_integer("c0", 4, "Channels of the first U-Net level.", lower_bound=1)
flags.DEFINE_integer("levels", None, "U-Net resolution levels (default: the architecture's, cmmas 4, original 5).",
                     lower_bound=1)
flags.DEFINE_bool("diffeomorphic", False, "Integrate stationary velocity fields (scaling and squaring).")
flags.DEFINE_enum("sim_loss", "dice", ["dice", "ncc", "mi", "mind", "dice+mi", "dice+ncc", "dice+mind"],
                  "Similarity terms of the loss (mind: the MIND-SSC distance of the images, weighted by "
                  "--lambda_mind).")
flags.DEFINE_float("lambda_mind", 1.0, "Weight of the MIND-SSC terms when --sim_loss has mind.", lower_bound=0.0)
flags.DEFINE_float("lambda_consis", 0.1, "Weight of the cycle-consistency L1 terms.", lower_bound=0.0)
flags.DEFINE_float("lambda_smooth", 0.0, "Weight of the squared-gradient smoothness of U and V.", lower_bound=0.0)
flags.DEFINE_float("lambda_fold", 0.0, "Weight of the negative-Jacobian folding penalty.", lower_bound=0.0)
flags.DEFINE_float("lr", 1e-3, "Initial Adam learning rate.", lower_bound=0.0)
flags.DEFINE_float("decay_rate", 0.96, "Learning-rate factor every --decay_steps steps (staircase).")
flags.DEFINE_integer("decay_steps", 100, "Steps between learning-rate decays.", lower_bound=1)
flags.DEFINE_integer("steps", 1503, "Optimiser steps in total.", lower_bound=1)
flags.DEFINE_integer("batch", 2, "Pairs per step (global batch).", lower_bound=1)
flags.DEFINE_integer("steps_per_epoch", 50, "Steps between logs, checkpoints and backups.", lower_bound=1)
flags.DEFINE_bool("augment", True, "Random affine augmentation (see --augment_mode).")
flags.DEFINE_enum("augment_mode", "pair", ["pair", "image"], "pair: one random affine per pair, applied to atlas "
                  "and target alike (ours); image: an independent random affine per image, the original's "
                  "(corners moved by up to 0.1 of the half-extent; the --aug_* ranges are then unused).")
flags.DEFINE_string("withhold_fold", None, "I/K: withhold cross-fitting fold I of K of the training targets (every "
                    "K-th from the I-th, natural id order): the BiRegNet that warps fold I's targets for DLF's training "
                    "pairs as the full one warps scans it has not seen (train_dlf.py --crossfit).")
flags.DEFINE_integer("simnet_holdout", 0, "Withhold the last K training atlases and targets (natural id order) "
                     "from BiRegNet, for SimNet's training pairs (the original: 4).", lower_bound=0)
flags.DEFINE_float("aug_rotation", 10.0, "Largest augmentation rotation about each axis, degrees.", lower_bound=0.0)
flags.DEFINE_float("aug_scale", 0.1, "Largest augmentation scale change per axis (0.1 = +-10 %).", lower_bound=0.0)
flags.DEFINE_float("aug_shift", 4.0, "Largest augmentation translation per axis, voxels.", lower_bound=0.0)
flags.DEFINE_string("init_weights", None, "A model.keras to start from (extends a finished run; steps and "
                    "learning-rate schedule restart at 0). Ignored when resuming an interrupted run.")
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multiworker"], "tf.distribute strategy.")
flags.DEFINE_integer("seed", 0, "Seed of Python, numpy and TensorFlow (weights, pairs, augmentation).")
flags.DEFINE_bool("progress", True, "Show the Keras progress bar.")
flags.mark_flags_as_required(["out"])




def _run() -> int:
    import dataclasses
    import random

    import numpy as np

    from cmmas.register import biregnet
    from cmmas.align.atlas_set import AtlasSet
    from cmmas.datasets import splits
    from cmmas.cohort.manifest import parse_shard
    from cmmas.errors import AtlasSetError, CmmasError
    from cmmas.align.cards import card_from_atlas_set
    from cmmas.nn.networks import ARCH_LEVELS

    random.seed(FLAGS.seed)
    np.random.seed(FLAGS.seed)
    shape = parse_shape(FLAGS.shape)
    aset = AtlasSet(atlas_set_flag())
    if tuple(aset.geometry.shape) != shape:
        raise AtlasSetError(
            aset.root, f"working grid is {aset.geometry.shape} but --shape is {shape}; pass --shape "
            f"{','.join(map(str, aset.geometry.shape))} or prepare the atlas set at {shape}"
        )
    atlas_ids = aset.ids(modality=FLAGS.atlas_modality, role="train", labelled=True)
    target_modality, target_ids, labelmix = pair_targets(aset)
    for ids, modality in ((atlas_ids, FLAGS.atlas_modality), (target_ids, target_modality)):
        if not ids:
            raise AtlasSetError(aset.root, f"no labelled train case of modality {modality!r}")
    if FLAGS.withhold_fold:
        if FLAGS.pairs != "cross":
            raise CmmasError("--withhold_fold", "cross-fitting withholds labelled targets of --target_modality: "
                             "it needs --pairs cross")
        index, count = parse_shard(FLAGS.withhold_fold, "--withhold_fold")
        held = splits.crossfit_folds(target_ids, count)[index]
        target_ids = [t for t in target_ids if t not in held]
        print(f"train_reg: withheld for cross-fitting: {', '.join(held)}")
    if FLAGS.simnet_holdout:
        held = splits.simnet_holdout(atlas_ids, target_ids, FLAGS.simnet_holdout)
        atlas_ids, target_ids = list(held.reg_atlases), list(held.reg_targets)
        print(f"train_reg: withheld for SimNet: {', '.join(dict.fromkeys(held.held_atlases + held.held_targets))}")
    config = biregnet.RegConfig(
        shape_zyx=shape, c0=FLAGS.c0, levels=FLAGS.levels or ARCH_LEVELS[FLAGS.arch], arch=FLAGS.arch,
        diffeomorphic=FLAGS.diffeomorphic,
        sim_loss=FLAGS.sim_loss, lambda_mind=FLAGS.lambda_mind, lambda_consis=FLAGS.lambda_consis,
        lambda_smooth=FLAGS.lambda_smooth, lambda_fold=FLAGS.lambda_fold, lr=FLAGS.lr, decay_rate=FLAGS.decay_rate,
        decay_steps=FLAGS.decay_steps,
        steps=FLAGS.steps, batch=FLAGS.batch, steps_per_epoch=FLAGS.steps_per_epoch, augment=FLAGS.augment,
        augment_mode=FLAGS.augment_mode, aug_rotation=FLAGS.aug_rotation, aug_scale=FLAGS.aug_scale,
        aug_shift=FLAGS.aug_shift, labelmix=labelmix, precision=FLAGS.precision, seed=FLAGS.seed,
    )
    atlas_images, atlas_labels = aset.arrays(atlas_ids)
    target_images, target_labels = aset.arrays(target_ids)
    print(f"train_reg: {len(atlas_ids)} {FLAGS.atlas_modality} atlases x {len(target_ids)} "
          f"{target_modality} targets at {shape}, {config.steps} steps of batch {config.batch}"
          + (f", random contrasts (labelmix {labelmix:g})" if labelmix else ""))
    path = biregnet.train(
        config, atlas_images, atlas_labels, target_images, target_labels, sorted(aset.labels), FLAGS.out,
        strategy=FLAGS.strategy, progress=FLAGS.progress, init_weights=FLAGS.init_weights,
        card=dataclasses.replace(card_from_atlas_set(aset, "biregnet", FLAGS.atlas_modality, FLAGS.target_modality),
                                 training_pairs=FLAGS.pairs),
        distinct_pairs=FLAGS.pairs == "atlas_only",
    )
    print(f"train_reg: model written to {path}")
    return 0


if __name__ == "__main__":
    app.run(absl_main("train_reg", _run))
