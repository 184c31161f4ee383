"""The one Keras training harness and the one model loader: distribution strategies,
the callbacks of a run folder (stop at a step count, CSV history, checkpoints, TensorBoard,
BackupAndRestore, one progress line per epoch), atomic saving, weight copying, loss curves."""

from __future__ import annotations

import csv
import json
import math
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from cmmas.errors import CmmasError, ModelError
from cmmas.nn import dlf, layers, networks  # noqa: F401  (registers the custom layers that load_model deserialises)
from cmmas.nn.losses import segmentation_loss
from cmmas.nn.precision import PRECISIONS
from cmmas.nn.model_card import KINDS, ModelCard, card_path, write_card
from cmmas.io import atomic_path

log = logging.getLogger(__name__)

STRATEGIES = ("default", "mirrored", "multiworker")


def get_strategy(name: str) -> "tf.distribute.Strategy":
    """``"default"`` (one device), ``"mirrored"`` (local GPUs) or ``"multiworker"`` (TF_CONFIG hosts)."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise CmmasError("strategy", f"unknown strategy {name!r}; expected one of {STRATEGIES}")


def run_folder(out: str | os.PathLike, distribution: "tf.distribute.Strategy") -> Path:
    """The folder this process writes a training run to: ``out`` itself for a single process and
    for the chief of a multi-worker run, ``out/workers/<task><index>`` for every other worker, so
    that workers given one shared ``--out`` never write the same history, checkpoints, backup or
    model (the chief's are the run's; the others hold the same trainable weights)."""
    out = Path(out)
    if distribution.extended.should_checkpoint:
        return out
    resolver = distribution.cluster_resolver
    return out / "workers" / f"{resolver.task_type}{resolver.task_id}"


def step_seed(optimizer: keras.optimizers.Optimizer, seed: int) -> tf.Tensor:
    """The ``[2]`` int64 seed of a training step's stateless random ops: ``(seed, step * replicas +
    replica)``, so that a resumed run draws what the uninterrupted run would, and replicas differ."""
    replica = tf.distribute.get_replica_context()
    replica_id = 0 if replica is None else replica.replica_id_in_sync_group
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    step = tf.cast(optimizer.iterations, tf.int64) * replicas + tf.cast(replica_id, tf.int64)
    return tf.stack([tf.constant(seed, tf.int64), step])


def schedule_problems(config, counts: Sequence[str]) -> list[str]:
    """What is wrong with a training config's shared fields (one line each): the integer fields
    ``counts`` below 1, ``lr`` not positive or ``decay_rate`` outside (0, 1], an unknown
    ``precision`` (:data:`cmmas.nn.precision.PRECISIONS`)."""
    problems = [f"{name} must be >= 1, got {getattr(config, name)}" for name in counts if int(getattr(config, name)) < 1]
    if not (config.lr > 0 and 0 < config.decay_rate <= 1):
        problems.append(f"need lr > 0 and 0 < decay_rate <= 1, got {config.lr}, {config.decay_rate}")
    if config.precision not in PRECISIONS:
        problems.append(f"precision must be one of {PRECISIONS}, got {config.precision!r}")
    return problems


class Trainer(keras.Model):
    """Base of our trainers (a ``keras.Model`` whose ``train_step`` trains a wrapped network):
    they build the network, metrics and optimizer before ``fit``, so ``fit``'s symbolic build pass
    has nothing to build. That pass is skipped: under ``MultiWorkerMirroredStrategy`` Keras 3
    reduces the first batch across workers to build from, which fails for a batch that is a dict
    of tensors (the collective reduce takes single tensors), as ours are.

    A step is :meth:`training_batch` (the data cast, one-hot encoded and augmented with the step's
    seed) then :meth:`losses` under the gradient tape; the ``"loss"`` term is minimised over the
    trainer's trainable variables (the wrapped network's) and every term a metric tracks (its
    name) is logged through :meth:`step_logs`. bench/bench_training.py times these parts apart.
    """

    def training_batch(self, data: dict, augment: bool = True) -> dict:
        """The tensors a step learns from: ``data`` prepared for :meth:`losses`, and augmented with
        this step's seed when ``augment`` and the trainer's config asks for it."""
        raise NotImplementedError

    def losses(self, batch: dict) -> dict:
        """Scalar loss terms of a :meth:`training_batch` (training mode); ``"loss"`` is minimised."""
        raise NotImplementedError

    def train_step(self, data):
        batch = self.training_batch(data[0] if isinstance(data, tuple) else data)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            terms = self.losses(batch)
            scaled = self.optimizer.scale_loss(terms["loss"] / tf.cast(replicas, terms["loss"].dtype))
        variables = self.trainable_variables
        self.optimizer.apply(tape.gradient(scaled, variables), variables)
        return self.track(terms)

    def track(self, terms: dict) -> dict:
        """Update every metric with the term of its name; the step's logs."""
        for metric in self.metrics:
            metric.update_state(terms[metric.name])
        return self.step_logs({metric.name: metric.result() for metric in self.metrics})

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if not all(layer.built for layer in self._flatten_layers()):
            super()._maybe_symbolic_build(iterator, data_batch)
        elif self.optimizer is not None and not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)

    def step_logs(self, logs: dict) -> dict:
        """A step's scalar logs as ``fit`` can reduce them: under ``MultiWorkerMirroredStrategy``
        Keras 3 reduces each along axis 0 (``strategy.reduce("MEAN", v, axis=0)``), which a scalar
        lacks, so there each becomes ``[1]`` (and the reduction gives the scalar back)."""
        if isinstance(self.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy) and \
                self.distribute_strategy.extended._in_multi_worker_mode():
            return {name: tf.reshape(value, [1]) for name, value in logs.items()}
        return logs


