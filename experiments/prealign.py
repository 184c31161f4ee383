"""Pre-align atlases to targets with ANTs (Mattes mutual information): the classical baseline's
first stage, and the input of fusion (experiments/evaluate.py) and of the networks.

Modes:
  pairwise (default): every atlas registered onto every target (rigid then affine, or + SyN with
    --registration syn), written per target as documented in cmmas.align.pairwise:
      OUT/<target>/pairs.json, target_image.nii.gz, target_label.nii.gz,
      OUT/<target>/atlases/<atlas>_image.nii.gz, <atlas>_label.nii.gz,
      OUT/<target>/transforms/<atlas>/affine.mat (+ warp.nii.gz, inverse_warp.nii.gz).
    --spacing S resamples the target to S mm isotropic first; the outputs lie on that grid.
  reference: every case aligned once to a reference atlas (cmmas.align.target.align_to_reference:
    several starts along the cranio-caudal axis, one ANTs thread, so the same cases give the same set)
    and stored on one working grid of --shape voxels of --spacing mm (cmmas.align.prepare.prepare:
    OUT/manifest.json, images/, labels/, transforms/ with each case's QC record qc.json).
    With --roi oracle (the original cmmas's setting, to reproduce the paper only): no ANTs; every
    case, targets included, is cropped around its OWN ground-truth --component (+10 mm), turned to
    the identity direction, stretched to --shape voxels and z-scored
    (cmmas.align.prepare.prepare_oracle; --spacing and --align_spacing are not used).

Split (cmmas.datasets.splits.split_cases): --fold k (with --n_folds) takes, per modality, the k-th contiguous chunk of the target
modality's cases as targets and the atlas modality's cases outside its own fold k as atlases
(as the paper); --targets and --atlases give explicit case ids instead. In reference mode the
targets are "test" cases and every other case of both modalities (outside the atlas modality's
fold k) is a "train" case.

Re-running skips what is done; outputs are written atomically.

Example:
  python experiments/prealign.py --data ../shared/data/abdomen-ctmr --layout folder \
      --atlas_modality ct --target_modality mr --fold 1 --max_atlases 5 --max_targets 2 \
      --spacing 3 --out runs/prealign/ct2mr_affine
"""

from __future__ import annotations

import random

from absl import app, flags

from cmmas.scripts import absl_main, parse_shape, parse_spacing

FLAGS = flags.FLAGS

flags.DEFINE_string("data", None, "Data-set root folder.")
flags.DEFINE_enum("layout", "folder", ["mmwhs", "chaos", "folder"], "On-disk layout of --data.")
flags.DEFINE_enum("atlas_modality", "ct", ["ct", "mr"], "Modality of the atlases.")
flags.DEFINE_enum("target_modality", "mr", ["ct", "mr"], "Modality of the targets.")
flags.DEFINE_integer("component", None, "Keep only this label code (others become background).")
flags.DEFINE_integer("fold", None, "1-based cross-validation fold (targets = that fold); 0: none held out, every "
                     "case trains (a bundle for new scans).", lower_bound=0)
flags.DEFINE_integer("n_folds", 4, "Number of folds.", lower_bound=2)
flags.DEFINE_list("targets", None, "Explicit target case ids (with --atlases; instead of --fold).")
flags.DEFINE_list("atlases", None, "Explicit atlas case ids (with --targets).")
flags.DEFINE_integer("max_atlases", None, "Use at most this many atlases (the first, natural order).", lower_bound=1)
flags.DEFINE_integer("max_targets", None, "Use at most this many targets (the first, natural order).", lower_bound=1)
flags.DEFINE_enum("mode", "pairwise", ["pairwise", "reference"], "Align atlas->target pairs, or all cases to one reference.")
flags.DEFINE_enum("registration", "affine", ["affine", "syn"], "pairwise: rigid+affine, or rigid+affine+SyN.")
flags.DEFINE_string("spacing", "3", "Working-grid spacing in mm: one value or z,y,x (pairwise: 0 keeps the target's grid).")
flags.DEFINE_string("shape", "96", "reference: working-grid shape in voxels: one integer or z,y,x.")
flags.DEFINE_float("align_spacing", 3.0, "reference: isotropic spacing of the alignments, mm.", lower_bound=0.1)
flags.DEFINE_string("reference", "auto", "reference: the reference case id, or 'auto'.")
flags.DEFINE_enum("roi", "atlases", ["atlases", "oracle"], "reference: the working grid around the union of the "
                  "aligned atlas labels, or each case cropped around its own label (the paper's oracle, no ANTs).")
