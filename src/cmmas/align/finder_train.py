"""Training the organ finder (:mod:`cmmas.align.finder`) on labelled scans of any modality.

Each training scan is read as the finder reads it (:func:`cmmas.align.finder.finder_image`: the
alignment image at ``spacing_mm``, scaled to [0, 1]) with its label map resampled (nearest) onto
that grid (:func:`prepare_case`). A step draws ``batch`` scans and a random box of ``crop_zyx``
voxels of each (a scan smaller than the box along an axis is padded with its minimum and
background), so the finder sees every part of a field of view at every position. In the graph,
each image gets, with probability ``labelmix``, a random contrast drawn from its label map
(:func:`cmmas.nn.labelmix.randomise_some`: every organ and a few background clusters through
their own random curve, bias field, gamma, blur, noise): the finder cannot rely on the
intensities of the modalities it was trained on. Loss: :func:`cmmas.nn.losses.segmentation_loss`.

Batch ``index`` of pass ``e`` over the data is drawn with ``numpy.random.default_rng([seed, e,
index])`` and the contrasts with the step's stateless seed, so a resumed run continues the same
sequence.
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

from cmmas import preprocess
from cmmas.align.finder import finder_image
from cmmas.errors import GeometryError, ModelError
from cmmas.io import Image, atomic_write_text
from cmmas.nn import training
from cmmas.nn.finder import build_finder
from cmmas.nn.labelmix import randomise_some
from cmmas.nn.model_card import ModelCard

logger = logging.getLogger(__name__)

#: File names in a training folder.
MODEL_FILE = "finder.keras"
CONFIG_FILE = "config.json"


@dataclasses.dataclass(frozen=True)
class FinderConfig:
    """Everything that defines an organ finder's training run.

    Attributes:
        spacing_mm: the finder's isotropic spacing (the atlas set's alignment spacing), mm.
        crop_zyx: the training box, voxels ``(D, H, W)``, each divisible by ``2**(levels - 1)``.
        c0, levels: the U-Net's first width and its levels (:func:`cmmas.nn.finder.build_finder`).
        lr, decay_rate, decay_steps: Adam's rate, multiplied by ``decay_rate`` every
            ``decay_steps`` steps (staircase).
        steps, batch, steps_per_epoch: optimiser steps, scans per step, steps per log line.
        labelmix: probability, per image and step, of a random contrast from its label map.
        ce_weight: weight of the cross-entropy beside the Dice term.
        precision: the U-Net's training precision (:data:`cmmas.nn.precision.PRECISIONS`).
        seed: seeds the weights, the draws of scans and boxes and the contrasts.
    """

    spacing_mm: float = 4.0
    crop_zyx: tuple[int, int, int] = (48, 48, 48)
    c0: int = 8
    levels: int = 4
    lr: float = 1e-3
    decay_rate: float = 0.5
    decay_steps: int = 400
    steps: int = 1200
    batch: int = 2
    steps_per_epoch: int = 50
    labelmix: float = 0.8
    ce_weight: float = 1.0
    precision: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "crop_zyx", tuple(int(n) for n in self.crop_zyx))
        problems = []
        if self.spacing_mm <= 0:
            problems.append(f"spacing_mm must be > 0, got {self.spacing_mm}")
        problems += training.schedule_problems(self, ("c0", "levels", "decay_steps", "steps", "batch",
                                                      "steps_per_epoch"))
        step = 2 ** (max(self.levels, 1) - 1)
        if len(self.crop_zyx) != 3 or any(n < step or n % step for n in self.crop_zyx):
            problems.append(f"crop_zyx must be 3 sizes divisible by 2**(levels-1) = {step}, got {self.crop_zyx}")
        if not 0 <= self.labelmix <= 1 or self.ce_weight < 0:
            problems.append(f"need 0 <= labelmix <= 1 and ce_weight >= 0, got {self.labelmix}, {self.ce_weight}")
        if problems:
            raise ModelError("FinderConfig", "; ".join(problems))


@dataclasses.dataclass(frozen=True)
class FinderCase:
    """One training scan as the finder reads it: ``image`` ``[D, H, W]`` float32 in [0, 1] and
    ``label`` ``[D, H, W]`` int8 channel indices (in the order of the run's codes)."""

    case_id: str
    image: np.ndarray
    label: np.ndarray


def prepare_case(case_id: str, image: Image, label: Image, spacing_mm: float, codes: Sequence[int]) -> FinderCase:
    """A labelled scan on the finder's grid (:func:`cmmas.align.finder.finder_image`), its label
    resampled nearest-neighbour onto it.

    Raises:
        GeometryError: the label's grid is not the image's.
    """
    if not label.geometry.matches(image.geometry):
        raise GeometryError(label.path, f"label grid {label.geometry.size} differs from its image's "
                            f"{image.geometry.size}")
    small = finder_image(image, spacing_mm)
    moved = preprocess.resample(label, geometry=small.geometry, kind="label")
    return FinderCase(case_id, small.array.astype(np.float32), preprocess.channel_index(moved.array, codes))


def random_box(image: np.ndarray, label: np.ndarray, crop_zyx: Sequence[int],
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random ``crop_zyx`` box of a scan and its label, uniformly placed; along an axis where
    the scan is smaller, the scan lies at a random offset inside the box, padded with its minimum
    and background (0)."""
    box_image = np.full(tuple(crop_zyx), image.min(), np.float32)
    box_label = np.zeros(tuple(crop_zyx), np.int8)
    source, target = [], []
    for n, c in zip(image.shape, crop_zyx):
        start = int(rng.integers(0, abs(n - c) + 1))
        source.append(slice(start, start + c) if n >= c else slice(0, n))
        target.append(slice(0, c) if n >= c else slice(start, start + n))
    box_image[tuple(target)] = image[tuple(source)]
    box_label[tuple(target)] = label[tuple(source)]
    return box_image, box_label


class _BoxBatches(keras.utils.PyDataset):
    """Random batches of training boxes (:func:`random_box`) as the dicts :class:`FinderTrainer`
    reads; a run resumed at epoch ``r`` passes ``first_epoch=r`` and sees the uninterrupted run's."""

    def __init__(self, cases: Sequence[FinderCase], config: FinderConfig, first_epoch: int = 0):
        super().__init__()
        self._cases, self._config, self._epoch = list(cases), config, first_epoch

    def __len__(self) -> int:
        return self._config.steps_per_epoch

    def __getitem__(self, index: int):
        rng = np.random.default_rng([self._config.seed, self._epoch, index])
        boxes = [random_box(self._cases[k].image, self._cases[k].label, self._config.crop_zyx, rng)
                 for k in rng.integers(len(self._cases), size=self._config.batch)]
        return ({"image": np.stack([b[0] for b in boxes])[..., None], "label": np.stack([b[1] for b in boxes])},)

    def on_epoch_end(self) -> None:
        self._epoch += 1


class FinderTrainer(training.SegmentationTrainer):
    """Trains an organ finder: the step's random contrasts, then
    :func:`cmmas.nn.losses.segmentation_loss`. Metrics: ``loss``, ``dice``, ``ce``. ``fit`` data:
    dicts with ``image`` ``[B, D, H, W, 1]`` and ``label`` ``[B, D, H, W]`` (channel indices). The
    artefact to save is ``self.net``."""

    def training_batch(self, data: dict, augment: bool = True) -> dict:
        """``image`` float32 and ``truth`` one-hot, the image given a random contrast from its
        label with probability ``config.labelmix``."""
        truth = tf.one_hot(tf.cast(data["label"], tf.int32), self.n_labels)
        image = tf.cast(data["image"], tf.float32)
        if augment and self.config.labelmix > 0:
            image = randomise_some(image, truth, training.step_seed(self.optimizer, self.config.seed),
                                   self.config.labelmix)
        return {"image": image, "truth": truth}


def train(config: FinderConfig, cases: Sequence[FinderCase], codes: Sequence[int], out_dir: str | os.PathLike,
          progress: bool = True, card: ModelCard | None = None,
          callbacks: Sequence[keras.callbacks.Callback] = ()) -> Path:
    """Train an organ finder on prepared scans (:func:`prepare_case`).

    Writes into ``out_dir``: ``finder.keras`` (atomically, once training is complete; its model
    card beside it), ``config.json`` (with the training cases), ``history.csv``, ``curves.png``,
    ``checkpoints/``, ``tensorboard/`` and, while the run is unfinished, ``backup/`` (the same
    call again resumes from the last epoch). Exactly ``config.steps`` steps.

    Raises:
        ModelError: no training case, or a label outside ``codes``.
    """
    codes = sorted(int(c) for c in codes)
    if not cases:
        raise ModelError("FinderConfig", "no training scan")
    for case in cases:
        if case.label.max() >= len(codes):
            raise ModelError(case.case_id, f"label channel {int(case.label.max())} outside the {len(codes)} codes")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / CONFIG_FILE, json.dumps({**dataclasses.asdict(config), "codes": codes,
                                                     "cases": [c.case_id for c in cases]}, indent=1))
    resume_epoch = training.resume_epoch_of(out / "backup")
    if resume_epoch == 0 and (out / "history.csv").exists():
        (out / "history.csv").unlink()
    keras.utils.set_random_seed(config.seed)
    net = build_finder(len(codes), c0=config.c0, levels=config.levels, precision=config.precision)
    trainer = FinderTrainer(net, config, len(codes))
    schedule = keras.optimizers.schedules.ExponentialDecay(config.lr, config.decay_steps, config.decay_rate,
                                                           staircase=True)
    trainer.compile(optimizer=keras.optimizers.Adam(schedule))
    logger.info("training the organ finder on %d scans for %d steps", len(cases), config.steps)
    trainer.fit(_BoxBatches(cases, config, resume_epoch), epochs=math.ceil(config.steps / config.steps_per_epoch),
                shuffle=False, callbacks=training.training_callbacks(config, out, callbacks, name="train_finder"),
                verbose=training.fit_verbosity(progress))
    path = training.save_model(net, out / MODEL_FILE, card=card)
    training.plot_history(out / "history.csv", out / "curves.png")
    return path
