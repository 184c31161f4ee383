"""The original cmmas networks' feature extractors (``arch="original"`` of :mod:`cmmas.nn.networks`).

Rebuilt from the original TF1 code (github NanYoMy/cmmas, ``proj/``): BiRegNet is
``learn2reg/regnet.py`` ``LabAttentionReg.build_network``, SimNet is
``fusion/fusionnetworks.py`` ``LabIntSimNet.build_network``; their blocks are in
``tf_help/layers.py``. Both have ``levels - 1`` residual down blocks and a conv bottleneck at
``1 / 2**(levels - 1)`` (the original: 5 levels, bottleneck at 1/16):

* down block (``downsample_resnet_block``): ``h0 = conv-BN-ReLU(x)`` (kernel 7 at level 0, 3
  elsewhere), ``r = ReLU(BN(conv(conv-BN-ReLU(h0))) + h0)``, 2x max-pool of ``r``; the skip it
  hands to the decoder is ``h0``, not ``r``.
* BiRegNet decoder (``att_upsample_resnet_block``): a gate with one channel per skip channel,
  ``a = sigmoid(W3 ReLU((W1 up(g) + W2 skip) / 2))`` (1x1x1 convolutions with bias, ``up`` a 2x
  linear resize of the coarse feature ``g``), ``h0 = a * skip``, then
  ``ReLU(BN(conv(conv-BN-ReLU(h0))) + h0)``: the coarse features reach the decoder only through
  the gate.
* SimNet decoder (``upsample_resnet_block``, no attention): ``h0 = ReLU(BN(deconv(g)))`` (3x3x3
  transposed convolution, stride 2) plus the additive upsampling of ``g`` (2x linear resize, the
  two halves of its channels summed), ``ReLU(BN(conv(conv-BN-ReLU(h0))) + h0 + skip)``.

Convolutions are bias-free with Glorot-uniform kernels (the original's Xavier), BatchNormalization
has scale and centre, momentum 0.9, epsilon 1e-3, as ``tf.contrib.layers.batch_norm`` there.
The original resizes with TF1's ``resize_images`` (``align_corners=False``: sample ``j`` reads
the coarse position ``j / 2``); here :class:`cmmas.nn.blocks.Upsample3D` aligns voxel centres
(``(j + 0.5) / 2 - 0.5``). Trainable parameters are the original's, one for one.

Tensors are ``[B, D, H, W, C]``, spatial axes in array order ``(z, y, x)``.
"""

from __future__ import annotations

import keras

from cmmas.nn.blocks import BN_MOMENTUM, Upsample3D


@keras.saving.register_keras_serializable(package="cmmas")
class ChannelHalvesSum(keras.layers.Layer):
    """Sum of the two halves of the channels: ``[..., 2C] -> [..., C]``, ``y[c] = x[c] + x[C + c]``
    (the channel step of the original's ``additive_up_sampling``)."""

    def call(self, x):
        half = x.shape[-1] // 2
        return x[..., :half] + x[..., half:]

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], input_shape[-1] // 2)


@keras.saving.register_keras_serializable(package="cmmas")
class DropBackground(keras.layers.Layer):
    """A one-hot label without its background channel 0: ``[..., L] -> [..., L - 1]``.

    With one structure (``L = 2``) this is the binary label the original SimNet reads.
    """

    def call(self, x):
        return x[..., 1:]

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], input_shape[-1] - 1)


def _conv(x, channels: int, kernel: int, name: str):
    return keras.layers.Conv3D(channels, kernel, padding="same", use_bias=False, name=f"{name}_conv")(x)


def _bn(x, name: str):
    return keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=1e-3, name=f"{name}_bn")(x)


def _conv_bn_relu(x, channels: int, kernel: int, name: str):
    """The original's ``conv3_block``: bias-free convolution, BatchNormalization, ReLU."""
    return keras.layers.ReLU(name=f"{name}_relu")(_bn(_conv(x, channels, kernel, name), name))


