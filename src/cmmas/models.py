"""The trained networks a segmentation runs: which learned fusion a model file serves, loading
BiRegNet and the fusions' networks once, and checking them against the atlas set they are to
segment with (grid, label table, a DLF's atlas count), before the first scan is read where possible.

A network is named by its kind (:data:`cmmas.nn.training.MODEL_KINDS`): from its model card
without TensorFlow, else from the loaded network's inputs and outputs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cmmas.align import cards
from cmmas.align.atlas_set import AtlasSet
from cmmas.errors import ModelError
from cmmas.fuse import registry
from cmmas.nn import model_card


#: A DLF network fuses between this fraction and this multiple of the atlases per target it was
#: trained with (its voting weights are normalised over the atlases given).
DLF_ATLAS_RANGE = (0.5, 4.0)


def _kind_of(model) -> str:
    """The kind of a loaded cmmas network (:data:`cmmas.nn.training.MODEL_KINDS`)."""
    from cmmas.nn import training

    for kind in training.MODEL_KINDS:
        try:
            training.check_kind(model, kind)
            return kind
        except ModelError:
            continue
    raise ModelError(model.name, "not a network of cmmas (BiRegNet, SimNet, DLF or U-Net)")


def learned_models(fusion_model) -> dict:
    """The learned fusions' networks by fusion name (:data:`cmmas.fuse.registry.LEARNED`) from
    ``fusion_model``: None (none), a mapping fusion name -> network or ``.keras`` path, one
    network or path, whose fusion is its kind (from its model card, else by loading it), or a
    list or tuple of those.

    Raises:
        ModelError: an unknown fusion name, a missing or unloadable file, or a network of no
            learned fusion's kind.
    """
    if fusion_model is None:
        return {}
    if isinstance(fusion_model, (list, tuple)):
        found = {}
        for model in fusion_model:
            for name, net in learned_models(model).items():
                if name in found:
                    raise ModelError(None, f"two networks for the fusion {name!r}")
                found[name] = net
        return found
    if isinstance(fusion_model, Mapping):
        unknown = sorted(set(fusion_model) - set(registry.LEARNED))
        if unknown:
            raise ModelError(None, f"no learned fusion named {unknown}; expected some of {sorted(registry.LEARNED)}")
        return {name: m for name, m in fusion_model.items() if m is not None}
    if isinstance(fusion_model, (str, os.PathLike)):
        if not Path(fusion_model).is_file():
            raise ModelError(fusion_model, "fusion model file not found")
        card = model_card.read_card(fusion_model)
        if card is not None:
            kind = card.kind
        else:
            from cmmas.nn import training  # TensorFlow: imported only to read a card-less network

            kind = _kind_of(training.load_model(fusion_model))
    else:
        kind = _kind_of(fusion_model)
    names = [name for name, learned in registry.LEARNED.items() if learned.kind == kind]
    if not names:
        raise ModelError(fusion_model if isinstance(fusion_model, (str, os.PathLike)) else None,
                         f"a {model_card.KINDS.get(kind, kind)} is not a fusion network")
    return {names[0]: fusion_model}


def _label_channels(net, kind: str) -> int:
    if kind == "simnet":
        return int(net.input["atlas_label"].shape[-1])
    return int(net.output["probabilities"].shape[-1])


def load_models(reg_model, fusion_models: Mapping | None, aset: AtlasSet):
    """``(BiRegNet, {fusion name: network})`` loaded from paths (objects pass through; a None
    BiRegNet stays None), each checked against the atlas set's working grid and label table (by its
    model card, naming the flags that would fit, before the network loads; else by its shape).

    Args:
        reg_model: a BiRegNet or its path, or None.
        fusion_models: the learned fusions' networks or paths by fusion name (:func:`learned_models`;
            None: none).

    Raises:
        ModelError: a missing or unloadable file, or a model that does not fit the atlas set.
    """
    fusion_models = dict(fusion_models or {})
    shape = tuple(aset.geometry.shape)
    named = [(reg_model, "BiRegNet"), *((m, registry.LEARNED[n].what) for n, m in fusion_models.items())]
    for model, what in named:
        if isinstance(model, (str, os.PathLike)):  # before TensorFlow is imported
            if not Path(model).is_file():
                raise ModelError(model, f"{what} model file not found")
            card = model_card.read_card(model)
            problem = card and cards.mismatch(card, aset, model)
            if problem:
                raise ModelError(model, problem)
    if reg_model is None and not fusion_models:
        return None, {}
    from cmmas.nn import training  # TensorFlow: imported only when a network runs

    def load(model, kind: str):
        if model is None:
            return None, None
        where = model if isinstance(model, (str, os.PathLike)) else None
        net = training.load_model(model, kind) if where is not None else model
        if where is None:
            training.check_kind(net, kind)
        return net, where or net.name

    reg_net, where = load(reg_model, "biregnet")
    if reg_net is not None:
        found = training.input_grid(reg_net, "biregnet")
        if found != shape:
            raise ModelError(where, f"BiRegNet takes a {found} grid but the atlas set's working grid is {shape} "
                                    f"(prepare the atlas set with --shape {','.join(map(str, found))})")
    nets = {}
    for name, model in fusion_models.items():
        learned = registry.LEARNED[name]
        net, where = load(model, learned.kind)
        found = training.input_grid(net, learned.kind)
        channels = _label_channels(net, learned.kind)
        if found != shape:
            raise ModelError(where, f"{learned.what} takes a {found} grid but the atlas set's working grid is {shape}")
        if channels != len(aset.labels) + 1:
            raise ModelError(where, f"{learned.what} has {channels} label channels; the atlas set has "
                                    f"{len(aset.labels) + 1} codes {[0, *sorted(aset.labels)]}")
        nets[name] = net
    return reg_net, nets


def check_atlas_count(fusion_model, count: int) -> None:
    """Refuse a DLF network (path with a model card) for ``count`` atlases outside
    :data:`DLF_ATLAS_RANGE` of the atlases per target it was trained with.

    Raises:
        ModelError: naming the model, its training count and the range.
    """
    if not isinstance(fusion_model, (str, os.PathLike)):
        return
    card = model_card.read_card(fusion_model)
    if card is None or card.atlas_count is None:
        return
    low = max(1, int(np.ceil(card.atlas_count * DLF_ATLAS_RANGE[0])))
    high = int(card.atlas_count * DLF_ATLAS_RANGE[1])
    if not low <= count <= high:
        raise ModelError(fusion_model, f"was trained with {card.atlas_count} atlases per target and fuses {low} to "
                                       f"{high}, not {count} (choose --atlases in that range, or another fusion)")


def load_finder(finder_model, aset: AtlasSet):
    """``(organ finder, its spacing in mm)`` from a ``.keras`` path (with its model card) or a
    network (at the atlas set's alignment spacing); ``(None, None)`` for None.

    Raises:
        ModelError: a missing file or card, a network that is not an organ finder, or one trained
            on another label table than the atlas set's.
    """
    if finder_model is None:
        return None, None
    from cmmas.nn import training  # TensorFlow: imported only when a finder runs

    if not isinstance(finder_model, (str, os.PathLike)):
        training.check_kind(finder_model, "finder")
        return finder_model, float(aset.manifest.align_spacing_mm)
    if not Path(finder_model).is_file():
        raise ModelError(finder_model, "organ finder model file not found")
    card = model_card.read_card(finder_model)
    if card is None or card.kind != "finder":
        raise ModelError(finder_model, "not an organ finder with its model card (experiments/train_finder.py)")
    if dict(card.labels) != dict(aset.labels):
        raise ModelError(finder_model, f"the organ finder's labels {dict(card.labels)} differ from the atlas set's "
                                       f"{dict(aset.labels)}")
    return training.load_model(finder_model, "finder"), float(card.align_spacing_mm)
