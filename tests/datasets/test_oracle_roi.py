"""The original's oracle ROI: each case cropped around its own label, stretched, and mapped back."""

import dataclasses

import numpy as np
import pytest

from cmmas.datasets import oracle_roi
from cmmas.errors import LabelError
from cmmas.io import Geometry, Image

SHAPE = (30, 34, 40)  # (z, y, x)
BOX = (24, 24, 24)  # the phantom's stand-in for the original's 96^3


def _phantom(spacing_zyx=(1.0, 1.0, 1.0), direction=None):
    """A label with two structures (500 inside, 205 a shell piece) and an image, ``SHAPE`` voxels."""
    label = np.zeros(SHAPE, dtype=np.int16)
    zz, yy, xx = np.indices(SHAPE)
    inside = ((zz - 14) / 5.0) ** 2 + ((yy - 17) / 6.0) ** 2 + ((xx - 20) / 7.0) ** 2 <= 1.0
    shell = (((zz - 14) / 6.5) ** 2 + ((yy - 17) / 7.5) ** 2 + ((xx - 20) / 8.5) ** 2 <= 1.0) & ~inside & (xx > 20)
    label[inside] = 500
    label[shell] = 205
    label[2, 2, 2] = 820  # far from the heart: outside a 500/205 box
    geometry = Geometry.identity(SHAPE, spacing_zyx, origin=(-12.0, 30.0, 5.0))
    if direction is not None:
        geometry = dataclasses.replace(geometry, direction=direction)
    image = np.random.default_rng(0).normal(100.0, 20.0, SHAPE).astype(np.float32) + 50.0 * (label > 0)
    return Image(image, geometry, "phantom_image"), Image(label, geometry, "phantom_label")


@pytest.mark.parametrize("spacing, direction", [
    ((1.0, 1.0, 1.0), None),
    ((1.5, 0.8, 1.2), None),
    ((1.0, 1.0, 1.0), (-1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0)),  # flipped and permuted axes
])
def test_a_label_survives_the_round_trip_through_its_oracle_box_exactly(spacing, direction):
    image, label = _phantom(spacing, direction)
    geometry = oracle_roi.oracle_geometry(label, codes=[500, 205], margin_mm=2.0, shape_zyx=BOX)
    cropped_image, cropped = oracle_roi.crop_case(image, label, geometry)
    assert cropped.shape == BOX and cropped_image.shape == BOX
    back = oracle_roi.label_to_original(cropped, label.geometry)
    assert back.geometry == label.geometry and back.array.dtype == label.array.dtype
    expected = np.where(label.array == 820, 0, label.array)  # outside the box: background
    np.testing.assert_array_equal(back.array, expected)


def test_the_box_is_the_structure_plus_the_margin_stretched_to_the_shape():
    _, label = _phantom()
    geometry = oracle_roi.oracle_geometry(label, codes=[500], margin_mm=3.0, shape_zyx=BOX)
    assert geometry.shape == BOX and geometry.direction_matrix.tolist() == np.eye(3).tolist()
    # 500 spans z 9..19, y 11..23, x 13..27 (voxel centres): edges -0.5 / +0.5, plus 3 mm
    extent_zyx = np.array([11 + 6, 13 + 6, 15 + 6], dtype=float)
    np.testing.assert_allclose(np.asarray(geometry.spacing_zyx) * BOX, extent_zyx)
    low_edge = np.asarray(geometry.origin) - np.asarray(geometry.spacing) / 2
    np.testing.assert_allclose(low_edge, np.array([-12.0, 30.0, 5.0]) + np.array([13, 11, 9]) - 0.5 - 3.0)


def test_the_box_is_clipped_to_the_image_and_the_crop_is_z_scored():
    image, label = _phantom()
    geometry = oracle_roi.oracle_geometry(label, margin_mm=100.0, shape_zyx=BOX)
    np.testing.assert_allclose(np.asarray(geometry.spacing_zyx) * BOX, SHAPE)  # the whole image
    cropped_image, _ = oracle_roi.crop_case(image, label, geometry)
    assert cropped_image.array.dtype == np.float32
    assert abs(float(cropped_image.array.mean())) < 1e-4
    assert abs(float(cropped_image.array.std()) - 1.0) < 1e-3


def test_a_missing_structure_is_an_error():
    _, label = _phantom()
    with pytest.raises(LabelError, match=r"none of the codes \[600\]"):
        oracle_roi.oracle_geometry(label, codes=[600])
