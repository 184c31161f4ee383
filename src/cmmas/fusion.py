"""Label fusion: every strategy behind one signature.

All arrays are numpy in array order ``(z, y, x)`` on the target's grid: ``N`` warped atlas label
maps ``[N, D, H, W]`` (integer data-set codes), optionally their warped intensity images
``[N, D, H, W]`` and the target image ``[D, H, W]``. :func:`fuse` returns a :class:`FusionResult`
with the fused label map (data-set codes), per-label probabilities ``[L, D, H, W]`` and an
atlas-agreement map.

Methods (:data:`METHODS`, chosen by name):

* ``"mv"``: majority vote.
* ``"global"``: vote weighted by one weight per atlas from the global NCC or MI between the
  atlas image and the target, turned into weights by a softmax with a temperature.
* ``"lwv"``: vote weighted per voxel by local NCC or local MI in a Gaussian window.
* ``"staple"``: multi-label STAPLE (SimpleITK).
* ``"jlf"``: ANTs joint label fusion (antspyx, imported lazily).
* ``"jlf_tf"``: the same joint label fusion in TensorFlow (:mod:`cmmas.joint_fusion`), faster.
* ``"weighted"``: vote with externally supplied weights (e.g. SimNet similarity maps).

Conventions shared by all methods:

* ``labels`` are the data-set codes including the background 0; results list them sorted
  ascending, and ``probabilities[k]`` belongs to ``labels[k]``.
* Ties of the vote (several labels with the same highest score at a voxel) go to the tied
  label with the highest summed score in the 3x3x3 neighbourhood of that voxel; a tie that
  remains goes to the lowest label code. So an isolated tie follows its surroundings, and
  the result never depends on atlas order.
* ``agreement`` is the fraction of atlases (unweighted) whose label equals the fused label:
  1 where all atlases agree, an atlas-agreement / uncertainty map.
* A failed atlas (empty warped label, flat warped image) cannot wipe the target: it is one
  vote among N in majority vote and STAPLE, its similarity is set to a floor in
  ``"global"``/``"lwv"`` (see :func:`local_similarity`) and it is left out of JLF.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
import random
import tempfile
from collections.abc import Callable, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from cmmas.errors import CmmasError, GeometryError, ImageReadError, LabelError

logger = logging.getLogger(__name__)

#: Default softmax temperature per similarity measure (in units of that measure:
#: NCC is unitless in [-1, 1], MI and pointwise MI are in nats).
DEFAULT_TEMPERATURE = {"ncc": 0.1, "mi": 0.5}

#: Local variance (of a globally standardised image) at or below which a window counts as flat.
_FLAT_VARIANCE = 1e-6


@dataclasses.dataclass(frozen=True)
class FusionResult:
    """The outcome of fusing N atlases on the target grid.

    Attributes:
        label: ``[D, H, W]`` int32, fused label map in data-set codes.
        probabilities: ``[L, D, H, W]`` float32, per-label probability, summing to 1 over L.
        agreement: ``[D, H, W]`` float32 in [0, 1], fraction of atlases whose label equals
            the fused label.
        labels: the L data-set codes, ascending; ``probabilities[k]`` is for ``labels[k]``.
    """

    label: np.ndarray
    probabilities: np.ndarray
    agreement: np.ndarray
    labels: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """Validated inputs: ``index`` holds positions into ``codes`` (``[N, D, H, W]``)."""

    index: np.ndarray
    codes: tuple[int, ...]
    atlas_images: np.ndarray | None
    target_image: np.ndarray | None
    weights: np.ndarray | None

    @property
    def n_labels(self) -> int:
        return len(self.codes)

    def images(self, method: str) -> tuple[np.ndarray, np.ndarray]:
        """``(atlas_images [N, D, H, W], target_image [D, H, W])`` as float64, or raise."""
        if self.atlas_images is None or self.target_image is None:
            raise CmmasError(None, f"fusion method {method!r} needs atlas_images and target_image")
        return self.atlas_images, self.target_image


# ----------------------------------------------------------------------------- entry point


def fuse(
    method: str,
    atlas_labels: np.ndarray,
    labels: Sequence[int],
    atlas_images: np.ndarray | None = None,
    target_image: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    **options,
) -> FusionResult:
    """Fuse warped atlas labels on the target grid.

    Args:
        method: a key of :data:`METHODS` (``mv``, ``global``, ``lwv``, ``staple``, ``jlf``,
            ``jlf_tf``, ``weighted``).
        atlas_labels: ``[N, D, H, W]`` integer codes of N atlases warped to the target.
        labels: the data-set codes, including the background 0.
        atlas_images: ``[N, D, H, W]`` warped atlas intensities (``global``, ``lwv``, the JLFs).
        target_image: ``[D, H, W]`` target intensities (``global``, ``lwv``, the JLFs).
        weights: ``[N, D, H, W]`` per-atlas or ``[N, L, D, H, W]`` per-atlas-per-label
            non-negative weights (``weighted`` only; L in the order of sorted ``labels``).
        **options: method options, see each method's keyword arguments in :data:`METHODS`.

    Raises:
        LabelError: bad ``labels`` or atlas codes outside ``labels``.
        GeometryError: shapes do not agree.
        ImageReadError: NaN/inf intensities.
        CmmasError: unknown method or option, or a required input is missing.
    """
    if method not in METHODS:
        raise CmmasError(None, f"unknown fusion method {method!r} (choose from {', '.join(METHODS)})")
    fn = METHODS[method]
    allowed = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise CmmasError(
            None, f"unknown option(s) {unknown} for fusion method {method!r} (allowed: {allowed})"
        )
    if weights is not None and method != "weighted":
        raise CmmasError(None, f"fusion method {method!r} takes no weights (use 'weighted')")
    inputs = _validate(atlas_labels, labels, atlas_images, target_image, weights)
    label_index, probabilities = fn(inputs, **options)
    codes = np.asarray(inputs.codes, dtype=np.int32)
    agreement = (inputs.index == label_index[None]).mean(axis=0, dtype=np.float64)
    return FusionResult(
        label=codes[label_index],
        probabilities=probabilities.astype(np.float32),
        agreement=agreement.astype(np.float32),
        labels=inputs.codes,
    )


# ----------------------------------------------------------------------------- validation


def _validate(atlas_labels, labels, atlas_images, target_image, weights) -> _Inputs:
    atlas_labels = np.asarray(atlas_labels)
    if atlas_labels.ndim != 4 or atlas_labels.shape[0] < 1:
        raise GeometryError(
            "atlas_labels", f"expected [N, D, H, W] with N >= 1, got {atlas_labels.shape}"
        )
    codes = _codes(labels)
    index = np.stack([_index_of(a, codes, f"atlas_labels[{i}]") for i, a in enumerate(atlas_labels)])
    shape = atlas_labels.shape
    if atlas_images is not None:
        atlas_images = _finite("atlas_images", atlas_images, shape)
    if target_image is not None:
        target_image = _finite("target_image", target_image, shape[1:])
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
        per_label = (shape[0], len(codes)) + shape[1:]
        if weights.shape not in (shape, per_label):
            raise GeometryError("weights", f"expected shape {shape} or {per_label}, got {weights.shape}")
        if not np.all(np.isfinite(weights)) or np.any(weights < 0):
            raise CmmasError("weights", "must be finite and non-negative")
    return _Inputs(index, codes, atlas_images, target_image, weights)


def _codes(labels: Sequence[int]) -> tuple[int, ...]:
    values = np.asarray(list(labels))
    if values.ndim != 1 or values.size < 2:
        raise LabelError(
            "labels", f"expected the background 0 and at least one structure, got {list(labels)}"
        )
    if not np.all(np.equal(np.mod(values, 1), 0)):
        raise LabelError("labels", f"codes must be integers, got {list(labels)}")
    codes = sorted(int(v) for v in values)
    if len(set(codes)) != len(codes):
        raise LabelError("labels", f"duplicate codes in {codes}")
    if codes[0] != 0:
        raise LabelError(
            "labels", f"codes must be non-negative and include the background 0, got {codes}"
        )
    return tuple(codes)


def _index_of(label_map: np.ndarray, codes: tuple[int, ...], source: str) -> np.ndarray:
    """Positions of the values of ``label_map`` in ``codes`` (uint16), or LabelError."""
    if not (np.issubdtype(label_map.dtype, np.integer) or label_map.dtype == bool):
        if not np.all(np.isfinite(label_map)) or not np.all(np.mod(label_map, 1) == 0):
            raise LabelError(source, "holds non-integer values")
    table = np.asarray(codes)
    index = np.clip(np.searchsorted(table, label_map), 0, len(table) - 1)
    bad = table[index] != label_map
    if bad.any():
        unknown = np.unique(label_map[bad])[:10].tolist()
        raise LabelError(source, f"unknown label codes {unknown} (expected one of {list(codes)})")
    return index.astype(np.uint16)


def _finite(name: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    array = np.asarray(array, dtype=np.float64)
    if array.shape != tuple(shape):
        raise GeometryError(name, f"expected shape {tuple(shape)}, got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ImageReadError(name, "holds NaN/inf values")
    return array


# ----------------------------------------------------------------------------- voting


def _votes(index: np.ndarray, n_labels: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Scores ``[L, D, H, W]``: ``sum_i w_i [A_i == l]``.

    ``weights`` is None (one vote each), broadcastable to ``[N, D, H, W]``, or ``[N, L, D, H, W]``
    (then atlas i contributes its weight for the label it votes for).
    """
    n_atlases, shape = index.shape[0], index.shape[1:]
    n_voxels = int(np.prod(shape))
    flat_index = index.reshape(n_atlases, n_voxels).astype(np.intp)
    if weights is not None:
        if weights.ndim == 5:
            weights = np.take_along_axis(weights, index[:, None].astype(np.intp), axis=1)[:, 0]
        weights = np.broadcast_to(weights, index.shape).reshape(-1)
    bins = (flat_index * n_voxels + np.arange(n_voxels)).reshape(-1)
    scores = np.bincount(bins, weights=weights, minlength=n_labels * n_voxels)
    return scores.astype(np.float64).reshape((n_labels,) + shape)