def _residual_tail(h0, shortcut, name: str):
    """``ReLU(BN(conv(conv-BN-ReLU(h0))) + shortcut)``, the second half of every original block."""
    channels = h0.shape[-1]
    r = _conv_bn_relu(h0, channels, 3, name=f"{name}_r1")
    r = _bn(_conv(r, channels, 3, name=f"{name}_r2"), name=f"{name}_r2")
    return keras.layers.ReLU(name=f"{name}_relu")(keras.layers.Add(name=f"{name}_add")([r, shortcut]))


def _down_block(x, channels: int, kernel: int, name: str):
    """Returns ``(pooled, skip)``: ``[B, D/2, H/2, W/2, channels]`` and ``[B, D, H, W, channels]``."""
    h0 = _conv_bn_relu(x, channels, kernel, name=f"{name}_in")
    r = _residual_tail(h0, h0, name=name)
    return keras.layers.MaxPooling3D(2, padding="same", name=f"{name}_pool")(r), h0


def _gated_up_block(coarse, skip, name: str):
    """BiRegNet's decoder step: ``coarse`` ``[B, D/2, H/2, W/2, C']`` gates ``skip`` ``[B, D, H, W, C]``.

    Returns ``[B, D, H, W, C]``.
    """
    channels = skip.shape[-1]
    up = Upsample3D(2, name=f"{name}_upsample")(coarse)
    from_coarse = keras.layers.Conv3D(channels, 1, name=f"{name}_gate_coarse")(up)
    from_skip = keras.layers.Conv3D(channels, 1, name=f"{name}_gate_skip")(skip)
    mixed = keras.layers.ReLU(name=f"{name}_gate_relu")(
        keras.layers.Average(name=f"{name}_gate_mean")([from_coarse, from_skip]))
    gate = keras.layers.Conv3D(channels, 1, activation="sigmoid", name=f"{name}_gate")(mixed)
    h0 = keras.layers.Multiply(name=f"{name}_gated")([gate, skip])
    return _residual_tail(h0, h0, name=name)


def _additive_up_block(coarse, skip, name: str):
    """SimNet's decoder step: ``coarse`` ``[B, D/2, H/2, W/2, 2C]`` and ``skip`` ``[B, D, H, W, C]``.

    Returns ``[B, D, H, W, C]``.
    """
    channels = skip.shape[-1]
    deconv = keras.layers.Conv3DTranspose(channels, 3, strides=2, padding="same", use_bias=False,
                                          name=f"{name}_deconv")(coarse)
    deconv = keras.layers.ReLU(name=f"{name}_deconv_relu")(_bn(deconv, name=f"{name}_deconv"))
    additive = ChannelHalvesSum(name=f"{name}_additive")(Upsample3D(2, name=f"{name}_upsample")(coarse))
    h0 = keras.layers.Add(name=f"{name}_up")([deconv, additive])
    with_skip = keras.layers.Add(name=f"{name}_skip")([h0, skip])
    return _residual_tail(h0, with_skip, name=name)


def _features(x, c0: int, levels: int, up_block, name: str) -> list:
    skips = []
    for level in range(levels - 1):
        x, skip = _down_block(x, c0 * 2**level, 7 if level == 0 else 3, name=f"{name}_down{level}")
        skips.append(skip)
    x = _conv_bn_relu(x, c0 * 2 ** (levels - 1), 3, name=f"{name}_bottleneck")
    features = [x]
    for level in range(levels - 2, -1, -1):
        x = up_block(x, skips[level], name=f"{name}_up{level}")
        features.insert(0, x)
    return features


def biregnet_features(x, c0: int, levels: int, name: str = "reg") -> list:
    """The original BiRegNet's features: ``features[i]`` is ``[B, D/2**i, H/2**i, W/2**i, c0 * 2**i]``
    for ``i`` in ``0 .. levels-1`` (the last the bottleneck), from the input ``x`` ``[B, D, H, W, 2]``."""
    return _features(x, c0, levels, _gated_up_block, name)


def simnet_features(x, c0: int, levels: int, name: str = "sim") -> list:
    """The original SimNet's features, as :func:`biregnet_features` with the additive decoder."""
    return _features(x, c0, levels, _additive_up_block, name)
