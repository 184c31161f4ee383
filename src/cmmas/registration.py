"""Training and applying BiRegNet: atlas-to-target deformable registration.

Training follows the original cmmas (GUIDE.md section 4). For a pair of an atlas (image ``I_a``,
one-hot label ``L_a``) and a target (``I_t``, ``L_t``) the network predicts ``U`` (warps the atlas
onto the target) and ``V`` (the target onto the atlas), and the default loss is::

    -Dice_ms(L_t, L_a o U) - Dice_ms(L_a, L_t o V)
        + lambda_consis (|I_t - I_t o V o U|_1 + |I_a - I_a o U o V|_1)

with ``Dice_ms`` the soft Dice over the foreground channels averaged over Gaussian blurs
``sigma in {0, 1, 2, 4}`` voxels (:class:`cmmas.losses.MultiScaleDice`). Other similarity terms
(``sim_loss``) compare the warped atlas image with the target image and the warped target image
with the atlas image (local NCC, global mutual information), optionally with the Dice terms.
Optional regularisers: ``lambda_smooth`` (squared gradients of ``U`` and ``V``) and
``lambda_fold`` (negative Jacobian determinants).

Conventions: images are ``[N, D, H, W]`` numpy arrays in ``[0, 1]`` on a working grid (array
order ``(z, y, x)``); labels are integer codes, one-hot encoded here only, background (code 0)
always channel 0; displacement fields are ``[..., D, H, W, 3]`` in voxels of the working grid,
channels in array-axis order (``ij``). Keras tensors are ``[B, D, H, W, C]``.

Randomness is stateless and keyed by ``(seed, optimizer step)``: the pairs a run draws and their
augmentations depend only on the seed and the step, so a run resumed by ``BackupAndRestore``
sees the same data as an uninterrupted one.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from cmmas import preprocess
from cmmas.atlas_set import normalize
from cmmas.errors import CmmasError, GeometryError, LabelError, ModelError
from cmmas.io import Geometry, Image, atomic_path, atomic_write_text, check_same_grid
from cmmas.layers import warp
from cmmas.losses import Grad, LocalNCC, MultiScaleDice, MutualInformation, NegativeJacobian
from cmmas.metrics import jacobian_stats
from cmmas.networks import build_biregnet, inference_copy

log = logging.getLogger(__name__)

SIM_LOSSES = ("dice", "ncc", "mi", "dice+mi", "dice+ncc")
STRATEGIES = ("default", "mirrored", "multiworker")
#: Names of the quantities the trainer tracks (``val_`` prefixed on validation data).
METRIC_NAMES = ("loss", "sim", "dice", "consis", "smooth", "fold")
#: Blurs (voxels) of the multi-scale Dice, as the original.
DICE_SIGMAS = (0.0, 1.0, 2.0, 4.0)
#: Default augmentation: rotation about each array axis up to this many degrees, ...
AUG_MAX_ROTATION_DEG = 10.0
#: ... scale of each axis within ``1 +- AUG_MAX_SCALE``, ...
AUG_MAX_SCALE = 0.1
#: ... and translation along each axis up to this many voxels (uniform draws).
AUG_MAX_SHIFT_VOX = 4.0

MODEL_FILE = "model.keras"
CONFIG_FILE = "config.json"


# --------------------------------------------------------------------------------------------
# Configuration and label encoding.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RegConfig:
    """Everything that defines a BiRegNet training run (defaults reproduce the original).

    Attributes:
        shape_zyx: working-grid shape ``(D, H, W)``, divisible by ``2**(levels-1)``.
        c0: channels of the first U-Net level (doubling per level).
        levels: U-Net resolution levels.
        diffeomorphic: predict stationary velocity fields integrated by scaling and squaring.
        sim_loss: one of :data:`SIM_LOSSES`.
        lambda_consis: weight of the cycle-consistency L1 terms.
        lambda_smooth: weight of the squared-gradient smoothness of ``U`` and ``V``.
        lambda_fold: weight of the negative-Jacobian folding penalty of ``U`` and ``V``.
        lr: initial Adam learning rate.
        decay_rate: the learning rate is multiplied by this ...
        decay_steps: ... every this many steps (staircase).
        steps: optimiser steps of the whole run.
        batch: pairs per step (global batch, split across replicas).
        steps_per_epoch: steps between logs, checkpoints and backups.
        augment: one random affine per pair, applied to the atlas and the target alike (it adds
            pose and size variety while keeping the pair's pre-alignment; independent affines
            per image made the network hurt at test time, see docs/results.md).
        aug_rotation: largest rotation about each array axis, degrees.
        aug_scale: largest relative scale change per axis.
        aug_shift: largest translation per axis, voxels of the working grid.
        seed: seeds initial weights, pair sampling and augmentation.
    """

    shape_zyx: tuple[int, int, int] = (96, 96, 96)
    c0: int = 4
    levels: int = 4
    diffeomorphic: bool = False
    sim_loss: str = "dice"
    lambda_consis: float = 0.1
    lambda_smooth: float = 0.0
    lambda_fold: float = 0.0
    lr: float = 1e-3
    decay_rate: float = 0.96
    decay_steps: int = 100
    steps: int = 1503
    batch: int = 2
    steps_per_epoch: int = 50
    augment: bool = True
    aug_rotation: float = AUG_MAX_ROTATION_DEG
    aug_scale: float = AUG_MAX_SCALE
    aug_shift: float = AUG_MAX_SHIFT_VOX
    seed: int = 0

    def __post_init__(self) -> None:
        self.shape_zyx = tuple(int(n) for n in self.shape_zyx)  # type: ignore[assignment]
        problems = []
        if len(self.shape_zyx) != 3:
            problems.append(f"shape_zyx must have 3 entries, got {self.shape_zyx}")
        if self.sim_loss not in SIM_LOSSES:
            problems.append(f"sim_loss must be one of {SIM_LOSSES}, got {self.sim_loss!r}")
        for name in ("c0", "levels", "decay_steps", "steps", "batch", "steps_per_epoch"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("lambda_consis", "lambda_smooth", "lambda_fold", "aug_rotation", "aug_scale", "aug_shift"):
            if float(getattr(self, name)) < 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        if not (self.lr > 0 and 0 < self.decay_rate <= 1):
            problems.append(f"need lr > 0 and 0 < decay_rate <= 1, got {self.lr}, {self.decay_rate}")
        if problems:
            raise ModelError("RegConfig", "; ".join(problems))

    @property
    def epochs(self) -> int:
        """``ceil(steps / steps_per_epoch)``; the last epoch stops at ``steps``."""
        return math.ceil(self.steps / self.steps_per_epoch)

    def to_dict(self) -> dict:
        """A JSON-ready dict (``shape_zyx`` as a list)."""
        data = dataclasses.asdict(self)
        data["shape_zyx"] = list(self.shape_zyx)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "RegConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ModelError`."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelError("RegConfig", f"unknown fields {unknown}; expected some of {sorted(known)}")
        return cls(**data)


def label_table(codes: Sequence[int]) -> tuple[int, ...]:
    """The one-hot channel order: background 0 first, then the other codes in the given order."""
    table = [0]
    for code in codes:
        if int(code) != code:
            raise LabelError("label codes", f"codes must be integers, got {code!r}")
        if int(code) not in table:
            table.append(int(code))
    return tuple(table)


def one_hot(labels: np.ndarray, codes: Sequence[int]) -> np.ndarray:
    """One-hot encoding of integer label maps.

    Args:
        labels: ``[N, D, H, W]`` (any shape) data-set codes.
        codes: the label codes; channel order is :func:`label_table` (0 first even if omitted).

    Returns:
        ``[N, D, H, W, L]`` float32, ``L = len(label_table(codes))``.

    Raises:
        LabelError: a value of ``labels`` is not in the table.
    """
    table = np.asarray(label_table(codes))
    labels = np.asarray(labels)
    order = np.argsort(table)
    position = np.clip(np.searchsorted(table[order], labels), 0, len(table) - 1)
    found = table[order][position] == labels
    if not np.all(found):
        unknown = sorted(np.unique(labels[~found]).tolist())
        raise LabelError("label map", f"unknown label values {unknown}; expected some of {table.tolist()}")
    index = order[position]
    return (index[..., None] == np.arange(len(table))).astype(np.float32)


# --------------------------------------------------------------------------------------------
# In-graph affine augmentation.
# --------------------------------------------------------------------------------------------


def affine_matrix(angles, scales, shifts) -> tf.Tensor:
    """Affine maps ``[B, 3, 4]`` (voxel units, array axes) from per-item parameters.

    Args:
        angles: ``[B, 3]`` rotations in radians about array axes d, h, w (applied w, h, d).
        scales: ``[B, 3]`` scale factors along d, h, w (1 is none).
        shifts: ``[B, 3]`` translations in voxels along d, h, w.

    Returns:
        ``[A | t]`` with ``A = R_d R_h R_w diag(scales)``. All-zero angles and shifts with unit
        scales give exactly the identity.
    """
    angles = tf.cast(angles, tf.float32)
    cos, sin = tf.cos(angles), tf.sin(angles)
    one, zero = tf.ones_like(cos[:, 0]), tf.zeros_like(cos[:, 0])

    def rotation(k: int, i: int, j: int) -> tf.Tensor:
        """Rotation by ``angles[:, k]`` in the plane of axes ``i`` and ``j``."""
        rows = [[one, zero, zero], [zero, one, zero], [zero, zero, one]]
        rows[i][i], rows[i][j] = cos[:, k], -sin[:, k]
        rows[j][i], rows[j][j] = sin[:, k], cos[:, k]
        return tf.stack([tf.stack(row, axis=-1) for row in rows], axis=-2)

    linear = rotation(0, 1, 2) @ rotation(1, 0, 2) @ rotation(2, 0, 1)
    linear = linear * tf.cast(scales, tf.float32)[:, None, :]
    return tf.concat([linear, tf.cast(shifts, tf.float32)[:, :, None]], axis=-1)


def affine_ddf(matrices, shape_zyx) -> tf.Tensor:
    """The displacement field ``[B, D, H, W, 3]`` (voxels) of affine maps about the volume centre.

    Voxel ``x`` samples ``A (x - c) + c + t`` with ``c = (shape - 1) / 2``, so the field is
    ``(A - I)(x - c) + t``: exactly zero for the identity.

    Args:
        matrices: ``[B, 3, 4]`` from :func:`affine_matrix`.
        shape_zyx: ``(D, H, W)`` (ints or a tensor).
    """
    matrices = tf.cast(matrices, tf.float32)
    sizes = [shape_zyx[k] for k in range(3)]
    axes = [tf.range(n, dtype=tf.float32) - (tf.cast(n, tf.float32) - 1.0) / 2.0 for n in sizes]
    centred = tf.stack(tf.meshgrid(*axes, indexing="ij"), axis=-1)
    linear = matrices[:, :, :3] - tf.eye(3)
    return tf.einsum("bij,dhwj->bdhwi", linear, centred) + matrices[:, None, None, None, :, 3]


def rethreshold(soft_one_hot) -> tf.Tensor:
    """Back to one-hot: ``[..., L]`` -> one-hot of the argmax channel, float32."""
    soft_one_hot = tf.convert_to_tensor(soft_one_hot)
    return tf.one_hot(tf.argmax(soft_one_hot, axis=-1), tf.shape(soft_one_hot)[-1], dtype=tf.float32)


def random_affine(
    images: Sequence,
    labels: Sequence = (),
    max_rotation: float = AUG_MAX_ROTATION_DEG,
    max_scale: float = AUG_MAX_SCALE,
    max_shift: float = AUG_MAX_SHIFT_VOX,
    seed=(0, 0),
) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
    """Warp volumes of one batch by a random affine per batch item (the same for all inputs).

    Rotation angles (degrees, about each array axis), per-axis scale deviations and shifts
    (voxels) are drawn uniformly in ``[-max, max]``; the map is applied about the volume centre
    (:func:`affine_ddf`). Images are warped linearly; one-hot labels linearly, then re-thresholded
    (argmax back to one-hot). Every input of one batch item gets the same map, so passing the
    atlas and the target of a pair together keeps their relative alignment.

    Args:
        images: ``[B, D, H, W, C]`` float tensors.
        labels: ``[B, D, H, W, L]`` one-hot tensors, same batch and spatial shape.
        seed: stateless seed, two integers (or an int tensor ``[2]``).

    Returns:
        ``(warped_images, warped_labels)``, lists in the input order.
    """
    volumes = [tf.convert_to_tensor(v, tf.float32) for v in (*images, *labels)]
    if not volumes:
        return [], []
    reference = tf.shape(volumes[0])
    draws = tf.random.stateless_uniform([3, reference[0], 3], tf.cast(seed, tf.int64), -1.0, 1.0)
    matrices = affine_matrix(
        draws[0] * (float(max_rotation) * math.pi / 180.0),
        1.0 + draws[1] * float(max_scale),
        draws[2] * float(max_shift),
    )
    ddf = affine_ddf(matrices, reference[1:4])
    widths = [v.shape[-1] for v in volumes]
    warped = tf.split(warp(tf.concat(volumes, axis=-1), ddf, "linear"), widths, axis=-1)
    return warped[: len(images)], [rethreshold(v) for v in warped[len(images):]]


# --------------------------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------------------------


def _check_stack(images: np.ndarray, onehot: np.ndarray, what: str) -> None:
    if images.ndim != 4:
        raise GeometryError(f"{what} images", f"expected [N, D, H, W], got shape {images.shape}")
    if onehot.ndim != 5 or onehot.shape[:4] != images.shape:
        raise GeometryError(f"{what} labels", f"expected one-hot {list(images.shape)} + [L], got {onehot.shape}")
    if len(images) == 0:
        raise GeometryError(f"{what} images", "none given")


def pair_dataset(
    atlas_images: np.ndarray,
    atlas_onehot: np.ndarray,
    target_images: np.ndarray,
    target_onehot: np.ndarray,
    batch: int,
    seed: int,
    start: int = 0,
) -> "tf.data.Dataset":
    """An infinite stream of random (atlas, target) pairs, batched.

    Pair ``k`` (counting from 0) is drawn from ``numpy.random.default_rng([seed, k])``, so the
    stream is a function of the seed alone and ``start`` resumes it at pair ``start``.

    Args:
        atlas_images, target_images: ``[N, D, H, W]`` float images.
        atlas_onehot, target_onehot: ``[N, D, H, W, L]`` one-hot labels (:func:`one_hot`).
        batch: pairs per element.
        seed: the stream's seed.
        start: index of the first pair.

    Returns:
        ``tf.data.Dataset`` of dicts ``atlas``, ``target`` ``[batch, D, H, W, 1]`` and
        ``atlas_label``, ``target_label`` ``[batch, D, H, W, L]``, float32.
    """
    atlas_images, target_images = (np.asarray(a, np.float32) for a in (atlas_images, target_images))
    atlas_onehot, target_onehot = (np.asarray(a, np.float32) for a in (atlas_onehot, target_onehot))
    _check_stack(atlas_images, atlas_onehot, "atlas")
    _check_stack(target_images, target_onehot, "target")
    if atlas_onehot.shape[1:] != target_onehot.shape[1:]:
        raise GeometryError(
            "target labels", f"shape {target_onehot.shape[1:]} differs from the atlases' {atlas_onehot.shape[1:]}"
        )
    spatial, channels = atlas_images.shape[1:], atlas_onehot.shape[-1]

    def pairs():
        k = int(start)
        while True:
            rng = np.random.default_rng([int(seed), k])
            a, t = int(rng.integers(len(atlas_images))), int(rng.integers(len(target_images)))
            yield {
                "atlas": atlas_images[a][..., None],
                "target": target_images[t][..., None],
                "atlas_label": atlas_onehot[a],
                "target_label": target_onehot[t],
            }
            k += 1

    image_spec = tf.TensorSpec((*spatial, 1), tf.float32)
    label_spec = tf.TensorSpec((*spatial, channels), tf.float32)
    signature = {"atlas": image_spec, "target": image_spec, "atlas_label": label_spec, "target_label": label_spec}
    dataset = tf.data.Dataset.from_generator(pairs, output_signature=signature)
    return dataset.batch(int(batch), drop_remainder=True).prefetch(1)


def _fixed_pairs_dataset(atlas_images, atlas_onehot, target_images, target_onehot, batch: int):
    """Validation pairs ``(i mod N_a, i mod N_t)`` for ``i < max(N_a, N_t)``: every case once, finite."""
    _check_stack(atlas_images, atlas_onehot, "validation atlas")
    _check_stack(target_images, target_onehot, "validation target")
    n = max(len(atlas_images), len(target_images))
    a = np.arange(n) % len(atlas_images)
    t = np.arange(n) % len(target_images)
    data = {
        "atlas": atlas_images[a][..., None].astype(np.float32),
        "target": target_images[t][..., None].astype(np.float32),
        "atlas_label": atlas_onehot[a].astype(np.float32),
        "target_label": target_onehot[t].astype(np.float32),
    }
    return tf.data.Dataset.from_tensor_slices(data).batch(int(batch))


# --------------------------------------------------------------------------------------------
# The trainer.
# --------------------------------------------------------------------------------------------


class BiRegNetTrainer(keras.Model):
    """BiRegNet with its training loss: ``fit`` it on :func:`pair_dataset` batches.

    Each batch is a dict of ``atlas``, ``target`` ``[B, D, H, W, 1]`` and ``atlas_label``,
    ``target_label`` ``[B, D, H, W, L]`` (one-hot, channel 0 background). ``train_step``
    augments each pair (when ``config.augment``), computes :meth:`pair_losses` and applies the
    gradients; ``test_step`` evaluates without augmentation. Both return the running means of
    :data:`METRIC_NAMES`: ``loss`` (the total), ``sim`` (the similarity terms), ``dice`` (soft
    foreground Dice of ``L_a o U`` with ``L_t``, higher is better), ``consis``, ``smooth``,
    ``fold`` (unweighted sums over both fields).

    Args:
        net: a model from :func:`cmmas.networks.build_biregnet`.
        config: the run's :class:`RegConfig` (loss weights, augmentation, seed).
    """

    def __init__(self, net: keras.Model, config: RegConfig, **kwargs):
        super().__init__(**kwargs)
        self.net = net
        self.config = config
        self.trackers = [keras.metrics.Mean(name=name) for name in METRIC_NAMES]
        self._dice_ms = MultiScaleDice(DICE_SIGMAS)
        self._dice = MultiScaleDice((0.0,))
        self._ncc = LocalNCC(9)
        self._mi = MutualInformation()
        self._grad = Grad("l2")
        self._fold = NegativeJacobian()
        self.built = True

    @property
    def metrics(self) -> list:
        return list(self.trackers)

    def call(self, inputs, training=None):
        return self.net(inputs, training=training)

    def pair_losses(self, data: dict, training: bool = False) -> dict:
        """Every term of the loss for one batch (no augmentation), scalar tensors by name.

        Each term sums both directions (atlas -> target with ``U``, target -> atlas with ``V``).
        Both directions run as one batch of ``2B`` (atlas side first), so one warp moves
        images and labels of both sides, and one more gives the round trips.
        """
        atlas, target = data["atlas"], data["target"]
        atlas_label, target_label = data["atlas_label"], data["target_label"]
        fields = self.net({"atlas": atlas, "target": target}, training=training)
        n = tf.shape(atlas)[0]
        forward = tf.concat([fields["U"], fields["V"]], axis=0)  # moves [atlas; target] onto the other
        backward = tf.concat([fields["V"], fields["U"]], axis=0)
        moving = tf.concat([tf.concat([atlas, atlas_label], -1), tf.concat([target, target_label], -1)], 0)
        moved = warp(moving, forward, "linear")  # [I_a o U, L_a o U; I_t o V, L_t o V]
        moved_images, moved_labels = moved[..., :1], moved[..., 1:]
        fixed_images = tf.concat([target, atlas], axis=0)
        fixed_labels = tf.concat([target_label, atlas_label], axis=0)
        kind = self.config.sim_loss
        sim = tf.constant(0.0)
        if "dice" in kind:
            sim += 2.0 * self._dice_ms(fixed_labels[..., 1:], moved_labels[..., 1:])
        if "ncc" in kind:
            sim += 2.0 * self._ncc(fixed_images, moved_images)
        if "mi" in kind:
            sim += 2.0 * self._mi(fixed_images, moved_images)
        round_trip = warp(moved_images, backward, "linear")  # [I_a o U o V; I_t o V o U]
        consis = 2.0 * tf.reduce_mean(tf.abs(tf.concat([atlas, target], axis=0) - round_trip))
        smooth = 2.0 * self._grad(forward)
        fold = 2.0 * self._fold(forward)
        c = self.config
        loss = sim
        for weight, term in ((c.lambda_consis, consis), (c.lambda_smooth, smooth), (c.lambda_fold, fold)):
            if weight:  # a zero-weight term is only monitored: keep it out of the gradient
                loss += weight * term
        dice = -self._dice(target_label[..., 1:], moved_labels[:n, ..., 1:])
        return {"loss": loss, "sim": sim, "dice": dice, "consis": consis, "smooth": smooth, "fold": fold}

    def _augment(self, data: dict) -> dict:
        """One random affine per pair, applied to its atlas and its target alike (one warp)."""
        context = tf.distribute.get_replica_context()
        replica = 0 if context is None else context.replica_id_in_sync_group
        replicas = self.distribute_strategy.num_replicas_in_sync
        step = tf.cast(self.optimizer.iterations, tf.int64)
        seed = tf.stack([tf.constant(self.config.seed, tf.int64), step * replicas + tf.cast(replica, tf.int64)])
        c = self.config
        (atlas, target), (atlas_label, target_label) = random_affine(
            [data["atlas"], data["target"]], [data["atlas_label"], data["target_label"]],
            c.aug_rotation, c.aug_scale, c.aug_shift, seed=seed,
        )
        return {"atlas": atlas, "target": target, "atlas_label": atlas_label, "target_label": target_label}

    def _track(self, terms: dict) -> dict:
        for tracker in self.trackers:
            tracker.update_state(terms[tracker.name])
        return {tracker.name: tracker.result() for tracker in self.trackers}

    def train_step(self, data):
        if self.config.augment:
            data = self._augment(data)
        with tf.GradientTape() as tape:
            terms = self.pair_losses(data, training=True)
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            scaled = self.optimizer.scale_loss(terms["loss"] / replicas)
        gradients = tape.gradient(scaled, self.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
        return self._track(terms)

    def test_step(self, data):
        return self._track(self.pair_losses(data, training=False))


# --------------------------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------------------------


def get_strategy(name: str) -> "tf.distribute.Strategy":
    """``"default"`` (one device), ``"mirrored"`` (local GPUs) or ``"multiworker"`` (TF_CONFIG hosts)."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise CmmasError("strategy", f"unknown strategy {name!r}; expected one of {STRATEGIES}")


