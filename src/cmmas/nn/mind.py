"""MIND-SSC: modality-independent neighbourhood descriptors from self-similarity contexts
(Heinrich et al., MICCAI 2013), as a TensorFlow function and a Keras layer.

At every voxel ``x``, for each of the 12 pairs ``(p, q)`` of the six-neighbourhood offsets
(``+-dilation`` voxels along one axis) that lie ``sqrt(2) dilation`` apart, the patch distance ::

    D_pq(x) = box_(2 radius + 1)^3 * (I(. + p) - I(. + q))^2   evaluated at x

is turned into a descriptor channel ::

    MIND_pq(x) = exp(-(D_pq(x) - min_pq D(x)) / V(x)),   V(x) = mean_pq (D_pq(x) - min_pq D(x))

with ``V`` clamped to ``[0.001, 1000]`` times its mean over the volume (and above a tiny floor,
so that a constant region gives finite descriptors: all 1). Each voxel's largest channel is 1.
The descriptor compares the local *structure* of an image, not its intensities: a monotone or
non-monotone remap of tissue intensities changes it little, which is what lets a CT and an MR
be compared voxel by voxel.

Volumes are ``[B, D, H, W, 1]`` float tensors, ``ij`` voxel indexing; the descriptor is
``[B, D, H, W, 12]`` in ``(0, 1]``. Borders are handled by mirroring the volume (shifts) and
by averaging only inside the volume (the box filter).
"""

from __future__ import annotations

import itertools

import keras
import numpy as np
import tensorflow as tf

from cmmas.errors import GeometryError, ModelError

#: Channels of the descriptor.
CHANNELS = 12

#: The six-neighbourhood offsets (unit steps, ``(d, h, w)``).
_SIX = np.array([[-1, 0, 0], [1, 0, 0], [0, -1, 0], [0, 1, 0], [0, 0, -1], [0, 0, 1]])

#: The 12 offset pairs sqrt(2) apart, as index pairs into :data:`_SIX` (lexicographic order).
PAIRS: tuple[tuple[int, int], ...] = tuple(
    (i, j) for i, j in itertools.combinations(range(6), 2) if int(((_SIX[i] - _SIX[j]) ** 2).sum()) == 2
)

#: Descriptor settings for label fusion (``radius``, ``dilation``, voxels): JLF's own patch
#: already sums over a neighbourhood, and a box on top of it blurs away the one-voxel structure
#: that tells a well-placed atlas from a shifted one.
FUSION = {"radius": 0, "dilation": 1}

#: Floor of the variance estimate (image intensities squared): keeps constant regions finite.
_VARIANCE_FLOOR = 1e-12


def _check(radius: int, dilation: int, owner: str) -> tuple[int, int]:
    if int(radius) < 0 or int(dilation) < 1:
        raise ModelError(owner, f"MIND-SSC needs radius >= 0 and dilation >= 1, got {radius}, {dilation}")
    return int(radius), int(dilation)


def _shifted(padded: tf.Tensor, offset: np.ndarray, pad: int, sizes) -> tf.Tensor:
    """``I(x + offset)`` for every voxel ``x``, read from ``padded`` (``pad`` voxels each side)."""
    begin = [0, *(pad + int(o) for o in offset), 0]
    return tf.slice(padded, begin, [-1, sizes[0], sizes[1], sizes[2], -1])


def mind_ssc(image, radius: int = 1, dilation: int = 2) -> tf.Tensor:
    """MIND-SSC descriptors of ``image`` (see the module docstring).

    Args:
        image: ``[B, D, H, W, 1]`` intensities (any scale; every spatial size > ``dilation``).
        radius: half-size of the box over which patch distances are summed, voxels.
        dilation: distance of the six neighbours from the centre, voxels.

    Returns:
        ``[B, D, H, W, 12]`` float32 in ``(0, 1]``; channel ``k`` is the pair ``PAIRS[k]``.
        Differentiable with respect to ``image``.
    """
    radius, dilation = _check(radius, dilation, "mind_ssc")
    image = tf.cast(tf.convert_to_tensor(image), tf.float32)
    if image.shape.rank != 5 or image.shape[-1] not in (1, None):
        raise GeometryError("mind_ssc", f"image must be [B, D, H, W, 1], got shape {list(image.shape)}")
    shape = tf.shape(image)
    sizes = [shape[1], shape[2], shape[3]]
    padded = tf.pad(image, [[0, 0], [dilation] * 2, [dilation] * 2, [dilation] * 2, [0, 0]], mode="SYMMETRIC")
    shifted = [_shifted(padded, _SIX[k] * dilation, dilation, sizes) for k in range(6)]
    squared = tf.concat([tf.square(shifted[i] - shifted[j]) for i, j in PAIRS], axis=-1)
    box = 2 * radius + 1
    distance = tf.nn.avg_pool3d(squared, [1, box, box, box, 1], [1, 1, 1, 1, 1], "SAME")  # inside only
    distance = distance - tf.reduce_min(distance, axis=-1, keepdims=True)
    variance = tf.reduce_mean(distance, axis=-1, keepdims=True)
    overall = tf.reduce_mean(variance, axis=[1, 2, 3, 4], keepdims=True)
    variance = tf.clip_by_value(variance, overall * 0.001, overall * 1000.0)
    return tf.exp(-distance / tf.maximum(variance, _VARIANCE_FLOOR))


def mind_distance(a, b) -> tf.Tensor:
    """Mean squared difference of two descriptors ``[B, D, H, W, C]`` per voxel: ``[B, D, H, W]``."""
    return tf.reduce_mean(tf.square(tf.cast(a, tf.float32) - tf.cast(b, tf.float32)), axis=-1)


def descriptors(volumes: np.ndarray, radius: int = 1, dilation: int = 2) -> np.ndarray:
    """MIND-SSC of a stack of volumes ``[N, D, H, W]`` (numpy): ``[N, D, H, W, 12]`` float32."""
    volumes = np.asarray(volumes, dtype=np.float32)
    if volumes.ndim != 4:
        raise GeometryError("MIND-SSC", f"expected volumes [N, D, H, W], got shape {volumes.shape}")
    return mind_ssc(volumes[..., None], radius, dilation).numpy()


@keras.saving.register_keras_serializable(package="cmmas")
class MindSSC(keras.layers.Layer):
    """MIND-SSC descriptors as a layer: ``[B, D, H, W, 1]`` -> ``[B, D, H, W, 12]`` (no weights).

    See :func:`mind_ssc` for ``radius`` and ``dilation`` (voxels).
    """

    def __init__(self, radius: int = 1, dilation: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.radius, self.dilation = _check(radius, dilation, self.name)

    def call(self, image):
        return mind_ssc(image, self.radius, self.dilation)

    def compute_output_shape(self, input_shape):
        return (*tuple(input_shape)[:4], CHANNELS)

    def get_config(self) -> dict:
        return {**super().get_config(), "radius": self.radius, "dilation": self.dilation}
