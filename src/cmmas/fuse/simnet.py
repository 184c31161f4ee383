"""SimNet inference: per-atlas similarity maps of warped atlas labels against the target, and
the SimNet-weighted vote ``argmax_l sum_i S_i [A_i == l]``.

Arrays are numpy in array order ``(z, y, x)``; tensors ``[B, D, H, W, C]``. Label maps hold
data-set codes; networks see their one-hot in ascending code order (:func:`channel_codes`)."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np

from cmmas.errors import GeometryError, LabelError, ModelError
from cmmas.fuse import vote
from cmmas.nn.folding import inference_copy
from cmmas.register import apply, biregnet


def channel_codes(codes: Sequence[int]) -> tuple[int, ...]:
    """The label codes in SimNet's one-hot channel order: ascending, with the background 0.

    The order of the fused labels (:func:`cmmas.fuse.vote.sorted_codes`), and :func:`cmmas.register.biregnet.label_table`
    of the sorted codes (0 is added when missing).

    Raises:
        LabelError: a code is not a non-negative integer.
    """
    table = biregnet.label_table(sorted(codes))
    if min(table) < 0:
        raise LabelError("label codes", f"codes must be non-negative, got {list(codes)}")
    return table


def score_atlases(
    simnet: keras.Model,
    target_image: np.ndarray,
    warped_labels: np.ndarray,
    codes: Sequence[int],
    batch_size: int = 4,
) -> np.ndarray:
    """SimNet similarity of every warped atlas with the target, voxel by voxel.

    Args:
        simnet: a SimNet whose input grid is the target's and whose label channels are ``codes``.
        target_image: ``[D, H, W]`` target image (normalised as in training).
        warped_labels: ``[N, D, H, W]`` warped atlas labels (codes).
        codes: the label codes (channel order :func:`channel_codes`).
        batch_size: atlases per network call (a shorter last batch runs padded: one traced graph).

    Returns:
        ``[N, D, H, W]`` float32 similarity, the sigmoid of SimNet's logits: in (0, 1), where
        float32 rounding makes very confident voxels exactly 1.

    Raises:
        GeometryError: shapes disagree with each other or with the network.
        ModelError: ``codes`` do not match the network's label channels.
        LabelError: atlas codes outside ``codes``.
    """
    codes = channel_codes(codes)
    if int(batch_size) < 1:
        raise ModelError("score_atlases", f"batch_size must be at least 1, got {batch_size}")
    inputs = simnet.input if isinstance(simnet.input, dict) else {}
    if set(inputs) != {"target", "atlas_label"}:
        raise ModelError(simnet.name, "not a SimNet: expected inputs 'target' and 'atlas_label'")
    target = np.asarray(target_image, dtype=np.float32)
    warped = np.asarray(warped_labels)
    if target.ndim != 3 or warped.ndim != 4 or warped.shape[1:] != target.shape or len(warped) < 1:
        raise GeometryError("score_atlases", f"expected target [D, H, W] and warped labels [N, D, H, W] on its "
                            f"grid, got {target.shape} and {warped.shape}")
    net_shape = tuple(inputs["target"].shape[1:4])
    n_channels = inputs["atlas_label"].shape[-1]
    if net_shape != target.shape:
        raise GeometryError(simnet.name, f"network input grid {net_shape} differs from the target's {target.shape}")
    if n_channels != len(codes):
        raise ModelError(simnet.name, f"network has {n_channels} label channels, got {len(codes)} codes {list(codes)}")
    scores = np.empty(warped.shape, dtype=np.float32)
    size = min(int(batch_size), len(warped))
    images = np.ascontiguousarray(np.broadcast_to(target[None, ..., None], (size, *target.shape, 1)))
    net = inference_copy(simnet)
    for start in range(0, len(warped), size):
        chunk = warped[start:start + size]
        onehot = apply.pad_batch(biregnet.one_hot(chunk, codes), size)
        out = net.predict_on_batch({"target": images, "atlas_label": onehot})
        scores[start:start + len(chunk)] = np.asarray(out["similarity"])[: len(chunk), ..., 0]
    return scores


def simnet_fuse(
    simnet: keras.Model,
    target_image: np.ndarray,
    warped_labels: np.ndarray,
    codes: Sequence[int],
    top_k: int | None = None,
    batch_size: int = 4,
) -> vote.FusionResult:
    """Fuse warped atlases by SimNet-weighted vote: ``argmax_l sum_i S_i [A_i == l]``.

    Args:
        simnet, target_image, warped_labels, codes, batch_size: as :func:`score_atlases`.
        top_k: at each voxel, only the k atlases of highest similarity vote (all if None).

    Returns:
        :class:`cmmas.fuse.vote.FusionResult`: the label, per-label probabilities (normalised
        weighted votes) and the atlas-agreement map.
    """
    scores = score_atlases(simnet, target_image, warped_labels, codes, batch_size=batch_size)
    inputs = vote.validate_inputs(warped_labels, channel_codes(codes), None, None, scores)
    return vote.fusion_result(inputs, *vote.weighted_vote(inputs, top_k=top_k))
