"""Joint label fusion in TensorFlow: the same fusion as ANTs's, and its search and weights at work."""

import numpy as np
import pytest

from cmmas.errors import CmmasError
from cmmas.fuse.registry import fuse
from cmmas.fuse.jlf_tf import joint_label_fusion, offsets
from phantom_data import SPHERE_CODES as CODES
from phantom_data import nested_spheres as _phantom


def test_offsets_nearest_first():
    cube = offsets(1)
    assert cube.shape == (27, 3)
    np.testing.assert_array_equal(cube[0], [0, 0, 0])
    distances = (cube**2).sum(axis=1)
    assert np.all(np.diff(distances) >= 0)
    assert len({tuple(o) for o in offsets(2)}) == 125


def test_agrees_with_ants_joint_label_fusion():
    label, image = _phantom()
    shifts = [(0, 0, 0), (1, 0, 0), (0, -1, 1), (0, 0, -1), (2, 1, 0)]
    rng = np.random.default_rng(1)
    atlas_labels = np.stack([np.roll(label, s, axis=(0, 1, 2)) for s in shifts])
    atlas_images = np.stack([np.roll(image, s, axis=(0, 1, 2)) + rng.normal(0, 0.03, image.shape) for s in shifts])
    ants = fuse("jlf", atlas_labels, CODES, atlas_images, image, rad=1, r_search=1)
    ours = fuse("jlf_tf", atlas_labels, CODES, atlas_images, image, rad=1, r_search=1)
    assert np.mean(ours.label == ants.label) > 0.99
    close = np.all(np.abs(ours.probabilities - ants.probabilities) < 0.05, axis=0)
    assert np.mean(close) > 0.98


def test_search_recovers_a_one_voxel_shift():
    label, image = _phantom(seed=2)
    atlas_labels = np.stack([np.roll(label, 1, axis=0)] * 2)  # both atlases one voxel off along z
    atlas_images = np.stack([np.roll(image, 1, axis=0)] * 2)
    index = np.searchsorted(CODES, atlas_labels)
    region = np.ones(label.shape, dtype=bool)
    inner = (slice(3, -3),) * 3
    for search, expected in ((1, label), (0, atlas_labels[0])):
        votes = joint_label_fusion(atlas_images, index, image, region, len(CODES), rad=1, search=search)
        np.testing.assert_array_equal(np.asarray(CODES)[np.argmax(votes, axis=0)][inner], expected[inner])


def test_the_atlas_that_matches_the_target_gets_the_vote():
    label, image = _phantom(seed=3)
    other = np.where(label > 0, 3, 0)  # a second atlas that says 3 for the whole body
    rng = np.random.default_rng(4)
    atlas_labels = np.stack([label, other, other])
    atlas_images = np.stack([image, rng.random(image.shape), rng.random(image.shape)]).astype(np.float32)
    fused = fuse("jlf_tf", atlas_labels, CODES, atlas_images, image, rad=1, r_search=0)
    assert np.mean(fused.label[label == 7] == 7) > 0.95  # one matching atlas outvotes two others
    assert np.mean(fuse("mv", atlas_labels, CODES).label[label == 7] == 7) == 0


def test_empty_region_and_bad_radius():
    label, image = _phantom(shape=(16, 16, 16))
    index = np.searchsorted(CODES, np.stack([label, label]))
    votes = joint_label_fusion(np.stack([image, image]), index, image, np.zeros(label.shape, bool), 3, rad=1, search=1)
    assert votes.shape == (3, 16, 16, 16) and not votes.any()
    with pytest.raises(CmmasError, match="patch radius >= 1"):
        joint_label_fusion(np.stack([image, image]), index, image, label > 0, 3, rad=0, search=1)


def test_votes_do_not_depend_on_the_chunking():
    label, image = _phantom(seed=5)
    shifts = [(0, 0, 0), (1, 0, 0), (0, -1, 1)]
    atlas_images = np.stack([np.roll(image, s, axis=(0, 1, 2)) for s in shifts])
    index = np.searchsorted(CODES, np.stack([np.roll(label, s, axis=(0, 1, 2)) for s in shifts]))
    region = label > 0
    whole = joint_label_fusion(atlas_images, index, image, region, len(CODES), rad=1, search=1)
    chunked = joint_label_fusion(atlas_images, index, image, region, len(CODES), rad=1, search=1, chunk_voxels=97)
    np.testing.assert_allclose(chunked, whole, atol=1e-5)
    assert whole[:, region].sum(axis=0).min() > 0  # every fused voxel got votes
