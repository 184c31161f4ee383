"""Training Deep Label Fusion (:func:`cmmas.nn.dlf.build_dlf`) and the plain U-Net it is compared
with (:func:`cmmas.nn.dlf.build_unet`) on the learned fusions' pair cache
(:mod:`cmmas.fuse.pairs`: every training atlas warped by BiRegNet onto every labelled training
target of the target modality). Inference: :mod:`cmmas.fuse.dlf`.

One training step (:class:`DLFTrainer`) takes a batch of training targets, each with N of its
warped atlases drawn **with duplicates** (N may exceed the atlases there are; DLF's atlas draw),
and, when ``augment``:

* one random similarity transform moves the target image, its label and every atlas together
  (their relative alignment kept);
* each atlas is moved again, alone, by a small random similarity transform with probability
  ``jitter_probability``: the warps of training targets, which BiRegNet was trained on, are
  better than those of new scans, and the fusion must learn to distrust a misplaced atlas;
* DLF's random histogram shift (:func:`histogram_shift`), drawn independently for the target and
  for each atlas, and Gaussian noise.

Loss: cross-entropy of the masked logits plus one minus the mean soft Dice of the foreground
labels, against the target's label (:func:`cmmas.nn.losses.segmentation_loss`). Where the truth
is a label no atlas votes for, the mask makes it unreachable; the cross-entropy there is clipped
(:data:`cmmas.nn.losses.MIN_PROBABILITY`) so that it carries no gradient rather than an enormous one.

The U-Net baseline (``kind="unet"``) trains on the same targets, the same augmentation of the
target and the same loss, without atlases.

Arrays are numpy in array order ``(z, y, x)``; tensors ``[B, D, H, W, C]``, atlases
``[B, N, D, H, W, C]``; label channels in ascending code order, the background 0 first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from cmmas.errors import ModelError
from cmmas.fuse.pairs import TrainingPairs, load_pairs
from cmmas.fuse.simnet import channel_codes
from cmmas.io import atomic_write_text
from cmmas.nn import training
from cmmas.nn.dlf import build_dlf, build_unet
from cmmas.nn.layers import warp
from cmmas.nn.model_card import ModelCard
from cmmas.preprocess import channel_index
from cmmas.register.augment import augmentation_displacement

logger = logging.getLogger(__name__)

#: The two networks this module trains, and their file names in a training folder.
MODEL_FILES = {"dlf": "dlf.keras", "unet": "unet.keras"}

#: File name of the run's configuration (JSON) in a training folder.
CONFIG_FILE = "config.json"

#: Knots of the histogram shift's intensity curve (:func:`histogram_shift`).
HISTOGRAM_KNOTS = 6


@dataclasses.dataclass(frozen=True)
class DLFConfig:
    """Everything that defines one training run of DLF or of the U-Net baseline.

    Attributes:
        kind: "dlf" or "unet".
        shape_zyx: the working grid ``(D, H, W)``.
        c_vote, vote_levels: the weighted-voting subnet's width and depth (DLF only).
        c_fine, fine_levels: the fine-tuning subnet's (the U-Net baseline's) width and depth.
        fine_tune, mask: DLF with its fine-tuning subnet and its atlas mask (False: the
            ablations of :func:`cmmas.nn.dlf.build_dlf`).
        atlases: atlases drawn per target and step, with duplicates (DLF only).
        lr, decay_rate, decay_steps: Adam's rate, multiplied by ``decay_rate`` every
            ``decay_steps`` steps (staircase).
        steps, batch, steps_per_epoch: optimiser steps, targets per step, steps per log line,
            checkpoint and backup.
        augment: the augmentations of the module docstring.
        rotation_max, translation_max, scale_range: the joint similarity transform (radians,
            voxels, isotropic factor).
        jitter_probability, jitter_rotation, jitter_translation, jitter_scale: each atlas's own
            transform (DLF only): probability, radians, voxels, largest relative scale change.
        shift_strength: the histogram shift's largest knot displacement (intensities in [0, 1]).
        noise_max: the noise's largest standard deviation.
        ce_weight: weight of the cross-entropy beside the Dice term.
        precision: the network's trunk precision (:data:`cmmas.nn.precision.PRECISIONS`;
            "mixed_bfloat16" trains the convolutions in bfloat16, weights, heads and losses float32).
        seed: seeds the weights, the draws of targets and atlases and the augmentation.
    """

    kind: str
    shape_zyx: tuple[int, int, int]
    c_vote: int = 8
    vote_levels: int = 3
    c_fine: int = 16
    fine_levels: int = 4
    fine_tune: bool = True
    mask: bool = True
    atlases: int = 5
    lr: float = 1e-3
    decay_rate: float = 0.5
    decay_steps: int = 300
    steps: int = 600
    batch: int = 1
    steps_per_epoch: int = 50
    augment: bool = True
    rotation_max: float = math.pi / 18
    translation_max: float = 4.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    jitter_probability: float = 0.5
    jitter_rotation: float = math.pi / 36
    jitter_translation: float = 2.0
    jitter_scale: float = 0.05
    shift_strength: float = 0.1
    noise_max: float = 0.03
    ce_weight: float = 1.0
    precision: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape_zyx", tuple(int(n) for n in self.shape_zyx))
        object.__setattr__(self, "scale_range", tuple(float(s) for s in self.scale_range))
        problems = []
        if self.kind not in MODEL_FILES:
            problems.append(f"kind must be one of {sorted(MODEL_FILES)}, got {self.kind!r}")
        problems += training.schedule_problems(self, ("c_vote", "vote_levels", "c_fine", "fine_levels", "atlases",
                                                      "decay_steps", "steps", "batch", "steps_per_epoch"))
        if not 0 <= self.jitter_probability <= 1:
            problems.append(f"jitter_probability must be in [0, 1], got {self.jitter_probability}")
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            problems.append(f"scale_range must be (low, high) with 0 < low <= high, got {self.scale_range}")
        if min(self.shift_strength, self.noise_max, self.ce_weight, self.jitter_scale) < 0:
            problems.append("shift_strength, noise_max, ce_weight and jitter_scale must be >= 0")
        if problems:
            raise ModelError("DLFConfig", "; ".join(problems))

    @property
    def model_file(self) -> str:
        return MODEL_FILES[self.kind]


def histogram_shift(images, strength: float, seed) -> tf.Tensor:
    """DLF's random histogram shift: each volume's intensities through its own random, monotone,
    piecewise-linear curve.

    The curve maps :data:`HISTOGRAM_KNOTS` evenly spaced intensities of [0, 1] to themselves plus
    a uniform draw in ``[-strength, strength]``, sorted (so the curve keeps intensities in order)
    and clipped to [0, 1]. A volume whose intensities leave [0, 1] (a z-scored oracle set) is
    mapped from ``[min(lowest, 0), max(highest, 1)]`` to [0, 1] for the curve and back.

    Args:
        images: ``[M, D, H, W, C]`` float intensities.
        strength: the largest knot displacement (0: the identity).
        seed: ``[2]`` int tensor for the stateless random draw.

    Returns:
        ``[M, D, H, W, C]`` float32.
    """
    images = tf.cast(images, tf.float32)
    axes = tf.range(1, tf.rank(images))
    low = tf.minimum(tf.reduce_min(images, axis=axes, keepdims=True), 0.0)
    span = tf.maximum(tf.reduce_max(images, axis=axes, keepdims=True), 1.0) - low
    images = (images - low) / span
    count = tf.shape(images)[0]
    knots = tf.linspace(0.0, 1.0, HISTOGRAM_KNOTS)
    moved = knots[None] + strength * (2.0 * tf.random.stateless_uniform(tf.stack([count, HISTOGRAM_KNOTS]),
                                                                        seed=seed) - 1.0)
    values = tf.clip_by_value(tf.sort(moved, axis=-1), 0.0, 1.0)
    position = images * (HISTOGRAM_KNOTS - 1)
    knot = tf.minimum(tf.floor(position), HISTOGRAM_KNOTS - 2)
    frac = position - knot
    index = tf.cast(knot, tf.int32)
    gather = lambda k: tf.gather(values, k, batch_dims=1)  # noqa: E731  ([M, K] by [M, ...] indices)
    flat = tf.reshape(index, tf.stack([count, -1]))
    lower = tf.reshape(gather(flat), tf.shape(images))
    upper = tf.reshape(gather(flat + 1), tf.shape(images))
    return (lower + frac * (upper - lower)) * span + low


def _similarity(shape_zyx, count, u, rotation_max, translation_max, scale_low, scale_high) -> tf.Tensor:
    """``count`` random similarity transforms as fields ``[count, D, H, W, 3]`` from uniforms ``u`` ``[count, 7]``."""
    angles = (2.0 * u[:, 0:3] - 1.0) * rotation_max
    translation = (2.0 * u[:, 3:6] - 1.0) * translation_max
    scale = scale_low + u[:, 6] * (scale_high - scale_low)
    return augmentation_displacement(shape_zyx, tf.zeros_like(angles), angles, translation, scale)


def augment_batch(target, target_one_hot, atlas_images, atlas_one_hot, config: DLFConfig, seed):
    """The augmentations of the module docstring, in the graph.

    Args:
        target: ``[B, D, H, W, 1]`` float; ``target_one_hot``: ``[B, D, H, W, L]``.
        atlas_images: ``[B, N, D, H, W, 1]`` or None (the U-Net); ``atlas_one_hot``: ``[B, N, D, H, W, L]`` or None.
        config: the ranges.
        seed: ``[2]`` int tensor (same seed, same result).

    Returns:
        The four inputs augmented (the atlases None where they were).
    """
    shape = config.shape_zyx
    batch = tf.shape(target)[0]
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 6)
    low, high = config.scale_range
    joint = _similarity(shape, batch, tf.random.stateless_uniform(tf.stack([batch, 7]), seed=seeds[0]),
                        config.rotation_max, config.translation_max, low, high)
    target = warp(tf.cast(target, tf.float32), joint, "linear")
    target_one_hot = warp(tf.cast(target_one_hot, tf.float32), joint, "nearest")
    target = histogram_shift(target, config.shift_strength, seeds[1])
    sigma = config.noise_max * tf.random.stateless_uniform(tf.stack([batch, 1, 1, 1, 1]), seed=seeds[2])
    target = target + sigma * tf.random.stateless_normal(tf.shape(target), seed=seeds[3])
    if atlas_images is None:
        return target, target_one_hot, None, None
    n = tf.shape(atlas_images)[1]
    flat = lambda x: tf.reshape(tf.cast(x, tf.float32), tf.concat([[-1], tf.shape(x)[2:]], 0))  # noqa: E731
    images, labels = flat(atlas_images), flat(atlas_one_hot)
    each = tf.repeat(joint, n, axis=0)
    u = tf.random.stateless_uniform(tf.stack([batch * n, 8]), seed=seeds[4])
    jitter = _similarity(shape, batch * n, u[:, :7], config.jitter_rotation, config.jitter_translation,
                         1.0 - config.jitter_scale, 1.0 + config.jitter_scale)
    jitter = tf.where((u[:, 7] < config.jitter_probability)[:, None, None, None, None], jitter, tf.zeros_like(jitter))
    images = warp(warp(images, each, "linear"), jitter, "linear")
    labels = warp(warp(labels, each, "nearest"), jitter, "nearest")
    images = histogram_shift(images, config.shift_strength, seeds[5])
    back = lambda x: tf.reshape(x, tf.concat([[batch, n], tf.shape(x)[1:]], 0))  # noqa: E731
    return target, target_one_hot, back(images), back(labels)


class DLFTrainer(training.SegmentationTrainer):
    """Trains a DLF or U-Net network: in-graph augmentation (:func:`augment_batch`), seeded by
    ``(config.seed, step, replica)``, and :func:`cmmas.nn.losses.segmentation_loss`. Metrics:
    ``loss``, ``dice``, ``ce``.

    ``fit`` data: dicts with ``target`` ``[B, D, H, W, 1]``, ``target_label`` ``[B, D, H, W]``
    (channel indices) and, for DLF, ``atlas_images`` ``[B, N, D, H, W, 1]`` and ``atlas_labels``
    ``[B, N, D, H, W]`` (channel indices). The artefact to save is ``self.net``.
    """

    def training_batch(self, data: dict, augment: bool = True) -> dict:
        """``data`` as float32 images and one-hot labels (``truth``; DLF: ``atlas_images``,
        ``atlas_labels``), with the step's :func:`augment_batch`."""
        target = tf.cast(data["target"], tf.float32)
        truth = tf.one_hot(tf.cast(data["target_label"], tf.int32), self.n_labels)
        dlf = self.config.kind == "dlf"
        images = tf.cast(data["atlas_images"], tf.float32) if dlf else None
        labels = tf.one_hot(tf.cast(data["atlas_labels"], tf.int32), self.n_labels) if dlf else None
        if augment and self.config.augment:
            target, truth, images, labels = augment_batch(target, truth, images, labels, self.config,
                                                          training.step_seed(self.optimizer, self.config.seed))
        return {"target": target, "truth": truth, **({"atlas_images": images, "atlas_labels": labels} if dlf else {})}


