"""Train Deep Label Fusion (or, with --network unet, the plain 3D U-Net it is compared with).

DLF (cmmas.nn.dlf, Xie et al. 2023): a weighted-voting subnet gives every warped atlas one
weight map per label, their vote is corrected by a fine-tuning subnet that reads the target
image, and each label is masked to where some atlas votes for it. It trains on the pair cache
of the learned fusions (OUT of train_fusion.py's gen step: every training atlas warped by the
trained BiRegNet onto every labelled training target), which --reg_model fills where it is
missing. With --crossfit_models (K BiRegNets, the I-th trained by train_reg.py --withhold_fold I/K)
each training target is warped by the network that did not see it (into --cache, which then
must be a folder of its own): DLF learns from warps as good as those of scans at test time,
not from a BiRegNet's warps of its own training targets. The U-Net reads the target image alone and trains on the same targets: the baseline a
user with labelled scans of the target modality would train instead.

Writes OUT/dlf.keras (or unet.keras) with its model card (grid, labels, modalities, atlases per
target), config.json, history.csv, curves.png, checkpoints/ and tensorboard/; a killed run
started again with the same flags resumes from OUT/backup/. Prints the model path.

Example:
  python experiments/train_dlf.py --atlas_set runs/atlas_set --reg_model runs/reg/model.keras \
      --cache runs/fusion/pairs --atlas_modality ct --target_modality mr --out runs/dlf
"""

from __future__ import annotations

import dataclasses
import math
import random

from absl import app, flags

from cmmas.scripts import (absl_main, atlas_set_flag, define_atlas_set, define_labelled_targets, define_precision,
                           labelled_targets)

FLAGS = flags.FLAGS

define_atlas_set("Prepared atlas set (experiments/prealign.py --mode reference).")
flags.DEFINE_enum("network", "dlf", ["dlf", "unet"], "dlf: Deep Label Fusion; unet: the plain U-Net on the target "
                  "image alone (the fine-tuning subnet's size).")
flags.DEFINE_string("reg_model", None, "Trained BiRegNet (.keras), to warp the pairs the cache lacks.")
flags.DEFINE_list("crossfit_models", [], "K BiRegNets (.keras), the I-th trained without cross-fitting fold I of K "
                  "of the training targets (train_reg.py --withhold_fold I/K): each target's pairs are warped by the "
                  "one that did not see it (instead of --reg_model).")
flags.DEFINE_string("cache", None, "Folder of the warped pairs (train_fusion.py's OUT/pairs; default OUT/pairs).")
flags.DEFINE_enum("atlas_modality", "ct", ["ct", "mr"], "Modality of the atlases.")
flags.DEFINE_enum("target_modality", "mr", ["ct", "mr"], "Modality of the targets.")
flags.DEFINE_string("out", None, "Output folder.")
define_labelled_targets()
define_precision()
flags.DEFINE_integer("atlases", 5, "Atlases drawn per target and step, with duplicates.", lower_bound=1)
flags.DEFINE_integer("c_vote", 8, "Channels of the weighted-voting subnet's first level.", lower_bound=1)
flags.DEFINE_integer("c_fine", 16, "Channels of the fine-tuning subnet's (the U-Net's) first level.", lower_bound=1)
flags.DEFINE_bool("fine_tune", True, "DLF: the fine-tuning subnet (false: the weighted-voting subnet alone, DLF's "
                  "ablation).")
flags.DEFINE_bool("mask", True, "DLF: mask each label to where some atlas votes for it (false: DLF's ablation).")
flags.DEFINE_integer("steps", 600, "Optimiser steps.", lower_bound=1)
flags.DEFINE_integer("batch", 1, "Targets per step.", lower_bound=1)
flags.DEFINE_float("lr", 1e-3, "Initial Adam learning rate.", lower_bound=0.0)
flags.DEFINE_float("decay_rate", 0.5, "Learning-rate factor applied every --decay_steps steps.")
flags.DEFINE_integer("decay_steps", 200, "Steps between learning-rate decays.", lower_bound=1)
flags.DEFINE_integer("steps_per_epoch", 50, "Steps between logs, checkpoints and backups.", lower_bound=1)
flags.DEFINE_bool("augment", True, "Augment (joint similarity transform, each atlas's own small transform, "
                  "histogram shift, noise).")
