"""Fusions that compare MIND-SSC descriptors (jlf_mind, lwv_mind) instead of intensities."""

import numpy as np
import pytest

from cmmas.errors import CmmasError
from cmmas.fuse.registry import fuse, fuse_named
from phantom_data import SPHERE_CODES as CODES
from phantom_data import nested_spheres


def _atlases():
    """A target, and three atlases: the first placed right, two others 2 voxels off the same way
    (they outvote it), each image with its own noise; and the voxels where they disagree."""
    label, image = nested_spheres(shape=(24, 24, 24), seed=5)
    rng = np.random.default_rng(7)
    shifts = [(0, 0, 0), (2, 0, 0), (2, 0, 0)]
    labels = np.stack([np.roll(label, s, (0, 1, 2)) for s in shifts])
    images = np.stack([np.roll(image, s, (0, 1, 2)) + rng.normal(0, 0.02, image.shape) for s in shifts])
    return label, image, labels, images.astype(np.float32), labels[0] != labels[1]


@pytest.mark.parametrize("mind, raw", [("jlf_mind", "jlf_tf"), ("lwv_mind", "lwv")])
def test_an_atlas_of_another_contrast_is_weighed_as_before(mind, raw):
    label, target, labels, images, disputed = _atlases()
    remapped = images.copy()
    remapped[0] = (images[0] - 0.45) ** 2  # non-monotone: the outer shell turns darker than both neighbours

    def right(name, atlas_images):
        fused = fuse_named(name, target, atlas_images, labels, CODES)
        return np.mean(fused.label[disputed] == label[disputed]), fused.probabilities

    assert right("mv", images)[0] == 0.0  # the two misplaced atlases outvote the right one
    before, p_before = right(mind, images)
    after, p_after = right(mind, remapped)
    assert before == after == 1.0
    assert np.abs(p_after - p_before).mean() < 0.01
    raw_before, _ = right(raw, images)
    raw_after, _ = right(raw, remapped)
    assert raw_before == 1.0 and raw_after < 0.9  # intensities no longer tell the right atlas


def test_mind_features_need_the_tensorflow_engine_and_lwv():
    label, target, labels, images, _ = _atlases()
    with pytest.raises(CmmasError, match="features"):
        fuse("jlf", labels, CODES, images, target, features="mind")
    with pytest.raises(CmmasError, match="local only"):
        fuse("global", labels, CODES, images, target, similarity="mind")
