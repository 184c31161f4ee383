"""Register one moving image onto a fixed image with a trained BiRegNet (as `cmmas register`).

Both images are resampled onto one working grid of the model's input shape, centred on the
fixed image (isotropic spacing that holds the whole fixed image, or --spacing), normalised to
[0, 1] and registered; the results are mapped back onto the FIXED image's original grid.
BiRegNet is deformable only: the two images must already be affinely aligned (share physical
space), e.g. with experiments/prealign.py.

Writes into --out_dir:
  warped_image.nii.gz            the moving image (its own intensities) on the fixed grid
  warped_label.nii.gz            the moving label on the fixed grid (with --moving_label)
  ddf_x.nii.gz, ddf_y.nii.gz, ddf_z.nii.gz
                                 the displacement in millimetres along the physical (LPS) x, y, z
                                 axes, one scalar image per component on the fixed grid: fixed
                                 point p corresponds to moving point p + d(p) (ITK's displacement
                                 field convention, split because our writer stores 3D scalars)
  jacobian.json                  folding %, std log|J|, min/max det J of the working-grid field
and prints the Jacobian statistics.

Example:
  python experiments/register.py --moving atlas.nii.gz --moving_label atlas_label.nii.gz \
      --fixed target.nii.gz --model runs/reg/model.keras --out_dir runs/register/pair1
"""

from __future__ import annotations


from absl import app, flags

from cmmas.scripts import absl_main, parse_spacing

FLAGS = flags.FLAGS

flags.DEFINE_string("moving", None, "Moving image (e.g. an atlas): NIfTI/MHA/NRRD or a DICOM folder.")
flags.DEFINE_string("fixed", None, "Fixed image (e.g. the target).")
flags.DEFINE_string("moving_label", None, "Label map of the moving image (optional).")
flags.DEFINE_string("model", None, "Trained BiRegNet (.keras).")
flags.DEFINE_string("out_dir", None, "Folder for the outputs.")
flags.DEFINE_string("spacing", None, "Working-grid spacing in mm: one value or z,y,x (default: fit the fixed image).")
flags.mark_flags_as_required(["moving", "fixed", "model", "out_dir"])


def _run() -> int:
    spacing = parse_spacing(FLAGS.spacing) if FLAGS.spacing else None
    from cmmas.register import apply  # TensorFlow: after the flags are checked
    written, stats = apply.register_files(
        FLAGS.moving, FLAGS.fixed, FLAGS.model, FLAGS.out_dir, moving_label=FLAGS.moving_label, spacing_zyx=spacing
    )
    for path in written:
        print(f"register: wrote {path}")
    print("register: jacobian " + ", ".join(f"{k} {v:.4g}" for k, v in stats.items()))
    return 0


if __name__ == "__main__":
    app.run(absl_main("register", _run))
