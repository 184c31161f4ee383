"""Deep Label Fusion's network (Xie et al., Medical Image Analysis 2023), in our own code, and the
plain 3D U-Net it is compared with.

:func:`build_dlf` chains two subnets:

1. **weighted voting**: a U-Net (3 levels) reads each warped atlas image with the target image
   and the working grid's coordinate maps and gives one weight logit per label; a softmax over
   the atlases turns them into **label-specific** weights ``W[i, l]`` (SimNet gives one weight per
   atlas). The initial consensus is ``S[l] = sum_i W[i, l] * onehot_i[l]`` (a vote share in
   [0, 1]; before training every weight is equal and ``S`` is the majority vote's share).
2. **fine-tuning**: a U-Net (4 levels) reads ``S``, the target image and the coordinate maps and
   corrects the consensus: ``logits[l] = head[l] + a * S[l]`` (``head`` zero-initialised, ``a`` a
   learned scalar starting at :data:`PRIOR_SCALE`, so the untrained network decides as the
   majority vote). Each label's logit is then masked by the union of the atlases' warped labels
   for it (:class:`AtlasMask`): a label no atlas votes for at a voxel cannot win there; the
   background is never masked.

The number of atlases is free (axis 1 of the atlas inputs is ``None``): the weights are
normalised over whatever atlases are given. DLF's ablations: ``fine_tune=False`` keeps the
weighted vote alone (``logits = a * S``), ``mask=False`` leaves the logits unmasked.

Tensors are ``[B, D, H, W, C]`` (atlas inputs ``[B, N, D, H, W, C]``) with the spatial axes in
array order ``(z, y, x)``; label channels in ascending code order, the background 0 first.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from cmmas.errors import ModelError
from cmmas.nn.networks import check_config, summed_heads, unet_features
from cmmas.nn.precision import trunk_precision

#: The fine-tuning subnet's initial weight of the consensus in its logits: softmax(5 * S) picks
#: the label with the largest vote share.
PRIOR_SCALE = 5.0

#: The logit given to a label at a voxel where no atlas votes for it.
MASKED_LOGIT = -1e4


def coordinates(shape_zyx: Sequence[int]) -> np.ndarray:
    """The working grid's coordinate maps ``[D, H, W, 3]`` float32: voxel centres scaled to
    ``[-1, 1]`` along each array axis ``(d, h, w)`` (0 at the centre)."""
    axes = [np.linspace(-1.0, 1.0, int(n), dtype=np.float32) if n > 1 else np.zeros(1, np.float32)
            for n in shape_zyx]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


@keras.saving.register_keras_serializable(package="cmmas")
class CoordinateMaps(keras.layers.Layer):
    """``[B, D, H, W, C]`` -> its grid's :func:`coordinates`, ``[B, D, H, W, 3]`` (constant)."""

    def call(self, x):
        grid = tf.constant(coordinates(x.shape[1:4]))
        return tf.broadcast_to(grid[None], tf.concat([tf.shape(x)[:1], tf.shape(grid)], 0))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:4], 3)


@keras.saving.register_keras_serializable(package="cmmas")
class AtlasPairs(keras.layers.Layer):
    """The weighted-voting subnet's input, one row per (target, atlas):
    ``(target [B, D, H, W, C], atlas_images [B, N, D, H, W, 1], coordinates [B, D, H, W, 3])`` ->
    ``[B * N, D, H, W, 1 + C + 3]`` (atlas image, target, coordinates)."""

    def call(self, inputs):
        target, atlases, coords = inputs
        n = tf.shape(atlases)[1]
        context = tf.concat([target, coords], axis=-1)
        tiled = tf.repeat(context, n, axis=0)
        flat = tf.reshape(atlases, tf.concat([[-1], tf.shape(atlases)[2:]], 0))
        return tf.concat([flat, tiled], axis=-1)

    def compute_output_shape(self, input_shape):
        target, atlases, coords = input_shape
        return (None, *target[1:4], atlases[-1] + target[-1] + coords[-1])


@keras.saving.register_keras_serializable(package="cmmas")
class AtlasWeights(keras.layers.Layer):
    """Label-specific voting weights: ``(logits [B * N, D, H, W, L], atlas_labels [B, N, D, H, W, L])``
    -> ``[B, N, D, H, W, L]``, a softmax over the N atlases of each label's logits (sums to 1 over
    atlases at every voxel and label)."""

    def call(self, inputs):
        logits, atlas_labels = inputs
        shaped = tf.reshape(logits, tf.shape(atlas_labels))
        exp = tf.exp(shaped - tf.reduce_max(shaped, axis=1, keepdims=True))  # tf.nn.softmax: <= 5 dims on oneDNN
        return exp / tf.reduce_sum(exp, axis=1, keepdims=True)

    def compute_output_shape(self, input_shape):
        return input_shape[1]


@keras.saving.register_keras_serializable(package="cmmas")
class WeightedVote(keras.layers.Layer):
    """``(weights [B, N, D, H, W, L], atlas_labels one-hot [B, N, D, H, W, L])`` -> the consensus
    ``[B, D, H, W, L]``: ``sum_i W[i, l] * onehot_i[l]``."""

    def call(self, inputs):
        weights, atlas_labels = inputs
        return tf.reduce_sum(weights * tf.cast(atlas_labels, weights.dtype), axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], *input_shape[0][2:])


