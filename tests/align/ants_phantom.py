"""The two-organ phantom of the ANTs tests, in a module of its own so that a child process can
import it (test_ants' single-thread determinism test) without importing a test module."""

import numpy as np
from scipy import ndimage

from cmmas import io

SHAPE = (36, 40, 44)  # (z, y, x), 2 mm voxels
SPACING = (2.0, 2.0, 2.0)
CODES = (205, 500)  # two structures, kept as data-set codes


def rotation_z(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])


def two_organ_phantom(
    matrix: np.ndarray | None = None,
    shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
    levels: tuple[float, float, float, float] = (0.0, 100.0, 200.0, 50.0),
    noise: float = 3.0,
    seed: int = 0,
) -> tuple[io.Image, io.Image]:
    """An asymmetric body with two organs, displaced by ``x -> matrix @ (x - c) + c + shift``.

    ``levels`` are the intensities of background, body, organ 205 and organ 500, so the same
    anatomy can be imaged as another "modality".
    """
    geometry = io.Geometry.identity(SHAPE, SPACING, origin=(-10.0, 5.0, 2.0))
    z, y, x = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    points = geometry.index_to_physical(np.stack([x, y, z], axis=-1).astype(np.float64))
    centre = geometry.index_to_physical(np.array([(n - 1) / 2 for n in reversed(SHAPE)]))
    # Sample the reference anatomy at the inverse-displaced points.
    matrix = np.eye(3) if matrix is None else matrix
    rel = (points - centre - np.asarray(shift_mm)) @ np.linalg.inv(matrix).T
    px, py, pz = rel[..., 0], rel[..., 1], rel[..., 2]
    body = (px / 32) ** 2 + (py / 26) ** 2 + (pz / 24) ** 2 < 1
    organ_a = (px - 9) ** 2 + (py + 4) ** 2 + (pz - 3) ** 2 < 10.0**2
    organ_b = ((px + 12) / 9) ** 2 + ((py - 9) / 6) ** 2 + ((pz + 5) / 7) ** 2 < 1
    label = np.zeros(SHAPE, dtype=np.int16)
    label[organ_a] = CODES[0]
    label[organ_b] = CODES[1]
    image = np.full(SHAPE, levels[0], dtype=np.float32)
    image[body] = levels[1]
    image[organ_a] = levels[2]
    image[organ_b] = levels[3]
    image = ndimage.gaussian_filter(image, 0.8)
    image += np.random.default_rng(seed).normal(0.0, noise, SHAPE).astype(np.float32)
    return io.Image(image, geometry, "phantom.nii.gz"), io.Image(label, geometry, "phantom_label.nii.gz")