class _TargetBatches(keras.utils.PyDataset):
    """Random batches of training targets with N of their warped atlases each (drawn with
    duplicates), as the dicts :class:`DLFTrainer` reads. Batch ``index`` of pass ``e`` is drawn with
    ``numpy.random.default_rng([seed, e, index])``; a run resumed at epoch ``r`` passes
    ``first_epoch=r`` and sees the batches of the uninterrupted run."""

    def __init__(self, pairs: TrainingPairs, codes: Sequence[int], config: DLFConfig, first_epoch: int = 0):
        super().__init__()
        self._images = pairs.target_images
        self._labels = channel_index(pairs.target_labels, codes)
        self._atlas_labels = [channel_index(w, codes) for w in pairs.warped_labels]
        self._atlas_images = pairs.warped_images  # float16 in memory, float32 per batch
        self._config = config
        self._epoch = first_epoch

    def __len__(self) -> int:
        return self._config.steps_per_epoch

    def __getitem__(self, index: int):
        config = self._config
        rng = np.random.default_rng([config.seed, self._epoch, index])
        chosen = rng.integers(len(self._images), size=config.batch)
        batch = {"target": self._images[chosen][..., None], "target_label": self._labels[chosen]}
        if config.kind == "dlf":
            draws = [rng.integers(len(self._atlas_labels[t]), size=config.atlases) for t in chosen]
            batch["atlas_images"] = np.stack([self._atlas_images[t][d] for t, d in zip(chosen, draws)]
                                             ).astype(np.float32)[..., None]
            batch["atlas_labels"] = np.stack([self._atlas_labels[t][d] for t, d in zip(chosen, draws)])
        return (batch,)

    def on_epoch_end(self) -> None:
        self._epoch += 1


