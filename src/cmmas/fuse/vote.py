"""Votes over warped atlas labels: the inputs and result every fusion shares, majority vote, the
externally weighted vote and multi-label STAPLE; :func:`cmmas.fuse.registry.fuse` dispatches to
them and to :mod:`cmmas.fuse.weights` and :mod:`cmmas.fuse.jlf`.

All arrays are numpy in array order ``(z, y, x)`` on the target's grid: ``N`` warped atlas label
maps ``[N, D, H, W]`` (integer data-set codes), optionally their warped intensity images
``[N, D, H, W]`` and the target image ``[D, H, W]``. :func:`cmmas.fuse.registry.fuse` returns a :class:`FusionResult`
with the fused label map (data-set codes), per-label probabilities ``[L, D, H, W]`` and an
atlas-agreement map.

Methods (:data:`cmmas.fuse.registry.METHODS`, chosen by name):

* ``"mv"``: majority vote.
* ``"global"``: vote weighted by one weight per atlas from the global NCC or MI between the
  atlas image and the target, turned into weights by a softmax with a temperature.
* ``"lwv"``: vote weighted per voxel by local NCC or local MI in a Gaussian window.
* ``"staple"``: multi-label STAPLE (SimpleITK).
* ``"jlf"``: ANTs joint label fusion (antspyx, imported lazily).
* ``"jlf_tf"``: the same joint label fusion in TensorFlow (:mod:`cmmas.fuse.jlf_tf`), faster.
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
  ``"global"``/``"lwv"`` (see :func:`cmmas.fuse.weights.local_similarity`) and it is left out of JLF.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from cmmas.errors import CmmasError, GeometryError, ImageReadError, LabelError

logger = logging.getLogger(__name__)


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
class FusionInputs:
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


def fusion_result(inputs: FusionInputs, label_index: np.ndarray, probabilities: np.ndarray) -> FusionResult:
    """The :class:`FusionResult` of a fusion method's ``label_index`` ``[D, H, W]`` (positions into
    ``inputs.codes``) and ``probabilities`` ``[L, D, H, W]``; the agreement is the fraction of
    atlases voting for the fused label."""
    codes = np.asarray(inputs.codes, dtype=np.int32)
    agreement = (inputs.index == label_index[None]).mean(axis=0, dtype=np.float64)
    return FusionResult(
        label=codes[label_index],
        probabilities=probabilities.astype(np.float32),
        agreement=agreement.astype(np.float32),
        labels=inputs.codes,
    )


def validate_inputs(atlas_labels, labels, atlas_images, target_image, weights) -> FusionInputs:
    atlas_labels = np.asarray(atlas_labels)
    if atlas_labels.ndim != 4 or atlas_labels.shape[0] < 1:
        raise GeometryError(
            "atlas_labels", f"expected [N, D, H, W] with N >= 1, got {atlas_labels.shape}"
        )
    codes = sorted_codes(labels)
    index = np.stack([index_of(a, codes, f"atlas_labels[{i}]") for i, a in enumerate(atlas_labels)])
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
    return FusionInputs(index, codes, atlas_images, target_image, weights)


def sorted_codes(labels: Sequence[int]) -> tuple[int, ...]:
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


def index_of(label_map: np.ndarray, codes: tuple[int, ...], source: str) -> np.ndarray:
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


def count_votes(index: np.ndarray, n_labels: int, weights: np.ndarray | None = None) -> np.ndarray:
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


def decide(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def majority_vote(inputs: FusionInputs) -> tuple[np.ndarray, np.ndarray]:
    """Majority vote; probabilities are the vote fractions."""
    return decide(count_votes(inputs.index, inputs.n_labels))


def weighted_vote(inputs: FusionInputs, *, top_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
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
    scores = count_votes(inputs.index, inputs.n_labels, weights)
    unweighted = scores.sum(axis=0) <= 0
    if unweighted.any():
        scores[:, unweighted] = count_votes(inputs.index, inputs.n_labels)[:, unweighted]
    return decide(scores)


def staple(
    inputs: FusionInputs, *, probabilities: str = "confusion", max_iterations: int | None = None
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
    votes = count_votes(inputs.index, n_labels)
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
        label_index[undecided] = decide(posterior)[0][undecided]
    return label_index, posterior
