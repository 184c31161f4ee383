"""Random affine augmentation of BiRegNet's training pairs, as displacement fields."""

from __future__ import annotations

import math
from collections.abc import Sequence

import tensorflow as tf

from cmmas.nn.layers import warp

#: Default augmentation: rotation about each array axis up to this many degrees, ...
AUG_MAX_ROTATION_DEG = 10.0

#: ... scale of each axis within ``1 +- AUG_MAX_SCALE``, ...
AUG_MAX_SCALE = 0.1

#: ... and translation along each axis up to this many voxels (uniform draws).
AUG_MAX_SHIFT_VOX = 4.0


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
