"""Training SimNet: learn where a warped atlas label can be trusted (inference: :mod:`cmmas.fuse.simnet`).

SimNet (:func:`cmmas.nn.networks.build_simnet`) reads the target image and one warped atlas label
(one-hot) and predicts, at every voxel, the *agreement* of that atlas with the unknown target
label: the fraction of the 3x3x3 window around the voxel where the warped atlas label equals
the target label (:func:`agreement_target`). Fusion is then the weighted vote
``argmax_l sum_i S_i [A_i == l]`` (:func:`cmmas.fuse.simnet.simnet_fuse`).

Training data (:func:`cmmas.fuse.pairs.generate_pairs`): every training atlas warped by a
trained BiRegNet to every training target, cached on disk, one ``<target_id>.npz`` per target.
Training (:func:`train`) runs :class:`SimNetTrainer`, a ``keras.Model`` whose ``train_step`` augments
in the graph, recomputes the agreement target from the augmented labels, and minimises the
sigmoid cross-entropy between the target and SimNet's logits. Two augmentations
(``SimConfig.augment_mode``): "atlas" (ours, :func:`random_augmentation`: the atlas label alone
moved by a random integer shift along the three spatial axes and a random similarity
transform) and "joint" (the original cmmas's, fusion/sampler_network.py,
:func:`joint_augmentation`: one similarity transform applied jointly to the target image, the
target label and the atlas label, then a small shift of the atlas label alone). Moving the
atlas label alone by a large transform changes the agreement targets SimNet learns
(docs/fidelity.md).

Arrays are numpy in array order ``(z, y, x)``; tensors ``[B, D, H, W, C]``. Label maps hold
data-set codes; ``codes`` lists them (the background 0 is always included); networks see their
one-hot in ascending code order (:func:`cmmas.fuse.simnet.channel_codes`).
"""

from __future__ import annotations

import csv
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
from scipy import ndimage

from cmmas.errors import GeometryError, ModelError
from cmmas.fuse.simnet import channel_codes
from cmmas.fuse.pairs import TrainingPairs, load_pairs
from cmmas.io import atomic_path, atomic_write_text
from cmmas.nn import training
from cmmas.nn.labelmix import randomise_some
from cmmas.nn.layers import warp
from cmmas.nn.model_card import ModelCard
from cmmas.nn.networks import build_simnet
from cmmas.register import augment, biregnet

logger = logging.getLogger(__name__)

#: File name of the trained SimNet in a training folder.
MODEL_FILE = "simnet.keras"

#: File name of the run's configuration (JSON) in a training folder.
CONFIG_FILE = "config.json"

#: Side of the cubic window of the agreement target, in voxels.
WINDOW = 3

