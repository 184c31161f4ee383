"""Training BiRegNet: atlas-to-target deformable registration (applying it: :mod:`cmmas.register.apply`).

The default loss is the original cmmas's (learn2reg/regnet.py, ``LabAttentionReg``). For a pair of
an atlas (image ``I_a``, one-hot label ``L_a``) and a target (``I_t``, ``L_t``) the network predicts
``U`` (warps the atlas onto the target) and ``V`` (the target onto the atlas), and the loss is::

    -Dice_ms(L_t, L_a o U) - Dice_ms(L_a, L_t o V)
        + lambda_consis (|I_t - I_t o V o U|_1 + |I_a - I_a o U o V|_1)

with ``Dice_ms`` the soft Dice over the foreground channels averaged over Gaussian blurs
``sigma in {0, 1, 2, 4}`` voxels (:class:`cmmas.nn.losses.MultiScaleDice`). Other similarity terms
(``sim_loss``) compare the warped atlas image with the target image and the warped target image
with the atlas image (local NCC, global mutual information, the MIND-SSC distance weighted by
``lambda_mind``), optionally with the Dice terms.
Optional regularisers: ``lambda_smooth`` (squared gradients of ``U`` and ``V``) and
``lambda_fold`` (negative Jacobian determinants). The schedule is the original's too; the default
network (``arch`` "cmmas", ``levels`` 4; ``arch="original"`` is the original's), the [0, 1]
normalisation (the original z-scores each crop) and the augmentation (one affine per pair;
``augment_mode="image"`` draws the original's, one per image) are not: docs/fidelity.md.

Conventions: images are ``[N, D, H, W]`` numpy arrays in ``[0, 1]`` on a working grid (array
order ``(z, y, x)``); labels are integer codes, one-hot encoded here only, background (code 0)
always channel 0; displacement fields are ``[..., D, H, W, 3]`` in voxels of the working grid,
channels in array-axis order (``ij``). Keras tensors are ``[B, D, H, W, C]``.

Randomness is stateless and keyed by ``(seed, optimizer step)``: the pairs a run draws and their
augmentations depend only on the seed and the step, so a run resumed by ``BackupAndRestore``
sees the same data as an uninterrupted one.
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

from cmmas.errors import CmmasError, GeometryError, LabelError, ModelError
from cmmas.io import atomic_write_text
from cmmas.nn.labelmix import randomise_some
from cmmas.nn.layers import warp
from cmmas.nn.model_card import ModelCard
from cmmas.nn.losses import Grad, LocalNCC, MindDistance, MultiScaleDice, MutualInformation, NegativeJacobian
from cmmas.nn.networks import build_biregnet
from cmmas.nn.training import (
    copy_weights,
    fit_verbosity,
    get_strategy,
    plot_history,
    resume_epoch_of,
    run_folder,
    save_model,
    schedule_problems,
    step_seed,
    Trainer,
    training_callbacks,
)
from cmmas.register.augment import (
    AUG_MAX_ROTATION_DEG,
    AUG_MAX_SCALE,
    AUG_MAX_SHIFT_VOX,
    random_affine,
    random_corner_affine,
)

log = logging.getLogger(__name__)

SIM_LOSSES = ("dice", "ncc", "mi", "mind", "dice+mi", "dice+ncc", "dice+mind")

#: Augmentation modes: one affine per pair (ours), or the original's independent one per image.
AUGMENT_MODES = ("pair", "image")

#: Network architectures (:func:`cmmas.nn.networks.build_biregnet`).
ARCHS = ("cmmas", "original")

#: Names of the quantities the trainer tracks (``val_`` prefixed on validation data).
METRIC_NAMES = ("loss", "sim", "dice", "consis", "smooth", "fold")

#: Blurs (voxels) of the multi-scale Dice, as the original.
DICE_SIGMAS = (0.0, 1.0, 2.0, 4.0)

MODEL_FILE = "model.keras"

CONFIG_FILE = "config.json"


@dataclasses.dataclass
class RegConfig:
    """Everything that defines a BiRegNet training run (the loss and schedule defaults are the
    original's; ``levels`` and ``augment`` depart from it, docs/fidelity.md).

    Attributes:
        shape_zyx: working-grid shape ``(D, H, W)``, divisible by ``2**(levels-1)``.
        c0: channels of the first U-Net level (doubling per level).
        levels: U-Net resolution levels.
        arch: one of :data:`ARCHS` ("original": the original cmmas's network, 5 levels).
        diffeomorphic: predict stationary velocity fields integrated by scaling and squaring.
        sim_loss: one of :data:`SIM_LOSSES`.
        lambda_mind: weight of the MIND-SSC distance terms when ``sim_loss`` has "mind".
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
            pose and size variety while keeping the pair's pre-alignment). The original draws an
            independent affine per image; on the phantom that made held-out pairs worse (lab
            notebook, 2026-11-25).
        augment_mode: one of :data:`AUGMENT_MODES`: "pair" (the above) or "image" (the
            original: atlas and target each warped, with its label, by its own random affine,
            :func:`cmmas.register.augment.random_corner_affine`; the ``aug_*`` ranges are then unused).
        aug_rotation: largest rotation about each array axis, degrees.
        aug_scale: largest relative scale change per axis.
        aug_shift: largest translation per axis, voxels of the working grid.
        labelmix: probability, per image, that its intensities are replaced by a random contrast
            drawn from its label map (:mod:`cmmas.nn.labelmix`), atlas and target drawn
            independently, after the affine augmentation (0: off). The losses are unchanged.
        precision: the network's trunk precision (:data:`cmmas.nn.precision.PRECISIONS`;
            "mixed_bfloat16" trains the convolutions in bfloat16, weights, heads and losses float32).
        seed: seeds initial weights, pair sampling and augmentation.
    """

    shape_zyx: tuple[int, int, int] = (96, 96, 96)
    c0: int = 4
    levels: int = 4
    arch: str = "cmmas"
    diffeomorphic: bool = False
    sim_loss: str = "dice"
    lambda_mind: float = 1.0
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
    augment_mode: str = "pair"
    aug_rotation: float = AUG_MAX_ROTATION_DEG
    aug_scale: float = AUG_MAX_SCALE
    aug_shift: float = AUG_MAX_SHIFT_VOX
    labelmix: float = 0.0
    precision: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        self.shape_zyx = tuple(int(n) for n in self.shape_zyx)  # type: ignore[assignment]
        problems = []
        if len(self.shape_zyx) != 3:
            problems.append(f"shape_zyx must have 3 entries, got {self.shape_zyx}")
        if self.sim_loss not in SIM_LOSSES:
            problems.append(f"sim_loss must be one of {SIM_LOSSES}, got {self.sim_loss!r}")
        if self.augment_mode not in AUGMENT_MODES:
            problems.append(f"augment_mode must be one of {AUGMENT_MODES}, got {self.augment_mode!r}")
        if self.arch not in ARCHS:
            problems.append(f"arch must be one of {ARCHS}, got {self.arch!r}")
        problems += schedule_problems(self, ("c0", "levels", "decay_steps", "steps", "batch", "steps_per_epoch"))
        for name in ("lambda_mind", "lambda_consis", "lambda_smooth", "lambda_fold", "aug_rotation", "aug_scale",
                     "aug_shift"):
            if float(getattr(self, name)) < 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        if not 0.0 <= self.labelmix <= 1.0:
            problems.append(f"labelmix must be a probability in [0, 1], got {self.labelmix}")
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
    distinct: bool = False,
) -> "tf.data.Dataset":
    """An infinite stream of random (atlas, target) pairs, batched.

    Pair ``k`` (counting from 0) is drawn from ``numpy.random.default_rng([seed, k])``, so the
    stream is a function of the seed alone and ``start`` resumes it at pair ``start``. With
    ``distinct`` (atlases and targets are the same cases, in the same order: the atlas-only mode)
    a case is never paired with itself.

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
    if distinct and (len(atlas_images) != len(target_images) or len(atlas_images) < 2):
        raise GeometryError("pairs", f"distinct pairs of one case list need >= 2 cases on both sides, got "
                                     f"{len(atlas_images)} atlases and {len(target_images)} targets")
    spatial, channels = atlas_images.shape[1:], atlas_onehot.shape[-1]

    def pairs():
        k = int(start)
        while True:
            rng = np.random.default_rng([int(seed), k])
            a = int(rng.integers(len(atlas_images)))
            if distinct:
                t = int(rng.integers(len(target_images) - 1))
                t += t >= a
            else:
                t = int(rng.integers(len(target_images)))
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


class BiRegNetTrainer(Trainer):
    """BiRegNet with its training loss: ``fit`` it on :func:`pair_dataset` batches.

    Each batch is a dict of ``atlas``, ``target`` ``[B, D, H, W, 1]`` and ``atlas_label``,
    ``target_label`` ``[B, D, H, W, L]`` (one-hot, channel 0 background). ``train_step``
    augments each pair (when ``config.augment``), computes :meth:`pair_losses` and applies the
    gradients; ``test_step`` evaluates without augmentation. Both return the running means of
    :data:`METRIC_NAMES`: ``loss`` (the total), ``sim`` (the similarity terms), ``dice`` (soft
    foreground Dice of ``L_a o U`` with ``L_t``, higher is better), ``consis``, ``smooth``,
    ``fold`` (unweighted sums over both fields).

    Args:
        net: a model from :func:`cmmas.nn.networks.build_biregnet`.
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
        self._mind = MindDistance()
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
        kind = self.config.sim_loss.split("+")
        sim = tf.constant(0.0)
        if "dice" in kind:
            sim += 2.0 * self._dice_ms(fixed_labels[..., 1:], moved_labels[..., 1:])
        if "ncc" in kind:
            sim += 2.0 * self._ncc(fixed_images, moved_images)
        if "mi" in kind:
            sim += 2.0 * self._mi(fixed_images, moved_images)
        if "mind" in kind:
            sim += 2.0 * self.config.lambda_mind * self._mind(fixed_images, moved_images)
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

    def _randomise(self, data: dict) -> dict:
        """``labelmix``: each atlas and each target, independently, gets a random contrast from
        its label map with probability ``config.labelmix`` (the labels are not touched)."""
        seed = tf.random.experimental.stateless_fold_in(step_seed(self.optimizer, self.config.seed), 1)
        atlas_seed, target_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        p = self.config.labelmix
        return {**data, "atlas": randomise_some(data["atlas"], data["atlas_label"], atlas_seed, p),
                "target": randomise_some(data["target"], data["target_label"], target_seed, p)}

    def _augment(self, data: dict) -> dict:
        """``augment_mode`` "pair": one random affine per pair, applied to its atlas and its target
        alike (one warp); "image": an independent random affine (the original's) for the atlas
        (with its label) and for the target (with its label)."""
        seed = step_seed(self.optimizer, self.config.seed)
        c = self.config
        if c.augment_mode == "image":
            atlas_seed, target_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
            (atlas,), (atlas_label,) = random_corner_affine([data["atlas"]], [data["atlas_label"]], seed=atlas_seed)
            (target,), (target_label,) = random_corner_affine([data["target"]], [data["target_label"]],
                                                              seed=target_seed)
            return {"atlas": atlas, "target": target, "atlas_label": atlas_label, "target_label": target_label}
        (atlas, target), (atlas_label, target_label) = random_affine(
            [data["atlas"], data["target"]], [data["atlas_label"], data["target_label"]],
            c.aug_rotation, c.aug_scale, c.aug_shift, seed=seed,
        )
        return {"atlas": atlas, "target": target, "atlas_label": atlas_label, "target_label": target_label}

    def training_batch(self, data: dict, augment: bool = True) -> dict:
        """``data`` (``atlas``, ``target``, one-hot ``atlas_label``, ``target_label``) with the
        step's random affine and, with ``labelmix``, random contrasts."""
        if augment and self.config.augment:
            data = self._augment(data)
        if augment and self.config.labelmix > 0:
            data = self._randomise(data)
        return data

    def losses(self, batch: dict) -> dict:
        return self.pair_losses(batch, training=True)

    def test_step(self, data):
        return self.track(self.pair_losses(data, training=False))


def _check_training_set(images, labels, shape: tuple, what: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(shape) or len(images) == 0:
        raise GeometryError(f"{what} images", f"expected [N, {', '.join(map(str, shape))}], got shape {images.shape}")
    if labels.shape != images.shape:
        raise GeometryError(f"{what} labels", f"shape {labels.shape} differs from the images' {images.shape}")
    return images.astype(np.float32, copy=False), labels


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
    card: ModelCard | None = None,
    distinct_pairs: bool = False,
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
            unfinished, ``backup/`` (what a re-run resumes from); the workers of a multi-worker
            run other than the chief write to ``workers/<task><index>`` in it (:func:`run_folder`).
        strategy: one of :data:`STRATEGIES`; ``config.batch`` is the global batch.
        progress: show the Keras progress bar.
        val: optional ``(atlas_images, atlas_labels, target_images, target_labels)`` evaluated
            (without augmentation) after each epoch on pairs ``(i mod N_a, i mod N_t)``.
        callbacks: more Keras callbacks, run after the built-in ones.
        init_weights: a ``model.keras`` of the same architecture to start from (to extend a
            finished run with more steps: the step count and the learning-rate schedule start
            again at 0). Ignored when resuming from ``backup/``.
        card: what the network is trained on (:func:`cmmas.align.cards.card_from_atlas_set`),
            written beside ``model.keras`` (``model.keras.json``); checked against
            ``config.shape_zyx`` before training.
        distinct_pairs: the atlases and targets are the same cases in the same order (the
            atlas-only mode): never pair a case with itself.

    Returns:
        The path of ``model.keras``.
    """
    shape = tuple(config.shape_zyx)
    if card is not None:
        card.check_shape(shape, "RegConfig")
    distribution = get_strategy(strategy)  # first: a multi-worker strategy must exist before any TensorFlow op
    out = run_folder(out_dir, distribution)
    if config.batch % distribution.num_replicas_in_sync:
        raise CmmasError(
            "batch", f"batch {config.batch} is not divisible by the {distribution.num_replicas_in_sync} replicas"
        )
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
    dataset = pair_dataset(atlas_images, atlas_onehot, target_images, target_onehot, config.batch, config.seed, start,
                           distinct=distinct_pairs)
    validation = None
    if val is not None:
        v_atlas, v_atlas_labels, v_target, v_target_labels = val
        v_atlas, v_atlas_labels = _check_training_set(v_atlas, v_atlas_labels, shape, "validation atlas")
        v_target, v_target_labels = _check_training_set(v_target, v_target_labels, shape, "validation target")
        validation = _fixed_pairs_dataset(
            v_atlas, one_hot(v_atlas_labels, table), v_target, one_hot(v_target_labels, table), config.batch
        )

    keras.utils.set_random_seed(config.seed)
    with distribution.scope():
        net = build_biregnet(shape, c0=config.c0, levels=config.levels, diffeomorphic=config.diffeomorphic,
                             arch=config.arch, precision=config.precision)
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
        callbacks=training_callbacks(config, out, callbacks, name="train_reg"),
        shuffle=False,
        verbose=fit_verbosity(progress),
    )
    path = save_model(net, out / MODEL_FILE, card=card)
    plot_history(out / "history.csv", out / "curves.png")
    return path
