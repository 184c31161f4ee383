"""BiRegNet inference against ANTs SyN on the same working-grid pairs: time, memory, Dice.

For each of --pairs (atlas, target) pairs, both methods register the atlas onto the target on
the same working grid:
  - BiRegNet: cmmas.register.apply.warp_atlases (forward pass, image and label warps), after one
    untimed warm-up call;
  - ANTs: cmmas.align.ants.register(kind="syn") (rigid, affine, then SyN; Mattes MI), the label
    warped with generic-label interpolation.
Printed per pair: seconds of each and their ratio (SyN / BiRegNet), peak resident memory of the
process during each call (VmHWM reset before each call, so each number is that call's own
peak, including what was resident before), the mean Dice over structures of the warped atlas
label against the target label (before registration, BiRegNet, SyN) and the percentage of
folding voxels (det J <= 0) of each deformation (BiRegNet's atlas->target field U; SyN's
deformable warp, through ANTs' Jacobian). Then the Dice per structure, mean over the pairs.

Data: --atlas_set (a prepared atlas set; atlases = labelled train cases of --atlas_modality, targets =
labelled test cases of --target_modality, or train cases if there are none) or, without it,
phantom subjects resampled onto a working grid centred on each target (not pre-aligned: SyN's
rigid and affine stages then do work BiRegNet does not). Without --model an untrained BiRegNet
(the identity) is used and the report says so. --out writes bench_registration.json
({"provenance", "command", "rows": one per pair, the printed columns and Dice per structure}).

Example:
  python bench/bench_registration.py --atlas_set runs/atlas_set --model runs/reg/model.keras --pairs 5
  python bench/bench_registration.py --shape 64 --pairs 2          # phantom, untrained net
"""

from __future__ import annotations

import os
import resource
import time
import warnings
from pathlib import Path

from absl import app, flags

from cmmas.scripts import absl_main, atlas_set_flag, define_atlas_set, parse_shape, write_bench_json

FLAGS = flags.FLAGS

define_atlas_set("Prepared atlas set (its held-out pairs are registered); default: phantom subjects.")
flags.DEFINE_string("model", None, "Trained BiRegNet (.keras); default: an untrained network.")
flags.DEFINE_integer("pairs", 3, "Number of (atlas, target) pairs.", lower_bound=1)
flags.DEFINE_string("atlas_modality", "ct", "Modality of the atlases.")
flags.DEFINE_string("target_modality", "mr", "Modality of the targets.")
flags.DEFINE_string("shape", "64", "Phantom/untrained-net working grid in voxels: one integer or z,y,x (divisible by 8).")
flags.DEFINE_bool("syn_fast", True, "ANTs' short schedule (seconds per pair) instead of the default one.")
flags.DEFINE_integer("seed", 0, "Seed of ANTs' sampling and of the phantom subjects.")
flags.DEFINE_string("out", None, "Folder for bench_registration.json (the rows printed, with their provenance).")

#: Keys of a pair's record in bench_registration.json, in the printed row's order.
ROW_KEYS = ("biregnet_s", "syn_s", "ratio", "biregnet_mib", "syn_mib", "dice_before", "dice_biregnet",
            "dice_syn", "folding_biregnet_percent", "folding_syn_percent")


def _reset_peak() -> None:
    """Reset the process's peak resident memory (Linux ``clear_refs`` 5); no-op elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def _peak_mb() -> float:
    """Peak resident memory in MiB since the last reset (VmHWM), else since the start (ru_maxrss)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _measure(fn):
    """``(result, seconds, peak MiB)`` of one call."""
    _reset_peak()
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start, _peak_mb()


def _dice_per_structure(a, b, codes) -> list[float]:
    """Dice of each non-zero code (NaN where neither label has it)."""
    from cmmas.metrics import dice

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [dice(a == c, b == c) if ((a == c).any() or (b == c).any()) else float("nan")
                for c in codes if c != 0]


