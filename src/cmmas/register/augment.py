"""Random affine augmentation of BiRegNet's training pairs, as displacement fields.

Two draws: :func:`random_affine` (ours: rotation, scale and shift about the volume centre, the
same map for every input of a batch item, i.e. one per pair) and :func:`random_corner_affine`
(the original cmmas's ``random_transform_generator``: four corners of the ``[-1, 1]^3`` cube
moved inwards by up to ``corner_scale``, applied to one image and its label; BiRegNet's
``augment_mode="image"`` draws one per image).
"""

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

#: The original's corner displacement (normalised coordinates, the cube being ``[-1, 1]^3``).
CORNER_SCALE = 0.1

#: The original's source corners and the signs of their (inward) moves (label-reg's generator).
_CORNERS = ((-1.0, -1.0, -1.0), (-1.0, -1.0, 1.0), (-1.0, 1.0, -1.0), (1.0, -1.0, -1.0))
_CORNER_SIGNS = ((1.0, 1.0, 1.0), (1.0, 1.0, -1.0), (1.0, -1.0, 1.0), (-1.0, 1.0, 1.0))


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


def augmentation_displacement(shape_zyx: Sequence[int], shift, angles, translation, scale) -> tf.Tensor:
    """Displacement field that moves a label map by a shift and a similarity transform.

    A point ``x`` of the label moves to ``T(x) = c + s R (x - c) + t + shift``, ``c`` the
    volume's centre and ``R`` the rotation of :func:`cmmas.register.affine_matrix`; the
    field samples the label at ``T^-1(x)`` (:func:`cmmas.register.affine_ddf`), so that
    ``warp(label, ddf, "nearest")`` is the moved label (clamped at the border: edge voxels
    repeat, as a shift with edge padding). With ``s = 1``, ``R = I`` and ``t = 0`` it is an
    exact integer shift along the spatial axes; channels are never mixed.

    Args:
        shape_zyx: ``(D, H, W)``.
        shift: ``[B, 3]`` voxels (integers for an exact shift), array-axis order.
        angles: ``[B, 3]`` radians about the array axes ``(d, h, w)``.
        translation: ``[B, 3]`` voxels.
        scale: ``[B]`` isotropic scale factors (> 1 enlarges the label).

    Returns:
        ``[B, D, H, W, 3]`` float32 displacement in voxels (``ij`` order).
    """
    angles = tf.cast(angles, tf.float32)
    rotation = affine_matrix(angles, tf.ones_like(angles), tf.zeros_like(angles))[:, :, :3]
    # T^-1(x) = A (x - c) + c - A (t + shift), with A = (s R)^-1 = R^T / s.
    linear = tf.linalg.matrix_transpose(rotation) / tf.reshape(tf.cast(scale, tf.float32), [-1, 1, 1])
    offset = tf.cast(translation, tf.float32) + tf.cast(shift, tf.float32)
    matrices = tf.concat([linear, -tf.einsum("bij,bj->bi", linear, offset)[:, :, None]], axis=-1)
    return affine_ddf(matrices, [int(n) for n in shape_zyx])


def rethreshold(soft_one_hot) -> tf.Tensor:
    """Back to one-hot: ``[..., L]`` -> one-hot of the argmax channel, float32."""
    soft_one_hot = tf.convert_to_tensor(soft_one_hot)
    return tf.one_hot(tf.argmax(soft_one_hot, axis=-1), tf.shape(soft_one_hot)[-1], dtype=tf.float32)


def corner_affine_matrix(moves, shape_zyx) -> tf.Tensor:
    """The original's random affine ``[B, 3, 4]`` (voxel units, about the volume centre) from corner moves.

    The four corners :data:`_CORNERS` of the normalised cube ``[-1, 1]^3`` move by
    ``moves * _CORNER_SIGNS`` (inwards); the affine ``y = A x + t`` (normalised units) mapping
    the corners to their moved positions is solved exactly (four points, twelve unknowns) and
    rescaled to voxels: ``A' = H A H^-1``, ``t' = H t`` with ``H = diag((shape - 1) / 2)``.

    Args:
        moves: ``[B, 4, 3]`` non-negative corner moves, normalised units (the original: uniform
            in ``[0, 0.1]``). Zero moves give exactly the identity.
        shape_zyx: ``(D, H, W)`` ints.

    Returns:
        ``[B, 3, 4]`` for :func:`affine_ddf`.
    """
    moves = tf.cast(moves, tf.float32)
    source = tf.constant(_CORNERS, tf.float32)
    moved = source[None] + moves * tf.constant(_CORNER_SIGNS, tf.float32)[None]
    homogeneous = tf.concat([source, tf.ones([4, 1])], axis=-1)  # [4, 4]
    solution = tf.linalg.solve(tf.tile(homogeneous[None], [tf.shape(moves)[0], 1, 1]), moved)  # [B, 4, 3]
    linear = tf.linalg.matrix_transpose(solution[:, :3, :])
    half = (tf.constant([float(n) for n in shape_zyx], tf.float32) - 1.0) / 2.0
    linear = linear * half[None, :, None] / half[None, None, :]
    return tf.concat([linear, (solution[:, 3, :] * half)[:, :, None]], axis=-1)


def random_corner_affine(
    images: Sequence, labels: Sequence = (), corner_scale: float = CORNER_SCALE, seed=(0, 0)
) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
    """Warp volumes of one batch by the original's random affine (:func:`corner_affine_matrix`,
    corner moves uniform in ``[0, corner_scale]``), one per batch item, the same for all inputs
    (pass one image with its label). Images linear; one-hot labels linear then re-thresholded.

    Args:
        images: ``[B, D, H, W, C]`` float tensors (static spatial shape).
        labels: ``[B, D, H, W, L]`` one-hot tensors.
        corner_scale: largest corner move, normalised units.
        seed: stateless seed, two integers (or an int tensor ``[2]``).

    Returns:
        ``(warped_images, warped_labels)``, lists in the input order.
    """
    volumes = [tf.convert_to_tensor(v, tf.float32) for v in (*images, *labels)]
    if not volumes:
        return [], []
    shape = [int(n) for n in volumes[0].shape[1:4]]
    moves = tf.random.stateless_uniform(tf.stack([tf.shape(volumes[0])[0], 4, 3]), tf.cast(seed, tf.int64), 0.0,
                                        float(corner_scale))
    return _warp_all(volumes, len(images), affine_ddf(corner_affine_matrix(moves, shape), shape))


def _warp_all(volumes: list, n_images: int, ddf) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
    """Warp images (the first ``n_images`` of ``volumes``) and one-hot labels by one field in one call."""
    widths = [v.shape[-1] for v in volumes]
    warped = tf.split(warp(tf.concat(volumes, axis=-1), ddf, "linear"), widths, axis=-1)
    return warped[:n_images], [rethreshold(v) for v in warped[n_images:]]


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
    return _warp_all(volumes, len(images), affine_ddf(matrices, reference[1:4]))
