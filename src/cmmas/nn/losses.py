"""Losses: image similarity, label overlap, field regularity, cycle consistency (registration), and
the Dice + cross-entropy of a segmentation (DLF, the U-Net, the organ finder).

Every loss is a plain callable that takes float tensors ``[B, D, H, W, C]`` (images, one-hot
labels) or ``[B, D, H, W, 3]`` (displacement fields in voxels, ``ij`` order) and returns a
scalar float32 tensor; lower is better. Similarity losses are called ``loss(y_true, y_pred)``,
regularisers ``loss(ddf)``. Filters are separable (one banded matmul per axis), cheap on CPU.

TensorFlow is imported inside the functions: this module defines no Keras classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from cmmas.errors import GeometryError, ModelError

#: The smallest probability the cross-entropy of :func:`segmentation_loss` sees (a masked-out truth
#: gives no gradient).
MIN_PROBABILITY = 1e-6


def _check_volume(x, owner: str, channels: int | None = None) -> None:
    shape = list(x.shape)
    if len(shape) != 5:
        raise GeometryError(owner, f"expected a [B, D, H, W, C] tensor, got shape {shape}")
    if channels is not None and shape[-1] not in (channels, None):
        raise GeometryError(owner, f"expected {channels} channels, got shape {shape}")


def _check_pair(y_true, y_pred, owner: str) -> None:
    _check_volume(y_true, owner)
    _check_volume(y_pred, owner)
    for a, b in zip(y_true.shape[1:], y_pred.shape[1:]):
        if a is not None and b is not None and a != b:
            raise GeometryError(owner, f"shapes differ: {list(y_true.shape)} vs {list(y_pred.shape)}")


def _positive_int(value, name: str, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(owner, f"{name} must be a positive integer, got {value!r}")
    return value


def _channels_to_batch(x):
    """``[B, D, H, W, C]`` -> ``[B * C, D, H, W]`` (batch-major)."""
    import tensorflow as tf

    x = tf.transpose(x, [0, 4, 1, 2, 3])
    shape = tf.shape(x)
    return tf.reshape(x, [-1, shape[2], shape[3], shape[4]])


def _band_matrix(size, kernel):
    """``[size, size]`` matrix ``M`` with ``(M v)[i] = sum_k kernel[k] v[i + k - r]``, zeros outside.

    ``r = (len(kernel) - 1) // 2``: a "same" 1D convolution with zero padding as one matmul.
    """
    import tensorflow as tf

    taps = tf.shape(kernel)[0]
    index = tf.range(size)
    offset = index[None, :] - index[:, None] + (taps - 1) // 2
    inside = (offset >= 0) & (offset < taps)
    return tf.where(inside, tf.gather(kernel, tf.clip_by_value(offset, 0, taps - 1)), 0.0)


def _separable_filter(x, kernel):
    """Filter ``x [N, D, H, W]`` with the 1D ``kernel`` along d, h and w ("same", zero padding).

    Each pass is a matmul with a banded matrix: on CPU this is an order of magnitude faster
    than ``conv3d`` with one channel (or a cumulative-sum box filter), forward and backward.
    """
    import tensorflow as tf

    kernel = tf.cast(kernel, x.dtype)
    shape = tf.shape(x)
    x = tf.einsum("ndhw,ed->nehw", x, _band_matrix(shape[1], kernel))
    x = tf.einsum("ndhw,eh->ndew", x, _band_matrix(shape[2], kernel))
    return tf.einsum("ndhw,ew->ndhe", x, _band_matrix(shape[3], kernel))


class LocalNCC:
    """Local normalised cross-correlation over cubic windows of ``window`` voxels a side.

    For each voxel and channel, the squared correlation coefficient of the two images over the
    window (only voxels inside the volume count, so borders are exact), from window sums::

        cc = S_IJ^2 / (S_II S_JJ + eps),  S_IJ = sum (I - mean I)(J - mean J), ...

    computed with separable box filters. The loss is ``-mean(cc)``: ``-1`` (its optimum, up to
    ``eps``) when ``J = a I + b`` on every window, for any ``a != 0`` (the square makes the sign
    of the relation irrelevant, as in voxelmorph). Windows where either image is flat score 0.
    """

    def __init__(self, window: int = 9, eps: float = 1e-5):
        self.window = _positive_int(window, "window", "LocalNCC")
        self.eps = float(eps)

    def __call__(self, y_true, y_pred):
        import tensorflow as tf

        y_true = tf.cast(y_true, tf.float32)
        y_pred = tf.cast(y_pred, tf.float32)
        _check_pair(y_true, y_pred, "LocalNCC")
        i = _channels_to_batch(y_true)
        j = _channels_to_batch(y_pred)
        box = tf.ones([self.window], tf.float32)
        sums = _separable_filter(tf.concat([i, j, i * i, j * j, i * j], axis=0), box)
        s_i, s_j, s_ii, s_jj, s_ij = tf.split(sums, 5, axis=0)
        count = _separable_filter(tf.ones_like(i[:1]), box)
        cross = s_ij - s_i * s_j / count
        var_i = tf.maximum(s_ii - s_i * s_i / count, 0.0)
        var_j = tf.maximum(s_jj - s_j * s_j / count, 0.0)
        cc = cross * cross / (var_i * var_j + self.eps)
        return -tf.reduce_mean(cc)


def _parzen_mutual_information(x, y, bins: int, sigma_ratio: float, minval: float, maxval: float):
    """MI (nats) of the rows of ``x`` and ``y`` ``[N, M]`` -> ``[N]``, Gaussian Parzen windows.

    Values are clipped to ``[minval, maxval]``; ``bins`` centres span that range and the
    Gaussian has ``sigma = sigma_ratio * bin spacing``. Each sample's weights sum to one.
    """
    import tensorflow as tf

    centres = tf.linspace(minval, maxval, bins)
    sigma = sigma_ratio * (maxval - minval) / (bins - 1)
    scale = 1.0 / (2.0 * sigma * sigma)

    def weights(v):
        v = tf.clip_by_value(v, minval, maxval)[..., None]
        w = tf.exp(-scale * tf.square(v - centres))
        return w / tf.reduce_sum(w, axis=-1, keepdims=True)

    wx, wy = weights(x), weights(y)
    samples = tf.cast(tf.shape(x)[1], tf.float32)
    joint = tf.matmul(wx, wy, transpose_a=True) / samples
    px = tf.reduce_mean(wx, axis=1)
    py = tf.reduce_mean(wy, axis=1)
    independent = px[:, :, None] * py[:, None, :]
    eps = 1e-10
    return tf.reduce_sum(joint * tf.math.log((joint + eps) / (independent + eps)), axis=[1, 2])


class MutualInformation:
    """Global mutual information (nats) of two images, Parzen-window histogram, differentiable.

    Inputs ``[B, D, H, W, C]`` are clipped to ``[minval, maxval]`` (normalise them there first);
    one joint histogram of ``bins x bins`` per batch item and channel. Loss = ``-mean(MI)``.
    """

    def __init__(self, bins: int = 32, sigma_ratio: float = 0.5, minval: float = 0.0, maxval: float = 1.0):
        self.bins = _positive_int(bins, "bins", "MutualInformation")
        if self.bins < 2 or not sigma_ratio > 0 or not maxval > minval:
            raise ModelError(
                "MutualInformation",
                f"need bins >= 2, sigma_ratio > 0 and maxval > minval, got {bins}, {sigma_ratio}, "
                f"[{minval}, {maxval}]",
            )
        self.sigma_ratio = float(sigma_ratio)
        self.minval = float(minval)
        self.maxval = float(maxval)

    def _mi(self, x, y):
        return _parzen_mutual_information(x, y, self.bins, self.sigma_ratio, self.minval, self.maxval)

    def _rows(self, v):
        """``[B, D, H, W, C]`` -> ``[B * C, D * H * W]``."""
        import tensorflow as tf

        v = _channels_to_batch(v)
        return tf.reshape(v, [tf.shape(v)[0], -1])

    def __call__(self, y_true, y_pred):
        import tensorflow as tf

        y_true = tf.cast(y_true, tf.float32)
        y_pred = tf.cast(y_pred, tf.float32)
        _check_pair(y_true, y_pred, type(self).__name__)
        return -tf.reduce_mean(self._mi(self._rows(y_true), self._rows(y_pred)))


class LocalMutualInformation(MutualInformation):
    """Mutual information over non-overlapping cubic patches of ``patch`` voxels, averaged.

    Each spatial size must be a multiple of ``patch``. Other arguments as
    :class:`MutualInformation`; loss = ``-mean(MI)`` over batch, channels and patches.
    """

    def __init__(self, patch: int = 16, bins: int = 32, sigma_ratio: float = 0.5,
                 minval: float = 0.0, maxval: float = 1.0):
        super().__init__(bins, sigma_ratio, minval, maxval)
        self.patch = _positive_int(patch, "patch", "LocalMutualInformation")

    def _rows(self, v):
        """``[B, D, H, W, C]`` -> ``[B * C * patches, patch ** 3]``."""
        import tensorflow as tf

        for size in v.shape[1:4]:
            if size is not None and size % self.patch:
                raise GeometryError(
                    "LocalMutualInformation",
                    f"spatial shape {list(v.shape[1:4])} is not a multiple of patch {self.patch}",
                )
        v = _channels_to_batch(v)
        shape = tf.shape(v)
        p = self.patch
        v = tf.reshape(v, [shape[0], shape[1] // p, p, shape[2] // p, p, shape[3] // p, p])
        v = tf.transpose(v, [0, 1, 3, 5, 2, 4, 6])
        return tf.reshape(v, [-1, p * p * p])


def gaussian_kernel(sigma: float):
    """Normalised 1D Gaussian, radius ``ceil(3 sigma)``; ``sigma == 0`` gives ``[1]``."""
    import tensorflow as tf

    if sigma == 0:
        return tf.ones([1], tf.float32)
    radius = int(math.ceil(3.0 * sigma))
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    k = tf.exp(-0.5 * tf.square(x / sigma))
    return k / tf.reduce_sum(k)


class MindDistance:
    """Mean squared difference of the MIND-SSC descriptors of two images (:mod:`cmmas.nn.mind`).

    A modality-independent image similarity: descriptors compare each voxel's neighbourhood
    with itself, so a CT and an MR of the same anatomy have similar descriptors where their
    intensities do not relate. Inputs ``[B, D, H, W, 1]`` (any intensity scale); the loss is the
    mean over voxels and batch of the 12-channel squared difference, in ``[0, 1]``, 0 for equal
    images and for images related by an affine intensity remap.
    """

    def __init__(self, radius: int = 1, dilation: int = 2):
        self.radius = _positive_int(radius, "radius", "MindDistance")
        self.dilation = _positive_int(dilation, "dilation", "MindDistance")

    def __call__(self, y_true, y_pred):
        import tensorflow as tf

        from cmmas.nn.mind import mind_distance, mind_ssc

        y_true = tf.cast(y_true, tf.float32)
        y_pred = tf.cast(y_pred, tf.float32)
        _check_pair(y_true, y_pred, "MindDistance")
        both = mind_ssc(tf.concat([y_true, y_pred], axis=0), self.radius, self.dilation)
        a, b = tf.split(both, 2, axis=0)
        return tf.reduce_mean(mind_distance(a, b))


class MultiScaleDice:
    """Soft Dice of one-hot label volumes, averaged over Gaussian blurs of both inputs.

    For each ``sigma`` (voxels; 0 means no blur) both ``[B, D, H, W, L]`` inputs are blurred
    with a separable Gaussian, then per batch item and label
    ``dice = (2 sum(a b) + eps) / (sum(a^2) + sum(b^2) + eps)`` (equal to 1 exactly when
    ``a == b``, also for soft values). The loss is ``-mean(dice)`` over sigmas, labels and batch,
    in ``[-1, 0]``. All ``L`` channels count: drop the background channel first to ignore it.
    """

    def __init__(self, sigmas: Sequence[float] = (0, 1, 2, 4), eps: float = 1e-5):
        sigmas = tuple(float(s) for s in sigmas)
        if not sigmas or any(s < 0 for s in sigmas):
            raise ModelError("MultiScaleDice", f"sigmas must be non-negative and not empty, got {sigmas}")
        self.sigmas = sigmas
        self.eps = float(eps)

    def __call__(self, y_true, y_pred):
        import tensorflow as tf

        y_true = tf.cast(y_true, tf.float32)
        y_pred = tf.cast(y_pred, tf.float32)
        _check_pair(y_true, y_pred, "MultiScaleDice")
        both = tf.concat([_channels_to_batch(y_true), _channels_to_batch(y_pred)], axis=0)
        scores = []
        for sigma in self.sigmas:
            blurred = both if sigma == 0 else _separable_filter(both, gaussian_kernel(sigma))
            a, b = tf.split(blurred, 2, axis=0)
            overlap = tf.reduce_sum(a * b, axis=[1, 2, 3])
            total = tf.reduce_sum(a * a, axis=[1, 2, 3]) + tf.reduce_sum(b * b, axis=[1, 2, 3])
            scores.append((2.0 * overlap + self.eps) / (total + self.eps))
        return -tf.reduce_mean(tf.stack(scores))


def _difference(x, axis: int):
    """Forward difference of ``[B, D, H, W, C]`` along spatial ``axis`` (0, 1, 2 = d, h, w)."""
    ahead = [slice(None)] * 5
    behind = [slice(None)] * 5
    ahead[axis + 1] = slice(1, None)
    behind[axis + 1] = slice(None, -1)
    return x[tuple(ahead)] - x[tuple(behind)]


class Grad:
    """First-order smoothness of a field ``[B, D, H, W, 3]``.

    ``(1/3) sum_k mean(|d_k u|^p)`` with forward differences ``d_k`` along each axis,
    the mean over batch, voxels and components; ``p = 1`` (``"l1"``) or ``2`` (``"l2"``).
    """

    def __init__(self, penalty: str = "l1"):
        if penalty not in ("l1", "l2"):
            raise ModelError("Grad", f"penalty must be 'l1' or 'l2', got {penalty!r}")
        self.penalty = penalty

    def __call__(self, ddf):
        import tensorflow as tf

        ddf = tf.cast(ddf, tf.float32)
        _check_volume(ddf, "Grad", channels=3)
        op = tf.abs if self.penalty == "l1" else tf.square
        return tf.add_n([tf.reduce_mean(op(_difference(ddf, k))) for k in range(3)]) / 3.0


class BendingEnergy:
    """Bending energy of a field ``[B, D, H, W, 3]``.

    ``mean(u_dd^2) + mean(u_hh^2) + mean(u_ww^2) + 2 (mean(u_dh^2) + mean(u_dw^2) + mean(u_hw^2))``
    with second differences ``u[i+2] - 2 u[i+1] + u[i]`` and mixed forward differences, each mean over batch,
    valid voxels and components. Zero for any affine field.
    """

    def __call__(self, ddf):
        import tensorflow as tf

        ddf = tf.cast(ddf, tf.float32)
        _check_volume(ddf, "BendingEnergy", channels=3)
        first = [_difference(ddf, k) for k in range(3)]
        pure = [_difference(first[k], k) for k in range(3)]
        mixed = [_difference(first[0], 1), _difference(first[0], 2), _difference(first[1], 2)]
        energy = tf.add_n([tf.reduce_mean(tf.square(d)) for d in pure])
        return energy + 2.0 * tf.add_n([tf.reduce_mean(tf.square(d)) for d in mixed])


def jacobian_determinant_tf(ddf):
    """Determinant of the Jacobian of ``x -> x + ddf(x)`` at interior voxels.

    ``ddf`` is ``[B, D, H, W, 3]`` (voxels, ``ij`` order). ``J = I + grad(u)`` with central
    differences, ``J[c, k] = delta_ck + d u_c / d x_k``; the result is ``[B, D-2, H-2, W-2]``
    (the one-voxel border is dropped). Negative values mark folding.
    """
    import tensorflow as tf

    ddf = tf.cast(ddf, tf.float32)
    _check_volume(ddf, "jacobian_determinant_tf", channels=3)
    inner = (slice(None), slice(1, -1), slice(1, -1), slice(1, -1))
    grads = []
    for axis in range(3):
        ahead = list(inner)
        behind = list(inner)
        ahead[axis + 1] = slice(2, None)
        behind[axis + 1] = slice(None, -2)
        grads.append((ddf[tuple(ahead)] - ddf[tuple(behind)]) / 2.0)
    # j[c][k] = d(x_c + u_c) / d x_k
    j = [[grads[k][..., c] + (1.0 if c == k else 0.0) for k in range(3)] for c in range(3)]
    return (
        j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
        + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
    )


class NegativeJacobian:
    """Folding penalty of a field ``[B, D, H, W, 3]``: ``mean(relu(-det J))`` over interior voxels.

    Zero when the map is locally orientation-preserving everywhere (see
    :func:`jacobian_determinant_tf`).
    """

    def __call__(self, ddf):
        import tensorflow as tf

        return tf.reduce_mean(tf.nn.relu(-jacobian_determinant_tf(ddf)))


def cycle_consistency(img, ddf_u, ddf_v):
    """``mean |img - warp(warp(img, ddf_v), ddf_u)|`` (L1, mean over every voxel and channel).

    This is the paper's ``|I_t - I_t o V o U|_1``: ``V`` (target -> atlas) warps the target
    image into atlas space, ``U`` (atlas -> target) brings it back, so for a target image pass
    ``(I_t, U, V)`` and for an atlas image ``(I_a, V, U)`` (``|I_a - I_a o U o V|_1``).
    ``img`` is ``[B, D, H, W, C]``, the fields ``[B, D, H, W, 3]`` in voxels; both warps are
    trilinear with border clamping (:func:`cmmas.nn.layers.warp`).
    """
    import tensorflow as tf

    from cmmas.nn.layers import warp

    img = tf.cast(img, tf.float32)
    round_trip = warp(warp(img, ddf_v, "linear"), ddf_u, "linear")
    return tf.reduce_mean(tf.abs(img - round_trip))


def segmentation_loss(probabilities, target_one_hot, ce_weight: float):
    """``(loss, dice, cross_entropy)`` of ``[B, D, H, W, L]`` probabilities against a one-hot truth.

    ``dice`` is the soft Dice averaged over the foreground labels and the batch (labels absent
    from both count 1); ``loss = ce_weight * cross_entropy + 1 - dice``.
    """
    import tensorflow as tf

    truth = tf.cast(target_one_hot, tf.float32)
    p = tf.cast(probabilities, tf.float32)
    cross_entropy = -tf.reduce_mean(tf.reduce_sum(truth * tf.math.log(tf.maximum(p, MIN_PROBABILITY)), axis=-1))
    overlap = tf.reduce_sum(p[..., 1:] * truth[..., 1:], axis=[1, 2, 3])
    total = tf.reduce_sum(p[..., 1:] + truth[..., 1:], axis=[1, 2, 3])
    dice = tf.reduce_mean((2.0 * overlap + 1e-5) / (total + 1e-5))
    return ce_weight * cross_entropy + 1.0 - dice, dice, cross_entropy