#: Augmentation modes (:attr:`SimConfig.augment_mode`): ours, or the original's joint one.
AUGMENT_MODES = ("atlas", "joint")


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """Everything that defines one SimNet training run.

    The schedule defaults are the original cmmas's (labelintensityfusionnet.py with
    slurm/run_fusionnet.slurm; fusion/fusionnetworks.py ``LabIntSimNet``): Adam 1e-4 decayed
    x0.96 every 1000 steps, 5003 steps, batch 2; so are the ranges of the similarity transform
    (rotation, scale; the original's translation is +-10 mm, here voxels). Ours: ``arch``
    "cmmas" with ``levels`` 4 (``arch="original"``: the original's network, 5 levels),
    ``augment_probability`` (the original augments every sample), ``augment_mode`` "atlas", the
    transform moving the atlas label alone (``"joint"``: the original's, target and atlas moved
    jointly) and ``shift_max`` 5 along three axes (the original shifts the atlas label by -4..3
    voxels along two axes: ``augment_mode="joint"`` with ``shift_max`` 4); docs/fidelity.md.

    Attributes:
        shape_zyx: network input shape ``(D, H, W)``, divisible by ``2**(levels - 1)``.
        c0, levels: SimNet width (channels of the first level) and depth.
        arch: "cmmas" or "original" (:func:`cmmas.nn.networks.build_simnet`).
        lr: initial Adam learning rate.
        decay_rate, decay_steps: the rate is multiplied by ``decay_rate`` every
            ``decay_steps`` optimiser steps (staircase).
        steps: optimiser steps in total; training stops after exactly that many.
        batch: pairs per step (the global batch under a distribution strategy).
        steps_per_epoch: steps between checkpoints, log lines and backups.
        augment: augment the pairs (see ``augment_mode``).
        augment_mode: one of :data:`AUGMENT_MODES`: "atlas" (:func:`random_augmentation`) or
            "joint" (:func:`joint_augmentation`, the original's).
        augment_probability: probability that a pair is augmented; the others keep the label
            BiRegNet produced, so the network sees well and badly aligned atlases.
        shift_max: random integer shift of the atlas label, up to this many voxels per axis
            ("joint": ``-shift_max .. shift_max - 1`` along array axes 0 and 1, as the original).
        rotation_max: random rotation about each axis, up to this angle (radians).
        translation_max: random translation along each axis, up to this many voxels.
        scale_range: random isotropic scale factor of the atlas label, uniform in this range.
        labelmix: probability that a pair's target image gets a random contrast from its label
            map (:mod:`cmmas.nn.labelmix`), after the augmentation (0: off; the atlas-only mode,
            whose targets are of the atlas modality, needs it).
        precision: the network's trunk precision (:data:`cmmas.nn.precision.PRECISIONS`;
            "mixed_bfloat16" trains the convolutions in bfloat16, weights, heads and losses float32).
        seed: seeds the weights, the sampling of pairs and the augmentation.
    """

    shape_zyx: tuple[int, int, int]
    c0: int = 16
    levels: int = 4
    arch: str = "cmmas"
    lr: float = 1e-4
    decay_rate: float = 0.96
    decay_steps: int = 1000
    steps: int = 5003
    batch: int = 2
    steps_per_epoch: int = 50
    augment: bool = True
    augment_mode: str = "atlas"
    augment_probability: float = 0.5
    shift_max: int = 5
    rotation_max: float = math.pi / 28
    translation_max: float = 10.0
    scale_range: tuple[float, float] = (0.85, 1.45)
    labelmix: float = 0.0
    precision: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape_zyx", tuple(int(n) for n in self.shape_zyx))
        object.__setattr__(self, "scale_range", tuple(float(s) for s in self.scale_range))
        problems = []
        if len(self.shape_zyx) != 3 or min(self.shape_zyx) < 1:
            problems.append(f"shape_zyx must be 3 positive sizes, got {self.shape_zyx}")
        problems += training.schedule_problems(self, ("c0", "levels", "decay_steps", "steps", "batch",
                                                       "steps_per_epoch"))
        if self.augment_mode not in AUGMENT_MODES:
            problems.append(f"augment_mode must be one of {AUGMENT_MODES}, got {self.augment_mode!r}")
        if self.arch not in ("cmmas", "original"):
            problems.append(f"arch must be 'cmmas' or 'original', got {self.arch!r}")
        if not 0 <= self.augment_probability <= 1:
            problems.append(f"augment_probability must be in [0, 1], got {self.augment_probability}")
        if self.shift_max < 0 or self.rotation_max < 0 or self.translation_max < 0:
            problems.append("shift_max, rotation_max and translation_max must be >= 0")
        if not 0 <= self.labelmix <= 1:
            problems.append(f"labelmix must be a probability in [0, 1], got {self.labelmix}")
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            problems.append(f"scale_range must be (low, high) with 0 < low <= high, got {self.scale_range}")
        if problems:
            raise ModelError("SimConfig", "; ".join(problems))


def agreement_target(warped_label: np.ndarray, target_label: np.ndarray) -> np.ndarray:
    """SimNet's training target: local agreement of a warped atlas label with the target label.

    The fraction of voxels of the 3x3x3 window centred on each voxel where ``warped_label``
    equals ``target_label``. At the volume's border the window is clipped to the volume (the
    mean over the voxels that exist), as in TensorFlow's 'SAME' average pooling used in
    training.

    Args:
        warped_label: ``[..., D, H, W]`` label codes (any leading axes, e.g. atlases).
        target_label: ``[D, H, W]`` or ``[..., D, H, W]``, broadcastable to ``warped_label``.

    Returns:
        ``[..., D, H, W]`` float32 in [0, 1]: 1 where the window agrees everywhere.
    """
    warped = np.asarray(warped_label)
    target = np.asarray(target_label)
    if warped.ndim < 3 or target.ndim < 3:
        raise GeometryError("agreement_target", f"labels must be [..., D, H, W], got {warped.shape} and {target.shape}")
    try:
        equal = (warped == target).astype(np.float64)
    except ValueError:
        raise GeometryError("agreement_target", f"shapes {warped.shape} and {target.shape} do not broadcast") from None
    size = (1,) * (equal.ndim - 3) + (WINDOW,) * 3
    summed = ndimage.uniform_filter(equal, size=size, mode="constant", cval=0.0)
    counted = ndimage.uniform_filter(np.ones(equal.shape[-3:]), size=WINDOW, mode="constant", cval=0.0)
    return np.clip(summed / counted, 0.0, 1.0).astype(np.float32)


