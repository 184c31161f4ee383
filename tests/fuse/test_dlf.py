"""Deep Label Fusion (cmmas.nn.dlf, cmmas.fuse.dlf, cmmas.fuse.dlf_train) and the U-Net baseline."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from cmmas.errors import ModelError
from cmmas.fuse import dlf, dlf_train, registry
from cmmas.fuse.pairs import TrainingPairs
from cmmas.nn import training
from cmmas.nn.dlf import MASKED_LOGIT, build_dlf, build_unet, coordinates
from cmmas.register import biregnet

SHAPE = (24, 24, 24)
CODES = (0, 1, 2)


def _ball(centre, radius) -> np.ndarray:
    grid = np.indices(SHAPE).astype(np.float32)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def _case(rng) -> tuple[np.ndarray, np.ndarray]:
    """A target: structure 1 and 2 as balls at random places; its image (1 bright, 2 grey)."""
    label = np.zeros(SHAPE, np.int16)
    label[_ball((12 + rng.integers(-2, 3), 7 + rng.integers(-1, 2), 12 + rng.integers(-2, 3)), 5)] = 1
    label[_ball((12 + rng.integers(-2, 3), 17 + rng.integers(-1, 2), 12 + rng.integers(-2, 3)), 4)] = 2
    image = 0.2 + 0.6 * (label == 1) + 0.35 * (label == 2) + rng.normal(0, 0.02, SHAPE)
    return image.astype(np.float32), label


def _grown(label: np.ndarray, code: int, voxels: int) -> np.ndarray:
    """``label`` with structure ``code`` dilated by ``voxels`` into the background."""
    grown = ndimage.binary_dilation(label == code, iterations=voxels) & (label == 0)
    return np.where(grown, code, label).astype(np.int16)


def _pairs(rng, n_targets: int, atlases) -> TrainingPairs:
    """Targets from :func:`_case`, each with the atlases ``atlases(image, label)`` gives."""
    images, labels, warped_images, warped_labels = [], [], [], []
    for _ in range(n_targets):
        image, label = _case(rng)
        stack_images, stack_labels = atlases(image, label)
        images.append(image)
        labels.append(label)
        warped_images.append(stack_images)
        warped_labels.append(stack_labels)
    return TrainingPairs.from_arrays(np.stack(images), np.stack(labels), warped_labels, warped_images=warped_images)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([2 * np.sum((a == c) & (b == c)) / (np.sum(a == c) + np.sum(b == c)) for c in CODES[1:]]))


def _one_hot(labels):
    return biregnet.one_hot(np.asarray(labels), CODES)


def test_untrained_dlf_is_the_majority_vote_for_any_number_of_atlases():
    net = build_dlf(SHAPE, len(CODES), c_vote=2, c_fine=2, vote_levels=2, fine_levels=2)
    rng = np.random.default_rng(0)
    image, label = _case(rng)
    for n in (1, 3, 5):
        atlases = np.stack([np.roll(label, k, axis=1) for k in range(n)])
        out = net({"target": image[None, ..., None], "atlas_images": np.repeat(image[None, None, ..., None], n, 1),
                   "atlas_labels": _one_hot(atlases)[None]})
        share = _one_hot(atlases).mean(0)
        np.testing.assert_allclose(out["consensus"][0], share, atol=1e-6)
        np.testing.assert_allclose(np.sum(out["weights"][0], axis=0), 1.0, atol=1e-5)
        fused = dlf.dlf_fuse(net, image, np.repeat(image[None], n, 0), atlases, CODES)
        assert np.all(share.max(-1)[..., None] == np.take_along_axis(share, np.searchsorted(CODES, fused.label)[..., None], -1))


def test_the_mask_keeps_a_label_out_of_voxels_where_no_atlas_votes_for_it():
    net = build_dlf(SHAPE, len(CODES), c_vote=2, c_fine=2, vote_levels=2, fine_levels=2)
    for level in range(2):  # the fine-tuning subnet now wants structure 2 everywhere, by far
        layer = net.get_layer(f"fine_head{level}")
        kernel, bias = layer.get_weights()
        layer.set_weights([kernel, np.array([0.0, 0.0, 50.0], np.float32)])
    rng = np.random.default_rng(1)
    image, label = _case(rng)
    atlases = np.stack([label, label])
    atlases[:, :, 12:] = np.where(atlases[:, :, 12:] == 2, 0, atlases[:, :, 12:])  # no vote for 2 in half the volume
    fused = dlf.dlf_fuse(net, image, np.stack([image, image]), atlases, CODES)
    voted = np.any(atlases == 2, axis=0)
    assert np.all(fused.label[~voted] != 2) and np.all(fused.label[voted] == 2)
    unmasked = build_dlf(SHAPE, len(CODES), c_vote=2, c_fine=2, vote_levels=2, fine_levels=2, mask=False)
    unmasked.set_weights(net.get_weights())
    assert np.all(dlf.dlf_fuse(unmasked, image, np.stack([image, image]), atlases, CODES).label == 2)
    logits = net({"target": image[None, ..., None], "atlas_images": np.stack([image, image])[None, ..., None],
                  "atlas_labels": _one_hot(atlases)[None]})["logits"][0]
    assert np.all(logits.numpy()[~voted][:, 2] == MASKED_LOGIT)


def test_coordinates_span_minus_one_to_one_along_each_axis():
    grid = coordinates((4, 3, 5))
    assert grid.shape == (4, 3, 5, 3)
    np.testing.assert_allclose(grid[0, 0, 0], [-1, -1, -1])
    np.testing.assert_allclose(grid[-1, -1, -1], [1, 1, 1])
    np.testing.assert_allclose(grid[:, 1, 2, 0], np.linspace(-1, 1, 4))


def test_histogram_shift_keeps_the_order_of_intensities_and_differs_by_seed():
    ramp = tf.reshape(tf.linspace(0.0, 1.0, 64), [1, 4, 4, 4, 1])
    first = dlf_train.histogram_shift(ramp, 0.2, tf.constant([1, 2])).numpy().ravel()
    again = dlf_train.histogram_shift(ramp, 0.2, tf.constant([1, 2])).numpy().ravel()
    other = dlf_train.histogram_shift(ramp, 0.2, tf.constant([3, 4])).numpy().ravel()
    assert np.all(np.diff(first) >= -1e-6) and first.min() >= 0 and first.max() <= 1
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 0.01
    np.testing.assert_allclose(dlf_train.histogram_shift(ramp, 0.0, tf.constant([1, 2])).numpy().ravel(),
                               ramp.numpy().ravel(), atol=1e-6)


def test_augmentation_keeps_labels_one_hot_and_atlases_with_their_labels():
    rng = np.random.default_rng(2)
    image, label = _case(rng)
    config = dlf_train.DLFConfig(kind="dlf", shape_zyx=SHAPE, jitter_probability=1.0)
    target, truth, images, labels = dlf_train.augment_batch(
        image[None, ..., None], _one_hot(label)[None], np.stack([image, image])[None, ..., None],
        _one_hot(np.stack([label, label]))[None], config, tf.constant([5, 6]))
    assert images.shape == (1, 2, *SHAPE, 1) and labels.shape == (1, 2, *SHAPE, 3)
    np.testing.assert_allclose(np.sum(labels, -1), 1.0)
    np.testing.assert_allclose(np.sum(truth, -1), 1.0)
    bright = images.numpy()[0, 0, ..., 0] > 0.6
    assert np.mean(labels.numpy()[0, 0][bright][:, 1]) > 0.9  # the moved image and label moved together


def _weights_phantom(image, label):
    """Atlas 0 (bright image): structure 1 right, structure 2 grown by 2 voxels; atlas 1 (dark
    image): the reverse. Only the atlas's image says which is which."""
    return np.stack([np.clip(image + 0.3, 0, 1), image]), np.stack([_grown(label, 2, 2), _grown(label, 1, 2)])