def _decide(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Arg-max of ``scores [L, D, H, W]`` with the module's tie-break, and normalised probabilities.

    Ties (within 1e-9 of the largest score anywhere) go to the label with the highest score
    summed over the 3x3x3 neighbourhood (zero outside the volume), then to the lowest index.
    """
    eps = 1e-9 * max(float(scores.max(initial=0.0)), np.finfo(np.float64).tiny)
    tied = scores >= scores.max(axis=0) - eps
    if np.any(tied.sum(axis=0) > 1):
        neighbourhood = ndimage.uniform_filter(scores, size=(1, 3, 3, 3), mode="constant") * 27.0
        key = np.where(tied, neighbourhood, -np.inf)
        tied &= key >= key.max(axis=0) - 27.0 * eps
    label_index = np.argmax(tied, axis=0)
    total = scores.sum(axis=0)
    probabilities = np.divide(scores, total, out=np.zeros_like(scores), where=total > 0)
    empty = total <= 0
    if empty.any():
        probabilities[:, empty] = 1.0 / scores.shape[0]
    return label_index, probabilities


def _mv(inputs: _Inputs) -> tuple[np.ndarray, np.ndarray]:
    """Majority vote; probabilities are the vote fractions."""
    return _decide(_votes(inputs.index, inputs.n_labels))


def _weighted(inputs: _Inputs, *, top_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Weighted vote ``argmax_l sum_i w_i [A_i == l]`` with the caller's ``weights``.

    Options:
        top_k: keep only the k atlases with the largest weight at each voxel (for per-label
            weights, an atlas' weight at a voxel is its weight for the label it votes for).

    Voxels where every kept weight is zero fall back to the unweighted vote of all atlases.
    """
    weights = inputs.weights
    if weights is None:
        raise CmmasError(None, "fusion method 'weighted' needs weights [N, D, H, W] or [N, L, D, H, W]")
    n_atlases = inputs.index.shape[0]
    if top_k is not None:
        if not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= n_atlases:
            raise CmmasError(None, f"top_k must be an integer in [1, {n_atlases}], got {top_k!r}")
        if weights.ndim == 5:
            own = np.take_along_axis(weights, inputs.index[:, None].astype(np.intp), axis=1)[:, 0]
        else:
            own = weights
        order = np.argsort(-own, axis=0, kind="stable")
        keep = np.zeros(own.shape, dtype=bool)
        np.put_along_axis(keep, order[:top_k], True, axis=0)
        weights = weights * (keep[:, None] if weights.ndim == 5 else keep)
    scores = _votes(inputs.index, inputs.n_labels, weights)
    unweighted = scores.sum(axis=0) <= 0
    if unweighted.any():
        scores[:, unweighted] = _votes(inputs.index, inputs.n_labels)[:, unweighted]
    return _decide(scores)


# ----------------------------------------------------------------------------- similarity weights


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
        raise CmmasError(None, f"unknown similarity {similarity!r} (choose 'ncc' or 'mi')")
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

    Floors (what keeps a failed atlas from winning): where an atlas window is flat (local
    variance <= 1e-6 of its global variance, e.g. an empty warp) and the target window is
    not, the atlas gets the floor: -1 for NCC, min(0, lowest local MI of any atlas) for MI.
    Where the target window is flat, NCC carries no information and is 0 for every atlas.

    Args:
        target_image: ``[D, H, W]``.
        atlas_images: ``[N, D, H, W]`` on the target grid.
    """
    _check_measure(similarity, None)
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


def _global(
    inputs: _Inputs, *, similarity: str = "mi", temperature: float | None = None, bins: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Globally weighted vote (see :func:`global_weights`)."""
    images, target = inputs.images("global")
    w = global_weights(target, images, similarity, temperature, bins)
    return _decide(_votes(inputs.index, inputs.n_labels, w[:, None, None, None]))


def _lwv(
    inputs: _Inputs,
    *,
    similarity: str = "ncc",
    sigma: float = 2.0,
    temperature: float | None = None,
    bins: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """Locally weighted vote (see :func:`local_weights`); ``sigma`` in voxels."""
    images, target = inputs.images("lwv")
    w = local_weights(target, images, similarity, sigma, temperature, bins)
    return _decide(_votes(inputs.index, inputs.n_labels, w))


# ----------------------------------------------------------------------------- STAPLE


def _staple(
    inputs: _Inputs, *, probabilities: str = "confusion", max_iterations: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Multi-label STAPLE (SimpleITK ``MultiLabelSTAPLEImageFilter``).

    The label is the filter's output; voxels it leaves undecided get the arg-max of the
    probabilities (with the module's tie-break).

    Options:
        probabilities: ``"confusion"`` (default): the STAPLE posterior
            ``p(l | decisions) ~ prior(l) prod_i theta_i[A_i, l]`` from the filter's estimated
            confusion matrices ``theta_i[observed, true]`` (entries floored at 1e-6) and
            priors equal to the overall label frequencies of the atlases (as the filter
            uses by default); ``"votes"``: the vote fractions.
        max_iterations: cap on EM iterations (default: the filter's, until convergence).
    """
    if probabilities not in ("confusion", "votes"):
        raise CmmasError(
            None, f"STAPLE probabilities must be 'confusion' or 'votes', got {probabilities!r}"
        )
    n_labels = inputs.n_labels
    staple = sitk.MultiLabelSTAPLEImageFilter()
    staple.SetLabelForUndecidedPixels(n_labels)
    if max_iterations is not None:
        staple.SetMaximumNumberOfIterations(int(max_iterations))
    # STAPLE runs on the contiguous indices 0..L-1: its cost grows with the largest label value
    label_index = sitk.GetArrayFromImage(
        staple.Execute([sitk.GetImageFromArray(index.astype(np.uint16)) for index in inputs.index])
    ).astype(np.intp)
    votes = _votes(inputs.index, n_labels)
    if probabilities == "votes":
        posterior = votes / inputs.index.shape[0]
    else:
        prior = votes.sum(axis=(1, 2, 3)) / votes.sum()
        log_post = np.empty_like(votes)
        log_post[:] = np.log(np.maximum(prior, 1e-6))[:, None, None, None]
        # the filter sizes its matrices by the largest index present (m <= L); true labels
        # it never saw keep the floor
        present = int(inputs.index.max()) + 1
        for i, index in enumerate(inputs.index):
            theta = np.full((n_labels, n_labels), 1e-6)
            estimated = np.asarray(staple.GetConfusionMatrix(i)).reshape(present + 1, present)
            theta[:present, :present] = estimated[:present]
            log_post += np.moveaxis(np.log(np.maximum(theta, 1e-6))[index], -1, 0)
        posterior = np.exp(log_post - log_post.max(axis=0))
        posterior /= posterior.sum(axis=0)
    undecided = label_index == n_labels
    if undecided.any():
        label_index[undecided] = _decide(posterior)[0][undecided]
    return label_index, posterior


# ----------------------------------------------------------------------------- joint label fusion


def _ants_deterministic(ants) -> None:
    """Switch ANTs to deterministic mode without disturbing the caller's random generators."""
    config = getattr(ants, "config", None)
    if config is None or not hasattr(config, "set_ants_deterministic"):
        return
    numpy_state, python_state = np.random.get_state(), random.getstate()
    config.set_ants_deterministic(True)
    np.random.set_state(numpy_state)
    random.setstate(python_state)


def _jlf_region(inputs: _Inputs, method: str, mask: str, mask_dilation: int):
    """What both joint label fusions share: ``(index, images, target, region)`` of the usable
    atlases; ``region`` is None when JLF cannot run (one usable atlas, or no foreground at all)."""
    images, target = inputs.images(method)
    if mask not in ("union", "all"):
        raise CmmasError(None, f"JLF mask must be 'union' or 'all', got {mask!r}")
    usable = [i for i in range(len(images)) if images[i].std() > 0] or list(range(len(images)))
    if len(usable) < len(images):
        logger.warning("JLF: leaving out %d atlas(es) with a flat image", len(images) - len(usable))
    index, images = inputs.index[usable], images[usable]
    foreground = np.any(index > 0, axis=0)
    if len(usable) == 1 or not foreground.any():
        return index, images, target, None
    if mask == "all":
        region = np.ones_like(foreground)
    elif int(mask_dilation) > 0:
        structure = ndimage.generate_binary_structure(3, 1)
        region = ndimage.binary_dilation(foreground, structure, iterations=int(mask_dilation))
    else:
        region = foreground
    return index, images, target, region


def _jlf(
    inputs: _Inputs,
    *,
    rad: int = 2,
    r_search: int = 3,
    beta: float = 4.0,
    rho: float = 0.01,
    mask: str = "union",
    mask_dilation: int = 2,
    engine: str = "ants",
) -> tuple[np.ndarray, np.ndarray]:
    """Joint label fusion (Wang et al.): antspyx ``joint_label_fusion`` or the same algorithm in
    TensorFlow (:mod:`cmmas.joint_fusion`, method ``"jlf_tf"``).

    Options:
        rad: patch radius (voxels); r_search: search radius (voxels); beta, rho: JLF's weight
            sharpness and ridge penalty. ``rad=1, r_search=1`` is fast.
        mask: ``"union"`` fuses inside the union of the atlas foregrounds dilated by
            ``mask_dilation`` voxels (background outside); ``"all"`` fuses everywhere.
        engine: ``"ants"`` (antspyx) or ``"tensorflow"`` (a few times faster on CPU; the same
            label on 99.7 % or more of the voxels of the abdomen targets, docs/results.md).

    Atlases with a constant (flat) image are left out: JLF can give such a failed atlas
    the highest weight (GUIDE section 5). With one atlas left, JLF cannot run (antspyx raises IndexError) and
    the result is the majority vote of that atlas. The label is antspyx's decision
    (background where its background posterior is at least the summed foreground posteriors, else
    the most probable foreground label); probabilities are JLF's posteriors inside the mask,
    background outside.
    """
    if engine not in ("ants", "tensorflow"):
        raise CmmasError(None, f"JLF engine must be 'ants' or 'tensorflow', got {engine!r}")
    method = "jlf" if engine == "ants" else "jlf_tf"
    index, images, target, region = _jlf_region(inputs, method, mask, mask_dilation)
    if region is None:
        return _decide(_votes(index, inputs.n_labels))
    options = dict(rad=int(rad), search=int(r_search), beta=float(beta), rho=float(rho))
    if engine == "ants":
        label_index, posterior = _ants_jlf(index, images, target, region, inputs.codes, **options)
    else:
        from cmmas.joint_fusion import joint_label_fusion

        options["alpha"] = options.pop("rho")
        posterior = joint_label_fusion(images, index, target, region, inputs.n_labels, **options).astype(np.float64)
        foreground = posterior[1:].sum(axis=0) > posterior[0]
        label_index = np.where(foreground, 1 + np.argmax(posterior[1:], axis=0), 0).astype(np.intp)  # no votes outside
    return label_index, _jlf_posterior(posterior, label_index, region)


def _ants_jlf(index, images, target, region, codes, *, rad, search, beta, rho) -> tuple[np.ndarray, np.ndarray]:
    """antspyx's joint label fusion: ``(label index, posterior [L, D, H, W])`` as it returns them."""
    import ants

    _ants_deterministic(ants)
    values = np.asarray(codes, dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="cmmas-jlf-") as folder:
        result = ants.joint_label_fusion(
            ants.from_numpy(target.astype(np.float32)),
            ants.from_numpy(region.astype(np.float32)),
            [ants.from_numpy(im.astype(np.float32)) for im in images],
            label_list=[ants.from_numpy(values[ix]) for ix in index],
            rad=rad,
            r_search=search,
            beta=beta,
            rho=rho,
            max_lab_plus_one=True,
            output_prefix=os.path.join(folder, "jlf_"),
        )
    if not result.get("probabilityimages"):
        raise CmmasError(None, "antsJointFusion produced no posterior maps")
    segmentation = np.rint(result["segmentation"].numpy()).astype(np.int64)
    label_index = _index_of(segmentation, codes, "JLF output").astype(np.intp)
    posterior = np.zeros((len(codes),) + segmentation.shape, dtype=np.float64)
    posterior[0] = result["background_prob"].numpy()
    for number, image in zip(result["segmentation_numbers"], result["probabilityimages"]):
        posterior[codes.index(int(number))] = image.numpy()
    return label_index, posterior


def _jlf_posterior(posterior: np.ndarray, label_index: np.ndarray, region: np.ndarray) -> np.ndarray:
    """``posterior [L, D, H, W]`` (unnormalised scores inside ``region``) as probabilities:
    normalised per voxel, background outside ``region``, one-hot of the label where no score."""
    posterior[:, ~region] = 0.0
    posterior[0, ~region] = 1.0
    posterior = np.clip(posterior, 0.0, None)
    total = posterior.sum(axis=0)
    missing = total <= 0
    posterior = np.divide(posterior, total, out=np.zeros_like(posterior), where=~missing)
    if missing.any():
        posterior[:, missing] = np.eye(posterior.shape[0])[label_index[missing]].T
    return posterior


#: Fusion methods by name. Each takes the validated inputs and its keyword-only options.
METHODS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "mv": _mv,
    "global": _global,
    "lwv": _lwv,
    "staple": _staple,
    "jlf": _jlf,
    "jlf_tf": functools.partial(_jlf, engine="tensorflow"),
    "weighted": _weighted,
}
