"""Write the synthetic CT/MR heart phantom as an MM-WHS-layout data set (cmmas.datasets.phantom).

Every subject is a different individual (anatomy drawn from --seed), CT and MR with opposite
fat/bone contrast, the seven MM-WHS structures labelled. Writes OUT/<mod>_train_<n>_image.nii.gz
and _label.nii.gz; --preview writes an overlay figure of one CT and one MR subject.

Example:
  python experiments/make_phantom.py --out runs/demo/data --n 12 --shape 64 --preview runs/demo/phantom_preview.png
"""

from __future__ import annotations

from absl import app, flags

from cmmas.datasets import phantom
from cmmas.scripts import absl_main

FLAGS = flags.FLAGS

flags.DEFINE_string("out", None, "Folder to write the MM-WHS-layout data set into.")
flags.DEFINE_integer("n", 20, "Subjects per modality.", lower_bound=1)
flags.DEFINE_integer("shape", phantom.BASE_SHAPE, "Voxels per axis (the field of view is fixed).",
                     lower_bound=phantom.MIN_SHAPE)
flags.DEFINE_integer("seed", 0, "Seed of the data set.")
flags.DEFINE_list("modalities", list(phantom.MODALITIES), "Modalities to write.")
flags.DEFINE_string("preview", None, "PNG file for an overlay figure of one CT and one MR subject.")


def _run() -> int:
    paths = phantom.generate(FLAGS.out, n=FLAGS.n, shape=FLAGS.shape, seed=FLAGS.seed, modalities=FLAGS.modalities)
    message = (f"make_phantom: wrote {len(paths) // 2} cases ({', '.join(FLAGS.modalities)}, {FLAGS.n} each, "
               f"{FLAGS.shape}^3) to {FLAGS.out}")
    if FLAGS.preview:
        message += f"; preview {phantom.preview_first_cases(FLAGS.out, FLAGS.modalities, FLAGS.preview)}"
    print(message)
    return 0


if __name__ == "__main__":
    flags.mark_flag_as_required("out")
    app.run(absl_main("make_phantom", _run))