@pytest.mark.slow
def test_trained_voting_weights_are_label_specific():
    rng = np.random.default_rng(3)
    pairs = _pairs(rng, 6, _weights_phantom)
    config = dlf_train.DLFConfig(kind="dlf", shape_zyx=SHAPE, c_vote=4, vote_levels=2, fine_tune=False, atlases=2,
                                 lr=1e-2, steps=40, steps_per_epoch=20, augment=False, seed=1)
    net = dlf_train.build(config, len(CODES))
    trainer = dlf_train.DLFTrainer(net, config, len(CODES))
    trainer.compile(optimizer=keras.optimizers.Adam(config.lr))
    trainer.fit(dlf_train._TargetBatches(pairs, CODES, config), epochs=2, shuffle=False, verbose=0)
    image, label = _case(rng)
    images, labels = _weights_phantom(image, label)
    weights = net({"target": image[None, ..., None], "atlas_images": images[None, ..., None],
                   "atlas_labels": _one_hot(labels)[None]})["weights"].numpy()[0]
    ring1, ring2 = (labels[1] == 1) & (label == 0), (labels[0] == 2) & (label == 0)
    # where only the wrong atlas votes for a structure, its weight for that structure is low, and
    # the same atlas is trusted for the other structure: one weight per atlas could not do both
    assert weights[1, ..., 1][ring1].mean() < 0.35 and weights[0, ..., 2][ring2].mean() < 0.35
    assert weights[0, ..., 1][ring1].mean() > 0.65 and weights[1, ..., 2][ring2].mean() > 0.65


