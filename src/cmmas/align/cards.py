"""Model cards against atlas sets: the card of a network trained on an atlas set, and how another
atlas set differs from what a card's network was trained on.

The card itself (:class:`cmmas.nn.model_card.ModelCard`) sits with the networks and knows no atlas
set; this module relates the two, so that training writes a card from its atlas set and
segmentation refuses an atlas set its networks do not fit.
"""

from __future__ import annotations

import datetime
import os

import numpy as np

from cmmas.align.atlas_set import AtlasSet
from cmmas.align.mapping import PERCENTILES
from cmmas.errors import ModelError
from cmmas.nn.model_card import KINDS, SPACING_TOLERANCE_MM, ModelCard, flag_value

#: How an atlas set's images are brought to the networks' input range (:func:`cmmas.align.mapping.normalize`).
NORMALISATION = f"clip to the {PERCENTILES[0]:g}-{PERCENTILES[1]:g} percentiles, then min-max to [0, 1]"

#: How an oracle set's images are normalised (:func:`cmmas.datasets.oracle_roi.crop_case`, the original's).
ORACLE_NORMALISATION = "z-score over each case's own oracle box (the original cmmas's)"


def card_from_atlas_set(
    aset: AtlasSet, kind: str, atlas_modality: str | None = None, target_modality: str | None = None
) -> ModelCard:
    """The card of a network of ``kind`` (a key of :data:`cmmas.nn.model_card.KINDS`) trained on ``aset``, made now.

    Args:
        aset: the atlas set the network is trained on (its grid, labels and alignment spacing).
        kind: a key of :data:`cmmas.nn.model_card.KINDS`.
        atlas_modality, target_modality: the modalities of the training atlases and targets.

    Raises:
        ModelError: an unknown ``kind``.
    """
    if kind not in KINDS:
        raise ModelError(None, f"unknown model kind {kind!r}; expected one of {sorted(KINDS)}")
    geometry = aset.geometry
    return ModelCard(
        kind=kind,
        shape_zyx=tuple(int(n) for n in geometry.shape),
        spacing_zyx=tuple(float(s) for s in geometry.spacing_zyx),
        labels=dict(aset.labels),
        atlas_modality=atlas_modality,
        target_modality=target_modality,
        normalisation=ORACLE_NORMALISATION if aset.manifest.oracle else NORMALISATION,
        align_spacing_mm=float(aset.manifest.align_spacing_mm),
        training_set=str(aset.root.resolve()),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def mismatch(card: ModelCard, aset: AtlasSet, model: str | os.PathLike | None = None) -> str | None:
    """One line saying how ``aset`` differs from what ``card``'s network was trained on, with the remedy.

    Compared: the working-grid shape (voxels), its spacing (mm, within
    :data:`SPACING_TOLERANCE_MM`) and the label codes (names are not compared). The alignment
    spacing is not: it changes how scans are aligned, not what the network takes.

    Args:
        card: the network's card.
        aset: the atlas set the network is to run on.
        model: the model's path, named in the ``--like`` remedy (default ``MODEL``).

    Returns:
        None when ``aset`` fits, else e.g. ``the atlas set runs/set has grid 64x64x64 voxels, not
        56x48x64; spacing 4 mm, not 5 (BiRegNet trained on 56x48x64 voxels at 5 mm): prepare the
        atlas set with --shape 56,48,64 --spacing 5 --align-spacing 4, or with --like MODEL``.
    """
    geometry = aset.geometry
    differences = []
    if tuple(geometry.shape) != card.shape_zyx:
        differences.append(f"grid {'x'.join(map(str, geometry.shape))} voxels, "
                           f"not {'x'.join(map(str, card.shape_zyx))}")
    if not np.allclose(geometry.spacing_zyx, card.spacing_zyx, rtol=0.0, atol=SPACING_TOLERANCE_MM):
        differences.append(f"spacing {flag_value(geometry.spacing_zyx)} mm, not {flag_value(card.spacing_zyx)}")
    if sorted(aset.labels) != sorted(card.labels):
        differences.append(f"label codes {sorted(aset.labels)}, not {sorted(card.labels)}")
    if not differences:
        return None
    return (f"the atlas set {aset.root} has {'; '.join(differences)} ({KINDS[card.kind]} trained on {card.grid()}): "
            f"prepare the atlas set with {card.prepare_flags()}, or with --like {model or 'MODEL'}")
