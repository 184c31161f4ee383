"""BiRegNet and SimNet, and the 3D U-Net blocks they share.

Two architectures (``arch``): ``"cmmas"`` (ours, the default) and ``"original"`` (Ding et al.'s,
rebuilt in :mod:`cmmas.nn.original`). Both end in the original's heads: the sum, over every
level, of a zero-initialised 3x3x3 convolution resized to full resolution. Zero heads make the
untrained BiRegNet the identity (both displacement fields exactly zero) and the untrained SimNet
undecided (similarity exactly 0.5), so training starts from a sane state.

Ours departs from the original (docs/fidelity.md): 4 levels by default (the original 5, bottleneck
at 1/16); a decoder that upsamples, gates the skip with a 1-channel additive attention gate
(Oktay et al.) and concatenates it with the upsampled coarse feature (the original: one gate
channel per skip channel, and the coarse feature reaches the decoder only through the gate);
the skip is the encoder level's residual output (the original: its first convolution); SimNet
reuses BiRegNet's attention U-Net with a 3^3 first kernel (the original SimNet has no attention,
a 7^3 first kernel and a transposed-convolution + additive-upsampling decoder); coarse
displacement heads are scaled by their upsampling factor (the original resizes them unscaled).

Tensors are ``[B, D, H, W, C]`` with the spatial axes in array order ``(z, y, x)``.
Displacement fields are in voxels of the input grid, channels in array-axis order
``(d, h, w)`` (``ij`` indexing, as voxelmorph); a field of zeros is the identity.

Resolution levels: level ``i`` of a network with ``levels`` levels has ``c0 * 2**i`` channels at
``1 / 2**i`` of the input size; level ``levels - 1`` is the bottleneck. Spatial sizes must be
divisible by ``2**(levels - 1)``.

For inference, :func:`inference_copy` gives a copy of either network with every
BatchNormalization folded into the convolution before it.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from cmmas.errors import ModelError
from cmmas.nn import original
from cmmas.nn.blocks import BN_MOMENTUM, Upsample3D
from cmmas.nn.layers import VecInt
from cmmas.nn.precision import trunk_precision

#: Architectures of both networks -> their default number of levels.
ARCH_LEVELS = {"cmmas": 4, "original": 5}


def conv_bn_relu(x, channels: int, kernel: int = 3, name: str = "conv"):
    """3D convolution (no bias, 'same' padding), BatchNormalization, ReLU. Shape kept, C -> channels."""
    x = keras.layers.Conv3D(channels, kernel, padding="same", use_bias=False,
                            kernel_initializer="he_normal", name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def residual_block(x, name: str = "res"):
    """Two 3x3x3 conv-BN layers with an identity shortcut, ReLU after the sum. Shape kept."""
    channels = x.shape[-1]
    y = conv_bn_relu(x, channels, 3, name=f"{name}_a")
    y = keras.layers.Conv3D(channels, 3, padding="same", use_bias=False,
                            kernel_initializer="he_normal", name=f"{name}_b_conv")(y)
    y = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_b_bn")(y)
    y = keras.layers.Add(name=f"{name}_add")([x, y])
    return keras.layers.ReLU(name=f"{name}_relu")(y)


def attention_gate(skip, gate, name: str = "att"):
    """Additive attention gate (Attention U-Net, Oktay et al. 2018) on a skip connection.

    ``alpha = sigmoid(psi(relu(theta(skip) + phi(gate))))`` with 1x1x1 convolutions to
    ``max(C_skip // 2, 1)`` intermediate channels; returns ``skip * alpha``.

    Args:
        skip: encoder feature ``[B, D, H, W, C_skip]``.
        gate: decoder feature at the same resolution ``[B, D, H, W, C_gate]``.

    Returns: the gated skip, ``[B, D, H, W, C_skip]``.
    """
    inter = max(skip.shape[-1] // 2, 1)
    theta = keras.layers.Conv3D(inter, 1, use_bias=False, name=f"{name}_theta")(skip)
    phi = keras.layers.Conv3D(inter, 1, name=f"{name}_phi")(gate)
    q = keras.layers.ReLU(name=f"{name}_relu")(keras.layers.Add(name=f"{name}_add")([theta, phi]))
    alpha = keras.layers.Conv3D(1, 1, activation="sigmoid", name=f"{name}_alpha")(q)
    return keras.layers.Multiply(name=f"{name}_gated")([skip, alpha])


def up_block(x, skip, name: str = "up"):
    """Decoder step: x2 nearest upsampling, conv to the skip's channels, attention-gated skip,
    concatenation, conv and residual block.

    Args:
        x: coarse decoder feature ``[B, D/2, H/2, W/2, C_in]``.
        skip: encoder feature ``[B, D, H, W, C]``.

    Returns: ``[B, D, H, W, C]``.
    """
    channels = skip.shape[-1]
    g = keras.layers.UpSampling3D(2, name=f"{name}_upsample")(x)
    g = conv_bn_relu(g, channels, 3, name=f"{name}_in")
    gated = attention_gate(skip, g, name=f"{name}_att")
    y = keras.layers.Concatenate(name=f"{name}_concat")([gated, g])
    y = conv_bn_relu(y, channels, 3, name=f"{name}_merge")
    return residual_block(y, name=f"{name}_res")


def unet_features(x, c0: int, levels: int, first_kernel: int = 3, name: str = "unet") -> list:
    """Residual U-Net with attention-gated skips; returns the decoder feature of every level.

    Encoder level ``i``: (2x max-pool if ``i > 0``), conv-BN-ReLU to ``c0 * 2**i`` channels
    (kernel ``first_kernel`` at level 0, 3 elsewhere), residual block. The decoder climbs back
    with :func:`up_block`.

    Returns: ``features[i]`` is ``[B, D/2**i, H/2**i, W/2**i, c0 * 2**i]`` for ``i`` in
    ``0 .. levels-1``; ``features[levels-1]`` is the bottleneck, the others decoder outputs.
    """
    skips = []
    for level in range(levels):
        if level > 0:
            x = keras.layers.MaxPooling3D(2, name=f"{name}_enc{level}_pool")(x)
        kernel = first_kernel if level == 0 else 3
        x = conv_bn_relu(x, c0 * 2**level, kernel, name=f"{name}_enc{level}")
        x = residual_block(x, name=f"{name}_enc{level}_res")
        skips.append(x)
    features = [x]
    for level in range(levels - 2, -1, -1):
        x = up_block(x, skips[level], name=f"{name}_dec{level}")
        features.insert(0, x)
    return features


def summed_heads(features: Sequence, channels: int, is_displacement: bool, name: str):
    """Sum over levels of zero-initialised 3x3x3 convolutions, each resized to full resolution.

    Head ``i`` (layer ``{name}_head{i}``, kernel and bias zeros) reads ``features[i]`` at
    ``1/2**i`` resolution and is upsampled with :class:`Upsample3D` by ``2**i``, its values
    multiplied by ``2**i`` when ``is_displacement`` (coarse voxels -> fine voxels).

    Returns: ``[B, D, H, W, channels]``, exactly zero before training.
    """
    terms = []
    for level, feature in enumerate(features):
        head = keras.layers.Conv3D(channels, 3, padding="same", kernel_initializer="zeros",
                                   bias_initializer="zeros", name=f"{name}_head{level}")(feature)
        if level > 0:
            head = Upsample3D(2**level, scale_values=is_displacement,
                              name=f"{name}_head{level}_upsample")(head)
        terms.append(head)
    if len(terms) == 1:
        return terms[0]
    return keras.layers.Add(name=f"{name}_sum")(terms)


def _arch_levels(name: str, arch: str, levels: int | None) -> int:
    """``levels``, or the architecture's default when None; ModelError for an unknown ``arch``."""
    if arch not in ARCH_LEVELS:
        raise ModelError(name, f"unknown architecture {arch!r}; expected one of {sorted(ARCH_LEVELS)}")
    return ARCH_LEVELS[arch] if levels is None else levels


def check_config(name: str, shape_zyx: Sequence[int], c0: int, levels: int) -> tuple[int, int, int]:
    """Validate the common arguments; return the shape as a tuple of 3 ints."""
    if len(tuple(shape_zyx)) != 3:
        raise ModelError(name, f"shape_zyx must have 3 entries (D, H, W), got {tuple(shape_zyx)}")
    shape = tuple(int(n) for n in shape_zyx)
    if int(levels) != levels or levels < 1:
        raise ModelError(name, f"levels must be a positive integer, got {levels!r}")
    if int(c0) != c0 or c0 < 1:
        raise ModelError(name, f"c0 must be a positive integer, got {c0!r}")
    step = 2 ** (levels - 1)
    if any(n < step or n % step for n in shape):
        raise ModelError(name, f"input shape {shape} must be divisible by 2**(levels-1) = {step} "
                               f"along every axis for {levels} levels (crop or pad it)")
    return shape


def build_biregnet(shape_zyx: Sequence[int] = (96, 96, 96), c0: int = 4, levels: int | None = None,
                   diffeomorphic: bool = False, int_steps: int = 7, arch: str = "cmmas",
                   precision: str = "float32", name: str = "biregnet") -> keras.Model:
    """BiRegNet: bidirectional registration of an atlas and a target image.

    Inputs (named): ``atlas`` and ``target``, each ``[B, D, H, W, 1]``, concatenated.
    One residual U-Net (first kernel 7, ``c0`` channels doubling per level; ``arch`` "cmmas":
    :func:`unet_features`, "original": :func:`cmmas.nn.original.biregnet_features`) feeds two
    sets of zero-initialised heads, one per level (bottleneck included), summed at full
    resolution (see :func:`summed_heads`). ``levels`` None: the architecture's
    (:data:`ARCH_LEVELS`). With ``arch="original"``, ``c0=4`` and 5 levels it has the original's
    249,530 trainable parameters.

    Outputs: a dict ``{"U": [B, D, H, W, 3], "V": [B, D, H, W, 3]}`` (also the names of the output
    layers): ``U`` maps the atlas onto the target (warp the atlas with it), ``V`` the target onto
    the atlas. Voxels of the input grid, channels ``(d, h, w)``. Both are exactly zero at
    initialisation. With ``diffeomorphic=True`` the summed heads are stationary velocity fields
    (layers ``U_velocity``, ``V_velocity``) integrated with ``VecInt(int_steps)``
    (scaling and squaring), ``U = exp(v_U)``, ``V = exp(v_V)``, independently of each other.

    Raises:
        ModelError: when the shape is not divisible by ``2**(levels-1)`` or an argument is invalid.
    """
    levels = _arch_levels(name, arch, levels)
    shape = check_config(name, shape_zyx, c0, levels)
    atlas = keras.Input((*shape, 1), name="atlas")
    target = keras.Input((*shape, 1), name="target")
    with trunk_precision(precision, name):
        x = keras.layers.Concatenate(name="atlas_target")([atlas, target])
        if arch == "original":
            features = original.biregnet_features(x, c0, levels, name="reg")
        else:
            features = unet_features(x, c0, levels, first_kernel=7, name="reg")
    outputs = {}
    for field in ("U", "V"):
        # The original resizes its coarse heads without scaling their values.
        summed = summed_heads(features, 3, is_displacement=arch != "original", name=field.lower())
        if diffeomorphic:
            summed = keras.layers.Identity(name=f"{field}_velocity")(summed)
            outputs[field] = VecInt(int_steps, name=field)(summed)
        else:
            outputs[field] = keras.layers.Identity(name=field)(summed)
    return keras.Model({"atlas": atlas, "target": target}, outputs, name=name)


def build_simnet(shape_zyx: Sequence[int], n_label_channels: int, c0: int = 16, levels: int | None = None,
                 arch: str = "cmmas", precision: str = "float32", name: str = "simnet") -> keras.Model:
    """SimNet: voxel-wise similarity between a target image and one warped atlas label.

    Inputs (named): ``target`` ``[B, D, H, W, 1]`` (image) and ``atlas_label``
    ``[B, D, H, W, L]`` (one-hot of the warped atlas label, ``L = n_label_channels``, background
    channel 0 included), concatenated into a residual U-Net with one zero-initialised 1-channel
    head per level, resized and summed. ``arch`` "cmmas": BiRegNet's attention U-Net
    (:func:`unet_features`, first kernel 3); "original": :func:`cmmas.nn.original.simnet_features`
    (no attention, first kernel 7), which reads the label without its background channel, as the
    original reads the binary label of its one structure (``L = 2``, ``c0=16``, 5 levels: the
    original's 4,727,925 trainable parameters). ``levels`` None: the architecture's
    (:data:`ARCH_LEVELS`). ``precision``: the U-Net's (:mod:`cmmas.nn.precision`; the heads stay float32).

    Design: one map per atlas from the multi-label one-hot input, not one map per label. The
    training target is label-agnostic (the fraction of voxels of a 3^3 window where the warped
    atlas label equals the target label), and a single map keeps every voxel's training signal,
    whereas per-label maps would be mostly background.

    Outputs: a dict ``{"similarity": S, "logits": z}`` (also the output layers' names), both
    ``[B, D, H, W, 1]``: ``z`` the pre-sigmoid logits (use them for a numerically stable
    sigmoid cross-entropy) and ``S = sigmoid(z)`` in (0, 1). At initialisation ``z == 0`` and
    ``S == 0.5`` everywhere.

    Raises:
        ModelError: when the shape is not divisible by ``2**(levels-1)`` or an argument is invalid.
    """
    levels = _arch_levels(name, arch, levels)
    shape = check_config(name, shape_zyx, c0, levels)
    if int(n_label_channels) != n_label_channels or n_label_channels < 1:
        raise ModelError(name, f"n_label_channels must be a positive integer, got {n_label_channels!r}")
    if arch == "original" and n_label_channels < 2:
        raise ModelError(name, "the original SimNet reads the label without its background channel: "
                               f"n_label_channels must be at least 2, got {n_label_channels}")
    target = keras.Input((*shape, 1), name="target")
    atlas_label = keras.Input((*shape, int(n_label_channels)), name="atlas_label")
    with trunk_precision(precision, name):
        if arch == "original":
            foreground = original.DropBackground(name="foreground")(atlas_label)
            x = keras.layers.Concatenate(name="target_atlas_label")([target, foreground])
            features = original.simnet_features(x, c0, levels, name="sim")
        else:
            x = keras.layers.Concatenate(name="target_atlas_label")([target, atlas_label])
            features = unet_features(x, c0, levels, first_kernel=3, name="sim")
    logits = keras.layers.Identity(name="logits")(
        summed_heads(features, 1, is_displacement=False, name="sim"))
    similarity = keras.layers.Activation("sigmoid", name="similarity")(logits)
    return keras.Model({"target": target, "atlas_label": atlas_label},
                       {"similarity": similarity, "logits": logits}, name=name)
