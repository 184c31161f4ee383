"""Similarity weights for voting: global (one weight per atlas) and local (per voxel)
NCC or mutual information between each warped atlas image and the target, and locally the
MIND-SSC distance (:mod:`cmmas.nn.mind`), which compares structure across modalities."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from cmmas.errors import CmmasError
from cmmas.fuse.vote import FusionInputs, count_votes, decide

#: Default softmax temperature per similarity measure (in units of that measure:
#: NCC is unitless in [-1, 1], MI and pointwise MI are in nats, MIND is minus a mean squared
#: descriptor difference in [-1, 0]; MIND is a local measure only).
DEFAULT_TEMPERATURE = {"ncc": 0.1, "mi": 0.5, "mind": 0.01}
_LOCAL_ONLY = ("mind",)

#: Local variance (of a globally standardised image) at or below which a window counts as flat.
_FLAT_VARIANCE = 1e-6


def _standardise(image: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance (a constant image becomes all zeros)."""
    std = image.std()
    return (image - image.mean()) / std if std > 0 else np.zeros_like(image)


def _local_variance(image: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-window mean and variance of a standardised image."""
    mean = ndimage.gaussian_filter(image, sigma)
    return mean, np.maximum(ndimage.gaussian_filter(image * image, sigma) - mean * mean, 0.0)


def _quantise(image: np.ndarray, bins: int) -> np.ndarray:
    """Bin indices in [0, bins) over the 0.5-99.5 percentile range (constant image: all 0)."""
    lo, hi = np.percentile(image, [0.5, 99.5])
    if hi <= lo:
        lo, hi = image.min(), image.max()
    if hi <= lo:
        return np.zeros(image.shape, dtype=np.intp)
    scaled = (np.clip(image, lo, hi) - lo) / (hi - lo) * bins
    return np.minimum(scaled.astype(np.intp), bins - 1)


def _pointwise_mi(atlas: np.ndarray, target_bins: np.ndarray, bins: int) -> tuple[np.ndarray, float]:
    """Per-voxel pointwise MI ``log p(a,t) / (p(a) p(t))`` (global joint histogram) and the MI, nats."""
    atlas_bins = _quantise(atlas, bins)
    joint = np.bincount((atlas_bins * bins + target_bins).ravel(), minlength=bins * bins)
    joint = joint.reshape(bins, bins) / atlas.size
    outer = joint.sum(axis=1)[:, None] * joint.sum(axis=0)[None, :]
    observed = joint > 0
    table = np.zeros_like(joint)
    table[observed] = np.log(joint[observed] / outer[observed])
    return table[atlas_bins, target_bins], float(np.sum(joint * table))


def _check_measure(similarity: str, temperature: float | None) -> float:
    if similarity not in DEFAULT_TEMPERATURE:
        raise CmmasError(None, f"unknown similarity {similarity!r} (choose from {', '.join(DEFAULT_TEMPERATURE)})")
    temperature = DEFAULT_TEMPERATURE[similarity] if temperature is None else float(temperature)
    if not temperature > 0:
        raise CmmasError(None, f"temperature must be > 0, got {temperature}")
    return temperature


def _softmax(similarity: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax across atlases (axis 0)."""
    z = np.exp((similarity - similarity.max(axis=0)) / temperature)
    return z / z.sum(axis=0)


def local_similarity(
    target_image: np.ndarray,
    atlas_images: np.ndarray,
    similarity: str = "ncc",
    sigma: float = 2.0,
    bins: int = 32,
) -> np.ndarray:
    """Local similarity of each atlas image to the target, ``[N, D, H, W]``.

    ``"ncc"``: normalised cross-correlation in a Gaussian window of ``sigma`` voxels, in [-1, 1].
    ``"mi"``: local mutual information approximated as the Gaussian-smoothed pointwise MI
    ``log p(a, t) / (p(a) p(t))`` from each atlas' global joint histogram (``bins`` bins), nats.
    ``"mind"``: minus the Gaussian-smoothed mean squared difference of the MIND-SSC descriptors
    (:func:`cmmas.nn.mind.mind_ssc` with :data:`cmmas.nn.mind.FUSION`, 12 channels in (0, 1]) of atlas and target, in [-1, 0].

    Floors (what keeps a failed atlas from winning): where an atlas window is flat (local
    variance <= 1e-6 of its global variance, e.g. an empty warp) and the target window is
    not, the atlas gets the floor: -1 for NCC, min(0, lowest local MI of any atlas) for MI.
    Where the target window is flat, NCC carries no information and is 0 for every atlas.

    Args:
        target_image: ``[D, H, W]``.
        atlas_images: ``[N, D, H, W]`` on the target grid.
    """
    _check_measure(similarity, None)
    if similarity == "mind":
        return _mind_similarity(target_image, atlas_images, sigma)
    target = _standardise(np.asarray(target_image, dtype=np.float64))
    atlases = np.asarray(atlas_images, dtype=np.float64)
    t_mean, t_var = _local_variance(target, sigma)
    target_flat = t_var <= _FLAT_VARIANCE
    target_bins = _quantise(target, bins)
    out = np.empty(atlases.shape, dtype=np.float64)
    flat = np.empty(atlases.shape, dtype=bool)
    for i, atlas in enumerate(atlases):
        atlas = _standardise(atlas)
        a_mean, a_var = _local_variance(atlas, sigma)
        flat[i] = (a_var <= _FLAT_VARIANCE) & ~target_flat
        if similarity == "ncc":
            cov = ndimage.gaussian_filter(atlas * target, sigma) - a_mean * t_mean
            valid = (a_var > _FLAT_VARIANCE) & ~target_flat
            denom = np.sqrt(np.where(valid, a_var * t_var, 1.0))
            out[i] = np.where(valid, np.clip(cov / denom, -1.0, 1.0), 0.0)
        else:
            out[i] = ndimage.gaussian_filter(_pointwise_mi(atlas, target_bins, bins)[0], sigma)
    floor = -1.0 if similarity == "ncc" else min(0.0, float(out.min()))
    out[flat] = floor
    return out


def _mind_similarity(target_image: np.ndarray, atlas_images: np.ndarray, sigma: float) -> np.ndarray:
    """``[N, D, H, W]`` minus the locally averaged MIND-SSC distance of each atlas to the target."""
    from cmmas.nn.mind import FUSION, descriptors  # TensorFlow: imported only when asked for

    described = descriptors(np.concatenate([np.asarray(target_image)[None], np.asarray(atlas_images)]), **FUSION)
    distance = np.mean(np.square(described[1:] - described[:1]), axis=-1)
    return -ndimage.gaussian_filter(distance.astype(np.float64), (0, sigma, sigma, sigma))


def local_weights(
    target_image: np.ndarray,
    atlas_images: np.ndarray,
    similarity: str = "ncc",
    sigma: float = 2.0,
    temperature: float | None = None,
    bins: int = 32,
) -> np.ndarray:
    """Per-voxel atlas weights ``[N, D, H, W]`` summing to 1 over atlases.

    Softmax over atlases of :func:`local_similarity` divided by ``temperature`` (default
    :data:`DEFAULT_TEMPERATURE` for the measure).
    """
    temperature = _check_measure(similarity, temperature)
    return _softmax(local_similarity(target_image, atlas_images, similarity, sigma, bins), temperature)


def global_similarity(
    target_image: np.ndarray, atlas_images: np.ndarray, similarity: str = "mi", bins: int = 32
) -> np.ndarray:
    """One similarity per atlas ``[N]``: global NCC in [-1, 1] or MI in nats (``bins`` bins).

    A constant (flat) atlas image gets the floor: -1 for NCC, 0 (the lower bound) for MI.
    """
    _check_measure(similarity, None)
    if similarity in _LOCAL_ONLY:
        raise CmmasError(None, f"similarity {similarity!r} is local only (use it with 'lwv')")
    target = _standardise(np.asarray(target_image, dtype=np.float64))
    target_bins = _quantise(target, bins)
    out = []
    for atlas in np.asarray(atlas_images, dtype=np.float64):
        if atlas.std() == 0:
            out.append(-1.0 if similarity == "ncc" else 0.0)
        elif similarity == "ncc":
            out.append(float(np.mean(_standardise(atlas) * target)))
        else:
            out.append(_pointwise_mi(atlas, target_bins, bins)[1])
    return np.asarray(out)


def global_weights(
    target_image: np.ndarray,
    atlas_images: np.ndarray,
    similarity: str = "mi",
    temperature: float | None = None,
    bins: int = 32,
) -> np.ndarray:
    """One weight per atlas ``[N]`` summing to 1: softmax of :func:`global_similarity` / temperature."""
    temperature = _check_measure(similarity, temperature)
    return _softmax(global_similarity(target_image, atlas_images, similarity, bins), temperature)


def global_vote(
    inputs: FusionInputs, *, similarity: str = "mi", temperature: float | None = None, bins: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Globally weighted vote (see :func:`global_weights`)."""
    images, target = inputs.images("global")
    w = global_weights(target, images, similarity, temperature, bins)
    return decide(count_votes(inputs.index, inputs.n_labels, w[:, None, None, None]))


def local_vote(
    inputs: FusionInputs,
    *,
    similarity: str = "ncc",
    sigma: float = 2.0,
    temperature: float | None = None,
    bins: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """Locally weighted vote (see :func:`local_weights`); ``sigma`` in voxels."""
    images, target = inputs.images("lwv")
    w = local_weights(target, images, similarity, sigma, temperature, bins)
    return decide(count_votes(inputs.index, inputs.n_labels, w))
