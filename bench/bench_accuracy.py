"""Cross-modality accuracy of the MIND-SSC options: fusion on descriptors and test-time refinement.

For each prepared atlas set (one per direction and fold) and each of its held-out targets, two
engines (cmmas.segment.Segmenter: the alignment stored in the atlas set, the --atlases most
similar atlases, BiRegNet; the second also refining every field) segment it by each fusion:

  jlf_tf              today's default fusion on BiRegNet's warps;
  jlf_mind            JLF on MIND-SSC descriptors (cmmas.fuse.registry "jlf_mind");
  refine+jlf_tf       every field refined on the target (cmmas.register.refine), then jlf_tf;
  refine+jlf_mind     both.

Each label is the engine's, as `cmmas segment` writes it, scored on the target's original grid.
Printed: Dice per organ and direction/fold (mean over targets, worst target), seconds of the
refinement and of each fusion (ratios against jlf_tf's), and folding % before and after the
refinement. --out writes bench_accuracy.csv (one row per target x variant x organ).

Example:
  python bench/bench_accuracy.py \\
      --atlas_set=runs/abdomen/ct2mr/fold1/atlas_set,runs/abdomen/mr2ct/fold1/atlas_set \\
      --reg_model=runs/abdomen/ct2mr/fold1/reg/model.keras,runs/abdomen/mr2ct/fold1/reg/model.keras \\
      --refine_steps=30 --out=runs/bench_accuracy
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags

from cmmas.scripts import absl_main

FLAGS = flags.FLAGS
flags.DEFINE_list("atlas_set", None, "Prepared atlas sets (e.g. runs/abdomen/ct2mr/fold1/atlas_set).")
flags.DEFINE_list("reg_model", None, "BiRegNet .keras per atlas set (same order).")
flags.DEFINE_integer("atlases", 10, "Atlases per target (the most similar after alignment).", lower_bound=1)
flags.DEFINE_integer("refine_steps", 30, "Adam steps of the refinement.", lower_bound=1)
flags.DEFINE_float("refine_scale", 0.5, "Refinement grid / working grid, voxels per axis.")
flags.DEFINE_float("refine_smoothness", 0.1, "Weight of the refinement's diffusion penalty.")
flags.DEFINE_string("out", None, "Folder for bench_accuracy.csv.")

FUSIONS = ("jlf_tf", "jlf_mind")


def _direction(atlas_set: str) -> str:
    """``"ct2mr fold1"`` for ``runs/abdomen/ct2mr/fold1/atlas_set``."""
    return f"{Path(atlas_set).parent.parent.name} {Path(atlas_set).parent.name}"


def run_set(atlas_set: str, reg_model: str, refinement: dict) -> list[dict]:
    """Rows (case, variant, organ, dice, seconds, folding) of every held-out target of one set:
    one engine without and one with the refinement (``refinement``: SegmentConfig's refine_*
    settings), each fusing by every fusion of :data:`FUSIONS`."""
    from cmmas.align.atlas_set import AtlasSet
    from cmmas.evaluate.runs import original_target
    from cmmas.evaluate.scoring import score
    from cmmas.models import load_models
    from cmmas.segment import SegmentConfig, Segmenter

    aset = AtlasSet(atlas_set)
    name = _direction(atlas_set)
    atlas_mod, target_mod = Path(atlas_set).parent.parent.name.split("2")
    reg_net, _ = load_models(reg_model, None, aset)
    engines = {prefix: Segmenter(aset, reg_net, None, SegmentConfig(
        fusion=FUSIONS[0], atlases=FLAGS.atlases, modality=atlas_mod, maps=False, **settings))
        for prefix, settings in (("", {}), ("refine+", refinement))}
    for engine in engines.values():
        engine.warm_up(FUSIONS)
    rows = []
    for target_id in aset.ids(target_mod, role="test", labelled=True):
        image, truth = original_target(aset, target_id)
        found = {prefix: engine.segment_all(image, FUSIONS, alignment=aset.transform(target_id))
                 for prefix, engine in engines.items()}
        refined = found["refine+"][FUSIONS[0]]
        before, after = refined.warped.refinement["folding_percent"]
        refine_seconds = refined.seconds["refine"]
        for prefix, results in found.items():
            for fusion, result in results.items():
                extra = {"fuse_s": result.seconds["fuse"], "refine_s": refine_seconds if prefix else 0.0,
                         "folding_before": before, "folding_after": after if prefix else before}
                for row in score(result.label.array, truth.array, aset.labels, truth.spacing_zyx,
                                 method=prefix + fusion, case=target_id, direction=name):
                    rows.append({**row, **extra})
        distance = refined.warped.refinement["mind_distance"]
        print(f"{name} {target_id}: refinement {refine_seconds:.1f} s, MIND distance "
              f"{distance[0]:.4f} -> {distance[1]:.4f}", flush=True)
    return rows


def main() -> int:
    if not FLAGS.atlas_set or len(FLAGS.atlas_set) != len(FLAGS.reg_model or []):
        raise app.UsageError("give one --reg_model per --atlas_set")
    refinement = {"refine_steps": FLAGS.refine_steps, "refine_scale": FLAGS.refine_scale,
                  "refine_smoothness": FLAGS.refine_smoothness}
    rows = []
    for atlas_set, reg_model in zip(FLAGS.atlas_set, FLAGS.reg_model):
        rows += run_set(atlas_set, reg_model, refinement)
    from cmmas.evaluate.results_page import accuracy_table

    text = accuracy_table(rows)
    print(text)
    if FLAGS.out:
        from cmmas.evaluate.report import to_csv
        from cmmas.io import atomic_write_text
        from cmmas.scripts import write_bench_json

        out = Path(FLAGS.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "bench_accuracy.csv", to_csv(rows, list(rows[0])))
        atomic_write_text(out / "bench_accuracy.md", text + "\n")
        write_bench_json(out / "bench_accuracy.json", rows,
                         models={f"reg_model{k}": path for k, path in enumerate(FLAGS.reg_model)},
                         cases=list(dict.fromkeys(r["case"] for r in rows)))
    return 0


if __name__ == "__main__":
    app.run(absl_main("bench_accuracy", main))
