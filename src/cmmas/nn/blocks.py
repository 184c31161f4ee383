"""The layers both architectures of BiRegNet and SimNet build on (:mod:`cmmas.nn.networks`, ours,
and :mod:`cmmas.nn.original`, Ding et al.'s): trilinear upsampling and the BatchNormalization
momentum.

Tensors are ``[B, D, H, W, C]`` with the spatial axes in array order ``(z, y, x)``.
"""

from __future__ import annotations

import keras

from cmmas.errors import ModelError

#: Momentum of every BatchNormalization (the original's ``decay=0.9``).
BN_MOMENTUM = 0.9


@keras.saving.register_keras_serializable(package="cmmas")
class Upsample3D(keras.layers.Layer):
    """Trilinear upsampling of ``[B, D, H, W, C]`` by an integer factor along each spatial axis.

    Voxel centres are aligned as in pooling (half-pixel convention): fine voxel ``j`` samples
    coarse position ``(j + 0.5) / factor - 0.5``, and values beyond the border are those of the
    edge voxel. Linear interpolation is applied separably along D, H and W, so a linear ramp
    stays a linear ramp away from the borders, and a constant stays constant.

    Args:
        factor: integer upsampling factor (>= 1), the same for D, H and W.
        scale_values: multiply the output by ``factor``. Use it for displacement fields: a
            displacement of one coarse voxel is ``factor`` fine voxels (exact under the
            half-pixel convention). Leave it off for intensities, features and logits.

    Output: ``[B, factor*D, factor*H, factor*W, C]``.
    """

    def __init__(self, factor: int, scale_values: bool = False, **kwargs):
        super().__init__(**kwargs)
        if int(factor) != factor or factor < 1:
            raise ModelError(self.name, f"upsampling factor must be a positive integer, got {factor!r}")
        self.factor = int(factor)
        self.scale_values = bool(scale_values)

    def call(self, x):
        for axis in (1, 2, 3):
            x = _linear_upsample_axis(x, axis, self.factor)
        if self.scale_values:
            x = x * keras.ops.cast(self.factor, x.dtype)
        return x

    def compute_output_shape(self, input_shape):
        b, d, h, w, c = input_shape
        return (b, *(None if n is None else n * self.factor for n in (d, h, w)), c)

    def get_config(self):
        return {**super().get_config(), "factor": self.factor, "scale_values": self.scale_values}


def _linear_upsample_axis(x, axis: int, factor: int):
    """Half-pixel linear upsampling of ``x`` along one axis by ``factor``, edge-clamped."""
    if factor == 1:
        return x
    ops = keras.ops
    padded = ops.concatenate([_slice(x, axis, 0, 1), x, _slice(x, axis, -1, None)], axis=axis)
    n = ops.shape(x)[axis]
    previous, current, following = (_slice(padded, axis, k, n + k) for k in range(3))
    phases = []
    for r in range(factor):
        t = (r + 0.5) / factor - 0.5  # offset in coarse voxels, in (-0.5, 0.5)
        if t < 0:
            phases.append(previous * (-t) + current * (1.0 + t))
        elif t > 0:
            phases.append(current * (1.0 - t) + following * t)
        else:
            phases.append(current)
    stacked = ops.stack(phases, axis=axis + 1)  # [..., n, factor, ...]
    shape = list(ops.shape(x))
    shape[0] = -1
    shape[axis] = n * factor
    return ops.reshape(stacked, shape)


def _slice(x, axis: int, start, stop):
    """``x[..., start:stop, ...]`` along ``axis``."""
    return x[(slice(None),) * axis + (slice(start, stop),)]
