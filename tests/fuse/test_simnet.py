"""SimNet: agreement target, augmentation, training, scoring and SimNet fusion.

One small SimNet (16^3, c0=8, 2 levels) is trained once per module on phantom blobs, with
exact and shifted atlas labels plus the in-graph augmentation; the tests that need a trained
network share it.
"""

import json

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from cmmas.fuse import registry
from cmmas.nn import training
from cmmas.register import augment, biregnet
from cmmas.fuse import simnet as simnet_fusion
from cmmas.fuse import pairs as training_pairs, simnet_train
from cmmas.errors import DatasetError, GeometryError, LabelError, ModelError
from cmmas.nn.layers import warp
from cmmas.nn.networks import build_biregnet

CODES = (0, 205, 500)
SIZE = 16
SHAPE = (SIZE, SIZE, SIZE)


def _phantom(rng: np.random.Generator, shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """Two ellipsoids (codes 205 left, 500 right along x) and an image that shows them."""
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    label = np.zeros(shape, np.int16)
    centre = (np.asarray(shape) - 1) / 2
    for code, side in ((205, -1), (500, 1)):
        c = centre + np.array([0.0, 0.0, side * 0.22 * shape[2]]) + rng.uniform(-1, 1, 3)
        r = rng.uniform(0.18, 0.24, 3) * shape[0]
        label[((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1] = code
    image = np.select([label == 205, label == 500], [0.6, 1.0], 0.2) + rng.normal(0, 0.05, shape)
    return ndimage.gaussian_filter(image, 0.7).astype(np.float32), label


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([2 * np.sum((a == c) & (b == c)) / (np.sum(a == c) + np.sum(b == c)) for c in CODES[1:]]))


def _edge_shift(volume: np.ndarray, shift) -> np.ndarray:
    """``out[x] = volume[clip(x - shift)]`` over the first three axes (edge padding)."""
    index = [np.clip(np.arange(n) - s, 0, n - 1) for n, s in zip(volume.shape[:3], shift)]
    return volume[np.ix_(*index)]


# ----------------------------------------------------------------------------- agreement target


def test_agreement_of_identical_labels_is_one_everywhere_including_the_border():
    _, label = _phantom(np.random.default_rng(0))
    agreement = simnet_train.agreement_target(label, label)
    assert agreement.dtype == np.float32 and agreement.shape == SHAPE
    np.testing.assert_array_equal(agreement, 1.0)


def test_agreement_of_a_shifted_label_drops_at_boundaries_only():
    _, label = _phantom(np.random.default_rng(0))
    shifted = np.roll(label, 1, axis=2)  # structures are away from the border: a plain shift
    agreement = simnet_train.agreement_target(np.stack([label, shifted]), label)
    assert agreement.shape == (2, *SHAPE)
    np.testing.assert_array_equal(agreement[0], 1.0)
    differ = shifted != label
    near = ndimage.binary_dilation(differ, np.ones((3, 3, 3), bool))
    assert differ.any()
    np.testing.assert_array_equal(agreement[1][~near], 1.0)
    assert np.all(agreement[1][near] < 1.0)
    assert np.all(agreement[1][differ] <= 26 / 27 + 1e-6)
    # A shift by one voxel leaves at least one agreeing voxel in every window.
    assert agreement[1].min() > 0


def test_agreement_map_in_graph_equals_numpy_at_the_border_too():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 3, (2, 2, 7, 8, 9))
    eye = np.eye(3, dtype=np.float32)
    in_graph = simnet_train.agreement_map(eye[a], eye[b]).numpy()[..., 0]
    np.testing.assert_allclose(in_graph, simnet_train.agreement_target(a, b), atol=1e-6)


def test_agreement_target_rejects_shapes_that_do_not_broadcast():
    with pytest.raises(GeometryError, match="agreement_target"):
        simnet_train.agreement_target(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))


# ----------------------------------------------------------------------------- augmentation


def test_integer_shift_moves_the_spatial_axes_only():
    _, label = _phantom(np.random.default_rng(2))
    one_hot = biregnet.one_hot(label[None], CODES)
    shift = (1, -2, 3)
    ddf = augment.augmentation_displacement(SHAPE, [shift], [[0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]], [1.0])
    moved = warp(one_hot, ddf, "nearest").numpy()[0]
    np.testing.assert_array_equal(moved, _edge_shift(one_hot[0], shift))
    np.testing.assert_array_equal(moved.sum(axis=-1), 1.0)
    # Channels are not mixed: the label of every voxel comes from one voxel of the input.
    np.testing.assert_array_equal(np.argmax(moved, -1), _edge_shift(np.argmax(one_hot[0], -1), shift))


