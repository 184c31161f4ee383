"""Every fusion by name: the one door through which ``segment`` and ``evaluate`` fuse.

Two levels of names:

* *methods* (:data:`METHODS`): the algorithms of :func:`fuse` with all their options
  (``mv``, ``global``, ``lwv``, ``staple``, ``jlf``, ``jlf_tf``, ``weighted``);
* *fusions* (:func:`names`): what users choose (``cmmas segment --fusion``, the ``--methods``
  of the evaluation): the learned fusions of :data:`LEARNED`, each needing a trained network
  (``"simnet"``: the SimNet-weighted vote, :mod:`cmmas.fuse.simnet`; ``"dlf"``: Deep Label
  Fusion, :mod:`cmmas.fuse.dlf`; ``"unet"``: the plain U-Net baseline, which segments the target
  alone), and the presets of :data:`PRESETS`, each a method with set options. :func:`fuse_named`
  fuses with one of them and is what ``segment`` and the evaluation both call.

All arrays are numpy in array order ``(z, y, x)`` on the working grid.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from cmmas.errors import CmmasError, ModelError
from cmmas.fuse.jlf import jlf
from cmmas.fuse.vote import FusionResult, fusion_result, majority_vote, staple, validate_inputs, weighted_vote
from cmmas.fuse.weights import global_vote, local_vote

logger = logging.getLogger(__name__)

#: The SimNet-weighted vote's name.
SIMNET = "simnet"


class Learned(NamedTuple):
    """A learned fusion: the kind of network it runs (:data:`cmmas.nn.training.MODEL_KINDS`), that
    network's name in messages, the file a bundle holds it in, and the options the fusion takes."""

    kind: str
    what: str
    file: str
    options: tuple[str, ...] = ()


#: The learned fusions by name; every other fusion name is a key of :data:`PRESETS`.
LEARNED = {
    SIMNET: Learned("simnet", "SimNet", "simnet.keras", ("top_k",)),
    "dlf": Learned("dlf", "DLF", "dlf.keras"),
    "unet": Learned("unet", "U-Net", "unet.keras"),
}


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
    inputs = validate_inputs(atlas_labels, labels, atlas_images, target_image, weights)
    return fusion_result(inputs, *fn(inputs, **options))


#: Fusion methods by name. Each takes the validated inputs and its keyword-only options.
METHODS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "mv": majority_vote,
    "global": global_vote,
    "lwv": local_vote,
    "staple": staple,
    "jlf": jlf,
    "jlf_tf": functools.partial(jlf, engine="tensorflow"),
    "weighted": weighted_vote,
}


#: Named fusion set-ups: name -> (method of :func:`fuse`, its options).
#: Cross-modality defaults: similarity-weighted votes use mutual information, and JLF uses
#: small patches (``rad=1, r_search=1``: seconds instead of minutes on a 96^3 grid). The
#: ``*_mind`` presets compare MIND-SSC descriptors instead of intensities (:mod:`cmmas.nn.mind`).
PRESETS: dict[str, tuple[str, dict]] = {
    "mv": ("mv", {}),
    "staple": ("staple", {}),
    "global": ("global", {"similarity": "mi"}),
    "lwv": ("lwv", {"similarity": "mi"}),
    "lwv_ncc": ("lwv", {"similarity": "ncc"}),
    "jlf": ("jlf", {"rad": 1, "r_search": 1}),
    "jlf_r2": ("jlf", {"rad": 2, "r_search": 2}),
    "jlf_tf": ("jlf_tf", {"rad": 1, "r_search": 1}),
    "lwv_mind": ("lwv", {"similarity": "mind"}),
    "jlf_mind": ("jlf_tf", {"rad": 1, "r_search": 1, "features": "mind"}),
}


def names() -> list[str]:
    """Every fusion name :func:`fuse_named` accepts: the learned fusions and the presets."""
    return [*LEARNED, *PRESETS]


def resolve(name: str, options: Mapping | None = None) -> tuple[str, dict]:
    """The :func:`fuse` method and options of a preset name, ``options`` merged over the preset's.

    Raises:
        CmmasError: unknown name.
    """
    if name not in PRESETS:
        raise CmmasError(None, f"unknown fusion {name!r}; choose one of {', '.join(names())}")
    method, preset = PRESETS[name]
    return method, {**preset, **dict(options or {})}


