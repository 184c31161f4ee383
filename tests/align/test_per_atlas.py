"""Each atlas's own affine stage onto the target: a known shift is undone."""

import numpy as np

from cmmas.align import per_atlas
from cmmas.datasets.phantom import make_subject
from cmmas.metrics import dice


def test_an_atlas_shifted_by_a_known_amount_is_moved_back_onto_the_target():
    image, label = make_subject("ct", 3, 40)
    shift = (2, -2, 1)  # voxels along (z, y, x)
    atlas_image = np.roll(image.array, shift, axis=(0, 1, 2))
    atlas_label = np.roll(label.array, shift, axis=(0, 1, 2))
    corrected = per_atlas.correct_atlases(atlas_image[None], atlas_label[None], image, image.geometry)
    assert corrected.images.shape == (1, *image.shape) and corrected.labels.dtype == np.int32
    foreground = label.array > 0
    before = dice(atlas_label > 0, foreground)
    after = dice(corrected.labels[0] > 0, foreground)
    assert before < 0.75 and after > 0.9
    assert set(np.unique(corrected.labels)) <= set(np.unique(label.array))


def test_the_correction_is_repeatable():
    image, label = make_subject("mr", 4, 32)
    atlas_image = np.roll(image.array, 1, axis=0)[None]
    atlas_label = np.roll(label.array, 1, axis=0)[None]
    first = per_atlas.correct_atlases(atlas_image, atlas_label, image, image.geometry)
    second = per_atlas.correct_atlases(atlas_image, atlas_label, image, image.geometry)
    np.testing.assert_array_equal(first.labels, second.labels)
    np.testing.assert_array_equal(first.images, second.images)
