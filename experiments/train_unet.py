"""Train the plain 3D U-Net baseline: experiments/train_dlf.py with --network unet (the same flags).

The U-Net reads the target image (and the working grid's coordinates) alone, is the size of DLF's
fine-tuning subnet and trains on the same labelled training targets of the target modality,
with the same augmentation and loss: what a user with labelled scans of the target modality
would train instead of cross-modality atlases. Writes OUT/unet.keras with its model card.

Example:
  python experiments/train_unet.py --atlas_set runs/atlas_set --cache runs/fusion/pairs \
      --target_modality mr --out runs/unet
"""

from absl import app, flags

import train_dlf  # experiments/ is on sys.path when this script runs
from cmmas.scripts import absl_main

flags.adopt_module_key_flags(train_dlf)

if __name__ == "__main__":
    flags.FLAGS.set_default("network", "unet")
    flags.FLAGS.set_default("steps", 1000)
    flags.FLAGS.set_default("decay_steps", 350)
    flags.mark_flags_as_required(["out"])
    app.run(absl_main("train_unet", train_dlf.run))