def check_names(fusions: Iterable[str], options: Mapping[str, Mapping] | None = None) -> None:
    """Fail early on an unknown fusion name or an option a learned fusion does not take.

    Raises:
        CmmasError: naming the first bad fusion.
    """
    for name in fusions:
        if name in LEARNED:
            allowed = LEARNED[name].options
            unknown = sorted(set((options or {}).get(name, {})) - set(allowed))
            if unknown:
                raise CmmasError(None, f"unknown option(s) {unknown} for fusion {name!r} (allowed: {list(allowed)})")
        else:
            resolve(name)


def check_model(name: str, models: Mapping | None) -> None:
    """Raise :class:`ModelError` when the fusion ``name`` is learned and ``models`` lacks its network."""
    if name in LEARNED and (models or {}).get(name) is None:
        learned = LEARNED[name]
        raise ModelError(None, f"fusion {name!r} needs a {learned.what} model (--fusion-model, or a bundle with "
                               f"{learned.file})")


def fuse_named(
    name: str,
    target: np.ndarray,
    atlas_images: np.ndarray | None,
    atlas_labels: np.ndarray,
    codes: Sequence[int],
    *,
    models: Mapping | None = None,
    batch_size: int = 2,
    options: Mapping | None = None,
) -> FusionResult:
    """Fuse warped atlases with the fusion ``name`` (one of :func:`names`).

    Args:
        name: a key of :data:`LEARNED` or of :data:`PRESETS`.
        target: ``[D, H, W]`` target image on the working grid.
        atlas_images: ``[N, D, H, W]`` warped atlas images (needed by DLF, the
            similarity-weighted presets and JLF).
        atlas_labels: ``[N, D, H, W]`` warped atlas labels (data-set codes).
        codes: label codes, the background 0 included.
        models: the trained networks of the learned fusions by fusion name (``{"simnet": ...,
            "dlf": ...}``); a learned fusion needs its own.
        batch_size: atlases per SimNet batch.
        options: options of this fusion, merged over the preset's.

    Raises:
        CmmasError: unknown name or option; ModelError: a learned fusion without its network.
    """
    options = dict(options or {})
    if name in LEARNED:
        check_names([name], {name: options})
        check_model(name, models)
        net = models[name]
        # TensorFlow: imported only when a learned fusion runs
        if name == SIMNET:
            from cmmas.fuse import simnet as simnet_fusion

            return simnet_fusion.simnet_fuse(net, target, atlas_labels, codes, batch_size=batch_size, **options)
        from cmmas.fuse import dlf

        if name == "dlf":
            return dlf.dlf_fuse(net, target, atlas_images, atlas_labels, codes)
        return dlf.unet_segment(net, target, atlas_labels, codes)
    method, kwargs = resolve(name, options)
    return fuse(method, atlas_labels, codes, atlas_images=atlas_images, target_image=target, **kwargs)


class Fused(NamedTuple):
    """One timed fusion: its :class:`FusionResult` and wall time, seconds."""

    result: FusionResult
    seconds: float

    @property
    def label(self) -> np.ndarray:
        """The fused label map ``[D, H, W]``, int32 codes."""
        return self.result.label.astype(np.int32)


def fuse_all(
    atlas_labels: np.ndarray,
    labels: Iterable[int],
    atlas_images: np.ndarray | None = None,
    target_image: np.ndarray | None = None,
    methods: Sequence[str] = ("mv", "staple", "lwv", "jlf"),
    options: Mapping[str, Mapping] | None = None,
    *,
    models: Mapping | None = None,
    batch_size: int = 2,
) -> dict[str, Fused]:
    """Fuse the atlases with each fusion of ``methods`` (:func:`fuse_named`), timed.

    Args:
        atlas_labels: ``[N, D, H, W]`` atlas labels on the target grid.
        labels: structure codes (background 0 is added when missing).
        atlas_images: ``[N, D, H, W]`` atlas images (needed by global, lwv, jlf).
        target_image: ``[D, H, W]``.
        methods: fusion names (:func:`names`).
        options: per-fusion option overrides, e.g. ``{"jlf": {"rad": 2}}``.
        models, batch_size: as :func:`fuse_named` (for the learned fusions).

    Returns:
        fusion name -> :class:`Fused`, in the order of ``methods``.
    """
    check_names(methods, options)
    codes = sorted({0} | {int(c) for c in labels})
    out = {}
    for name in methods:
        start = time.perf_counter()
        result = fuse_named(name, target_image, atlas_images, atlas_labels, codes, models=models,
                            batch_size=batch_size, options=(options or {}).get(name))
        out[name] = Fused(result, time.perf_counter() - start)
        logger.debug("fusion %s took %.2f s", name, out[name].seconds)
    return out