def agreement_map(atlas_one_hot, target_one_hot) -> tf.Tensor:
    """In-graph :func:`agreement_target` of one-hot labels.

    Args:
        atlas_one_hot, target_one_hot: ``[B, D, H, W, L]`` one-hot labels.

    Returns:
        ``[B, D, H, W, 1]`` float32: 3x3x3 'SAME' average pooling of the equality mask (the
        window is clipped to the volume at its border).
    """
    equal = tf.reduce_sum(tf.cast(atlas_one_hot, tf.float32) * tf.cast(target_one_hot, tf.float32),
                          axis=-1, keepdims=True)
    window = [1, WINDOW, WINDOW, WINDOW, 1]
    return tf.nn.avg_pool3d(equal, ksize=window, strides=[1, 1, 1, 1, 1], padding="SAME")


def random_augmentation(one_hot, config: SimConfig, seed) -> tf.Tensor:
    """Randomly shift and similarity-transform a batch of one-hot atlas labels.

    Each pair is augmented with probability ``config.augment_probability``: an integer shift
    uniform in ``[-shift_max, shift_max]`` voxels per spatial axis, rotations uniform in
    ``[-rotation_max, rotation_max]`` about each axis, a translation uniform in
    ``[-translation_max, translation_max]`` voxels per axis and a scale uniform in
    ``scale_range`` (see :func:`augmentation_displacement`). Nearest-neighbour sampling of the
    one-hot map keeps it one-hot (channel sums stay 1).

    The original's shift is ``np.roll`` of its binary ``[D, H, W, 1]`` atlas label over axes
    (0, 1, 3) (fusion/sampler_network.py, ``shift``): axis 3 is the size-1 channel axis, so it
    moves the label along D and H only and relabels nothing. Here the shift moves D, H and W.

    Args:
        one_hot: ``[B, D, H, W, L]`` float one-hot labels, ``(D, H, W) == config.shape_zyx``.
        config: the ranges and the shape.
        seed: ``[2]`` int32/int64 tensor for the stateless random ops (same seed, same result).

    Returns:
        ``[B, D, H, W, L]``, the augmented one-hot labels.
    """
    one_hot = tf.convert_to_tensor(one_hot)
    batch = tf.shape(one_hot)[0]
    u = tf.random.stateless_uniform(tf.stack([batch, 11]), seed=seed)
    apply = u[:, 0] < config.augment_probability
    m = float(config.shift_max)
    shift = tf.minimum(tf.floor(u[:, 1:4] * (2 * m + 1)), 2 * m) - m
    angles = (2.0 * u[:, 4:7] - 1.0) * config.rotation_max
    translation = (2.0 * u[:, 7:10] - 1.0) * config.translation_max
    low, high = config.scale_range
    scale = low + u[:, 10] * (high - low)
    ddf = augment.augmentation_displacement(config.shape_zyx, shift, angles, translation, scale)
    moved = warp(one_hot, ddf, "nearest")
    return tf.where(apply[:, None, None, None, None], moved, one_hot)


