"""The organ finder's network: a plain 3D U-Net that labels a whole scan at a coarse, isotropic
spacing, any size (its spatial dimensions are free).

Each encoder level is two 3x3x3 convolution-BatchNorm-ReLU layers (``c0 * 2**i`` channels) then
2x max-pooling; the decoder upsamples (nearest, x2), concatenates the encoder level's output and
applies two more such layers; a 1x1x1 convolution gives the logits. Inputs must be divisible by
``2**(levels - 1)`` along each axis (:func:`cmmas.align.finder.find_organs` pads a scan to that).

Tensors are ``[B, D, H, W, C]`` with the spatial axes in array order ``(z, y, x)``.
"""

from __future__ import annotations

import keras

from cmmas.errors import ModelError
from cmmas.nn.networks import conv_bn_relu
from cmmas.nn.precision import trunk_precision


def build_finder(n_labels: int, c0: int = 8, levels: int = 4, precision: str = "float32",
                 name: str = "finder") -> keras.Model:
    """The organ finder (module docstring).

    Inputs (named): ``image`` ``[B, D, H, W, 1]`` (intensities in [0, 1]; D, H, W free, divisible
    by ``2**(levels - 1)``). Outputs (a dict, also the output layers' names): ``logits`` and
    ``probabilities`` (softmax) ``[B, D, H, W, n_labels]``, channel 0 the background.
    ``precision``: the U-Net's (:mod:`cmmas.nn.precision`); the logits are float32.

    Raises:
        ModelError: ``n_labels`` below 2, ``c0`` or ``levels`` below 1.
    """
    if int(n_labels) != n_labels or n_labels < 2:
        raise ModelError(name, f"n_labels must be an integer >= 2 (background included), got {n_labels!r}")
    if int(c0) != c0 or c0 < 1 or int(levels) != levels or levels < 1:
        raise ModelError(name, f"c0 and levels must be positive integers, got {c0!r} and {levels!r}")
    image = keras.Input((None, None, None, 1), name="image")
    with trunk_precision(precision, name):
        x, skips = image, []
        for level in range(levels):
            if level:
                x = keras.layers.MaxPooling3D(2, name=f"enc{level}_pool")(x)
            x = conv_bn_relu(x, c0 * 2**level, name=f"enc{level}_a")
            x = conv_bn_relu(x, c0 * 2**level, name=f"enc{level}_b")
            skips.append(x)
        for level in range(levels - 2, -1, -1):
            x = keras.layers.UpSampling3D(2, name=f"dec{level}_up")(x)
            x = keras.layers.Concatenate(name=f"dec{level}_concat")([skips[level], x])
            x = conv_bn_relu(x, c0 * 2**level, name=f"dec{level}_a")
            x = conv_bn_relu(x, c0 * 2**level, name=f"dec{level}_b")
    logits = keras.layers.Conv3D(int(n_labels), 1, name="logits")(x)
    probabilities = keras.layers.Softmax(name="probabilities")(logits)
    return keras.Model({"image": image}, {"logits": logits, "probabilities": probabilities}, name=name)