class SegmentationTrainer(Trainer):
    """A trainer of a network with a ``probabilities`` output ``[B, D, H, W, L]`` against a one-hot
    truth: :func:`cmmas.nn.losses.segmentation_loss` (``config.ce_weight``); metrics ``loss``,
    ``dice``, ``ce``. A subclass's :meth:`training_batch` gives ``truth`` and the network's inputs by
    name. The artefact to save is ``self.net``."""

    def __init__(self, net: keras.Model, config, n_labels: int, **kwargs):
        super().__init__(**kwargs)
        self.net, self.config, self.n_labels = net, config, int(n_labels)
        self.trackers = [keras.metrics.Mean(name=n) for n in ("loss", "dice", "ce")]
        self.built = True

    def call(self, inputs, training=False):
        return self.net(inputs, training=training)

    @property
    def metrics(self):
        return self.trackers

    def losses(self, batch: dict) -> dict:
        feed = {key: value for key, value in batch.items() if key != "truth"}
        loss, dice, cross_entropy = segmentation_loss(self.net(feed, training=True)["probabilities"], batch["truth"],
                                                      self.config.ce_weight)
        return {"loss": loss, "dice": dice, "ce": cross_entropy}


class _StopAtStep(keras.callbacks.Callback):
    """Stop ``fit`` once the optimiser has taken ``steps`` steps (mid-epoch if need be)."""

    def __init__(self, steps: int):
        super().__init__()
        self.steps = int(steps)

    def on_train_batch_end(self, batch, logs=None):
        if int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)) >= self.steps:
            self.model.stop_training = True


class EpochLog(keras.callbacks.Callback):
    """One line per finished epoch on stdout, flushed (shows in logs and pipes, where the Keras
    progress bar does not): ``<name> epoch 3/30 step 150: loss -0.512, dice 0.713, 42.1 s``."""

    def __init__(self, name: str, epochs: int, stream=None):
        super().__init__()
        self.name, self.epochs, self.stream = name, int(epochs), stream
        self._start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        values = ", ".join(f"{k} {float(v):.4g}" for k, v in (logs or {}).items() if k != "learning_rate")
        print(f"{self.name} epoch {epoch + 1}/{self.epochs} step {step}: {values}, "
              f"{time.perf_counter() - self._start:.1f} s", file=self.stream or sys.stdout, flush=True)


def fit_verbosity(progress: bool) -> int:
    """Keras ``fit``'s ``verbose``: its progress bar only where ``progress`` is asked and stdout is
    a terminal (elsewhere :class:`EpochLog`'s lines say the same, one per epoch)."""
    return 1 if progress and sys.stdout.isatty() else 0


