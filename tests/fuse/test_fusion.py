"""Label fusion: every method on small phantoms, tie-breaks, weights and failed atlases."""

import numpy as np
import pytest

from cmmas.errors import CmmasError, GeometryError, LabelError
from cmmas.fuse.registry import METHODS, fuse
from cmmas.fuse.weights import global_weights, local_weights
from cmmas.metrics import dice

CODES = (0, 205, 500)
FAST = {"jlf": {"rad": 1, "r_search": 1}, "jlf_tf": {"rad": 1, "r_search": 1}}


def _phantom(shape=(20, 20, 20), seed=0):
    """Nested spheres (500 outside, 205 inside) and a textured image whose contrast follows them."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    r2 = sum((c - n / 2) ** 2 for c, n in zip((z, y, x), shape))
    label = np.zeros(shape, dtype=np.int32)
    label[r2 < 49] = 500
    label[r2 < 12] = 205
    image = label / 100.0 + rng.normal(0.0, 0.3, shape)
    return label, image


def _options(method, n_atlases, shape):
    options = dict(FAST.get(method, {}))
    if method == "weighted":
        options["weights"] = np.random.default_rng(3).random((n_atlases,) + shape)
    return options


def _structure_dice(pred, truth):
    return [dice(pred == c, truth == c) for c in CODES[1:]]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_identical_atlases_return_the_atlas(method):
    label, image = _phantom()
    atlas_labels = np.stack([label] * 3)
    atlas_images = np.stack([image] * 3)
    result = fuse(method, atlas_labels, CODES, atlas_images, image, **_options(method, 3, label.shape))
    np.testing.assert_array_equal(result.label, label)
    assert result.labels == CODES
    assert result.probabilities.shape == (3,) + label.shape and result.probabilities.dtype == np.float32
    np.testing.assert_allclose(result.probabilities.sum(axis=0), 1.0, atol=1e-5)
    one_hot = np.stack([label == c for c in CODES])
    np.testing.assert_allclose(result.probabilities, one_hot, atol=1e-3)
    np.testing.assert_array_equal(result.agreement, 1.0)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_probabilities_sum_to_one_and_agreement_in_range(method):
    label, image = _phantom(seed=1)
    shifts = [(0, 0, 0), (1, 0, 0), (0, -1, 1), (0, 0, -1)]
    atlas_labels = np.stack([np.roll(label, s, axis=(0, 1, 2)) for s in shifts])
    atlas_images = np.stack([np.roll(image, s, axis=(0, 1, 2)) for s in shifts])
    result = fuse(method, atlas_labels, CODES, atlas_images, image, **_options(method, 4, label.shape))
    assert np.all(result.probabilities >= 0)
    np.testing.assert_allclose(result.probabilities.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_allclose(result.agreement * 4, np.round(result.agreement * 4), atol=1e-5)
    all_agree = np.all(atlas_labels == atlas_labels[0], axis=0)
    np.testing.assert_array_equal(result.agreement[all_agree], 1.0)
    np.testing.assert_array_equal(result.label[all_agree], atlas_labels[0][all_agree])
    assert min(_structure_dice(result.label, label)) > 0.8


def test_majority_vote_constructed_votes_and_tie_break():
    shape = (16, 16, 16)
    a = np.zeros((3,) + shape, dtype=np.int32)
    # 2 of 3 atlases say 9 in this block: majority 9, agreement 2/3
    a[0, 1:4, 1:4, 1:4] = 9
    a[1, 1:4, 1:4, 1:4] = 9
    a[2, 1:4, 1:4, 1:4] = 5
    # a block where the atlases say 5, 9 and 0 (a three-way tie everywhere): inside the
    # block the neighbourhood sums tie too, so the lowest code (0) wins
    a[0, 6:12, 6:12, 6:12] = 5
    a[1, 6:12, 6:12, 6:12] = 9
    # a 9-region with one voxel where the votes tie between 5 and 9 (and 0):
    # the neighbourhood is all 9, so 9 wins although 5 (and 0) are lower codes
    a[:, 1:6, 10:15, 1:6] = 9
    a[0, 3, 12, 3] = 5
    a[2, 3, 12, 3] = 0
    result = fuse("mv", a, [0, 5, 9])
    assert np.all(result.label[1:4, 1:4, 1:4] == 9)
    np.testing.assert_allclose(result.agreement[1:4, 1:4, 1:4], 2 / 3)
    assert np.all(result.label[7:11, 7:11, 7:11] == 0)
    np.testing.assert_allclose(result.agreement[7:11, 7:11, 7:11], 1 / 3)
    assert result.label[3, 12, 3] == 9
    np.testing.assert_allclose(result.probabilities[:, 3, 12, 3], [1 / 3, 1 / 3, 1 / 3])
    assert np.all(result.label[a.sum(axis=0) == 0] == 0)


def test_majority_vote_two_way_tie_follows_neighbourhood_then_lowest_code():
    a = np.zeros((2, 16, 16, 16), dtype=np.int32)
    a[0, 4:12, 4:12, 4:12] = 5  # atlas 0: a cube of 5, atlas 1: a cube of 9, same place
    a[1, 4:12, 4:12, 4:12] = 9
    a[0, 4:12, 4:12, 11] = 9  # ... except the last slab, where both say 9
    result = fuse("mv", a, [0, 5, 9])
    assert np.all(result.label[4:12, 4:12, 11] == 9)  # agreement
    assert np.all(result.label[5:11, 5:11, 10] == 9)  # tie next to the 9-slab: neighbourhood
    assert np.all(result.label[5:11, 5:11, 5:10] == 5)  # tie with a tied neighbourhood: lowest code
    np.testing.assert_allclose(result.agreement[5:11, 5:11, 5:11], 0.5)


def test_lwv_weights_prefer_the_identical_atlas():
    label, image = _phantom()
    shifted = np.roll(image, 2, axis=0)
    for similarity in ("ncc", "mi"):
        w = local_weights(image, np.stack([shifted, image]), similarity=similarity, sigma=2.0)
        assert w.shape == (2,) + image.shape
        np.testing.assert_allclose(w.sum(axis=0), 1.0)
        assert np.mean(w[1] > w[0]) > 0.95, similarity
        gw = global_weights(image, np.stack([shifted, image]), similarity=similarity)
        assert gw[1] > gw[0], similarity


@pytest.mark.parametrize(
    "method,options",
    [
        ("mv", {}),
        ("global", {"similarity": "mi"}),
        ("global", {"similarity": "ncc"}),
        ("lwv", {"similarity": "ncc"}),
        ("lwv", {"similarity": "mi"}),
        ("staple", {}),
        ("jlf", FAST["jlf"]),
        ("jlf_tf", FAST["jlf_tf"]),
    ],
)
def test_failed_atlas_does_not_wipe_the_target(method, options):
    label, image = _phantom(seed=2)
    shifts = [(1, 0, 0), (0, 1, 0), (0, 0, -1)]
    atlas_labels = np.stack([np.roll(label, s, axis=(0, 1, 2)) for s in shifts] + [np.zeros_like(label)])
    noisy = np.random.default_rng(5).normal(0.0, 0.3, (3,) + label.shape)
    good = [np.roll(label / 100.0, s, axis=(0, 1, 2)) + n for s, n in zip(shifts, noisy)]
    atlas_images = np.stack(good + [np.zeros_like(image)])
    result = fuse(method, atlas_labels, CODES, atlas_images, image, **options)
    assert min(_structure_dice(result.label, label)) > 0.8
    if method in ("global", "lwv"):
        ref = (local_weights if method == "lwv" else global_weights)(image, atlas_images, **options)
        assert np.all(ref[3] < ref[:3].max(axis=0))  # the failed atlas never weighs most


def test_weighted_vote_follows_the_weights():
    shape = (16, 16, 16)
    a = np.stack([np.full(shape, c, dtype=np.int32) for c in (0, 5, 5, 9)])
    w = np.ones((4,) + shape)
    w[3, :8] = 10.0  # atlas 3 dominates the first half
    result = fuse("weighted", a, [0, 5, 9], weights=w)
    assert np.all(result.label[:8] == 9) and np.all(result.label[8:] == 5)
    np.testing.assert_allclose(result.probabilities[:, 0, 0, 0], [1 / 13, 2 / 13, 10 / 13])
    # per-label weights [N, L, D, H, W]: only label 0 counts for atlas 0
    per_label = np.zeros((4, 3) + shape)
    per_label[0, 0] = 1.0
    per_label[1:, 1:] = 0.1
    assert np.all(fuse("weighted", a, [0, 5, 9], weights=per_label).label == 0)
    # top_k=1 keeps the single heaviest atlas per voxel
    w = np.ones((4,) + shape)
    w[0] = 1.5
    assert np.all(fuse("weighted", a, [0, 5, 9], weights=w, top_k=1).label == 0)
    assert np.all(fuse("weighted", a, [0, 5, 9], weights=w).label == 5)
    # all weights zero at a voxel: plain majority vote there
    assert np.all(fuse("weighted", a, [0, 5, 9], weights=np.zeros((4,) + shape)).label == 5)


def test_staple_probability_modes():
    label, image = _phantom(seed=3)
    shifts = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (3, 0, 0)]
    atlas_labels = np.stack([np.roll(label, s, axis=(0, 1, 2)) for s in shifts])
    votes = fuse("staple", atlas_labels, CODES, probabilities="votes")
    posterior = fuse("staple", atlas_labels, CODES, probabilities="confusion")
    np.testing.assert_array_equal(votes.label, posterior.label)
    np.testing.assert_allclose(votes.probabilities * 4, np.round(votes.probabilities * 4), atol=1e-5)
    np.testing.assert_allclose(posterior.probabilities.sum(axis=0), 1.0, atol=1e-5)
    most_probable = np.asarray(CODES)[np.argmax(posterior.probabilities, axis=0)]
    assert np.mean(most_probable == posterior.label) > 0.99


@pytest.mark.parametrize("method", ["jlf", "jlf_tf"])
def test_jlf_single_atlas_and_inputs_untouched(method):
    label, image = _phantom(shape=(16, 16, 16))
    atlas_labels, atlas_images = label[None].copy(), image[None].copy()
    result = fuse(method, atlas_labels, CODES, atlas_images, image, rad=1, r_search=1)
    np.testing.assert_array_equal(result.label, label)
    two = np.stack([label, np.roll(label, 1, axis=0)])
    before = two.copy()
    fuse(method, two, CODES, np.stack([image, np.roll(image, 1, axis=0)]), image, rad=1, r_search=1)
    np.testing.assert_array_equal(two, before)
    # a flat (failed) second atlas is left out: the one usable atlas decides alone
    failed = fuse(method, np.stack([label, np.zeros_like(label)]), CODES, np.stack([image, np.zeros_like(image)]),
                  image, rad=1, r_search=1)
    np.testing.assert_array_equal(failed.label, label)


def test_bad_input_raises_cmmas_errors():
    label, image = _phantom(shape=(16, 16, 16))
    atlases = np.stack([label, label])
    bad = atlases.copy()
    bad[1, 0, 0, 0] = 7
    with pytest.raises(LabelError, match=r"atlas_labels\[1\]: unknown label codes \[7\]"):
        fuse("mv", bad, CODES)
    with pytest.raises(LabelError, match="background 0"):
        fuse("mv", atlases, (205, 500))
    with pytest.raises(LabelError, match="non-integer"):
        fuse("mv", atlases + 0.5, CODES)
    with pytest.raises(GeometryError, match="target_image"):
        fuse("lwv", atlases, CODES, np.stack([image, image]), image[:-1])
    with pytest.raises(GeometryError, match="weights"):
        fuse("weighted", atlases, CODES, weights=np.ones((3, 16, 16, 16)))
    with pytest.raises(CmmasError, match="needs atlas_images"):
        fuse("lwv", atlases, CODES)
    with pytest.raises(CmmasError, match="'jlf_tf' needs atlas_images"):
        fuse("jlf_tf", atlases, CODES)
    with pytest.raises(CmmasError, match="unknown fusion method"):
        fuse("vote", atlases, CODES)
    with pytest.raises(CmmasError, match="unknown option"):
        fuse("mv", atlases, CODES, sigma=2)
    with pytest.raises(CmmasError, match="takes no weights"):
        fuse("mv", atlases, CODES, weights=np.ones(atlases.shape))


def test_staple_when_some_labels_are_absent_from_every_atlas():
    atlas = np.zeros((12, 12, 12), np.int32)
    atlas[3:8, 3:8, 3:8] = 1
    atlases = np.stack([atlas, atlas, np.roll(atlas, 1, axis=0)])
    result = fuse("staple", atlases, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(result.label, atlas)
    np.testing.assert_allclose(result.probabilities.sum(axis=0), 1.0, atol=1e-5)
    assert result.probabilities[2:].max() < 1e-3