def joint_augmentation(target_image, target_one_hot, atlas_one_hot, config: SimConfig, seed):
    """The original's augmentation of a batch of SimNet pairs (fusion/sampler_network.py).

    With probability ``config.augment_probability`` per pair (the original: always), one
    similarity transform (rotations uniform in ``[-rotation_max, rotation_max]`` about each axis,
    translation uniform in ``[-translation_max, translation_max]`` voxels per axis, isotropic
    scale uniform in ``scale_range``; :func:`augmentation_displacement`) moves the target image
    (linear), the target label and the atlas label (nearest) together, so that their relative
    alignment, hence the agreement target, is kept; then the atlas label alone is shifted by an
    integer uniform in ``[-shift_max, shift_max - 1]`` voxels along array axes 0 and 1 (the
    original's ``np.roll`` wraps around; here the border voxels repeat).

    Args:
        target_image: ``[B, D, H, W, 1]`` float.
        target_one_hot, atlas_one_hot: ``[B, D, H, W, L]`` float one-hot labels.
        config: the ranges and the shape ``(D, H, W)``.
        seed: ``[2]`` int tensor for the stateless random ops.

    Returns:
        ``(target_image, target_one_hot, atlas_one_hot)``, augmented, same shapes.
    """
    image, target, atlas = (tf.convert_to_tensor(v, tf.float32) for v in (target_image, target_one_hot,
                                                                          atlas_one_hot))
    batch = tf.shape(image)[0]
    u = tf.random.stateless_uniform(tf.stack([batch, 10]), seed=seed)
    apply = u[:, 0] < config.augment_probability
    angles = (2.0 * u[:, 1:4] - 1.0) * config.rotation_max
    translation = (2.0 * u[:, 4:7] - 1.0) * config.translation_max
    low, high = config.scale_range
    scale = low + u[:, 7] * (high - low)
    zeros = tf.zeros_like(angles)
    joint = augment.augmentation_displacement(config.shape_zyx, zeros, angles, translation, scale)
    m = float(config.shift_max)
    shift = tf.floor(u[:, 8:10] * 2 * m) - m  # -m .. m-1 (u < 1); 0 when m == 0
    shift = tf.concat([shift, tf.zeros_like(shift[:, :1])], axis=-1)
    only_atlas = augment.augmentation_displacement(config.shape_zyx, shift, zeros, zeros, tf.ones_like(scale))
    moved_image = warp(image, joint, "linear")
    moved_target = warp(target, joint, "nearest")
    moved_atlas = warp(warp(atlas, joint, "nearest"), only_atlas, "nearest")
    where = apply[:, None, None, None, None]
    return (tf.where(where, moved_image, image), tf.where(where, moved_target, target),
            tf.where(where, moved_atlas, atlas))


class SimNetTrainer(training.Trainer):
    """Trains a SimNet: in-graph augmentation, agreement target, sigmoid cross-entropy.

    ``fit`` data: dicts with ``target`` ``[B, D, H, W, 1]`` (target image), ``atlas_label``
    ``[B, D, H, W, L]`` (one-hot warped atlas label) and ``target_label`` ``[B, D, H, W, L]``
    (one-hot target label). Each step augments (when ``config.augment``) ``atlas_label``
    (:func:`random_augmentation`) or, with ``augment_mode="joint"``, all three
    (:func:`joint_augmentation`), seeded by ``(config.seed, step, replica)`` so a resumed run
    continues the same sequence, recomputes the agreement target with :func:`agreement_map`
    and minimises the mean sigmoid cross-entropy of SimNet's logits against it.
    Metrics: ``loss`` and ``mae`` (mean |similarity - target|).

    The trainer is a training harness; the artefact to save and deploy is ``self.simnet``.
    """

    def __init__(self, simnet: keras.Model, config: SimConfig, **kwargs):
        super().__init__(**kwargs)
        self.simnet = simnet
        self.config = config
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.mae_tracker = keras.metrics.Mean(name="mae")
        self.built = True

    def call(self, inputs, training=False):
        return self.simnet({"target": inputs["target"], "atlas_label": inputs["atlas_label"]},
                           training=training)

    @property
    def metrics(self):
        return [self.loss_tracker, self.mae_tracker]

    def training_batch(self, data: dict, augment: bool = True) -> dict:
        """``data`` with the atlas label as float32, the step's augmentation (``augment_mode``
        "atlas": the atlas label moved; "joint": all three) and, with ``labelmix``, a random
        contrast of the target image."""
        atlas = tf.cast(data["atlas_label"], tf.float32)
        image, target = data["target"], data["target_label"]
        if augment and self.config.augment and self.config.augment_mode == "joint":
            image, target, atlas = joint_augmentation(image, target, atlas, self.config,
                                                      training.step_seed(self.optimizer, self.config.seed))
        elif augment and self.config.augment:
            atlas = random_augmentation(atlas, self.config, training.step_seed(self.optimizer, self.config.seed))
        if augment and self.config.labelmix > 0:
            seed = tf.random.experimental.stateless_fold_in(training.step_seed(self.optimizer, self.config.seed), 1)
            image = randomise_some(image, target, seed, self.config.labelmix)
        return {"target": image, "target_label": target, "atlas_label": atlas}

    def losses(self, batch: dict) -> dict:
        """``loss``: the mean sigmoid cross-entropy of the logits against the agreement map;
        ``mae``: the mean |similarity - agreement|."""
        agreement = agreement_map(batch["atlas_label"], batch["target_label"])
        outputs = self.simnet({"target": batch["target"], "atlas_label": batch["atlas_label"]}, training=True)
        loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=agreement, logits=outputs["logits"]))
        return {"loss": loss, "mae": tf.reduce_mean(tf.abs(outputs["similarity"] - agreement))}


