"""Write a bundle: the atlas set, the trained models, bundle.json (its default fusion: --fusion,
else the best of --summary among those it can run) and a README.txt in one folder (cmmas.bundle).

`cmmas segment --bundle OUT --target scan.nii.gz --out seg.nii.gz` is then the whole recipe.

Example (what `make bundle` runs for one direction and fold of the chain):
  python experiments/make_bundle.py --atlas_set runs/abdomen/ct2mr/fold1/atlas_set \
      --reg_model runs/abdomen/ct2mr/fold1/reg/model.keras \
      --fusion_model runs/abdomen/ct2mr/fold1/fusion/simnet.keras,runs/abdomen/ct2mr/fold1/dlf/dlf.keras \
      --summary runs/abdomen/ct2mr/fold1/eval/summary.json --out runs/abdomen/bundle-ct2mr
"""

from __future__ import annotations

from absl import app, flags

from cmmas.scripts import absl_main, atlas_set_flag, define_atlas_set

FLAGS = flags.FLAGS

define_atlas_set("Prepared atlas set to bundle.")
flags.DEFINE_string("reg_model", None, "Trained BiRegNet (.keras).")
flags.DEFINE_list("fusion_model", [], "Learned fusions' networks (.keras: SimNet, DLF, U-Net); optional.")
flags.DEFINE_string("fusion", None, "The bundle's default fusion (default: the highest mean Dice of --summary among "
                    "the fusions the bundle can run).")
flags.DEFINE_string("finder_model", None, "An organ finder (.keras, experiments/train_finder.py); optional.")
flags.DEFINE_string("summary", None, "The evaluation's summary.json: its Dice goes into README.txt; optional.")
flags.DEFINE_string("title", "cmmas bundle", "First line of README.txt.")
flags.DEFINE_string("out", None, "Bundle folder to write (replaced if present).")


def _run() -> int:
    from cmmas.bundle import write_bundle

    out = write_bundle(atlas_set_flag(), FLAGS.reg_model, FLAGS.out, fusion_models=FLAGS.fusion_model,
                       summary=FLAGS.summary, title=FLAGS.title, fusion=FLAGS.fusion, finder_model=FLAGS.finder_model)
    print(f"make_bundle: wrote {out} (cmmas segment --bundle {out} --target SCAN --out SEG.nii.gz)")
    return 0


if __name__ == "__main__":
    flags.mark_flags_as_required(["reg_model", "out"])
    app.run(absl_main("make_bundle", _run))
