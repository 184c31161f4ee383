"""Model cards: the working grid, labels and data a network was trained on, kept beside its ``.keras`` file.

A BiRegNet or SimNet only fits an atlas set on the grid it was trained on (shape *and* spacing)
with the same label codes. The network itself records only its input shape, so training writes a
card, a JSON sidecar ``<model>.keras.json`` (:func:`card_path`), next to the model
(:func:`cmmas.nn.training.save_model`'s ``card``). Whoever copies a model copies its sidecar too
(:mod:`cmmas.bundle` copies every ``<model>.keras.*``). Models saved before cards existed have
none: :func:`read_card` gives None for them.

This module imports neither TensorFlow nor Keras: the card of a model can be read (e.g. by
``cmmas prepare-atlases --like MODEL``) without loading the network. Nor does it know atlas sets:
the card of a network trained on one, and how another differs from a card, are in
:mod:`cmmas.align.cards`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

from cmmas.errors import ModelError
from cmmas.io import atomic_write_text

#: Version of the card's JSON layout.
VERSION = 1

#: The kinds of network a card describes, and their names in messages.
KINDS = {"biregnet": "BiRegNet", "simnet": "SimNet", "dlf": "Deep Label Fusion network", "unet": "U-Net",
         "finder": "organ finder"}

#: What a registration network can be trained on: "cross", atlases x labelled scans of the
#: target modality; "atlas_only", pairs of atlas-modality scans each given a random contrast
#: (:mod:`cmmas.nn.labelmix`): no labelled scan of the target modality used.
TRAINING_PAIRS = ("cross", "atlas_only")

#: Two spacings closer than this (mm, per axis) are the same.
SPACING_TOLERANCE_MM = 1e-3


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """What a trained network was trained on.

    Attributes:
        kind: a key of :data:`KINDS`.
        shape_zyx: working-grid shape in voxels, array order ``(D, H, W)``.
        spacing_zyx: working-grid spacing in mm, array order.
        labels: label table of the training set, code -> name (background 0 excluded).
        atlas_modality: modality of the atlases ("ct" or "mr"; None when not recorded).
        target_modality: modality of the targets (None when not recorded).
        normalisation: how the images were normalised (:data:`cmmas.align.cards.NORMALISATION`).
        align_spacing_mm: isotropic spacing, mm, of the affine alignments of the training set.
        training_set: absolute path of the atlas set the network was trained on.
        created: when the card was made, ISO 8601, UTC.
        version: the card's layout version.
        atlas_count: atlases per target the network was trained with (DLF; None for the others).
        training_pairs: what a BiRegNet or SimNet was trained on (:data:`TRAINING_PAIRS`; None:
            not recorded, a card made before the zero-label mode, i.e. "cross").
    """

    kind: str
    shape_zyx: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float]
    labels: dict[int, str]
    atlas_modality: str | None
    target_modality: str | None
    normalisation: str
    align_spacing_mm: float
    training_set: str
    created: str
    version: int = VERSION
    atlas_count: int | None = None
    training_pairs: str | None = None

    def to_json(self) -> str:
        """Serialise (label codes become strings, as JSON keys must)."""
        data = dataclasses.asdict(self)
        data["labels"] = {str(code): name for code, name in self.labels.items()}
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str | os.PathLike | None = None) -> "ModelCard":
        """Parse :meth:`to_json`'s text; anything else raises :class:`ModelError` naming ``source``."""
        try:
            data = json.loads(text)
            if data.get("version") != VERSION:
                raise ModelError(source, f"model card version {data.get('version')} is not {VERSION}")
            if data["kind"] not in KINDS:
                raise ModelError(source, f"model card of unknown kind {data['kind']!r}; "
                                         f"expected one of {sorted(KINDS)}")
            if data.get("training_pairs") not in (None, *TRAINING_PAIRS):
                raise ModelError(source, f"model card training_pairs {data['training_pairs']!r} is not one of "
                                         f"{TRAINING_PAIRS}")
            shape, spacing = tuple(int(n) for n in data["shape_zyx"]), tuple(float(s) for s in data["spacing_zyx"])
            if len(shape) != 3 or len(spacing) != 3:
                raise ModelError(source, f"model card grid {shape} at {spacing} mm is not three-dimensional")
            return cls(
                kind=data["kind"],
                shape_zyx=shape,
                spacing_zyx=spacing,
                labels={int(code): str(name) for code, name in data["labels"].items()},
                atlas_modality=data["atlas_modality"],
                target_modality=data["target_modality"],
                normalisation=str(data["normalisation"]),
                align_spacing_mm=float(data["align_spacing_mm"]),
                training_set=str(data["training_set"]),
                created=str(data["created"]),
                atlas_count=None if data.get("atlas_count") is None else int(data["atlas_count"]),
                training_pairs=data.get("training_pairs"),
            )
        except ModelError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ModelError(source, f"invalid model card ({type(err).__name__}: {err})") from None

    def grid(self) -> str:
        """The working grid in words, e.g. ``56x48x64 voxels at 5 mm``."""
        return f"{'x'.join(map(str, self.shape_zyx))} voxels at {flag_value(self.spacing_zyx)} mm"

    def prepare_flags(self) -> str:
        """The ``cmmas prepare-atlases`` flags that reproduce this grid, e.g.
        ``--shape 56,48,64 --spacing 5 --align-spacing 4`` (and ``--component CODE`` for a
        one-structure model)."""
        flags = (f"--shape {','.join(map(str, self.shape_zyx))} --spacing {flag_value(self.spacing_zyx)} "
                 f"--align-spacing {self.align_spacing_mm:g}")
        return flags + (f" --component {next(iter(self.labels))}" if len(self.labels) == 1 else "")

    def check_shape(self, shape_zyx: Sequence[int], source: str | os.PathLike | None = None) -> None:
        """Raise :class:`ModelError` naming ``source`` unless ``shape_zyx`` (voxels) is the card's grid shape."""
        if tuple(shape_zyx) != self.shape_zyx:
            raise ModelError(source, f"the network's grid {tuple(shape_zyx)} is not its model card's "
                                     f"{self.shape_zyx} (the atlas set {self.training_set})")


def flag_value(values: Sequence[float]) -> str:
    """Values as a flag takes them: ``5`` when all are equal, else ``5,4,4`` (``--spacing``, ``--shape``)."""
    return f"{values[0]:g}" if len(set(values)) == 1 else ",".join(f"{v:g}" for v in values)


def card_path(model_path: str | os.PathLike) -> Path:
    """The card of a model: ``<model>.keras.json`` beside it."""
    path = Path(model_path)
    return path.with_name(path.name + ".json")


def write_card(card: ModelCard, model_path: str | os.PathLike) -> Path:
    """Write ``card`` beside ``model_path`` atomically; returns the card's path."""
    return atomic_write_text(card_path(model_path), card.to_json())


def read_card(model_path: str | os.PathLike) -> ModelCard | None:
    """The card of the model at ``model_path``; None when it has none (a model saved before cards).

    Raises:
        ModelError: the card exists but is unreadable or invalid (naming the card's file).
    """
    path = card_path(model_path)
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ModelError(path, f"unreadable model card ({err})") from None
    return ModelCard.from_json(text, path)


def require_card(model_path: str | os.PathLike) -> ModelCard:
    """:func:`read_card`, but a model without a card raises :class:`ModelError` naming the model."""
    card = read_card(model_path)
    if card is None:
        raise ModelError(model_path, f"has no model card ({card_path(model_path).name}): it was saved before models "
                                     "recorded their grid; give --shape, --spacing and --align-spacing instead")
    return card
