"""Joint label fusion (Wang et al.) with two engines: antspyx ``joint_label_fusion`` and the
same algorithm in TensorFlow (:mod:`cmmas.fuse.jlf_tf`)."""

from __future__ import annotations

import logging
import os
import random
import tempfile

import numpy as np
from scipy import ndimage

from cmmas.errors import CmmasError
from cmmas.fuse.jlf_tf import joint_label_fusion
from cmmas.fuse.vote import FusionInputs, count_votes, decide, index_of

logger = logging.getLogger(__name__)

#: What JLF's patches compare (the ``features`` option).
FEATURES = ("intensity", "mind")


def _ants_deterministic(ants) -> None:
    """Switch ANTs to deterministic mode without disturbing the caller's random generators."""
    config = getattr(ants, "config", None)
    if config is None or not hasattr(config, "set_ants_deterministic"):
        return
    numpy_state, python_state = np.random.get_state(), random.getstate()
    config.set_ants_deterministic(True)
    np.random.set_state(numpy_state)
    random.setstate(python_state)


def _jlf_region(inputs: FusionInputs, method: str, mask: str, mask_dilation: int):
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


def jlf(
    inputs: FusionInputs,
    *,
    rad: int = 2,
    r_search: int = 3,
    beta: float = 4.0,
    rho: float = 0.01,
    mask: str = "union",
    mask_dilation: int = 2,
    engine: str = "ants",
    features: str = "intensity",
) -> tuple[np.ndarray, np.ndarray]:
    """Joint label fusion (Wang et al.): antspyx ``joint_label_fusion`` or the same algorithm in
    TensorFlow (:mod:`cmmas.fuse.jlf_tf`, method ``"jlf_tf"``).

    Options:
        rad: patch radius (voxels); r_search: search radius (voxels); beta, rho: JLF's weight
            sharpness and ridge penalty. ``rad=1, r_search=1`` is fast.
        mask: ``"union"`` fuses inside the union of the atlas foregrounds dilated by
            ``mask_dilation`` voxels (background outside); ``"all"`` fuses everywhere.
        engine: ``"ants"`` (antspyx) or ``"tensorflow"`` (a few times faster on CPU; the same
            label on 99.7 % or more of the voxels of the abdomen targets, docs/results.md).
        features: what patches compare: ``"intensity"`` (JLF as published: one modality) or
            ``"mind"`` (the 12 MIND-SSC channels of target and atlases, :mod:`cmmas.nn.mind`:
            atlases of another modality are weighed by local structure; tensorflow engine only).

    Atlases with a constant (flat) image are left out: JLF can give such a failed atlas
    the highest weight. With one atlas left, JLF cannot run (antspyx raises IndexError) and
    the result is the majority vote of that atlas. The label is antspyx's decision
    (background where its background posterior is at least the summed foreground posteriors, else
    the most probable foreground label); probabilities are JLF's posteriors inside the mask,
    background outside.
    """
    if engine not in ("ants", "tensorflow"):
        raise CmmasError(None, f"JLF engine must be 'ants' or 'tensorflow', got {engine!r}")
    if features not in FEATURES or (features != "intensity" and engine != "tensorflow"):
        raise CmmasError(None, f"JLF features must be one of {FEATURES} ('mind' with the tensorflow engine), "
                               f"got {features!r} with engine {engine!r}")
    method = "jlf" if engine == "ants" else "jlf_tf"
    index, images, target, region = _jlf_region(inputs, method, mask, mask_dilation)
    if region is None:
        return decide(count_votes(index, inputs.n_labels))
    if features == "mind":
        from cmmas.nn.mind import FUSION, descriptors  # TensorFlow: imported only when asked for

        described = descriptors(np.concatenate([target[None], images]), **FUSION)
        target, images = described[0], described[1:]
    options = dict(rad=int(rad), search=int(r_search), beta=float(beta), rho=float(rho))
    if engine == "ants":
        label_index, posterior = _ants_jlf(index, images, target, region, inputs.codes, **options)
    else:
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
    label_index = index_of(segmentation, codes, "JLF output").astype(np.intp)
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