@keras.saving.register_keras_serializable(package="cmmas")
class AtlasMask(keras.layers.Layer):
    """``(logits [B, D, H, W, L], atlas_labels one-hot [B, N, D, H, W, L])`` -> the logits where
    some atlas votes for the label, :data:`MASKED_LOGIT` elsewhere; channel 0 (background) kept."""

    def call(self, inputs):
        logits, atlas_labels = inputs
        voted = tf.reduce_max(tf.cast(atlas_labels, logits.dtype), axis=1) > 0.5
        keep = tf.concat([tf.ones_like(voted[..., :1]), voted[..., 1:]], axis=-1)
        return tf.where(keep, logits, tf.cast(MASKED_LOGIT, logits.dtype))

    def compute_output_shape(self, input_shape):
        return input_shape[0]


@keras.saving.register_keras_serializable(package="cmmas")
class Scale(keras.layers.Layer):
    """Multiply by one trainable scalar, initially ``initial``."""

    def __init__(self, initial: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.initial = float(initial)

    def build(self, input_shape):
        self.factor = self.add_weight(name="factor", shape=(), initializer=keras.initializers.Constant(self.initial))

    def call(self, x):
        return x * self.factor

    def get_config(self):
        return {**super().get_config(), "initial": self.initial}


def _check_labels(name: str, n_labels: int) -> int:
    if int(n_labels) != n_labels or n_labels < 2:
        raise ModelError(name, f"n_labels must be an integer >= 2 (background included), got {n_labels!r}")
    return int(n_labels)


def build_dlf(shape_zyx: Sequence[int], n_labels: int, c_vote: int = 8, c_fine: int = 16, vote_levels: int = 3,
              fine_levels: int = 4, fine_tune: bool = True, mask: bool = True, precision: str = "float32",
              name: str = "dlf") -> keras.Model:
    """Deep Label Fusion: weighted-voting subnet, then the masked fine-tuning subnet (module docstring;
    ``fine_tune`` False: the weighted vote alone; ``mask`` False: no atlas mask; ``precision``: both
    subnets' U-Nets', :mod:`cmmas.nn.precision`, their heads, the weights and the vote float32).

    Inputs (named): ``target`` ``[B, D, H, W, 1]``, ``atlas_images`` ``[B, N, D, H, W, 1]`` and
    ``atlas_labels`` ``[B, N, D, H, W, L]`` (one-hot of the warped atlas labels), N free.

    Outputs (a dict, also the output layers' names): ``probabilities`` and ``logits`` (masked)
    ``[B, D, H, W, L]``, ``consensus`` (the weighted vote ``S``) ``[B, D, H, W, L]`` and
    ``weights`` ``[B, N, D, H, W, L]``.

    Raises:
        ModelError: a shape not divisible by ``2**(levels-1)`` of either subnet, or bad sizes.
    """
    shape = check_config(name, shape_zyx, c_vote, vote_levels)
    check_config(name, shape, c_fine, fine_levels)
    n_labels = _check_labels(name, n_labels)
    target = keras.Input((*shape, 1), name="target")
    atlas_images = keras.Input((None, *shape, 1), name="atlas_images")
    atlas_labels = keras.Input((None, *shape, n_labels), name="atlas_labels")
    coords = CoordinateMaps(name="coordinates")(target)
    pairs = AtlasPairs(name="atlas_pairs")([target, atlas_images, coords])
    with trunk_precision(precision, name):
        vote_features = unet_features(pairs, c_vote, vote_levels, name="vote")
    vote_logits = summed_heads(vote_features, n_labels, is_displacement=False, name="vote")
    weights = AtlasWeights(name="weights")([vote_logits, atlas_labels])
    consensus = WeightedVote(name="consensus")([weights, atlas_labels])
    logits = Scale(PRIOR_SCALE, name="prior")(consensus)
    if fine_tune:
        with trunk_precision(precision, name):
            x = keras.layers.Concatenate(name="fine_input")([consensus, target, coords])
            fine_features = unet_features(x, c_fine, fine_levels, name="fine")
        head = summed_heads(fine_features, n_labels, is_displacement=False, name="fine")
        logits = keras.layers.Add(name="fine_logits")([head, logits])
    logits = AtlasMask(name="logits")([logits, atlas_labels]) if mask else keras.layers.Identity(name="logits")(logits)
    probabilities = keras.layers.Softmax(name="probabilities")(logits)
    return keras.Model({"target": target, "atlas_images": atlas_images, "atlas_labels": atlas_labels},
                       {"probabilities": probabilities, "logits": logits, "consensus": consensus, "weights": weights},
                       name=name)


def build_unet(shape_zyx: Sequence[int], n_labels: int, c0: int = 16, levels: int = 4, precision: str = "float32",
               name: str = "unet") -> keras.Model:
    """The plain 3D U-Net DLF is compared with: the fine-tuning subnet's U-Net on the target image
    and the coordinate maps alone (no atlas); ``precision``: its trunk's (:mod:`cmmas.nn.precision`).

    Inputs (named): ``target`` ``[B, D, H, W, 1]``. Outputs: ``probabilities`` and ``logits``
    ``[B, D, H, W, L]``.
    """
    shape = check_config(name, shape_zyx, c0, levels)
    n_labels = _check_labels(name, n_labels)
    target = keras.Input((*shape, 1), name="target")
    coords = CoordinateMaps(name="coordinates")(target)
    with trunk_precision(precision, name):
        x = keras.layers.Concatenate(name="unet_input")([target, coords])
        features = unet_features(x, c0, levels, name="unet")
    head = summed_heads(features, n_labels, is_displacement=False, name="unet")
    logits = keras.layers.Identity(name="logits")(head)
    probabilities = keras.layers.Softmax(name="probabilities")(logits)
    return keras.Model({"target": target}, {"probabilities": probabilities, "logits": logits}, name=name)
