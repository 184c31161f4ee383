"""Train SimNet, the learned label fusion, on atlases warped by a trained BiRegNet.

Two steps:
  gen   every training atlas (--atlas_modality, role "train", labelled) of the prepared atlas set is
        warped with BiRegNet onto every training target (--target_modality, role "train",
        labelled); one OUT/pairs/<target>.npz per target (cmmas.fuse.pairs.generate_pairs).
        Files already there are kept, so a re-run only adds what is missing. --skip_gen skips
        the step (the cache must exist).
  train SimNet on the cached pairs (cmmas.fuse.simnet_train.train): OUT/simnet.keras (+ its
        model card simnet.keras.json: the atlas set's grid, spacing and labels), config.json,
        history.csv, curves.png, checkpoints/, tensorboard/; a killed run started again with
        the same flags resumes from OUT/backup/.

Held-out ("test") cases are never used. The schedule defaults are the original SimNet's (lr 1e-4
decayed x0.96 every 1000 steps, 5003 steps, batch 2); the network (--arch cmmas, 4 levels), the
augmentation (--augment_mode atlas) and, unless BiRegNet was trained with --simnet_holdout, the
pairs are not (docs/fidelity.md). --arch original --augment_mode joint --augment_probability 1
--shift_max 4 are the original's; the architecture is saved in simnet.keras. --pairs atlas_only
takes the targets from the atlas modality too (warped by an atlas-only BiRegNet) and gives each
target image a random contrast (--labelmix): SimNet without a labelled scan of the target modality.
Prints the model path.

Example:
  python experiments/train_fusion.py --atlas_set runs/atlas_set --reg_model runs/reg/model.keras \
      --atlas_modality ct --target_modality mr --out runs/simnet
"""

from __future__ import annotations

import dataclasses
import math
import random

from absl import app, flags

from cmmas.scripts import (absl_main, atlas_set_flag, define_atlas_set, define_labelled_targets, define_precision,
                           define_training_pairs, pair_targets, parse_shape)

FLAGS = flags.FLAGS

define_atlas_set("Prepared atlas set (experiments/prealign.py --mode reference).")
define_labelled_targets()
define_training_pairs()
define_precision()
flags.DEFINE_string("reg_model", None, "Trained BiRegNet (.keras) for the gen step.")
flags.DEFINE_enum("atlas_modality", "ct", ["ct", "mr"], "Modality of the atlases.")
flags.DEFINE_enum("target_modality", "mr", ["ct", "mr"], "Modality of the targets.")
flags.DEFINE_string("out", None, "Output folder.")
flags.DEFINE_string("cache", None, "Folder of the warped pairs (default: OUT/pairs).")
flags.DEFINE_bool("skip_gen", False, "Skip the gen step and train on the existing cache.")
flags.DEFINE_integer("gen_batch", 4, "Atlases per BiRegNet batch in the gen step.", lower_bound=1)
flags.DEFINE_string("shape", None, "Network shape in voxels: one integer or z,y,x (default: the atlas set's working grid, which it must equal).")
flags.DEFINE_enum("arch", "cmmas", ["cmmas", "original"], "Network: ours, or the original cmmas's (5 levels, no "
                  "attention, 7^3 first kernel; docs/fidelity.md).")
flags.DEFINE_integer("c0", 16, "Channels of the first U-Net level.", lower_bound=1)
flags.DEFINE_integer("levels", None, "U-Net levels (default: the architecture's, cmmas 4, original 5).", lower_bound=1)
flags.DEFINE_float("lr", 1e-4, "Initial Adam learning rate.", lower_bound=0.0)
flags.DEFINE_float("decay_rate", 0.96, "Learning-rate factor applied every --decay_steps steps.")
flags.DEFINE_integer("decay_steps", 1000, "Steps between learning-rate decays.", lower_bound=1)
flags.DEFINE_integer("steps", 5003, "Optimiser steps.", lower_bound=1)
flags.DEFINE_integer("batch", 2, "Pairs per step (global batch).", lower_bound=1)
flags.DEFINE_integer("steps_per_epoch", 50, "Steps between logs, checkpoints and backups.", lower_bound=1)
flags.DEFINE_bool("augment", True, "Augment the pairs (see --augment_mode).")
flags.DEFINE_enum("augment_mode", "atlas", ["atlas", "joint"], "atlas: the atlas label alone moved by a random shift "
                  "and similarity transform (ours); joint: one similarity transform applied to target image, target "
                  "label and atlas label together, then the atlas label alone shifted along axes 0 and 1 (the "
                  "original's).")