def resume_epoch_of(backup_dir: Path) -> int:
    """The epoch ``BackupAndRestore`` will resume at (0 when there is no usable backup)."""
    try:
        return int(json.loads((backup_dir / "training_metadata.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def training_callbacks(config, out: Path, extra: Sequence, name: str = "train") -> list:
    """The training callbacks of a run folder (also used by :mod:`cmmas.fuse.simnet_train`).

    Stop after ``config.steps`` steps, one line per epoch on stdout (:class:`EpochLog`, headed
    ``name``), ``history.csv`` (appended), per-epoch weights in
    ``checkpoints/``, ``tensorboard/`` (if installed), ``backup/`` (BackupAndRestore, keeping
    the previous backup too), then ``extra``.
    """
    callbacks = [
        _StopAtStep(config.steps),
        EpochLog(name, math.ceil(config.steps / config.steps_per_epoch)),
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


def save_model(net: keras.Model, path: str | os.PathLike, card: ModelCard | None = None) -> Path:
    """Save a model as ``.keras`` atomically (temporary name in the same folder, then rename).

    Args:
        net: the network.
        path: the ``.keras`` file.
        card: what the network was trained on, written beside it (:func:`cmmas.nn.model_card.card_path`)
            once the model is in place. A card left there by an earlier model is removed first, so
            that an interrupted save leaves a model without a card rather than with a wrong one.

    Raises:
        ModelError: ``card`` is not of ``net``'s kind or grid shape.
    """
    path = Path(path)
    if card is not None:
        check_kind(net, card.kind, path)
        grid = net.input[MODEL_KINDS[card.kind][0][0]].shape[1:4]
        if None not in grid:  # the organ finder takes any size: its card records its training box
            card.check_shape(input_grid(net, card.kind), path)
    card_path(path).unlink(missing_ok=True)
    with atomic_path(path, ".keras") as tmp:
        net.save(tmp)
    if card is not None:
        write_card(card, path)
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


#: What each kind of cmmas network takes and gives: input names, the output that identifies it.
MODEL_KINDS = {
    "biregnet": (("atlas", "target"), "U"),
    "simnet": (("target", "atlas_label"), "similarity"),
    "dlf": (("target", "atlas_images", "atlas_labels"), "consensus"),
    "unet": (("target",), "probabilities"),
    "finder": (("image",), "probabilities"),
}


def check_kind(model: keras.Model, kind: str, where: str | os.PathLike | None = None) -> None:
    """Raise :class:`ModelError` (naming ``where``, default the model's name) unless ``model`` is a
    network of ``kind`` (a key of :data:`MODEL_KINDS`)."""
    names, output = MODEL_KINDS[kind]
    inputs, outputs = getattr(model, "input", None), getattr(model, "output", None)
    if not (isinstance(inputs, dict) and set(inputs) == set(names) and isinstance(outputs, dict) and output in outputs):
        raise ModelError(where or model.name, f"not a {KINDS[kind]}: expected "
                         f"inputs {' and '.join(repr(n) for n in names)} and an output {output!r}")


def input_grid(model: keras.Model, kind: str) -> tuple[int, int, int]:
    """The working-grid shape ``(D, H, W)`` a network of ``kind`` takes (checked with :func:`check_kind`)."""
    check_kind(model, kind)
    return tuple(int(n) for n in model.input[MODEL_KINDS[kind][0][0]].shape[1:4])  # type: ignore[return-value]


def load_model(path: str | os.PathLike, kind: str | None = None) -> keras.Model:
    """Load a ``.keras`` network saved by cmmas: the one loader of BiRegNet, SimNet, DLF and U-Net files.

    Args:
        path: the ``.keras`` file.
        kind: a key of :data:`MODEL_KINDS` to check that the file holds that network; None accepts any.

    Raises:
        ModelError: the file is missing, not a loadable Keras model, or not of ``kind``.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(path, "model file not found")
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as err:  # Keras raises many types for a bad file; all mean the same here.
        detail = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        raise ModelError(path, f"not a loadable .keras model ({type(err).__name__}: {detail})") from None
    if kind is not None:
        check_kind(model, kind, path)
    return model