class _PairBatches(keras.utils.PyDataset):
    """Random batches of (target, warped atlas) pairs, as the dicts :class:`SimNetTrainer` reads.

    Batch ``index`` of pass ``e`` over the data (counted by ``on_epoch_end`` from
    ``first_epoch``) is drawn with ``numpy.random.default_rng([seed, e, index])``. A run resumed
    at epoch ``r`` passes ``first_epoch=r`` and sees the batches of the uninterrupted run (fit
    with ``shuffle=False``).
    """

    def __init__(self, pairs: TrainingPairs, codes: Sequence[int], batch: int, steps: int, seed: int,
                 first_epoch: int = 0):
        super().__init__()
        self._pairs = pairs
        self.sorted_codes = list(codes)
        self._index = [(t, i) for t, stack in enumerate(pairs.warped_labels) for i in range(len(stack))]
        self._batch, self._steps, self._seed = batch, steps, seed
        self._epoch = first_epoch

    def __len__(self) -> int:
        return self._steps

    def __getitem__(self, index: int):
        rng = np.random.default_rng([self._seed, self._epoch, index])
        chosen = [self._index[k] for k in rng.integers(len(self._index), size=self._batch)]
        atlases = np.stack([self._pairs.warped_labels[t][i] for t, i in chosen])
        targets = np.stack([self._pairs.target_labels[t] for t, _ in chosen])
        images = np.stack([self._pairs.target_images[t] for t, _ in chosen])[..., None]
        return ({"target": images,
                 "atlas_label": biregnet.one_hot(atlases, self.sorted_codes),
                 "target_label": biregnet.one_hot(targets, self.sorted_codes)},)

    def on_epoch_end(self) -> None:
        self._epoch += 1


def _as_float(text: str | None) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):  # CSVLogger writes "NA" for metrics it did not get
        return math.nan