def _syn_folding_percent(syn, fixed) -> float:
    """Percentage of voxels of ``fixed`` (an Image) where SyN's warp (first forward transform) folds."""
    import ants
    import numpy as np

    from cmmas.align.ants import to_ants

    det = ants.create_jacobian_determinant_image(to_ants(fixed), syn.forward[0]).numpy()
    return 100.0 * float(np.mean(det <= 0))


def _atlas_set_pairs(aset):
    """``(geometry, {code: name}, [(name, atlas, atlas_label, target, target_label)])`` of an atlas set."""
    from cmmas.errors import AtlasSetError

    atlases = aset.ids(FLAGS.atlas_modality, role="train", labelled=True)
    targets = aset.ids(FLAGS.target_modality, role="test", labelled=True) or aset.ids(
        FLAGS.target_modality, role="train", labelled=True)
    if not atlases or not targets:
        raise AtlasSetError(aset.root, f"needs labelled {FLAGS.atlas_modality} atlases and "
                                       f"{FLAGS.target_modality} targets")
    pairs = []
    for k in range(FLAGS.pairs):
        a, t = atlases[k % len(atlases)], targets[k % len(targets)]
        (ai,), (al,) = aset.arrays([a])
        (ti,), (tl,) = aset.arrays([t])
        pairs.append((f"{a}->{t}", ai, al, ti, tl))
    return aset.geometry, dict(sorted(aset.labels.items())), pairs


def _phantom_pairs(shape):
    """Phantom pairs on working grids centred on each target (atlas subjects 1.., targets 101..)."""
    from cmmas import preprocess
    from cmmas.align.mapping import normalize
    from cmmas.datasets import phantom
    from cmmas.register.apply import fit_spacing

    pairs, geometry = [], None
    for k in range(FLAGS.pairs):
        atlas, atlas_label = phantom.make_subject(FLAGS.atlas_modality, FLAGS.seed + 1 + k)
        target, target_label = phantom.make_subject(FLAGS.target_modality, FLAGS.seed + 101 + k)
        fixed = preprocess.to_working_grid(target, fit_spacing(target.geometry, shape), shape)
        geometry = fixed.geometry

        def on_grid(image, kind):
            return preprocess.resample(image, geometry=geometry, kind=kind,
                                       default=float(image.array.min()) if kind == "linear" else 0.0)

        pairs.append((
            f"phantom {FLAGS.atlas_modality}{k + 1}->{FLAGS.target_modality}{k + 1}",
            normalize(on_grid(atlas, "linear")).array,
            on_grid(atlas_label, "label").array.astype("int32"),
            normalize(fixed).array,
            on_grid(target_label, "label").array.astype("int32"),
        ))
    return geometry, {c: phantom.MMWHS_LABELS[c] for c in phantom.LABEL_CODES if c}, pairs