def _biased_atlases(image, label, n: int = 4, seed: int = 0):
    """Atlases as a registration across modalities leaves them: structure 1 grown by one voxel
    (every atlas), each shifted by up to a voxel."""
    rng = np.random.default_rng(int(label.sum()) + seed)
    labels = [np.roll(_grown(label, 1, 1), tuple(rng.integers(-1, 2, 3)), axis=(0, 1, 2)) for _ in range(n)]
    return np.stack([image] * n), np.stack(labels)


@pytest.fixture(scope="module")
def dlf_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dlf_run")
    pairs = _pairs(np.random.default_rng(4), 6, _biased_atlases)
    config = dlf_train.DLFConfig(kind="dlf", shape_zyx=SHAPE, c_vote=4, vote_levels=2, c_fine=8, fine_levels=3,
                                 atlases=4, lr=3e-3, steps=96, steps_per_epoch=24, seed=2)

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise RuntimeError("interrupted at epoch 2")

    with pytest.raises(RuntimeError, match="interrupted"):
        dlf_train.train(config, pairs, CODES, out, progress=False, callbacks=[Interrupt()])
    backup = sorted(p.name for p in (out / "backup").iterdir())
    path = dlf_train.train(config, pairs, CODES, out, progress=False)
    return {"out": out, "path": path, "backup": backup, "config": config}


@pytest.mark.slow
def test_train_dlf_resumes_after_a_kill(dlf_run):
    assert "latest.weights.h5" in dlf_run["backup"]
    with open(dlf_run["out"] / "history.csv") as handle:
        assert [int(line.split(",")[0]) for line in handle.readlines()[1:]] == [0, 1, 2, 3]
    assert not (dlf_run["out"] / "backup").exists()
    assert json.loads((dlf_run["out"] / "config.json").read_text())["steps"] == 96


@pytest.mark.slow
def test_a_briefly_trained_dlf_beats_majority_vote_on_held_out_targets(dlf_run):
    net = training.load_model(dlf_run["path"], "dlf")
    rng = np.random.default_rng(5)
    gains = []
    for _ in range(3):
        image, label = _case(rng)
        images, labels = _biased_atlases(image, label, seed=1)
        mv = registry.fuse_named("mv", image, images, labels, CODES).label
        fused = registry.fuse_named("dlf", image, images, labels, CODES, models={"dlf": net}).label
        gains.append(_dice(fused, label) - _dice(mv, label))
    assert np.mean(gains) > 0.03, gains  # about +0.08 measured


def test_unet_segments_the_target_alone_and_fits_its_checks():
    net = build_unet(SHAPE, len(CODES), c0=2, levels=2)
    image, label = _case(np.random.default_rng(6))
    result = dlf.unet_segment(net, image, np.stack([label]), CODES)
    assert result.label.shape == SHAPE and result.probabilities.shape == (3, *SHAPE)
    with pytest.raises(ModelError, match="label channels"):
        dlf.unet_segment(net, image, np.stack([label]), (0, 1))
    with pytest.raises(ModelError, match="not a dlf network"):
        dlf.dlf_fuse(net, image, image[None], label[None], CODES)
    with pytest.raises(ModelError, match="needs a DLF model"):
        registry.fuse_named("dlf", image, image[None], label[None], CODES)


def test_a_config_out_of_range_is_one_message():
    with pytest.raises(ModelError, match="kind must be one of"):
        dlf_train.DLFConfig(kind="vnet", shape_zyx=SHAPE)
    with pytest.raises(ModelError, match="atlases must be >= 1"):
        dlf_train.DLFConfig(kind="dlf", shape_zyx=SHAPE, atlases=0)
