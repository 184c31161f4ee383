"""Train the organ finder: a small 3D U-Net that labels a whole scan of any modality at the
alignment's coarse spacing (cmmas.align.finder), trained on the labelled training scans of a
fold with label-driven random contrasts (--labelmix), so that it finds organs in a modality it
has not seen labelled.

Training scans: the atlas modality's labelled cases outside --fold (the atlases of that fold);
with --target_labels also the target modality's labelled training cases (never its --fold
cases, the fold's test targets). Each is read as the finder reads a scan (its alignment image
at --spacing, scaled to [0, 1]), its label resampled onto that grid; each step takes random
--crop boxes of --batch scans.

Writes OUT/finder.keras with its model card (kind "finder", the training box, spacing, labels and
modalities), config.json, history.csv, curves.png, checkpoints/ and tensorboard/; a killed run
started again with the same flags resumes from OUT/backup/.

Example:
  python experiments/train_finder.py --data ../shared/data/abdomen-ctmr --fold 1 \
      --atlas_modality ct --target_modality mr --spacing 4 --out runs/finder-ct
"""

from __future__ import annotations

import datetime
import random

from absl import app, flags

from cmmas.scripts import absl_main, define_precision, parse_shape

FLAGS = flags.FLAGS

flags.DEFINE_string("data", None, "Data-set root folder.")
flags.DEFINE_enum("layout", "folder", ["mmwhs", "chaos", "folder"], "On-disk layout of --data.")
flags.DEFINE_integer("fold", None, "1-based cross-validation fold: its cases are never trained on (0: every case "
                     "trains).", lower_bound=0)
flags.DEFINE_integer("n_folds", 4, "Number of folds.", lower_bound=2)
flags.DEFINE_enum("atlas_modality", "ct", ["ct", "mr"], "Modality of the atlases (always trained on).")
flags.DEFINE_enum("target_modality", "mr", ["ct", "mr"], "Modality of the targets.")
flags.DEFINE_bool("target_labels", False, "Also train on the target modality's labelled training cases.")
flags.DEFINE_float("spacing", 4.0, "Isotropic spacing of the finder, mm (the atlas set's --align_spacing).",
                   lower_bound=0.1)
flags.DEFINE_string("crop", "48", "Training box in voxels: one integer or z,y,x, divisible by 2**(levels-1).")
flags.DEFINE_integer("c0", 8, "Channels of the U-Net's first level.", lower_bound=1)
flags.DEFINE_integer("levels", 4, "U-Net levels.", lower_bound=1)
flags.DEFINE_float("labelmix", 0.8, "Probability, per image and step, of a random contrast from its label map.",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_float("lr", 1e-3, "Initial Adam learning rate.", lower_bound=0.0)
flags.DEFINE_float("decay_rate", 0.5, "Learning-rate factor applied every --decay_steps steps.")
flags.DEFINE_integer("decay_steps", 400, "Steps between learning-rate decays.", lower_bound=1)
flags.DEFINE_integer("steps", 1200, "Optimiser steps.", lower_bound=1)
flags.DEFINE_integer("batch", 2, "Scans per step.", lower_bound=1)
flags.DEFINE_integer("steps_per_epoch", 50, "Steps between logs, checkpoints and backups.", lower_bound=1)
define_precision()
flags.DEFINE_integer("seed", 0, "Seed of Python, numpy and TensorFlow.", lower_bound=0)
flags.DEFINE_bool("progress", True, "Show progress bars.")
flags.DEFINE_string("out", None, "Output folder.")


def _run() -> int:
    import numpy as np

    from cmmas.align.cards import NORMALISATION
    from cmmas.datasets import load_case, open_dataset
    from cmmas.datasets.splits import fold_split
    from cmmas.errors import DatasetError
    from cmmas.nn.model_card import ModelCard

    random.seed(FLAGS.seed)
    np.random.seed(FLAGS.seed)
    dataset = open_dataset(FLAGS.data, FLAGS.layout)
    modalities = [FLAGS.atlas_modality] + ([FLAGS.target_modality] if FLAGS.target_labels else [])
    cases = [case for modality in dict.fromkeys(modalities)
             for case in fold_split(dataset.of(modality), FLAGS.fold, FLAGS.n_folds)[1] if case.label_path is not None]
    if not cases:
        raise DatasetError(dataset.root, f"no labelled training case of {' or '.join(modalities)} "
                                         f"outside fold {FLAGS.fold}")

    from cmmas.align import finder_train  # TensorFlow

    config = finder_train.FinderConfig(
        spacing_mm=FLAGS.spacing, crop_zyx=parse_shape(FLAGS.crop), c0=FLAGS.c0, levels=FLAGS.levels, lr=FLAGS.lr,
        decay_rate=FLAGS.decay_rate, decay_steps=FLAGS.decay_steps, steps=FLAGS.steps, batch=FLAGS.batch,
        steps_per_epoch=FLAGS.steps_per_epoch, labelmix=FLAGS.labelmix, precision=FLAGS.precision, seed=FLAGS.seed)
    codes = [0, *sorted(int(c) for c in dataset.labels)]
    print(f"train_finder: preparing {len(cases)} scans ({', '.join(modalities)}) at {FLAGS.spacing:g} mm")
    prepared = []
    for case in cases:
        image, label = load_case(case, dict(dataset.labels))
        prepared.append(finder_train.prepare_case(case.id, image, label, FLAGS.spacing, codes))
    card = ModelCard(
        kind="finder", shape_zyx=config.crop_zyx, spacing_zyx=(float(FLAGS.spacing),) * 3,
        labels={int(c): str(n) for c, n in dataset.labels.items()}, atlas_modality=FLAGS.atlas_modality,
        target_modality=FLAGS.target_modality if FLAGS.target_labels else None, normalisation=NORMALISATION,
        align_spacing_mm=float(FLAGS.spacing), training_set=str(dataset.root.resolve()),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    print(f"train_finder: {config.steps} steps of {config.batch} boxes of {config.crop_zyx} into {FLAGS.out}")
    print(finder_train.train(config, prepared, codes, FLAGS.out, progress=FLAGS.progress, card=card))
    return 0


if __name__ == "__main__":
    flags.mark_flags_as_required(["data", "fold", "out"])
    app.run(absl_main("train_finder", _run))