def _run() -> int:
    import numpy as np

    from cmmas.align import ants as align_ants
    from cmmas.align.atlas_set import AtlasSet
    from cmmas.io import Image
    from cmmas.metrics import jacobian_stats
    from cmmas.nn import training
    from cmmas.nn.networks import build_biregnet
    from cmmas.register import apply, biregnet

    path = atlas_set_flag(required=False)
    aset = AtlasSet(path) if path is not None else None
    if FLAGS.model:
        model = training.load_model(FLAGS.model, "biregnet")
        shape = training.input_grid(model, "biregnet")
        print(f"BiRegNet: {FLAGS.model}")
    else:
        shape = aset.geometry.shape if aset is not None else parse_shape(FLAGS.shape)
        model = build_biregnet(shape)
        print(f"BiRegNet: UNTRAINED (identity) network at {shape}: its Dice is the input alignment's")
    geometry, names, pairs = _atlas_set_pairs(aset) if aset is not None else _phantom_pairs(shape)
    codes = list(names)
    if tuple(geometry.shape) != tuple(shape):
        from cmmas.errors import ModelError

        raise ModelError(FLAGS.model, f"model input {shape} differs from the data's grid {geometry.shape}")
    table = biregnet.label_table(codes)
    _, atlas0, label0, target0, _ = pairs[0]
    apply.warp_atlases(model, atlas0[None], label0[None], target0, table)  # warm-up, untimed
    print(f"{len(pairs)} pair(s) on a {geometry.shape} grid of {np.round(geometry.spacing_zyx, 2).tolist()} mm; "
          f"ANTs SyN {'fast' if FLAGS.syn_fast else 'default'} schedule, {os.cpu_count()} CPU(s)")
    header = (f"{'pair':<28} {'BiRegNet s':>10} {'SyN s':>8} {'ratio':>7} {'BiRegNet MiB':>12} {'SyN MiB':>8} "
              f"{'Dice before':>11} {'BiRegNet':>8} {'SyN':>6} {'fold% net':>9} {'fold% SyN':>9}")
    print(header)
    rows, per_structure, records = [], [], []
    for name, atlas, atlas_label, target, target_label in pairs:
        (_, net_labels, ddfs), net_s, net_mb = _measure(
            lambda: apply.warp_atlases(model, atlas[None], atlas_label[None], target, table))
        fixed = Image(target, geometry)
        syn, syn_s, syn_mb = _measure(lambda: align_ants.register(
            Image(atlas, geometry), fixed, kind="syn", seed=FLAGS.seed,
            moving_label=Image(atlas_label, geometry), fast=FLAGS.syn_fast))
        syn_label, syn_fold = syn.warped_label.array, _syn_folding_percent(syn, fixed)
        syn.cleanup()
        dices = [_dice_per_structure(moved, target_label, codes) for moved in (atlas_label, net_labels[0], syn_label)]
        per_structure.append(dices)
        row = (net_s, syn_s, syn_s / net_s, net_mb, syn_mb, *(np.nanmean(d) for d in dices),
               jacobian_stats(ddfs[0])["folding_percent"], syn_fold)
        rows.append(row)
        records.append({"pair": name, **{k: float(v) for k, v in zip(ROW_KEYS, row)},
                        "dice_per_structure": {names[c]: [float(d[k]) for d in dices] for k, c in enumerate(codes)}})
        print(f"{name[:28]:<28} {row[0]:>10.2f} {row[1]:>8.2f} {row[2]:>6.1f}x {row[3]:>12.0f} {row[4]:>8.0f} "
              f"{row[5]:>11.3f} {row[6]:>8.3f} {row[7]:>6.3f} {row[8]:>9.2f} {row[9]:>9.2f}")
    med = np.median(np.asarray(rows), axis=0)
    print(f"{'median':<28} {med[0]:>10.2f} {med[1]:>8.2f} {med[2]:>6.1f}x {med[3]:>12.0f} {med[4]:>8.0f} "
          f"{med[5]:>11.3f} {med[6]:>8.3f} {med[7]:>6.3f} {med[8]:>9.2f} {med[9]:>9.2f}")
    mean = np.nanmean(np.asarray(per_structure), axis=0)  # [3 methods, structures]
    print(f"\nDice per structure, mean over {len(pairs)} pair(s)")
    print(f"{'structure':<28} {'before':>8} {'BiRegNet':>8} {'SyN':>8}")
    for k, code in enumerate(codes):
        print(f"{names[code][:28]:<28} {mean[0, k]:>8.3f} {mean[1, k]:>8.3f} {mean[2, k]:>8.3f}")
    if FLAGS.out:
        written = write_bench_json(Path(FLAGS.out) / "bench_registration.json", records,
                                   models={"reg_model": FLAGS.model} if FLAGS.model else None,
                                   cases=[r["pair"] for r in records])
        print(f"bench_registration: wrote {written}")
    return 0


if __name__ == "__main__":
    app.run(absl_main("bench_registration", _run))