flags.DEFINE_float("augment_probability", 0.5, "Probability that a pair is augmented.", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_integer("shift_max", 5, "Random integer shift of the atlas label, voxels per axis (joint: "
                     "-shift_max..shift_max-1 along axes 0 and 1).", lower_bound=0)
flags.DEFINE_float("rotation_max", math.pi / 28, "Random rotation about each axis, radians.", lower_bound=0.0)
flags.DEFINE_float("translation_max", 10.0, "Random translation along each axis, voxels.", lower_bound=0.0)
flags.DEFINE_float("scale_min", 0.85, "Smallest random scale of the atlas label.", lower_bound=0.0)
flags.DEFINE_float("scale_max", 1.45, "Largest random scale of the atlas label.", lower_bound=0.0)
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multiworker"], "tf.distribute strategy.")
flags.DEFINE_integer("seed", 0, "Seed of Python, numpy and TensorFlow.", lower_bound=0)
flags.DEFINE_bool("progress", True, "Show progress bars.")
flags.DEFINE_string("init_weights", None, "A simnet.keras to start from (extends a finished run; steps and "
                    "learning-rate schedule restart at 0). Ignored when resuming an interrupted run.")


def _run() -> int:
    from pathlib import Path

    import numpy as np

    from cmmas.align.atlas_set import AtlasSet
    from cmmas.errors import AtlasSetError, CmmasError

    random.seed(FLAGS.seed)
    np.random.seed(FLAGS.seed)
    aset = AtlasSet(atlas_set_flag())  # fails fast, before TensorFlow is imported

    from cmmas.nn import training
    from cmmas.fuse import simnet as simnet_fusion
    from cmmas.fuse import pairs as training_pairs, simnet_train
    from cmmas.align.cards import card_from_atlas_set
    from cmmas.nn.networks import ARCH_LEVELS

    out = Path(FLAGS.out)
    cache = Path(FLAGS.cache) if FLAGS.cache else out / "pairs"
    codes = simnet_fusion.channel_codes(aset.labels)
    shape = parse_shape(FLAGS.shape) if FLAGS.shape else aset.geometry.shape
    atlases = aset.ids(FLAGS.atlas_modality, role="train", labelled=True)
    target_modality, targets, labelmix = pair_targets(aset)
    if not atlases or not targets:
        raise AtlasSetError(aset.root, f"needs labelled training atlases and targets; found {len(atlases)} "
                            f"{FLAGS.atlas_modality} atlas(es) and {len(targets)} {target_modality} target(s)")

    if not FLAGS.skip_gen:
        if not FLAGS.reg_model:
            raise CmmasError("--reg_model", "the gen step needs a trained BiRegNet (or pass --skip_gen)")
        print(f"train_fusion: warping {len(atlases)} atlas(es) onto {len(targets)} target(s) into {cache}")
        reg_model = training.load_model(FLAGS.reg_model, "biregnet")
        training_pairs.generate_pairs(reg_model, aset, atlases, targets, cache, codes, batch_size=FLAGS.gen_batch,
                                    progress=FLAGS.progress)
    config = simnet_train.SimConfig(
        shape_zyx=shape, c0=FLAGS.c0, levels=FLAGS.levels or ARCH_LEVELS[FLAGS.arch], arch=FLAGS.arch,
        lr=FLAGS.lr, decay_rate=FLAGS.decay_rate,
        decay_steps=FLAGS.decay_steps, steps=FLAGS.steps, batch=FLAGS.batch, steps_per_epoch=FLAGS.steps_per_epoch,
        augment=FLAGS.augment, augment_mode=FLAGS.augment_mode, augment_probability=FLAGS.augment_probability,
        shift_max=FLAGS.shift_max,
        rotation_max=FLAGS.rotation_max, translation_max=FLAGS.translation_max,
        scale_range=(FLAGS.scale_min, FLAGS.scale_max), labelmix=labelmix, precision=FLAGS.precision,
        seed=FLAGS.seed)
    pairs = training_pairs.load_pairs(cache, targets)
    print(f"train_fusion: training SimNet on {pairs.n_pairs} pairs for {config.steps} steps into {out}")
    path = simnet_train.train(config, pairs, codes, out, strategy=FLAGS.strategy, progress=FLAGS.progress,
                            init_weights=FLAGS.init_weights,
                            card=dataclasses.replace(card_from_atlas_set(aset, "simnet", FLAGS.atlas_modality,
                                                                         FLAGS.target_modality),
                                                     training_pairs=FLAGS.pairs))
    print(path)
    return 0


if __name__ == "__main__":
    flags.mark_flags_as_required(["out"])
    app.run(absl_main("train_fusion", _run))
