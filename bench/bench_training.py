"""Where a training step goes: BiRegNet (with and without labelmix), SimNet, DLF and the U-Net at
the abdomen chain's working grid, on synthetic batches (random blob label maps, images in [0, 1]).

Each network is set up as its trainer builds it (the abdomen configs' widths: BiRegNet c0 4 with
4 levels, SimNet c0 8, DLF c_vote 8 / c_fine 16 with --atlases per target, the U-Net c 16), then
four compiled functions are timed, each over --steps calls after --warmup untimed ones, at each of
--precisions (cmmas.nn.precision: the trunk's convolutions in float32 or bfloat16):
  step         the trainer's own train_step, compiled (augmentation, forward, backward, optimizer);
  augment      its training_batch alone (the batch cast, one-hot encoded and augmented: BiRegNet's
               affine and, for labelmix, the contrasts);
  forward      its losses on the batch, not augmented (training mode, no gradient);
  fwd+bwd      the loss and its gradient with respect to every trainable weight.
Printed per variant and precision: seconds per step (median over the calls), steps per second,
the ratio of its step time to the first row's (the first variant at the first precision: the
reference of this run), the speed-up over the same variant at the first precision, and the
shares of the step: augment, forward, backward (fwd+bwd - forward) and the rest (optimizer
update, metrics, call overhead: step - augment - fwd+bwd). BiRegNet's input pipeline (pair_dataset: a numpy draw per
pair, batched and prefetched) is timed per batch beside it. Nothing else should run on the
machine meanwhile: the ratios are only meaningful within one run.

Example:
  python bench/bench_training.py --out runs/bench_training
  python bench/bench_training.py --variants biregnet,biregnet_labelmix --precisions float32 --steps 10
"""

from __future__ import annotations

import statistics
import time

from absl import app, flags

from cmmas.scripts import absl_main, parse_shape, write_bench_json

FLAGS = flags.FLAGS

#: What can be timed, the first given being the run's reference.
VARIANTS = ("biregnet", "biregnet_labelmix", "simnet", "dlf", "unet")

flags.DEFINE_list("variants", list(VARIANTS), f"Networks to time, the first the reference (of {', '.join(VARIANTS)}).")
flags.DEFINE_string("shape", "56,48,64", "Working grid in voxels: one integer or z,y,x (the abdomen chain's).")
flags.DEFINE_list("precisions", ["float32", "mixed_bfloat16"], "Trunk precisions to time each variant at, the first "
                  "the reference (of float32, mixed_bfloat16).")
flags.DEFINE_integer("batch", 2, "Pairs (targets) per step.", lower_bound=1)
flags.DEFINE_integer("atlases", 5, "DLF: atlases per target.", lower_bound=1)
flags.DEFINE_integer("labels", 5, "Label channels, the background included.", lower_bound=2)
flags.DEFINE_integer("steps", 20, "Timed calls of each function.", lower_bound=1)
flags.DEFINE_integer("warmup", 3, "Untimed calls first (tracing, allocation).", lower_bound=1)
flags.DEFINE_string("out", None, "Folder for bench_training.json (the rows printed, with their provenance).")

#: Keys of a variant's row, in the printed order.
ROW_KEYS = ("step_s", "steps_per_s", "ratio", "speedup", "augment_share", "forward_share", "backward_share",
            "rest_share", "data_s")


def _median_seconds(fn, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _labels(rng, count: int, shape, n_labels: int):
    """``count`` label maps ``[count, D, H, W]`` (ints): random ellipsoids of labels 1..L-1."""
    import numpy as np

    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float32)
    out = np.zeros((count, *shape), np.int32)
    for k in range(count):
        for label in range(1, n_labels):
            centre = rng.uniform(0.25, 0.75, 3) * np.asarray(shape)
            radii = rng.uniform(0.08, 0.2, 3) * np.asarray(shape)
            out[k][(((grid - centre) / radii) ** 2).sum(-1) <= 1] = label
    return out


def _setup(variant: str, precision: str, shape, batch: int, atlases: int, n_labels: int, rng):
    """(trainer, a batch of its training data, a data fetch fn or None) of one variant."""
    import numpy as np
    import tensorflow as tf

    labels = _labels(rng, batch, shape, n_labels)
    images = (0.2 + 0.6 * labels / n_labels + 0.05 * rng.standard_normal(labels.shape)).astype(np.float32)
    if variant.startswith("biregnet"):
        from cmmas.nn.networks import build_biregnet
        from cmmas.register import biregnet

        config = biregnet.RegConfig(shape_zyx=shape, batch=batch, labelmix=0.5 if variant.endswith("labelmix") else 0.0,
                                    precision=precision)
        net = build_biregnet(shape, c0=config.c0, levels=config.levels, precision=precision)
        onehot = biregnet.one_hot(labels, tuple(range(n_labels)))
        data = {"atlas": images[..., None], "target": images[::-1, ..., None].copy(), "atlas_label": onehot,
                "target_label": onehot[::-1].copy()}
        stream = iter(biregnet.pair_dataset(images, onehot, images, onehot, batch, 0))
        return biregnet.BiRegNetTrainer(net, config), data, lambda: next(stream)
    if variant == "simnet":
        from cmmas.fuse import simnet_train
        from cmmas.nn.networks import build_simnet

        config = simnet_train.SimConfig(shape_zyx=shape, c0=8, batch=batch, precision=precision)
        onehot = tf.one_hot(labels, n_labels).numpy()
        data = {"target": images[..., None], "target_label": onehot, "atlas_label": onehot[::-1].copy()}
        return simnet_train.SimNetTrainer(build_simnet(shape, n_labels, c0=8, precision=precision), config), data, None
    from cmmas.fuse import dlf_train

    config = dlf_train.DLFConfig(kind=variant, shape_zyx=shape, batch=batch, atlases=atlases, precision=precision)
    pick = rng.integers(batch, size=(batch, atlases))
    data = {"target": images[..., None], "target_label": labels.astype(np.int8)}
    if variant == "dlf":
        data |= {"atlas_images": images[pick][..., None], "atlas_labels": labels[pick].astype(np.int8)}
    return dlf_train.DLFTrainer(dlf_train.build(config, n_labels), config, n_labels), data, None