def test_random_augmentation_keeps_one_hot_and_is_seeded():
    rng = np.random.default_rng(3)
    labels = np.stack([_phantom(rng)[1] for _ in range(3)])
    one_hot = tf.constant(biregnet.one_hot(labels, CODES))
    config = simnet_train.SimConfig(SHAPE, augment_probability=1.0)
    out = simnet_train.random_augmentation(one_hot, config, tf.constant([0, 1], tf.int64)).numpy()
    assert out.shape == one_hot.shape
    assert set(np.unique(out)) <= {0.0, 1.0}
    np.testing.assert_array_equal(out.sum(axis=-1), 1.0)
    assert all(np.any(out[i] != one_hot[i]) for i in range(3))
    again = simnet_train.random_augmentation(one_hot, config, tf.constant([0, 1], tf.int64)).numpy()
    np.testing.assert_array_equal(out, again)
    other = simnet_train.random_augmentation(one_hot, config, tf.constant([0, 2], tf.int64)).numpy()
    assert np.any(other != out)
    never = simnet_train.SimConfig(SHAPE, augment_probability=0.0)
    kept = simnet_train.random_augmentation(one_hot, never, tf.constant([0, 1], tf.int64)).numpy()
    np.testing.assert_array_equal(kept, one_hot)


def test_similarity_transform_scales_and_rotates_the_label():
    size = 32
    zz, yy, xx = np.meshgrid(*[np.arange(size)] * 3, indexing="ij")
    ball = (((zz - 15.5) ** 2 + (yy - 15.5) ** 2 + (xx - 15.5) ** 2) <= 7**2).astype(np.float32)
    vol = ball[None, ..., None]
    zero = [[0.0, 0.0, 0.0]]
    grown = augment.augmentation_displacement((size,) * 3, zero, zero, zero, [1.3])
    ratio = warp(vol, grown, "nearest").numpy().sum() / ball.sum()
    assert 1.3**3 * 0.85 < ratio < 1.3**3 * 1.15
    bar = np.zeros((size,) * 3, np.float32)
    bar[15:17, 15:17, 4:28] = 1  # along x
    turned = augment.augmentation_displacement((size,) * 3, zero, [[np.pi / 2, 0.0, 0.0]], zero, [1.0])
    out = warp(bar[None, ..., None], turned, "nearest").numpy()[0, ..., 0]
    extent = [np.ptp(np.nonzero(out)[k]) for k in range(3)]
    assert extent[1] > 20 and extent[2] < 4  # a rotation about the z axis turns x into y


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A SimNet trained (200 steps) on 4 phantom targets, each with one exact and one shifted atlas."""
    rng = np.random.default_rng(0)
    images, labels = zip(*[_phantom(rng) for _ in range(4)])
    warped = [np.stack([label, np.roll(label, tuple(rng.integers(-4, 5, 3)), axis=(0, 1, 2))]) for label in labels]
    pairs = training_pairs.TrainingPairs.from_arrays(np.stack(images), np.stack(labels), warped)
    config = simnet_train.SimConfig(SHAPE, c0=8, levels=2, lr=1e-2, steps=200, batch=2, steps_per_epoch=100,
                                  shift_max=4, translation_max=2.0, scale_range=(0.9, 1.1), seed=0)
    out = tmp_path_factory.mktemp("simnet")
    path = simnet_train.train(config, pairs, CODES, out, progress=False)
    return path, training.load_model(path, "simnet")


@pytest.fixture(scope="module")
def bad_atlas_case():
    """A new target, 2 exact atlases and 3 atlases shifted by 4 voxels: majority vote follows the bad."""
    image, label = _phantom(np.random.default_rng(99))
    atlases = np.stack([label] * 2 + [np.roll(label, 4, axis=2)] * 3)
    return image, label, atlases


@pytest.mark.slow
def test_train_writes_the_model_log_and_curves(trained):
    path, _ = trained
    out = path.parent
    assert path.name == simnet_train.MODEL_FILE and path.is_file()
    assert (out / "curves.png").stat().st_size > 0
    assert not (out / "backup").exists()  # removed once training completed
    assert json.loads((out / simnet_train.CONFIG_FILE).read_text())["steps"] == 200
    rows = (out / "history.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert len(rows) == 1 + 2 and {"loss", "mae"} <= set(header)
    losses = [float(r.split(",")[header.index("loss")]) for r in rows[1:]]
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_identical_atlas_gets_a_high_similarity(trained, bad_atlas_case):
    _, simnet = trained
    image, label, atlases = bad_atlas_case
    scores = simnet_fusion.score_atlases(simnet, image, atlases, CODES)
    foreground = label > 0
    assert scores[0][foreground].mean() > 0.8
    # The shifted atlases are trusted less where they claim a structure.
    wrong = (atlases[2] > 0) & (atlases[2] != label)
    assert scores[2][wrong].mean() < scores[0][foreground].mean() - 0.2


@pytest.mark.slow
def test_simnet_fusion_beats_majority_vote_when_most_atlases_are_bad(trained, bad_atlas_case):
    _, simnet = trained
    image, label, atlases = bad_atlas_case
    majority = registry.fuse("mv", atlases, CODES)
    fused = simnet_fusion.simnet_fuse(simnet, image, atlases, CODES)
    assert _dice(majority.label, label) < 0.4  # it follows the 3 bad atlases
    assert _dice(fused.label, label) > 0.7
    assert _dice(fused.label, label) > _dice(majority.label, label) + 0.3
    assert fused.labels == CODES and fused.probabilities.shape == (3, *SHAPE)
    np.testing.assert_allclose(fused.probabilities.sum(axis=0), 1.0, atol=1e-5)
    best_two = simnet_fusion.simnet_fuse(simnet, image, atlases, CODES, top_k=2)
    assert _dice(best_two.label, label) > 0.85


@pytest.mark.slow
def test_score_atlases_shape_range_and_bad_input(trained, bad_atlas_case):
    _, simnet = trained
    image, _, atlases = bad_atlas_case
    scores = simnet_fusion.score_atlases(simnet, image, atlases, CODES, batch_size=2)
    assert scores.shape == atlases.shape and scores.dtype == np.float32
    assert np.all((scores >= 0) & (scores <= 1)) and scores.min() < 0.5 < scores.max()
    np.testing.assert_allclose(scores, simnet_fusion.score_atlases(simnet, image, atlases, CODES, batch_size=5),
                               atol=1e-5)
    with pytest.raises(GeometryError):
        simnet_fusion.score_atlases(simnet, image[:8], atlases[:, :8], CODES)
    with pytest.raises(ModelError, match="label channels"):
        simnet_fusion.score_atlases(simnet, image, atlases, (0, 205))
    with pytest.raises(LabelError):
        simnet_fusion.score_atlases(simnet, image, np.full_like(atlases, 7), CODES)


@pytest.mark.slow
def test_save_and_load_give_identical_outputs(trained, bad_atlas_case, tmp_path):
    path, simnet = trained
    image, _, atlases = bad_atlas_case
    copy = training.load_model(training.save_model(simnet, tmp_path / "copy.keras"), "simnet")
    np.testing.assert_array_equal(simnet_fusion.score_atlases(copy, image, atlases, CODES),
                                  simnet_fusion.score_atlases(simnet, image, atlases, CODES))


@pytest.mark.slow
def test_init_weights_continues_from_a_trained_simnet(trained, tmp_path):
    path, simnet = trained
    image, label = _phantom(np.random.default_rng(5))
    pairs = training_pairs.TrainingPairs.from_arrays(image[None], label[None], [label[None]])
    config = simnet_train.SimConfig(SHAPE, c0=8, levels=2, lr=1e-12, steps=1, batch=1, steps_per_epoch=1)
    more = simnet_train.train(config, pairs, CODES, tmp_path / "more", progress=False, init_weights=path)
    for old, new in zip(simnet.trainable_weights, training.load_model(more, "simnet").trainable_weights):
        np.testing.assert_allclose(new.numpy(), old.numpy(), atol=1e-6)


def test_load_model_rejects_missing_files_and_other_networks(tmp_path):
    with pytest.raises(ModelError, match="model file not found"):
        training.load_model(tmp_path / "missing.keras", "simnet")
    (tmp_path / "junk.keras").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="not a loadable"):
        training.load_model(tmp_path / "junk.keras", "simnet")
    reg = training.save_model(build_biregnet((8, 8, 8), c0=2, levels=2), tmp_path / "reg.keras")
    with pytest.raises(ModelError, match="not a SimNet"):
        training.load_model(reg, "simnet")


def test_config_and_data_mismatch_are_reported(tmp_path):
    with pytest.raises(ModelError, match="SimConfig"):
        simnet_train.SimConfig(SHAPE, scale_range=(1.2, 0.9))
    _, label = _phantom(np.random.default_rng(4))
    pairs = training_pairs.TrainingPairs.from_arrays(np.zeros((1, *SHAPE)), label[None], [label[None]])
    with pytest.raises(ModelError, match="grid"):
        simnet_train.train(simnet_train.SimConfig((8, 8, 8)), pairs, CODES, tmp_path, progress=False)
    with pytest.raises(GeometryError):
        training_pairs.TrainingPairs.from_arrays(np.zeros((1, *SHAPE)), label[None], [label[None, :8]])


# ----------------------------------------------------------------------------- pair cache


class _Space:
    """The part of :class:`cmmas.align.atlas_set.AtlasSet` that generate_pairs reads, in memory."""

    def __init__(self, root, cases: dict):
        self.root = root
        self.cases = cases

    def arrays(self, ids):
        return (np.stack([self.cases[i][0] for i in ids]), np.stack([self.cases[i][1] for i in ids]))


def test_generate_pairs_caches_every_target_and_resumes(tmp_path):
    rng = np.random.default_rng(5)
    cases = {name: _phantom(rng) for name in ("ct1", "ct2", "mr1", "mr2")}
    space = _Space(tmp_path / "space", cases)
    identity = build_biregnet(SHAPE, c0=2, levels=2)  # untrained: zero fields, atlases unchanged
    cache = tmp_path / "pairs"
    paths = training_pairs.generate_pairs(identity, space, ["ct1", "ct2"], ["mr1", "mr2"], cache, CODES, progress=False)
    assert [p.name for p in paths] == ["mr1.npz", "mr2.npz"]
    with np.load(paths[0]) as data:
        assert data["warped_labels"].dtype == data["target_label"].dtype == np.int16  # codes up to 500
        np.testing.assert_array_equal(data["warped_labels"], np.stack([cases["ct1"][1], cases["ct2"][1]]))
        np.testing.assert_array_equal(data["target_label"], cases["mr1"][1])
        np.testing.assert_allclose(data["target_image"], cases["mr1"][0])
        np.testing.assert_allclose(data["warped_images"], np.stack([cases["ct1"][0], cases["ct2"][0]]), atol=1e-3)
        assert list(data["atlas_ids"]) == ["ct1", "ct2"]
    stamp = paths[0].stat().st_mtime_ns
    training_pairs.generate_pairs(identity, space, ["ct1", "ct2"], ["mr1", "mr2"], cache, CODES, progress=False)
    assert paths[0].stat().st_mtime_ns == stamp  # kept, not recomputed
    # pairs another network is to warp (a cross-fitted one) are remade, and then kept
    training_pairs.generate_pairs(identity, space, ["ct1", "ct2"], ["mr1"], cache, CODES, progress=False,
                                  made_by="reg_withhold0of2/model.keras")
    assert paths[0].stat().st_mtime_ns != stamp
    stamp = paths[0].stat().st_mtime_ns
    with np.load(paths[0]) as data:
        assert str(data["made_by"]) == "reg_withhold0of2/model.keras"
    training_pairs.generate_pairs(identity, space, ["ct1", "ct2"], ["mr1"], cache, CODES, progress=False,
                                  made_by="reg_withhold0of2/model.keras")
    assert paths[0].stat().st_mtime_ns == stamp
    # A target that is also an atlas is never its own atlas; a changed atlas list is rewritten.
    training_pairs.generate_pairs(identity, space, ["ct1", "mr1"], ["mr1"], cache, CODES, progress=False)
    with np.load(paths[0]) as data:
        assert list(data["atlas_ids"]) == ["ct1"]
    pairs = training_pairs.load_pairs(cache, images=True)
    assert pairs.target_ids == ("mr1", "mr2") and pairs.n_pairs == 3 and pairs.shape_zyx == SHAPE
    assert [w.shape for w in pairs.warped_images] == [w.shape for w in pairs.warped_labels]
    with pytest.raises(DatasetError, match="no training pairs"):
        training_pairs.load_pairs(tmp_path / "empty")
    with pytest.raises(DatasetError, match="no such pair file"):
        training_pairs.load_pairs(cache, ["mr3"])
