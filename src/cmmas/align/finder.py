"""Finding a scan's organs without comparing it to another scan: the organ finder
(:func:`cmmas.nn.finder.build_finder`) labels the whole scan at the alignment's coarse spacing.

The finder reads what the alignment reads (:func:`cmmas.align.target.alignment_image`: the scan
block-averaged to an isotropic ``spacing_mm``, cut to its content), scaled to [0, 1] by its
percentiles as every network input (:func:`cmmas.align.mapping.normalize`). Trained with
label-driven random contrasts (:mod:`cmmas.nn.labelmix`), it is meant to work on a modality it
has not seen labelled: its organs place the scan on the atlas set by label overlap, and its
labels are the QC's independent second opinion.

Arrays are numpy ``(z, y, x)``; probabilities ``[L, D, H, W]`` in the order of the label codes,
the background 0 first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from cmmas import preprocess
from cmmas.align import mapping
from cmmas.align.target import alignment_image
from cmmas.io import Geometry, Image, label_dtype
from cmmas.metrics import dice


#: An organ of a segmentation is doubtful when the finder's Dice with it is below this: on fold 1's
#: targets of both directions, three alignments each (docs/results.md, "The QC end to end"), 0.3
#: called 35 of the 44 organs segmented below 0.5 Dice doubtful and 10 of the 127 above 0.7 (0.2:
#: 29 of 44 and 4 of 127; 0.4: 41 of 44 and 16 of 127).
DOUBTFUL_BELOW = 0.3


@dataclasses.dataclass(frozen=True)
class FoundOrgans:
    """The finder's answer for one scan.

    Attributes:
        codes: label codes, ascending, the background 0 first.
        probabilities: ``[L, D, H, W]`` float32 per-label probabilities on ``geometry``.
        geometry: the finder's grid of the scan (:func:`finder_image`'s).
    """

    codes: tuple[int, ...]
    probabilities: np.ndarray
    geometry: Geometry

    def label(self) -> Image:
        """The arg-max label map (codes) on :attr:`geometry`."""
        codes = np.asarray(self.codes)
        return Image(codes.astype(label_dtype(codes))[np.argmax(self.probabilities, axis=0)], self.geometry)


def finder_image(image: Image, spacing_mm: float, seen: Image | None = None) -> Image:
    """A scan as the finder reads it: its alignment image at ``spacing_mm`` (isotropic, cut to its
    content), percentile-clipped and scaled to [0, 1], float32. ``seen``: the scan's alignment
    image as the caller computed it for its alignment, used when it is at ``spacing_mm``."""
    if seen is None or not np.allclose(seen.geometry.spacing, spacing_mm):
        seen = alignment_image(image, spacing_mm)
    return mapping.normalize(seen)


def pad_to_multiple(array: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[slice, ...]]:
    """``array`` padded at the end of each axis with its minimum to a multiple of ``multiple``
    voxels; returns it and the slices that cut the original back out."""
    pads = [(0, -n % multiple) for n in array.shape]
    padded = np.pad(array, pads, constant_values=array.min()) if any(p for _, p in pads) else array
    return padded, tuple(slice(0, n) for n in array.shape)


def find_organs(model, image: Image, spacing_mm: float, codes, seen: Image | None = None) -> FoundOrgans:
    """The organs of a scan (any grid, any modality) by a trained finder ``model`` (a
    :func:`cmmas.nn.finder.build_finder` network, run as its float32 inference copy) at the
    spacing it was trained at, ``codes`` its label codes with the background 0; ``seen``: the
    scan's alignment image where the caller has it (:func:`finder_image`)."""
    import keras

    from cmmas.nn.folding import inference_copy

    small = finder_image(image, spacing_mm, seen)
    pools = sum(isinstance(layer, keras.layers.MaxPooling3D) for layer in model.layers)
    padded, crop = pad_to_multiple(small.array, 2 ** pools)
    out = inference_copy(model)({"image": padded[None, ..., None]}, training=False)["probabilities"]
    probabilities = np.moveaxis(keras.ops.convert_to_numpy(out)[0][crop], -1, 0).astype(np.float32)
    return FoundOrgans(tuple(int(c) for c in codes), probabilities, small.geometry)


def doubtful(agreement: Mapping, below: float = DOUBTFUL_BELOW) -> list:
    """The keys of ``agreement`` (structure -> the finder's Dice with a segmentation, None where
    neither has it, :func:`organ_agreement`) whose Dice is below ``below``: the structures the QC
    calls doubtful."""
    return [key for key, value in agreement.items() if value is not None and value < below]


def organ_agreement(found: FoundOrgans, label: Image) -> dict[int, float | None]:
    """Per organ, the Dice between the finder's label and a segmentation ``label`` (codes, any
    grid; resampled nearest-neighbour onto the finder's grid through physical space): the QC's
    second opinion, independent of the atlases. None for an organ absent from both."""
    mine = found.label().array
    theirs = preprocess.resample(label, geometry=found.geometry, kind="label").array
    return {code: round(dice(mine == code, theirs == code), 4) if (mine == code).any() or (theirs == code).any()
            else None for code in found.codes if code}
