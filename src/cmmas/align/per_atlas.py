"""Each atlas's own affine correction to the target, on the working grid.

The target reaches the working grid through one alignment to the atlas set's reference, and the
atlases through theirs; when the target's alignment is off, every atlas is off together and no
fusion can save it. Registering each atlas to the target on the working grid (ANTs's affine
stage alone, mutual information, from the identity) gives every atlas its own chance: a local
optimum that traps one atlas costs one vote, not all of them (multi-atlas segmentation is robust
exactly when its atlases fail independently).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from cmmas.align import ants
from cmmas.io import Geometry, Image


@dataclasses.dataclass(frozen=True)
class AtlasCorrection:
    """The atlases after their own affine stage.

    Attributes:
        images: ``[N, D, H, W]`` float32 atlas images on the working grid.
        labels: ``[N, D, H, W]`` int32 atlas labels (codes) on the working grid.
        seconds: wall time of the N registrations.
    """

    images: np.ndarray
    labels: np.ndarray
    seconds: float


def correct_atlases(images: np.ndarray, labels: np.ndarray, target: Image, geometry: Geometry,
                    seed: int = 0) -> AtlasCorrection:
    """Register every atlas affinely onto the target, both on the working grid.

    Args:
        images: ``[N, D, H, W]`` atlas images on ``geometry``.
        labels: ``[N, D, H, W]`` integer atlas labels on ``geometry``.
        target: the aligned target on the working grid (``geometry``).
        geometry: the working grid.
        seed: ANTs's sampling seed (deterministic with one ITK thread:
            :func:`cmmas.align.ants.set_threads`).

    Returns:
        :class:`AtlasCorrection`; the images warped linearly, the labels with generic-label
        interpolation.
    """
    start = time.perf_counter()
    warped_images, warped_labels = [], []
    for image, label in zip(images, labels):
        reg = ants.register(Image(np.asarray(image, np.float32), geometry), target, kind="affine_only", seed=seed,
                            fast=True, moving_label=Image(np.asarray(label, np.int32), geometry))
        warped_images.append(reg.warped.array)
        warped_labels.append(reg.warped_label.array)
        reg.cleanup()
    return AtlasCorrection(images=np.stack(warped_images).astype(np.float32),
                           labels=np.stack(warped_labels).astype(np.int32),
                           seconds=time.perf_counter() - start)
