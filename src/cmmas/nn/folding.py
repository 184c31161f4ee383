"""Inference on BatchNorm-folded copies of the networks: each BatchNormalization after a bias-free
Conv3D becomes that convolution's per-channel scale and bias, so inference runs no
normalisation passes."""

from __future__ import annotations

import functools

import keras
import tensorflow as tf


def _foldable_pairs(model: keras.Model) -> dict[str, str]:
    """``{conv name: batch-norm name}`` for every BatchNormalization (channels last) fed only by
    a bias-free Conv3D whose output nothing else reads.

    The graph is read through Keras's node attributes; should a Keras version lack them, nothing
    is folded (the copy then computes exactly what the model does, only not faster).
    """
    pairs = {}
    for layer in model.layers:
        if not isinstance(layer, keras.layers.BatchNormalization) or layer.axis not in (-1, [-1], [4]):
            continue
        try:
            if len(layer._inbound_nodes) != 1:
                continue
            source = layer._inbound_nodes[0].input_tensors[0]._keras_history.operation
            alone = len(source._outbound_nodes) == 1
        except (AttributeError, IndexError):
            return {}
        if isinstance(source, keras.layers.Conv3D) and not source.use_bias and alone:
            pairs[source.name] = layer.name
    return pairs


def folded_copy(model: keras.Model) -> keras.Model:
    """An inference-only copy of ``model`` with each BatchNormalization folded into the
    convolution before it (:func:`sync_folded`): the same outputs up to float rounding, without
    the normalisation passes (a BiRegNet forward pass on a 2-core CPU is 10-20 % faster). Every
    layer of the copy computes in float32, also those trained in bfloat16 (:mod:`cmmas.nn.precision`).

    The copy does not follow later changes of ``model``'s weights: call :func:`sync_folded`.
    """
    pairs = _foldable_pairs(model)
    norms = set(pairs.values())

    def clone(layer):
        if layer.name in norms:
            return keras.layers.Identity(name=layer.name)
        config = {**layer.get_config(), "dtype": "float32"}  # inference in float32 whatever the training precision
        if layer.name in pairs:
            config["use_bias"] = True
        return layer.__class__.from_config(config)

    def call(layer, *args, **kwargs):  # the normalisation's own arguments (mask) do not apply
        return layer(*args) if layer.name in norms else layer(*args, **kwargs)

    copy = keras.models.clone_model(model, clone_function=clone, call_function=call)
    sync_folded(model, copy)
    return copy


def sync_folded(model: keras.Model, copy: keras.Model) -> None:
    """Set the weights of ``copy`` (a :func:`folded_copy` of ``model``) from ``model``'s current ones.

    A convolution ``k`` followed by BatchNormalization (inference: ``gamma * (x - mean) /
    sqrt(var + eps) + beta``) becomes the convolution with kernel ``k * s`` and bias
    ``beta - mean * s``, ``s = gamma / sqrt(var + eps)`` per output channel.
    """
    pairs = _foldable_pairs(model)
    norms = set(pairs.values())
    layers = {layer.name: layer for layer in copy.layers}
    for layer in model.layers:
        if layer.name in norms or not layer.weights:
            continue
        folded = layers[layer.name]
        if layer.name not in pairs:
            for mine, theirs in zip(folded.weights, layer.weights):
                mine.assign(theirs)
            continue
        norm = model.get_layer(pairs[layer.name])
        scale = keras.ops.rsqrt(norm.moving_variance + norm.epsilon)
        if norm.scale:
            scale = scale * norm.gamma
        folded.kernel.assign(layer.kernel * scale)
        folded.bias.assign((norm.beta if norm.center else 0.0) - norm.moving_mean * scale)


@functools.lru_cache(maxsize=4)
def _folded(model: keras.Model):
    copy = folded_copy(model)
    return copy, tf.function(functools.partial(sync_folded, model, copy), autograph=False)


def inference_copy(model: keras.Model) -> keras.Model:
    """The :func:`folded_copy` of ``model`` for inference, made once per model (the last four
    are cached and kept alive) and set to ``model``'s current weights at every call (a
    graph-compiled :func:`sync_folded`: ~3 ms, against ~50 ms eagerly)."""
    copy, sync = _folded(model)
    sync()
    return copy
