"""Fusing with a trained Deep Label Fusion network, or segmenting with the plain U-Net baseline
(networks: :mod:`cmmas.nn.dlf`; training: :mod:`cmmas.fuse.dlf_train`).

Arrays are numpy in array order ``(z, y, x)`` on the working grid; label maps hold data-set codes.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np

from cmmas.errors import GeometryError, ModelError
from cmmas.fuse import vote
from cmmas.fuse.simnet import channel_codes
from cmmas.nn.folding import inference_copy
from cmmas.register import biregnet

#: Fusion name -> the model kind it runs (:data:`cmmas.nn.training.MODEL_KINDS`).
KINDS = {"dlf": "dlf", "unet": "unet"}


def _check(net: keras.Model, kind: str, target: np.ndarray, codes: Sequence[int]) -> None:
    inputs = net.input if isinstance(net.input, dict) else {}
    expected = {"dlf": {"target", "atlas_images", "atlas_labels"}, "unet": {"target"}}[kind]
    if set(inputs) != expected:
        raise ModelError(net.name, f"not a {kind} network: expected inputs {sorted(expected)}")
    grid = tuple(inputs["target"].shape[1:4])
    if grid != target.shape:
        raise GeometryError(net.name, f"network input grid {grid} differs from the target's {target.shape}")
    channels = net.output["probabilities"].shape[-1]
    if channels != len(codes):
        raise ModelError(net.name, f"network has {channels} label channels, got {len(codes)} codes {list(codes)}")


def _result(probabilities: np.ndarray, warped_labels: np.ndarray, codes: Sequence[int]) -> vote.FusionResult:
    """A :class:`FusionResult` from ``[D, H, W, L]`` probabilities (the agreement: the share of the
    atlases whose warped label is the result's)."""
    inputs = vote.validate_inputs(warped_labels, codes, None, None, None)
    probabilities = np.moveaxis(np.asarray(probabilities, dtype=np.float32), -1, 0)
    return vote.fusion_result(inputs, probabilities.argmax(axis=0), probabilities)


def dlf_fuse(net: keras.Model, target_image: np.ndarray, atlas_images: np.ndarray, atlas_labels: np.ndarray,
             codes: Sequence[int]) -> vote.FusionResult:
    """Fuse warped atlases with a trained DLF network (all atlases in one pass).

    Args:
        net: a DLF network (:func:`cmmas.nn.dlf.build_dlf`) of the target's grid and ``codes``.
        target_image: ``[D, H, W]`` target image (normalised as in training).
        atlas_images: ``[N, D, H, W]`` warped atlas images.
        atlas_labels: ``[N, D, H, W]`` warped atlas labels (codes).
        codes: the label codes, background 0 included.

    Returns:
        The label (argmax of the network's masked probabilities), the probabilities ``[L, D, H, W]``
        and the atlases' agreement with the label.

    Raises:
        GeometryError, ModelError: shapes, channels or inputs that do not fit the network.
    """
    codes = channel_codes(codes)
    target = np.asarray(target_image, dtype=np.float32)
    _check(net, "dlf", target, codes)
    images, labels = np.asarray(atlas_images, dtype=np.float32), np.asarray(atlas_labels)
    if images.shape != labels.shape or images.ndim != 4 or images.shape[1:] != target.shape:
        raise GeometryError("dlf_fuse", f"expected atlas images and labels [N, {', '.join(map(str, target.shape))}], "
                            f"got {images.shape} and {labels.shape}")
    out = inference_copy(net).predict_on_batch({
        "target": target[None, ..., None], "atlas_images": images[None, ..., None],
        "atlas_labels": biregnet.one_hot(labels, codes)[None]})
    return _result(np.asarray(out["probabilities"])[0], labels, codes)


def unet_segment(net: keras.Model, target_image: np.ndarray, atlas_labels: np.ndarray,
                 codes: Sequence[int]) -> vote.FusionResult:
    """Segment the target with the plain U-Net baseline; the atlases only give the agreement map.

    Args:
        net: a U-Net (:func:`cmmas.nn.dlf.build_unet`) of the target's grid and ``codes``.
        target_image: ``[D, H, W]``; atlas_labels: ``[N, D, H, W]`` codes; codes: with the background.
    """
    codes = channel_codes(codes)
    target = np.asarray(target_image, dtype=np.float32)
    _check(net, "unet", target, codes)
    out = inference_copy(net).predict_on_batch({"target": target[None, ..., None]})
    return _result(np.asarray(out["probabilities"])[0], atlas_labels, codes)