def build(config: DLFConfig, n_labels: int) -> keras.Model:
    """The untrained network of ``config.kind``."""
    if config.kind == "dlf":
        return build_dlf(config.shape_zyx, n_labels, c_vote=config.c_vote, c_fine=config.c_fine,
                         vote_levels=config.vote_levels, fine_levels=config.fine_levels, fine_tune=config.fine_tune,
                         mask=config.mask, precision=config.precision)
    return build_unet(config.shape_zyx, n_labels, c0=config.c_fine, levels=config.fine_levels, precision=config.precision)


def train(
    config: DLFConfig,
    data: TrainingPairs | str | os.PathLike,
    codes: Sequence[int],
    out_dir: str | os.PathLike,
    target_ids: Sequence[str] | None = None,
    progress: bool = True,
    card: ModelCard | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> Path:
    """Train DLF or the U-Net baseline on a pair cache (a folder of :func:`cmmas.fuse.pairs.generate_pairs`)
    or on :class:`TrainingPairs`.

    Writes into ``out_dir``: ``dlf.keras`` or ``unet.keras`` (atomically, once training is
    complete; its model card beside it), ``config.json``, ``history.csv`` (loss, dice, ce per
    epoch), ``curves.png``, ``checkpoints/``, ``tensorboard/`` and, while the run is unfinished,
    ``backup/`` (the same call again resumes from the last epoch). Exactly ``config.steps`` steps.

    Args:
        config: the run (its ``shape_zyx`` must be the pairs' grid).
        data: the pair cache (DLF needs its warped images).
        codes: label codes with the background 0.
        out_dir: output folder (created).
        target_ids: train on these targets of the cache only (default: all).
        progress: show Keras' progress bar.
        card: the model card written beside the model.
        callbacks: more Keras callbacks, after the run folder's.

    Raises:
        ModelError: the config does not fit the data or the card; DatasetError: unreadable cache.
    """
    pairs = data if isinstance(data, TrainingPairs) else load_pairs(data, target_ids, images=config.kind == "dlf")
    if pairs.shape_zyx != config.shape_zyx:
        raise ModelError("DLFConfig", f"shape_zyx {config.shape_zyx} differs from the training pairs' grid "
                         f"{pairs.shape_zyx}")
    if config.kind == "dlf" and pairs.warped_images is None:
        raise ModelError("DLFConfig", "DLF needs the warped atlas images of the pair cache")
    if card is not None:
        card.check_shape(config.shape_zyx, "DLFConfig")
    codes = channel_codes(codes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / CONFIG_FILE, json.dumps({**dataclasses.asdict(config), "targets": list(pairs.target_ids)},
                                                    indent=1))
    resume_epoch = training.resume_epoch_of(out / "backup")
    if resume_epoch == 0 and (out / "history.csv").exists():
        (out / "history.csv").unlink()
    elif resume_epoch:
        logger.info("resuming %s at epoch %d", out, resume_epoch)
    keras.utils.set_random_seed(config.seed)
    net = build(config, len(codes))
    trainer = DLFTrainer(net, config, len(codes))
    schedule = keras.optimizers.schedules.ExponentialDecay(config.lr, config.decay_steps, config.decay_rate,
                                                           staircase=True)
    trainer.compile(optimizer=keras.optimizers.Adam(schedule))
    batches = _TargetBatches(pairs, codes, config, resume_epoch)
    logger.info("training %s on %d targets for %d steps", config.kind, len(pairs.target_ids), config.steps)
    trainer.fit(batches, epochs=math.ceil(config.steps / config.steps_per_epoch), shuffle=False,
                callbacks=training.training_callbacks(config, out, callbacks, name=f"train_{config.kind}"),
                verbose=training.fit_verbosity(progress))
    path = training.save_model(net, out / config.model_file, card=card)
    training.plot_history(out / "history.csv", out / "curves.png")
    return path
