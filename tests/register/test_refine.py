"""Test-time refinement of atlas fields with MIND-SSC."""

import numpy as np
import pytest
from scipy import ndimage

from cmmas.datasets.phantom import tissues_and_labels
from cmmas.errors import CmmasError
from cmmas.register.apply import warp_by_fields
from cmmas.register.refine import Refinement, refine_fields

VALUES = np.linspace(0.0, 1.0, 11)


@pytest.fixture(scope="module")
def pair():
    """A target and an atlas of another contrast (tissue intensities permuted) shifted 2 voxels
    along z, and the target's eroded body (where the shift is measurable)."""
    tissue = tissues_and_labels("mr", 3, 32)[0].array
    target = ndimage.gaussian_filter(VALUES[tissue], 0.7).astype(np.float32)
    contrast = np.random.default_rng(0).permutation(VALUES)
    atlas = np.roll(ndimage.gaussian_filter(contrast[tissue], 0.7), 2, axis=0).astype(np.float32)
    return target, atlas, ndimage.binary_erosion(tissue > 0, iterations=3)


def test_recovers_a_known_shift_across_contrasts(pair):
    target, atlas, body = pair
    refined = refine_fields(target, atlas[None], None, Refinement(steps=80, scale=1.0))
    field = refined.fields[0]
    assert field[..., 0][body].mean() == pytest.approx(2.0, abs=0.6)  # atlas(x + 2) = target(x)
    assert abs(field[..., 1][body].mean()) < 0.3 and abs(field[..., 2][body].mean()) < 0.3
    assert refined.distance[1] < 0.6 * refined.distance[0]
    assert refined.folding_percent[1] <= 1.0


def test_starts_from_the_given_field_and_zero_steps_change_nothing(pair):
    target, atlas, _ = pair
    start = np.zeros((1, *target.shape, 3), np.float32)
    start[..., 0] = 2.0
    unchanged = refine_fields(target, atlas[None], start, Refinement(steps=0))
    np.testing.assert_array_equal(unchanged.fields, start)
    near = refine_fields(target, atlas[None], start, Refinement(steps=10, scale=0.5))
    assert near.distance[0] < refine_fields(target, atlas[None], None, Refinement(steps=10, scale=0.5)).distance[0]


def test_the_same_inputs_give_the_same_fields(pair):
    target, atlas, _ = pair
    settings = Refinement(steps=5, scale=0.5)
    first = refine_fields(target, np.stack([atlas, target]), None, settings).fields
    np.testing.assert_array_equal(first, refine_fields(target, np.stack([atlas, target]), None, settings).fields)


def test_warp_by_zero_fields_is_the_identity(pair):
    target, atlas, _ = pair
    labels = (np.stack([atlas, target]) > 0.5).astype(np.int32) * 7
    images, warped = warp_by_fields(np.stack([atlas, target]), labels, np.zeros((2, *target.shape, 3)), [0, 7])
    np.testing.assert_array_equal(images, np.stack([atlas, target]))
    np.testing.assert_array_equal(warped, labels)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(CmmasError, match="steps >= 0"):
        Refinement(steps=-1)
