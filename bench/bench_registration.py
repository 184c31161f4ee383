"""BiRegNet inference against ANTs SyN on the same working-grid pairs: time, memory, Dice.

For each of --pairs (atlas, target) pairs, both methods register the atlas onto the target on
the same working grid:
  - BiRegNet: cmmas.registration.warp_atlases (forward pass, image and label warps), after one
    untimed warm-up call;
  - ANTs: cmmas.prealign.register(kind="syn") (rigid, affine, then SyN; Mattes MI), the label
    warped with generic-label interpolation.
Printed per pair: seconds of each and their ratio (SyN / BiRegNet), peak resident memory of the
process during each call (VmHWM reset before each call, so each number is that call's own
peak, including what was resident before), and the mean Dice over structures of the warped
atlas label against the target label (before registration, BiRegNet, SyN).

Data: --space (a prepared space; atlases = labelled train cases of --atlas_modality, targets =
labelled test cases of --target_modality, or train cases if there are none) or, without it,
phantom subjects resampled onto a working grid centred on each target (not pre-aligned: SyN's
rigid and affine stages then do work BiRegNet does not). Without --model an untrained BiRegNet
(the identity) is used and the report says so.

Example:
  python bench/bench_registration.py --space runs/space --model runs/reg/model.keras --pairs 5
  python bench/bench_registration.py --shape 64 --pairs 2          # phantom, untrained net
"""

from __future__ import annotations

import os
import resource
import time
import warnings

from absl import app, flags

from cmmas.scripts import absl_main

FLAGS = flags.FLAGS

flags.DEFINE_string("space", None, "Prepared space (AtlasSet root); default: phantom subjects.")
flags.DEFINE_string("model", None, "Trained BiRegNet (.keras); default: an untrained network.")
flags.DEFINE_integer("pairs", 3, "Number of (atlas, target) pairs.", lower_bound=1)
flags.DEFINE_string("atlas_modality", "ct", "Modality of the atlases.")
flags.DEFINE_string("target_modality", "mr", "Modality of the targets.")
flags.DEFINE_integer("shape", 64, "Phantom/untrained-net working grid (voxels per axis, divisible by 8).")
flags.DEFINE_bool("syn_fast", True, "ANTs' short schedule (seconds per pair) instead of the default one.")
flags.DEFINE_integer("seed", 0, "Seed of ANTs' sampling and of the phantom subjects.")


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


def _mean_dice(a, b, codes) -> float:
    import numpy as np

    from cmmas.metrics import dice

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = [dice(a == c, b == c) for c in codes if c != 0 and ((a == c).any() or (b == c).any())]
    return float(np.mean(scores)) if scores else float("nan")


def _space_pairs():
    """``(geometry, codes, [(name, atlas, atlas_label, target, target_label)])`` from --space."""
    from cmmas.atlas_set import AtlasSet
    from cmmas.errors import AtlasSetError

    space = AtlasSet(FLAGS.space)
    atlases = space.ids(FLAGS.atlas_modality, role="train", labelled=True)
    targets = space.ids(FLAGS.target_modality, role="test", labelled=True) or space.ids(
        FLAGS.target_modality, role="train", labelled=True)
    if not atlases or not targets:
        raise AtlasSetError(FLAGS.space, f"needs labelled {FLAGS.atlas_modality} atlases and "
                                         f"{FLAGS.target_modality} targets")
    pairs = []
    for k in range(FLAGS.pairs):
        a, t = atlases[k % len(atlases)], targets[k % len(targets)]
        (ai,), (al,) = space.arrays([a])
        (ti,), (tl,) = space.arrays([t])
        pairs.append((f"{a}->{t}", ai, al, ti, tl))
    return space.geometry, sorted(space.labels), pairs


def _phantom_pairs(shape):
    """Phantom pairs on working grids centred on each target (atlas subjects 1.., targets 101..)."""
    from cmmas import preprocess
    from cmmas.atlas_set import normalize
    from cmmas.datasets import phantom
    from cmmas.registration import fit_spacing

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
    return geometry, [c for c in phantom.LABEL_CODES if c], pairs


def _run() -> int:
    import numpy as np

    from cmmas import prealign, registration
    from cmmas.io import Image
    from cmmas.networks import build_biregnet

    if FLAGS.model:
        model = registration.load_model(FLAGS.model)
        shape = registration.model_shape(model)
        print(f"BiRegNet: {FLAGS.model}")
    else:
        shape = (FLAGS.shape,) * 3
        if FLAGS.space:
            from cmmas.atlas_set import AtlasSet

            shape = AtlasSet(FLAGS.space).geometry.shape
        model = build_biregnet(shape)
        print(f"BiRegNet: UNTRAINED (identity) network at {shape}: its Dice is the input alignment's")
    geometry, codes, pairs = _space_pairs() if FLAGS.space else _phantom_pairs(shape)
    if tuple(geometry.shape) != tuple(shape):
        from cmmas.errors import ModelError

        raise ModelError(FLAGS.model, f"model input {shape} differs from the data's grid {geometry.shape}")
    table = registration.label_table(codes)
    _, atlas0, label0, target0, _ = pairs[0]
    registration.warp_atlases(model, atlas0[None], label0[None], target0, table)  # warm-up, untimed
    print(f"{len(pairs)} pair(s) on a {geometry.shape} grid of {np.round(geometry.spacing_zyx, 2).tolist()} mm; "
          f"ANTs SyN {'fast' if FLAGS.syn_fast else 'default'} schedule, {os.cpu_count()} CPU(s)")
    header = (f"{'pair':<28} {'BiRegNet s':>10} {'SyN s':>8} {'ratio':>7} {'BiRegNet MiB':>12} {'SyN MiB':>8} "
              f"{'Dice before':>11} {'BiRegNet':>8} {'SyN':>6}")
    print(header)
    rows = []
    for name, atlas, atlas_label, target, target_label in pairs:
        (_, net_labels, _), net_s, net_mb = _measure(
            lambda: registration.warp_atlases(model, atlas[None], atlas_label[None], target, table))
        syn, syn_s, syn_mb = _measure(lambda: prealign.register(
            Image(atlas, geometry), Image(target, geometry), kind="syn", seed=FLAGS.seed,
            moving_label=Image(atlas_label, geometry), fast=FLAGS.syn_fast))
        syn_label = syn.warped_label.array
        syn.cleanup()
        row = (net_s, syn_s, syn_s / net_s, net_mb, syn_mb, _mean_dice(atlas_label, target_label, codes),
               _mean_dice(net_labels[0], target_label, codes), _mean_dice(syn_label, target_label, codes))
        rows.append(row)
        print(f"{name[:28]:<28} {row[0]:>10.2f} {row[1]:>8.2f} {row[2]:>6.1f}x {row[3]:>12.0f} {row[4]:>8.0f} "
              f"{row[5]:>11.3f} {row[6]:>8.3f} {row[7]:>6.3f}")
    med = np.median(np.asarray(rows), axis=0)
    print(f"{'median':<28} {med[0]:>10.2f} {med[1]:>8.2f} {med[2]:>6.1f}x {med[3]:>12.0f} {med[4]:>8.0f} "
          f"{med[5]:>11.3f} {med[6]:>8.3f} {med[7]:>6.3f}")
    return 0


if __name__ == "__main__":
    app.run(absl_main("bench_registration", _run))