flags.DEFINE_float("jitter_probability", 0.5, "Probability that an atlas is moved alone by a small transform.",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_float("shift_strength", 0.1, "Largest knot displacement of the random histogram shift.", lower_bound=0.0)
flags.DEFINE_integer("gen_batch", 4, "Atlases per BiRegNet batch when warping pairs.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed of Python, numpy and TensorFlow.", lower_bound=0)
flags.DEFINE_bool("progress", True, "Show progress bars.")


def run() -> int:
    """The script's work, after flag parsing (train_unet.py runs it too)."""
    from pathlib import Path

    import numpy as np

    from cmmas.align.atlas_set import AtlasSet
    from cmmas.errors import AtlasSetError, CmmasError

    random.seed(FLAGS.seed)
    np.random.seed(FLAGS.seed)
    aset = AtlasSet(atlas_set_flag())  # fails fast, before TensorFlow is imported

    from cmmas.align.cards import card_from_atlas_set
    from cmmas.datasets import splits
    from cmmas.fuse import dlf_train, pairs
    from cmmas.fuse.simnet import channel_codes
    from cmmas.nn import training

    out = Path(FLAGS.out)
    cache = Path(FLAGS.cache) if FLAGS.cache else out / "pairs"
    codes = channel_codes(aset.labels)
    atlases = aset.ids(FLAGS.atlas_modality, role="train", labelled=True)
    targets = labelled_targets(aset.ids(FLAGS.target_modality, role="train", labelled=True))
    if not targets or (FLAGS.network == "dlf" and not atlases):
        raise AtlasSetError(aset.root, f"needs labelled training cases; found {len(atlases)} {FLAGS.atlas_modality} "
                            f"atlas(es) and {len(targets)} {FLAGS.target_modality} target(s)")
    missing = [t for t in targets if not (cache / f"{t}.npz").exists()]
    if FLAGS.crossfit_models:
        if FLAGS.reg_model:
            raise CmmasError("--crossfit_models", "give either the cross-fitted BiRegNets or --reg_model, not both")
        folds = splits.crossfit_folds(targets, len(FLAGS.crossfit_models))
        for path, fold in zip(FLAGS.crossfit_models, folds):
            pairs.generate_pairs(training.load_model(path, "biregnet"), aset, atlases, fold, cache, codes,
                                 batch_size=FLAGS.gen_batch, progress=FLAGS.progress, made_by=path)
    elif missing or FLAGS.reg_model:
        if not FLAGS.reg_model:
            raise CmmasError("--reg_model", f"the pair cache {cache} lacks {len(missing)} target(s) "
                             f"({', '.join(missing[:3])}...): give the trained BiRegNet to warp them")
        reg_model = training.load_model(FLAGS.reg_model, "biregnet")
        pairs.generate_pairs(reg_model, aset, atlases, targets, cache, codes, batch_size=FLAGS.gen_batch,
                             progress=FLAGS.progress)
    config = dlf_train.DLFConfig(
        kind=FLAGS.network, shape_zyx=tuple(aset.geometry.shape), c_vote=FLAGS.c_vote, c_fine=FLAGS.c_fine,
        fine_tune=FLAGS.fine_tune, mask=FLAGS.mask, atlases=FLAGS.atlases, lr=FLAGS.lr, decay_rate=FLAGS.decay_rate,
        decay_steps=FLAGS.decay_steps, steps=FLAGS.steps, batch=FLAGS.batch, steps_per_epoch=FLAGS.steps_per_epoch, augment=FLAGS.augment,
        jitter_probability=FLAGS.jitter_probability, shift_strength=FLAGS.shift_strength,
        precision=FLAGS.precision, seed=FLAGS.seed)
    card = card_from_atlas_set(aset, FLAGS.network, FLAGS.atlas_modality, FLAGS.target_modality)
    if FLAGS.network == "dlf":
        card = dataclasses.replace(card, atlas_count=FLAGS.atlases)
    print(f"train_{FLAGS.network}: {len(targets)} target(s), {config.steps} steps, "
          f"{math.ceil(config.steps / config.steps_per_epoch)} epochs into {out}")
    path = dlf_train.train(config, cache, codes, out, target_ids=targets, progress=FLAGS.progress, card=card)
    print(path)
    return 0


if __name__ == "__main__":
    flags.mark_flags_as_required(["out"])
    app.run(absl_main("train_dlf", run))