def _plot_curves(history_csv: Path, out_png: Path) -> Path:
    """Every logged metric (loss, mae, ...) against the epoch, one panel each, written atomically.

    :func:`cmmas.nn.training.plot_history` draws BiRegNet's loss and Dice only; this draws
    whatever the CSVLogger file holds.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with history_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    names = [name for name in (rows[0] if rows else ()) if name != "epoch"]
    curves = {name: [_as_float(r.get(name)) for r in rows] for name in names}
    curves = {name: values for name, values in curves.items() if np.isfinite(values).any()}
    figure = Figure(figsize=(4 * max(len(curves), 1), 3))
    FigureCanvasAgg(figure)
    epochs = [int(r["epoch"]) + 1 for r in rows]
    for index, (name, values) in enumerate(curves.items()):
        axes = figure.add_subplot(1, len(curves), index + 1)
        axes.plot(epochs, values)
        axes.set_xlabel("epoch")
        axes.set_title(name)
    figure.tight_layout()
    with atomic_path(out_png, ".png") as tmp:
        figure.savefig(tmp, dpi=100)
    return out_png


def train(
    config: SimConfig,
    data: TrainingPairs | str | os.PathLike,
    codes: Sequence[int],
    out_dir: str | os.PathLike,
    strategy: str = "default",
    progress: bool = True,
    init_weights: str | os.PathLike | None = None,
    card: ModelCard | None = None,
) -> Path:
    """Train a SimNet on cached pairs (a folder from :func:`cmmas.fuse.pairs.generate_pairs`) or
    on arrays.

    Writes into ``out_dir``: ``simnet.keras`` (the bare SimNet, atomically, once training is
    complete), ``config.json``, ``history.csv`` (loss and mae per epoch), ``curves.png``,
    ``checkpoints/`` (trainer weights per epoch), ``tensorboard/`` (when the tensorboard
    package is installed) and, while the run is unfinished, ``backup/`` (Keras
    BackupAndRestore: the same call again resumes from the last epoch). The callbacks are
    BiRegNet's (:mod:`cmmas.register`). Training takes exactly ``config.steps`` steps.

    Args:
        config: the run (its ``shape_zyx`` must be the pairs' grid).
        data: a pair cache folder or :class:`cmmas.fuse.pairs.TrainingPairs`.
        codes: label codes with the background 0 (the one-hot channels, sorted).
        out_dir: output folder (created); the workers of a multi-worker run other than the chief
            write to ``workers/<task><index>`` in it (:func:`cmmas.nn.training.run_folder`).
        strategy: one of :data:`cmmas.nn.training.STRATEGIES`; ``config.batch`` is the global
            batch.
        progress: show Keras' progress bar.
        init_weights: a ``simnet.keras`` of the same architecture to start from (steps and
            schedule start again at 0); ignored when resuming from ``backup/``.
        card: what the network is trained on (:func:`cmmas.align.cards.card_from_atlas_set`),
            written beside ``simnet.keras`` (``simnet.keras.json``).

    Returns:
        The path of ``simnet.keras``.

    Raises:
        ModelError: the config does not fit the data or the card; DatasetError: unreadable cache.
    """
    pairs = data if isinstance(data, TrainingPairs) else load_pairs(data)
    if pairs.shape_zyx != config.shape_zyx:
        raise ModelError("SimConfig", f"shape_zyx {config.shape_zyx} differs from the training pairs' grid "
                         f"{pairs.shape_zyx}")
    if card is not None:
        card.check_shape(config.shape_zyx, "SimConfig")
    codes = channel_codes(codes)
    distribution = training.get_strategy(strategy)  # before any TensorFlow op (a multi-worker strategy needs it)
    out = training.run_folder(out_dir, distribution)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / CONFIG_FILE, json.dumps(dataclasses.asdict(config), indent=1))
    resume_epoch = training.resume_epoch_of(out / "backup")
    if resume_epoch == 0 and (out / "history.csv").exists():
        (out / "history.csv").unlink()  # a fresh run, not a resume: start a new log
    elif resume_epoch:
        logger.info("resuming %s at epoch %d", out, resume_epoch)

    if config.batch % distribution.num_replicas_in_sync:
        raise ModelError("SimConfig", f"batch {config.batch} is not divisible by the "
                         f"{distribution.num_replicas_in_sync} replicas")
    keras.utils.set_random_seed(config.seed)
    with distribution.scope():
        simnet = build_simnet(config.shape_zyx, len(codes), c0=config.c0, levels=config.levels, arch=config.arch,
                              precision=config.precision)
        if init_weights is not None and resume_epoch == 0:
            training.copy_weights(init_weights, simnet)
        trainer = SimNetTrainer(simnet, config)
        schedule = keras.optimizers.schedules.ExponentialDecay(
            config.lr, config.decay_steps, config.decay_rate, staircase=True)
        trainer.compile(optimizer=keras.optimizers.Adam(schedule))
    batches = _PairBatches(pairs, codes, config.batch, config.steps_per_epoch, config.seed, resume_epoch)
    logger.info("training SimNet on %d pairs of %d targets for %d steps", pairs.n_pairs,
                len(pairs.target_ids), config.steps)
    trainer.fit(batches, epochs=math.ceil(config.steps / config.steps_per_epoch), shuffle=False,
                callbacks=training.training_callbacks(config, out, (), name="train_fusion"),
                verbose=training.fit_verbosity(progress))
    path = training.save_model(simnet, out / MODEL_FILE, card=card)
    _plot_curves(out / "history.csv", out / "curves.png")
    return path