class _StopAtStep(keras.callbacks.Callback):
    """Stop ``fit`` once the optimiser has taken ``steps`` steps (mid-epoch if need be)."""

    def __init__(self, steps: int):
        super().__init__()
        self.steps = int(steps)

    def on_train_batch_end(self, batch, logs=None):
        if int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)) >= self.steps:
            self.model.stop_training = True


def _check_training_set(images, labels, shape: tuple, what: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(shape) or len(images) == 0:
        raise GeometryError(f"{what} images", f"expected [N, {', '.join(map(str, shape))}], got shape {images.shape}")
    if labels.shape != images.shape:
        raise GeometryError(f"{what} labels", f"shape {labels.shape} differs from the images' {images.shape}")
    return images.astype(np.float32, copy=False), labels


def resume_epoch_of(backup_dir: Path) -> int:
    """The epoch ``BackupAndRestore`` will resume at (0 when there is no usable backup)."""
    try:
        return int(json.loads((backup_dir / "training_metadata.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def training_callbacks(config, out: Path, extra: Sequence) -> list:
    """The training callbacks of a run folder (also used by :mod:`cmmas.similarity`).

    Stop after ``config.steps`` steps, ``history.csv`` (appended), per-epoch weights in
    ``checkpoints/``, ``tensorboard/`` (if installed), ``backup/`` (BackupAndRestore, keeping
    the previous backup too), then ``extra``.
    """
    callbacks = [
        _StopAtStep(config.steps),
        keras.callbacks.CSVLogger(str(out / "history.csv"), append=True),
        keras.callbacks.ModelCheckpoint(
            str(out / "checkpoints" / "epoch_{epoch:03d}.weights.h5"), save_weights_only=True
        ),
    ]
    try:
        import tensorboard  # noqa: F401  (tf.summary needs the package)

        callbacks.append(
            keras.callbacks.TensorBoard(str(out / "tensorboard"), write_graph=False, profile_batch=0)
        )
    except ImportError:
        log.warning("the tensorboard package is not installed: no TensorBoard logs in %s", out)
    callbacks.append(keras.callbacks.BackupAndRestore(str(out / "backup"), double_checkpoint=True))
    return callbacks + list(extra)


def train(
    config: RegConfig,
    atlas_images: np.ndarray,
    atlas_labels: np.ndarray,
    target_images: np.ndarray,
    target_labels: np.ndarray,
    codes: Sequence[int],
    out_dir: str | os.PathLike,
    strategy: str = "default",
    progress: bool = True,
    val: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
    callbacks: Sequence = (),
    init_weights: str | os.PathLike | None = None,
) -> Path:
    """Train BiRegNet on random atlas x target pairs; re-running an interrupted call resumes it.

    Args:
        config: the run (shape, network, loss, schedule, seed).
        atlas_images, target_images: ``[N, D, H, W]`` float images in ``[0, 1]`` on the working
            grid, ``(D, H, W) == config.shape_zyx``.
        atlas_labels, target_labels: ``[N, D, H, W]`` integer codes.
        codes: the label codes (see :func:`label_table`).
        out_dir: run folder. Writes ``model.keras`` (the bare network, atomically),
            ``config.json``, ``history.csv``, ``curves.png``, ``checkpoints/``,
            ``tensorboard/`` (when the tensorboard package is installed) and, while the run is
            unfinished, ``backup/`` (what a re-run resumes from).
        strategy: one of :data:`STRATEGIES`; ``config.batch`` is the global batch.
        progress: show the Keras progress bar.
        val: optional ``(atlas_images, atlas_labels, target_images, target_labels)`` evaluated
            (without augmentation) after each epoch on pairs ``(i mod N_a, i mod N_t)``.
        callbacks: more Keras callbacks, run after the built-in ones.
        init_weights: a ``model.keras`` of the same architecture to start from (to extend a
            finished run with more steps: the step count and the learning-rate schedule start
            again at 0). Ignored when resuming from ``backup/``.

    Returns:
        The path of ``model.keras``.
    """
    out = Path(out_dir)
    shape = tuple(config.shape_zyx)
    atlas_images, atlas_labels = _check_training_set(atlas_images, atlas_labels, shape, "atlas")
    target_images, target_labels = _check_training_set(target_images, target_labels, shape, "target")
    table = label_table(codes)
    atlas_onehot, target_onehot = one_hot(atlas_labels, table), one_hot(target_labels, table)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / CONFIG_FILE, json.dumps(config.to_dict(), indent=1))

    resume_epoch = resume_epoch_of(out / "backup")
    if resume_epoch == 0 and (out / "history.csv").exists():
        (out / "history.csv").unlink()
    elif resume_epoch:
        log.info("resuming %s at epoch %d", out, resume_epoch)
    start = resume_epoch * config.steps_per_epoch * config.batch
    dataset = pair_dataset(atlas_images, atlas_onehot, target_images, target_onehot, config.batch, config.seed, start)
    validation = None
    if val is not None:
        v_atlas, v_atlas_labels, v_target, v_target_labels = val
        v_atlas, v_atlas_labels = _check_training_set(v_atlas, v_atlas_labels, shape, "validation atlas")
        v_target, v_target_labels = _check_training_set(v_target, v_target_labels, shape, "validation target")
        validation = _fixed_pairs_dataset(
            v_atlas, one_hot(v_atlas_labels, table), v_target, one_hot(v_target_labels, table), config.batch
        )

    keras.utils.set_random_seed(config.seed)
    distribution = get_strategy(strategy)
    if config.batch % distribution.num_replicas_in_sync:
        raise CmmasError(
            "batch", f"batch {config.batch} is not divisible by the {distribution.num_replicas_in_sync} replicas"
        )
    with distribution.scope():
        net = build_biregnet(shape, c0=config.c0, levels=config.levels, diffeomorphic=config.diffeomorphic)
        if init_weights is not None and resume_epoch == 0:
            copy_weights(init_weights, net)
        trainer = BiRegNetTrainer(net, config)
        schedule = keras.optimizers.schedules.ExponentialDecay(
            config.lr, config.decay_steps, config.decay_rate, staircase=True
        )
        trainer.compile(optimizer=keras.optimizers.Adam(schedule))
        # Variables created while tracing make tf.function trace the step twice: create them now.
        trainer.optimizer.build(trainer.trainable_variables)
    trainer.fit(
        dataset,
        epochs=config.epochs,
        steps_per_epoch=config.steps_per_epoch,
        validation_data=validation,
        callbacks=training_callbacks(config, out, callbacks),
        shuffle=False,
        verbose=1 if progress else 0,
    )
    path = save_model(net, out / MODEL_FILE)
    plot_history(out / "history.csv", out / "curves.png")
    return path


def save_model(net: keras.Model, path: str | os.PathLike) -> Path:
    """Save a model as ``.keras`` atomically (temporary name in the same folder, then rename)."""
    path = Path(path)
    with atomic_path(path, ".keras") as tmp:
        net.save(tmp)
    return path


def copy_weights(source: str | os.PathLike, net: keras.Model) -> None:
    """Set ``net``'s weights from the saved model ``source`` (same architecture and shapes).

    Raises:
        ModelError: ``source`` is unreadable or its weights do not match ``net``'s.
    """
    weights = load_model(source).get_weights()
    expected = [tuple(w.shape) for w in net.get_weights()]
    found = [tuple(w.shape) for w in weights]
    if found != expected:
        raise ModelError(source, f"weights do not fit this network ({len(found)} arrays vs {len(expected)}, "
                         "or different shapes): was it trained with the same shape, c0 and levels?")
    net.set_weights(weights)


def _number(text: str | None) -> float:
    """A CSV cell as a float; empty or ``NA`` (CSVLogger's missing value) as NaN."""
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")


def plot_history(csv_path: str | os.PathLike, png_path: str | os.PathLike) -> Path:
    """Loss and Dice per epoch (training, and validation when logged) from a CSVLogger file."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    csv_path, png_path = Path(csv_path), Path(png_path)
    if not csv_path.exists():
        raise CmmasError(csv_path, "training history not found")
    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise CmmasError(csv_path, "training history is empty")
    epochs = [int(r["epoch"]) + 1 for r in rows]
    figure = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(figure)
    for index, name in enumerate(("loss", "dice")):
        axes = figure.add_subplot(1, 2, index + 1)
        for key, style in ((name, "-"), (f"val_{name}", "--")):
            values = [_number(r.get(key)) for r in rows]
            if any(np.isfinite(values)):
                axes.plot(epochs, values, style, label=key)
        axes.set_xlabel("epoch")
        axes.set_title(name)
        axes.legend()
    figure.tight_layout()
    with atomic_path(png_path, ".png") as tmp:
        figure.savefig(tmp, dpi=100)
    return png_path


# --------------------------------------------------------------------------------------------
# Inference.
# --------------------------------------------------------------------------------------------


def load_model(path: str | os.PathLike) -> keras.Model:
    """Load a ``.keras`` model saved by :func:`train` (or any cmmas network).

    Raises:
        ModelError: the file is missing, or not a loadable Keras model.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(path, "model file not found")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as err:  # Keras raises many types for a bad file; all mean the same here.
        detail = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        raise ModelError(path, f"not a loadable .keras model ({type(err).__name__}: {detail})") from None


def model_shape(model: keras.Model) -> tuple[int, int, int]:
    """The ``(D, H, W)`` a BiRegNet model takes; :class:`ModelError` if it is not one."""
    inputs = model.input if isinstance(model.input, dict) else {}
    if set(inputs) != {"atlas", "target"} or not isinstance(model.output, dict) or "U" not in model.output:
        raise ModelError(model.name, "not a BiRegNet: expected inputs 'atlas', 'target' and an output 'U'")
    return tuple(int(n) for n in inputs["atlas"].shape[1:4])  # type: ignore[return-value]


@functools.lru_cache(maxsize=2)
def _compiled_warp(model: keras.Model):
    """A graph-compiled forward pass and warp for ``model`` (1.7x faster than eager calls on CPU).

    Cached for the last two models, which the cache keeps alive.
    """

    @tf.function(reduce_retracing=True, autograph=False)  # no Python control flow to convert
    def run(atlases, targets, onehot):
        ddf = model({"atlas": atlases[..., None], "target": targets[..., None]}, training=False)["U"]
        warped = warp(tf.concat([atlases[..., None], onehot], axis=-1), ddf, "linear")  # one gather for both
        return warped[..., 0], tf.argmax(warped[..., 1:], axis=-1), ddf

    return run


def pad_batch(array: np.ndarray, size: int) -> np.ndarray:
    """``array`` ``[n, ...]`` with its last item repeated up to ``size`` items (unchanged if n >= size).

    Inference loops pad their last, shorter batch so that every call has one shape: a
    graph-compiled model is then traced once, not again for the remainder (a retrace costs
    seconds on a CPU, more than the pass itself).
    """
    missing = int(size) - len(array)
    if missing <= 0:
        return array
    return np.concatenate([array, np.repeat(array[-1:], missing, axis=0)])


def _warp_batch(run, atlases: np.ndarray, onehot: np.ndarray, target: np.ndarray, size: int):
    """Fields and warped images / label indices of one batch through ``run`` (of
    :func:`_compiled_warp`), run padded to ``size`` atlases (see :func:`pad_batch`)."""
    n = len(atlases)
    atlases, onehot = pad_batch(atlases, size), pad_batch(onehot, size)
    targets = np.repeat(target[None], len(atlases), 0)
    images, index, ddf = run(tf.constant(atlases), tf.constant(targets), tf.constant(onehot))
    return images.numpy()[:n], index.numpy()[:n], ddf.numpy()[:n]


def warp_atlases(
    model: keras.Model,
    atlas_images: np.ndarray,
    atlas_labels: np.ndarray,
    target_image: np.ndarray,
    codes: Sequence[int],
    batch_size: int = 4,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Register every atlas onto one target with BiRegNet and warp it there.

    Args:
        model: a BiRegNet (:func:`load_model`) for the working-grid shape ``(D, H, W)``.
        atlas_images: ``[N, D, H, W]`` images in ``[0, 1]``.
        atlas_labels: ``[N, D, H, W]`` integer codes.
        target_image: ``[D, H, W]`` image in ``[0, 1]``.
        codes: the label codes (see :func:`label_table`).
        batch_size: atlases per forward pass (a shorter last batch runs padded: one traced graph).

    Returns:
        ``(warped_images [N, D, H, W] float32, warped_labels [N, D, H, W] int32 codes,
        ddfs [N, D, H, W, 3] float32)``: images warped linearly, labels one-hot warped linearly
        then argmax, ``ddfs`` the atlas -> target fields ``U`` in voxels. An untrained network
        returns the atlases unchanged and zero fields.
    """
    shape = model_shape(model)
    atlas_images = np.asarray(atlas_images, dtype=np.float32)
    atlas_labels = np.asarray(atlas_labels)
    target_image = np.asarray(target_image, dtype=np.float32)
    if atlas_images.ndim != 4 or tuple(atlas_images.shape[1:]) != shape:
        raise GeometryError("atlas images", f"expected [N, {', '.join(map(str, shape))}], got {atlas_images.shape}")
    if atlas_labels.shape != atlas_images.shape:
        raise GeometryError("atlas labels", f"shape {atlas_labels.shape} differs from the images' {atlas_images.shape}")
    if tuple(target_image.shape) != shape:
        raise GeometryError("target image", f"shape {target_image.shape} differs from the model's {shape}")
    if int(batch_size) < 1:
        raise ModelError("warp_atlases", f"batch_size must be at least 1, got {batch_size}")
    table = np.asarray(label_table(codes), dtype=np.int32)
    size = min(int(batch_size), len(atlas_images))
    run = _compiled_warp(inference_copy(model))
    images, labels, ddfs = [], [], []
    for first in range(0, len(atlas_images), size):
        chunk = slice(first, first + size)
        onehot = one_hot(atlas_labels[chunk], table)
        warped, index, ddf = _warp_batch(run, atlas_images[chunk], onehot, target_image, size)
        images.append(warped.astype(np.float32))
        labels.append(table[index])
        ddfs.append(ddf.astype(np.float32))
    return np.concatenate(images), np.concatenate(labels).astype(np.int32), np.concatenate(ddfs)


def fit_spacing(geometry: Geometry, shape_zyx: Sequence[int]) -> tuple[float, float, float]:
    """The isotropic spacing (mm, z y x) at which a ``shape_zyx`` LPS grid covers ``geometry``'s box."""
    points = geometry.corners()
    extent_xyz = points.max(axis=0) - points.min(axis=0)
    spacing = float(np.max(extent_xyz / np.asarray(shape_zyx, dtype=np.float64)[::-1]))
    return (spacing, spacing, spacing)


def register_images(
    model: keras.Model,
    moving: Image,
    fixed: Image,
    moving_label: Image | None = None,
    codes: Sequence[int] | None = None,
    spacing_zyx: float | Sequence[float] | None = None,
) -> dict:
    """Register ``moving`` onto ``fixed`` with BiRegNet and map the results onto ``fixed``'s grid.

    Both images are resampled onto one working grid of the model's shape, LPS-oriented and
    centred at the fixed image's centre, of spacing ``spacing_zyx`` (default: isotropic, the
    smallest that holds the whole fixed image, :func:`fit_spacing`), and normalised to
    ``[0, 1]``. BiRegNet is deformable only: the images must already share physical space
    (be affinely pre-aligned, e.g. with :func:`cmmas.prealign.register`).

    Args:
        model: a BiRegNet.
        moving, fixed: the images (any grids, same physical space).
        moving_label: integer labels on ``moving``'s grid, or None.
        codes: label codes of ``moving_label`` (default: the values it holds).
        spacing_zyx: working spacing in millimetres (one value or ``(z, y, x)``).

    Returns:
        A dict: ``warped_image`` (moving intensities, linear) and ``warped_label`` (or None) on
        the fixed grid; ``ddf_mm``: three images ``(x, y, z)`` on the fixed grid holding the
        displacement in millimetres along the physical LPS axes: fixed point ``p`` corresponds to
        moving point ``p + d(p)`` (an ITK displacement field, split per component; zero outside
        the working grid); ``ddf_voxels`` ``[D, H, W, 3]`` the field on ``working_geometry`` in
        voxels (z, y, x); ``jacobian``: :func:`cmmas.metrics.jacobian_stats` of that field.
    """
    shape = model_shape(model)
    if moving_label is not None:
        check_same_grid(moving, moving_label, what="label")
    spacing = fit_spacing(fixed.geometry, shape) if spacing_zyx is None else spacing_zyx
    fixed_work = preprocess.to_working_grid(
        fixed, spacing, shape, center_mm=preprocess.physical_center(fixed.geometry), kind="linear"
    )
    grid = fixed_work.geometry
    moving_work = preprocess.resample(moving, geometry=grid, kind="linear", default=float(moving.array.min()))
    if moving_label is not None:
        label_work = preprocess.resample(moving_label, geometry=grid, kind="label").array
        table = label_table(np.unique(moving_label.array).tolist() if codes is None else codes)
    else:
        label_work, table = np.zeros(shape, np.int32), (0,)
    _, warped_labels, ddfs = warp_atlases(
        model, normalize(moving_work).array[None], label_work[None], normalize(fixed_work).array, table, batch_size=1
    )
    ddf = ddfs[0]
    raw = warp(moving_work.array[None, ..., None].astype(np.float32), ddf[None], "linear").numpy()[0, ..., 0]
    outside = float(moving.array.min())
    warped_image = preprocess.back_to_grid(Image(raw, grid), fixed.geometry, kind="linear", default=outside)
    warped_label = None
    if moving_label is not None:
        warped_label = preprocess.back_to_grid(Image(warped_labels[0], grid), fixed.geometry, kind="label")
    spacing_zyx_mm = grid.spacing_zyx
    components = []
    for axis in (2, 1, 0):  # physical x, y, z are array axes 2, 1, 0 of the LPS working grid
        mm = (ddf[..., axis] * spacing_zyx_mm[axis]).astype(np.float32)
        components.append(preprocess.back_to_grid(Image(mm, grid), fixed.geometry, kind="linear"))
    return {
        "warped_image": warped_image.with_array(warped_image.array.astype(np.float32)),
        "warped_label": warped_label,
        "ddf_mm": tuple(components),
        "ddf_voxels": ddf,
        "working_geometry": grid,
        "jacobian": jacobian_stats(ddf),
    }


def register_files(
    moving: str | os.PathLike,
    fixed: str | os.PathLike,
    model: str | os.PathLike | keras.Model,
    out_dir: str | os.PathLike,
    moving_label: str | os.PathLike | None = None,
    spacing_zyx: float | Sequence[float] | None = None,
) -> tuple[list[Path], dict[str, float]]:
    """:func:`register_images` from and to files (``cmmas register``).

    Writes into ``out_dir``: ``warped_image.nii.gz``, ``warped_label.nii.gz`` (with a moving
    label), ``ddf_x.nii.gz``, ``ddf_y.nii.gz``, ``ddf_z.nii.gz`` (the displacement in mm along
    the physical LPS axes on the fixed grid, one component per file: see
    :func:`register_images`) and ``jacobian.json``; every file atomically.

    Returns:
        ``(paths written, Jacobian statistics of the working-grid field)``.
    """
    from cmmas.io import read_image, read_label, write_image

    net = model if isinstance(model, keras.Model) else load_model(model)
    moving_image, fixed_image = read_image(moving), read_image(fixed)
    label = None if moving_label is None else read_label(moving_label, like=moving_image)
    result = register_images(net, moving_image, fixed_image, label, spacing_zyx=spacing_zyx)
    out = Path(out_dir)
    written = [write_image(result["warped_image"], out / "warped_image.nii.gz")]
    if result["warped_label"] is not None:
        written.append(write_image(result["warped_label"], out / "warped_label.nii.gz"))
    for axis, component in zip("xyz", result["ddf_mm"]):
        written.append(write_image(component, out / f"ddf_{axis}.nii.gz"))
    written.append(atomic_write_text(out / "jacobian.json", json.dumps(result["jacobian"], indent=1)))
    return written, result["jacobian"]