def _time_variant(variant: str, precision: str, rng) -> dict:
    import keras
    import tensorflow as tf

    shape = parse_shape(FLAGS.shape)
    trainer, data, fetch = _setup(variant, precision, shape, FLAGS.batch, FLAGS.atlases, FLAGS.labels, rng)
    trainer.compile(optimizer=keras.optimizers.Adam(1e-4))
    trainer.optimizer.build(trainer.trainable_variables)
    batch = {k: tf.constant(v) for k, v in data.items()}
    prepared = trainer.training_batch(batch, augment=False)
    variables = trainer.trainable_variables

    def loss(d):
        return trainer.losses(d)["loss"]

    @tf.function
    def forward_backward(d):
        with tf.GradientTape() as tape:
            value = loss(d)
        gradients = [g for g in tape.gradient(value, variables) if g is not None]
        return tf.add_n([tf.reduce_sum(g) for g in gradients])  # one scalar to the host, as the step's logs

    step_fn, augment_fn, forward_fn = tf.function(trainer.train_step), tf.function(trainer.training_batch), \
        tf.function(loss)

    def materialise(out) -> None:
        for tensor in tf.nest.flatten(out):
            if tensor is not None:
                tensor.numpy()

    timed = {
        "step": lambda: materialise(step_fn(batch)),
        "augment": lambda: materialise(augment_fn(batch)),
        "forward": lambda: materialise(forward_fn(prepared)),
        "fwd+bwd": lambda: materialise(forward_backward(prepared)),
    }
    seconds = {name: _median_seconds(fn, FLAGS.warmup, FLAGS.steps) for name, fn in timed.items()}
    data_s = _median_seconds(fetch, FLAGS.warmup, FLAGS.steps) if fetch else None
    step = seconds["step"]
    return {"variant": variant, "precision": precision, "step_s": step, "steps_per_s": 1.0 / step,
            "augment_share": seconds["augment"] / step, "forward_share": seconds["forward"] / step,
            "backward_share": (seconds["fwd+bwd"] - seconds["forward"]) / step,
            "rest_share": (step - seconds["augment"] - seconds["fwd+bwd"]) / step, "data_s": data_s}


def _run() -> int:
    import numpy as np

    from cmmas.errors import CmmasError
    from cmmas.nn.precision import PRECISIONS

    for flag, given, known in (("--variants", FLAGS.variants, VARIANTS), ("--precisions", FLAGS.precisions, PRECISIONS)):
        unknown = sorted(set(given) - set(known))
        if unknown or not given:
            raise CmmasError(flag, f"unknown {unknown}; choose from {', '.join(known)}")
    rng = np.random.default_rng(0)
    rows = []
    print(f"bench_training: grid {FLAGS.shape}, batch {FLAGS.batch}, median of {FLAGS.steps} calls after "
          f"{FLAGS.warmup}; shares of the step; speed-up: against the variant at {FLAGS.precisions[0]}")
    print(f"{'variant':<20}{'precision':<16}{'s/step':>8}{'steps/s':>9}{'x ref':>7}{'speed-up':>10}{'augment':>9}"
          f"{'forward':>9}{'backward':>10}{'rest':>7}{'data s':>8}")
    for variant in FLAGS.variants:
        for precision in FLAGS.precisions:
            row = _time_variant(variant, precision, rng)
            row["ratio"] = row["step_s"] / (rows[0]["step_s"] if rows else row["step_s"])
            base = next((r for r in rows if r["variant"] == variant), row)
            row["speedup"] = base["step_s"] / row["step_s"]
            rows.append(row)
            data = f"{row['data_s']:.3f}" if row["data_s"] is not None else "-"
            print(f"{variant:<20}{precision:<16}{row['step_s']:>8.3f}{row['steps_per_s']:>9.2f}{row['ratio']:>7.2f}"
                  f"{row['speedup']:>10.2f}{row['augment_share']:>9.0%}{row['forward_share']:>9.0%}"
                  f"{row['backward_share']:>10.0%}{row['rest_share']:>7.0%}{data:>8}")
    if FLAGS.out:
        from pathlib import Path

        print(f"bench_training: {write_bench_json(Path(FLAGS.out) / 'bench_training.json', rows)}")
    return 0


if __name__ == "__main__":
    app.run(absl_main("bench_training", _run))