flags.DEFINE_bool("fast", False, "Use ANTs' short schedule (seconds per pair, less accurate).")
flags.DEFINE_string("out", None, "Output folder.")
flags.DEFINE_integer("seed", 0, "Seed of Python, numpy and ANTs' metric sampling.", lower_bound=0)
flags.DEFINE_integer("workers", 1, "Pairs registered at once, one process and one ANTs thread each.", lower_bound=1)
flags.DEFINE_bool("progress", True, "Show progress bars.")


def _run() -> int:
    import numpy as np

    from cmmas.align import ants
    from cmmas.datasets import open_dataset
    from cmmas.datasets.splits import split_cases
    from cmmas.errors import CmmasError

    random.seed(FLAGS.seed)
    np.random.seed(FLAGS.seed)
    if FLAGS.roi == "oracle" and FLAGS.mode != "reference":
        raise CmmasError("--roi", "the oracle ROI makes an atlas set: use it with --mode reference")
    if FLAGS.workers > 1 or (FLAGS.mode == "reference" and FLAGS.roi == "atlases"):
        ants.set_threads(1)  # one thread per worker; in reference mode, the same cases give the same atlas set
    dataset = open_dataset(FLAGS.data, FLAGS.layout)
    targets, atlases, others = split_cases(dataset, FLAGS.atlas_modality, FLAGS.target_modality, FLAGS.fold,
                                           FLAGS.n_folds, FLAGS.targets, FLAGS.atlases, FLAGS.max_atlases,
                                           FLAGS.max_targets)
    spacing = parse_spacing(FLAGS.spacing, allow_zero=FLAGS.mode == "pairwise")
    print(
        f"prealign: {FLAGS.mode}, {len(atlases)} {FLAGS.atlas_modality} atlas(es) "
        f"[{', '.join(a.id for a in atlases)}] -> {len(targets)} {FLAGS.target_modality} target(s) "
        f"[{', '.join(t.id for t in targets)}]"
    )
    if FLAGS.mode == "reference":
        from cmmas.align import prepare

        cases = list(atlases) + list(others) + list(targets)
        roles = {c.id: ("test" if c in targets else "train") for c in cases}
        if FLAGS.roi == "oracle":
            aset = prepare.prepare_oracle(cases, dict(dataset.labels), FLAGS.out, parse_shape(FLAGS.shape), roles=roles,
                                          component=FLAGS.component, progress=FLAGS.progress)
            print(f"prealign: {len(cases)} case(s) in {aset.root}, each cropped around its own label (oracle ROI)")
            return 0
        aset = prepare.prepare(
            cases,
            dict(dataset.labels),
            FLAGS.out,
            shape_zyx=parse_shape(FLAGS.shape),
            spacing_zyx=spacing,
            reference=FLAGS.reference,
            roi_ids=[a.id for a in atlases],
            roles=roles,
            align_spacing_mm=FLAGS.align_spacing,
            component=FLAGS.component,
            fast=FLAGS.fast,
            seed=FLAGS.seed,
            progress=FLAGS.progress,
        )
        print(f"prealign: {len(cases)} case(s) in {aset.root} (reference {aset.manifest.reference})")
        return 0

    from cmmas.align.pairwise import prealign_targets

    if len(set(spacing)) != 1:
        raise CmmasError("--spacing", f"pairwise mode resamples to one isotropic spacing, got {FLAGS.spacing}")
    results = prealign_targets(
        atlases,
        targets,
        dict(dataset.labels),
        FLAGS.out,
        kind=FLAGS.registration,
        spacing_mm=spacing[0] or None,
        seed=FLAGS.seed,
        fast=FLAGS.fast,
        component=FLAGS.component,
        workers=FLAGS.workers,
        progress=FLAGS.progress,
    )
    for pairs in results:
        seconds = list(pairs.seconds.values())
        print(
            f"prealign: {pairs.target_id}: {len(pairs.atlas_ids)} atlas(es) in {pairs.folder} "
            f"({len(pairs.registered)} registered now; {np.mean(seconds):.1f} s per registration)"
        )
    return 0


if __name__ == "__main__":
    flags.mark_flags_as_required(["data", "out"])
    app.run(absl_main("prealign", _run))
