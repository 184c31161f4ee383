"""Label-driven intensity randomisation ("labelmix"): a new, random contrast for an image from its
label map, so that a network trained on it cannot learn one modality's intensities.

After SLAug's class-wise random curves (Su et al., AAAI 2023) and SynthMorph's label-driven
contrasts (Hoffmann et al., IEEE TMI 2022), in our own TensorFlow ops (they run inside the
training graph). Per image, in this order:

1. **Classes**: every foreground label is a class; the background is split into
   ``background_clusters`` classes by its intensity (soft bins of [0, 1]), so that it keeps its
   structure (fat, muscle, air, bone do not become one flat grey).
2. **Curves**: each class's intensities go through its own random cubic Bezier curve
   ``y(x) = sum_k B_k(x) p_k`` (Bernstein basis ``B_k``, control values ``p_k`` uniform in [0, 1];
   sorted, i.e. a monotone curve, with probability ``monotone_probability``); the image is the
   sum of the classes' curves weighted by their (soft) masks. A class's level is random and its
   texture kept, or inverted by a falling curve.
3. **Bias field**: multiplied by ``exp(f)``, ``f`` a ``4^3`` grid of normal draws (standard
   deviation ``bias_std``) resampled trilinearly to the image.
4. **Gamma**: min-max to [0, 1], then ``y ** exp(g)``, ``g ~ N(0, gamma_std)``.
5. **Blur**: a separable Gaussian, ``sigma ~ U(0, blur_max)`` voxels (a lower resolution).
6. **Noise**: additive Gaussian, standard deviation ``~ U(0, noise_max)``; min-max to [0, 1].

Everything is drawn by stateless random ops from one ``[2]`` integer seed: the same seed gives
the same contrast. Tensors are ``[B, D, H, W, C]`` (array order ``(z, y, x)``), images single-channel
in [0, 1], label maps one-hot (or soft, after a linear warp) with the background channel first.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from cmmas.errors import CmmasError
from cmmas.nn.layers import resize_volume

#: Grid of the bias field's random draws (per axis) before it is resampled to the image.
BIAS_GRID = 4
#: Width (in bins) of a background cluster's soft membership.
CLUSTER_SOFTNESS = 0.3
#: Radius (voxels) of the blur's Gaussian kernel.
BLUR_RADIUS = 2


@dataclasses.dataclass(frozen=True)
class LabelMix:
    """The randomisation's ranges (module docstring; each 0 switches its step off)."""

    background_clusters: int = 3
    monotone_probability: float = 0.5
    bias_std: float = 0.3
    gamma_std: float = 0.25
    blur_max: float = 1.0
    noise_max: float = 0.03

    def __post_init__(self) -> None:
        problems = []
        if int(self.background_clusters) != self.background_clusters or self.background_clusters < 1:
            problems.append(f"background_clusters must be an integer >= 1, got {self.background_clusters!r}")
        if not 0.0 <= self.monotone_probability <= 1.0:
            problems.append(f"monotone_probability must lie in [0, 1], got {self.monotone_probability}")
        for name in ("bias_std", "gamma_std", "blur_max", "noise_max"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.blur_max > BLUR_RADIUS / 2:
            problems.append(f"blur_max must be <= {BLUR_RADIUS / 2:g} voxels (the kernel's radius is {BLUR_RADIUS}), "
                            f"got {self.blur_max}")
        if problems:
            raise CmmasError("LabelMix", "; ".join(problems))


def class_masks(images: tf.Tensor, one_hot: tf.Tensor, clusters: int) -> tf.Tensor:
    """The classes of step 1 as soft masks ``[B, D, H, W, clusters + L - 1]`` summing to the label
    map's sum (1 for a one-hot map): the background (channel 0) split by intensity into
    ``clusters`` bins of [0, 1] centred at ``(k + 0.5) / clusters`` (a voxel's membership a
    softmax of its Gaussian distances to the centres, :data:`CLUSTER_SOFTNESS` bin widths: no
    hard edge where a bin ends), then the foreground labels."""
    x = tf.clip_by_value(images, 0.0, 1.0)
    centres = (tf.range(clusters, dtype=x.dtype) + 0.5) / clusters
    membership = tf.nn.softmax(-0.5 * ((x - centres) * clusters / CLUSTER_SOFTNESS) ** 2, axis=-1)
    return tf.concat([one_hot[..., :1] * membership, one_hot[..., 1:]], axis=-1)


def bezier_curves(x: tf.Tensor, controls: tf.Tensor) -> tf.Tensor:
    """Each class's cubic Bezier curve at the intensities ``x`` ``[B, D, H, W, 1]`` (in [0, 1]),
    from control values ``controls`` ``[B, C, 4]``: ``[B, D, H, W, C]``."""
    t = tf.clip_by_value(x, 0.0, 1.0)
    s = 1.0 - t
    basis = tf.concat([s ** 3, 3.0 * s ** 2 * t, 3.0 * s * t ** 2, t ** 3], axis=-1)
    return tf.einsum("bdhwk,bck->bdhwc", basis, controls)


def _min_max(y) -> tf.Tensor:
    low = tf.reduce_min(y, axis=(1, 2, 3, 4), keepdims=True)
    high = tf.reduce_max(y, axis=(1, 2, 3, 4), keepdims=True)
    return (y - low) / tf.maximum(high - low, 1e-6)


def _blur(y, sigma) -> tf.Tensor:
    """Separable Gaussian of standard deviation ``sigma`` ``[B]`` (voxels; 0: unchanged) on
    ``[B, D, H, W, 1]``, each item its own: the batch runs as channels of a diagonal kernel. The
    edges are mirrored (zero padding would darken a rim that the final min-max then stretches)."""
    offsets = tf.range(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=y.dtype)
    safe = tf.maximum(sigma, 1e-3)[:, None]
    weights = tf.exp(-0.5 * (offsets[None] / safe) ** 2)
    weights = weights / tf.reduce_sum(weights, axis=1, keepdims=True)
    weights = tf.where(sigma[:, None] > 1e-3, weights, tf.cast(tf.equal(offsets, 0.0), y.dtype)[None])
    kernel = tf.linalg.diag(tf.transpose(weights))  # [K, B, B]
    x = tf.transpose(y, [4, 1, 2, 3, 0])  # [1, D, H, W, B]
    size = 2 * BLUR_RADIUS + 1
    for axis in range(3):
        shape, pad = [1, 1, 1], [[0, 0]] * 5
        shape[axis], pad[axis + 1] = size, [BLUR_RADIUS, BLUR_RADIUS]
        k = tf.reshape(kernel, (*shape, tf.shape(kernel)[1], tf.shape(kernel)[2]))
        x = tf.nn.conv3d(tf.pad(x, pad, mode="SYMMETRIC"), k, strides=(1, 1, 1, 1, 1), padding="VALID")
    return tf.transpose(x, [4, 1, 2, 3, 0])


def randomise(images: tf.Tensor, one_hot: tf.Tensor, seed: tf.Tensor, params: LabelMix = LabelMix()) -> tf.Tensor:
    """A random contrast for each image from its label map (module docstring).

    Args:
        images: ``[B, D, H, W, 1]`` float intensities in [0, 1].
        one_hot: ``[B, D, H, W, L]`` label map (one-hot or soft), background channel 0, L >= 1.
        seed: ``[2]`` integer tensor (or pair) of the stateless draws.
        params: the ranges.

    Returns:
        ``[B, D, H, W, 1]`` float32 in [0, 1]; the label map is not touched.
    """
    images = tf.cast(images, tf.float32)
    one_hot = tf.cast(one_hot, tf.float32)
    seeds = tf.unstack(tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 7))
    batch = tf.shape(images)[0]
    masks = class_masks(images, one_hot, params.background_clusters)
    classes = tf.shape(masks)[-1]

    controls = tf.random.stateless_uniform(tf.stack([batch, classes, 4]), seed=seeds[0])
    monotone = tf.random.stateless_uniform(tf.stack([batch, classes, 1]), seed=seeds[1]) < params.monotone_probability
    controls = tf.where(monotone, tf.sort(controls, axis=-1), controls)
    y = tf.reduce_sum(masks * bezier_curves(images, controls), axis=-1, keepdims=True)

    if params.bias_std > 0:
        grid = params.bias_std * tf.random.stateless_normal(tf.stack([batch, BIAS_GRID, BIAS_GRID, BIAS_GRID, 1]),
                                                            seed=seeds[2])
        y = y * tf.exp(resize_volume(grid, tf.shape(images)[1:4]))
    y = _min_max(y)
    if params.gamma_std > 0:
        gamma = tf.exp(params.gamma_std * tf.random.stateless_normal(tf.stack([batch, 1, 1, 1, 1]), seed=seeds[3]))
        y = tf.maximum(y, 0.0) ** gamma
    if params.blur_max > 0:
        y = _blur(y, params.blur_max * tf.random.stateless_uniform(tf.stack([batch]), seed=seeds[4]))
    if params.noise_max > 0:
        std = params.noise_max * tf.random.stateless_uniform(tf.stack([batch, 1, 1, 1, 1]), seed=seeds[5])
        y = y + std * tf.random.stateless_normal(tf.shape(y), seed=seeds[6])
    return tf.clip_by_value(_min_max(y), 0.0, 1.0)


def randomise_some(images: tf.Tensor, one_hot: tf.Tensor, seed: tf.Tensor, probability: float,
                   params: LabelMix = LabelMix()) -> tf.Tensor:
    """:func:`randomise` for each image with probability ``probability`` (drawn per image from
    ``seed``), the others returned unchanged. Shapes as :func:`randomise`."""
    images = tf.cast(images, tf.float32)
    if probability <= 0:
        return images
    pick_seed, mix_seed = tf.unstack(tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2))
    mixed = randomise(images, one_hot, mix_seed, params)
    if probability >= 1:
        return mixed
    chosen = tf.random.stateless_uniform(tf.stack([tf.shape(images)[0], 1, 1, 1, 1]), seed=pick_seed) < probability
    return tf.where(chosen, mixed, images)
