"""Keras layers and functions that move voxels with dense displacement fields.

Conventions (docs/design.md): volumes are ``[B, D, H, W, C]`` tensors; a displacement field
(DDF) is ``[B, D, H, W, 3]`` in voxels of the same grid, its channels in array-axis order
``(d, h, w)`` (``ij`` indexing, as voxelmorph). Warping samples the moving volume at the
displaced position::

    warp(vol, ddf)(x) = vol(x + ddf(x))

so a field of zeros is the identity, bit for bit. Positions outside the volume are clamped to
its border (the border voxels are repeated).

Composition follows from that definition: warping by ``u`` and then by ``v`` samples
``vol(x + v(x) + u(x + v(x)))``, so ::

    warp(warp(vol, u), v) == warp(vol, compose(u, v)),  compose(u, v) = v + warp(u, v)

up to interpolation error.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import keras
import tensorflow as tf

from cmmas.errors import GeometryError, ModelError

INTERPOLATIONS = ("linear", "nearest")


def _check_interpolation(interpolation: str, owner: str) -> None:
    if interpolation not in INTERPOLATIONS:
        raise ModelError(owner, f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")


def _check_field_shapes(vol_shape: Sequence, ddf_shape: Sequence, owner: str) -> None:
    """Static checks (where shapes are known) that ``vol`` and ``ddf`` fit together."""
    vol_shape, ddf_shape = list(vol_shape), list(ddf_shape)
    if len(vol_shape) != 5:
        raise GeometryError(owner, f"volume must be [B, D, H, W, C], got shape {vol_shape}")
    if len(ddf_shape) != 5 or ddf_shape[-1] not in (3, None):
        raise GeometryError(owner, f"displacement field must be [B, D, H, W, 3], got shape {ddf_shape}")
    for axis, (n_vol, n_ddf) in enumerate(zip(vol_shape[1:4], ddf_shape[1:4])):
        if n_vol is not None and n_ddf is not None and n_vol != n_ddf:
            raise GeometryError(
                owner,
                f"volume {vol_shape} and displacement field {ddf_shape} differ along spatial axis {axis}",
            )


def warp(vol, ddf, interpolation: str = "linear") -> tf.Tensor:
    """Warp ``vol`` by the displacement field ``ddf``: ``out(x) = vol(x + ddf(x))``.

    Args:
        vol: ``[B, D, H, W, C]`` volume (any batch size, eager or inside ``tf.function``).
        ddf: ``[B, D, H, W, 3]`` displacements in voxels, channels ``(d, h, w)``.
        interpolation: ``"linear"`` (trilinear; an integer ``vol`` is cast to float32) or
            ``"nearest"`` (keeps the dtype of ``vol``, rounds ties to even; for label maps).

    Returns:
        ``[B, D, H, W, C]`` warped volume. Sampling positions are clamped to the volume, so
        outside voxels repeat the border. Gradients flow to ``vol`` and (linear only) ``ddf``.
    """
    _check_interpolation(interpolation, "warp")
    vol = tf.convert_to_tensor(vol)
    ddf = tf.convert_to_tensor(ddf)
    _check_field_shapes(vol.shape, ddf.shape, "warp")
    if interpolation == "linear" and not vol.dtype.is_floating:
        vol = tf.cast(vol, tf.float32)

    shape = tf.shape(vol)
    batch, channels = shape[0], shape[4]
    sizes = [shape[1], shape[2], shape[3]]
    flat = tf.reshape(vol, [batch, -1, channels])

    axes = [tf.range(n, dtype=tf.float32) for n in sizes]
    grid = tf.stack(tf.meshgrid(*axes, indexing="ij"), axis=-1)
    upper = tf.cast(tf.stack(sizes) - 1, tf.float32)
    coords = tf.clip_by_value(grid[None] + tf.cast(ddf, tf.float32), 0.0, upper)
    coords = tf.reshape(coords, [batch, -1, 3])

    def gather(index: list[tf.Tensor]) -> tf.Tensor:
        linear = (index[0] * sizes[1] + index[1]) * sizes[2] + index[2]
        return tf.gather(flat, linear, batch_dims=1)

    if interpolation == "nearest":
        nearest = tf.cast(tf.round(coords), tf.int32)
        out = gather([nearest[..., k] for k in range(3)])
        return tf.reshape(out, shape)

    floor = tf.floor(coords)
    frac = tf.cast(coords - floor, vol.dtype)
    low = tf.cast(floor, tf.int32)
    high = tf.minimum(low + 1, tf.stack(sizes) - 1)
    corners = (low, high)
    weights = (1.0 - frac, frac)
    out = None
    for bits in itertools.product((0, 1), repeat=3):
        index = [corners[bit][..., k] for k, bit in enumerate(bits)]
        weight = weights[bits[0]][..., 0:1] * weights[bits[1]][..., 1:2] * weights[bits[2]][..., 2:3]
        term = weight * gather(index)
        out = term if out is None else out + term
    return tf.reshape(out, shape)


def compose(ddf_u, ddf_v) -> tf.Tensor:
    """Displacement of "warp by ``ddf_u``, then by ``ddf_v``".

    ``compose(u, v)(x) = v(x) + u(x + v(x))``, so that
    ``warp(warp(vol, u), v) == warp(vol, compose(u, v))`` up to interpolation error.
    Both fields are ``[B, D, H, W, 3]`` in voxels; the result has the same shape.
    """
    ddf_v = tf.convert_to_tensor(ddf_v)
    return ddf_v + warp(ddf_u, ddf_v, "linear")


def integrate_velocity(velocity, steps: int = 7) -> tf.Tensor:
    """Scaling and squaring: the displacement of ``exp(velocity)``.

    ``velocity`` is a stationary velocity field ``[B, D, H, W, 3]`` in voxels; it is scaled by
    ``2**-steps`` and composed with itself ``steps`` times. ``steps=0`` returns it unchanged.
    """
    ddf = tf.convert_to_tensor(velocity) * (0.5**steps)
    for _ in range(steps):
        ddf = ddf + warp(ddf, ddf, "linear")
    return ddf


def _resize_axis(x: tf.Tensor, axis: int, size) -> tf.Tensor:
    """Linear resampling of ``x`` along ``axis`` to ``size`` samples, same field of view.

    Voxel centres are aligned as in an image that keeps its extent: output voxel ``i`` reads
    input position ``(i + 0.5) * n / size - 0.5``, clamped to ``[0, n - 1]``.
    """
    n = tf.shape(x)[axis]
    ratio = tf.cast(n, tf.float32) / tf.cast(size, tf.float32)
    pos = (tf.range(size, dtype=tf.float32) + 0.5) * ratio - 0.5
    pos = tf.clip_by_value(pos, 0.0, tf.cast(n - 1, tf.float32))
    low_f = tf.floor(pos)
    low = tf.cast(low_f, tf.int32)
    high = tf.minimum(low + 1, n - 1)
    shape = [1, 1, 1, 1, 1]
    shape[axis] = -1
    frac = tf.reshape(tf.cast(pos - low_f, x.dtype), shape)
    return tf.gather(x, low, axis=axis) * (1.0 - frac) + tf.gather(x, high, axis=axis) * frac


def resize_volume(vol, shape: Sequence) -> tf.Tensor:
    """Resample a volume ``[B, D, H, W, C]`` onto a grid ``shape = (D', H', W')`` (same extent):
    trilinear, voxel centres aligned as in :func:`_resize_axis`."""
    out = tf.convert_to_tensor(vol)
    for k in range(3):
        out = _resize_axis(out, k + 1, shape[k])
    return out


def resize_displacement(ddf, shape: Sequence) -> tf.Tensor:
    """Resample a field ``[B, D, H, W, 3]`` onto a grid ``shape = (D', H', W')`` (same extent).

    Trilinear, voxel centres aligned as in :func:`_resize_axis`; the vector along axis ``k`` is
    multiplied by ``shape[k] / input_size[k]`` so that it stays in voxels of the new grid.
    """
    ddf = tf.convert_to_tensor(ddf)
    in_sizes = tf.shape(ddf)[1:4]
    out = resize_volume(ddf, shape)
    scale = tf.cast(tf.stack(list(shape)), out.dtype) / tf.cast(in_sizes, out.dtype)
    return out * scale


@keras.saving.register_keras_serializable(package="cmmas")
class SpatialTransformer(keras.layers.Layer):
    """Warp a volume by a displacement field: ``call([vol, ddf])`` -> ``vol(x + ddf(x))``.

    Inputs ``vol [B, D, H, W, C]`` and ``ddf [B, D, H, W, 3]`` (voxels, ``ij`` order);
    output ``[B, D, H, W, C]``. See :func:`warp`.
    """

    def __init__(self, interpolation: str = "linear", **kwargs):
        super().__init__(**kwargs)
        _check_interpolation(interpolation, self.name)
        self.interpolation = interpolation

    def call(self, inputs):
        vol, ddf = inputs
        return warp(vol, ddf, self.interpolation)

    def compute_output_shape(self, input_shape):
        vol_shape, ddf_shape = input_shape
        _check_field_shapes(vol_shape, ddf_shape, self.name)
        return tuple(vol_shape)

    def get_config(self) -> dict:
        return {**super().get_config(), "interpolation": self.interpolation}


@keras.saving.register_keras_serializable(package="cmmas")
class VecInt(keras.layers.Layer):
    """Integrate a stationary velocity field ``[B, D, H, W, 3]`` into a displacement field.

    Scaling and squaring with ``steps`` squarings (:func:`integrate_velocity`); zero velocity
    gives exactly zero displacement, a constant velocity the same constant displacement.
    """

    def __init__(self, steps: int = 7, **kwargs):
        super().__init__(**kwargs)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ModelError(self.name, f"steps must be a non-negative integer, got {steps!r}")
        self.steps = steps

    def call(self, velocity):
        return integrate_velocity(velocity, self.steps)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self) -> dict:
        return {**super().get_config(), "steps": self.steps}


def _as_triple(value, name: str, owner: str, integer: bool) -> tuple | None:
    """``None``, or ``value`` (one positive number or three) as a tuple of three."""
    if value is None:
        return None
    triple = tuple(value) if isinstance(value, (list, tuple)) else (value,) * 3
    kinds = (int,) if integer else (int, float)
    if len(triple) != 3 or not all(
        isinstance(v, kinds) and not isinstance(v, bool) and v > 0 for v in triple
    ):
        what = "a positive integer" if integer else "a positive number"
        raise ModelError(owner, f"{name} must be {what} or three of them, got {value!r}")
    return tuple(int(v) if integer else float(v) for v in triple)


@keras.saving.register_keras_serializable(package="cmmas")
class ResizeDisplacement(keras.layers.Layer):
    """Resample a displacement field ``[B, D, H, W, 3]`` to another grid of the same extent.

    Give exactly one of ``factor`` (a number or one per axis: the output has
    ``floor(n * factor + 0.5)`` voxels along an axis of ``n``) or ``shape`` (``(D', H', W')``).
    Trilinear; each vector component is multiplied by ``output_size / input_size`` of its
    axis (the factor, when sizes divide), so displacements stay in voxels of the new grid.
    """

    def __init__(self, factor=None, shape=None, **kwargs):
        super().__init__(**kwargs)
        if (factor is None) == (shape is None):
            raise ModelError(self.name, "give exactly one of factor and shape")
        self.factor = _as_triple(factor, "factor", self.name, integer=False)
        self.shape = _as_triple(shape, "shape", self.name, integer=True)

    def _out_sizes(self, in_sizes: Sequence):
        if self.shape is not None:
            return list(self.shape)
        return [
            None if n is None else int(math.floor(n * f + 0.5)) for n, f in zip(in_sizes, self.factor)
        ]

    def call(self, ddf):
        if self.shape is not None:
            sizes = list(self.shape)
        else:
            in_sizes = tf.cast(tf.shape(ddf)[1:4], tf.float32)
            sizes = [
                tf.cast(tf.floor(in_sizes[k] * self.factor[k] + 0.5), tf.int32) for k in range(3)
            ]
        return resize_displacement(ddf, sizes)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self._out_sizes(input_shape[1:4]), input_shape[4])

    def get_config(self) -> dict:
        return {**super().get_config(), "factor": self.factor, "shape": self.shape}
