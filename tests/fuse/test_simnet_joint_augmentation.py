"""SimNet's joint augmentation (the original's: one similarity transform for target image, target
label and atlas label, then an atlas-only shift) and the original SimNet trained and loaded back."""

import json
import math

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from cmmas.errors import ModelError  # noqa: E402
from cmmas.fuse import pairs as training_pairs, simnet_train  # noqa: E402
from cmmas.nn import training  # noqa: E402
from cmmas.nn.networks import build_simnet  # noqa: E402
from cmmas.register import biregnet  # noqa: E402

N = 16
TABLE = (0, 1)


def _blobs(n: int = 2) -> np.ndarray:
    """``[n, N, N, N]`` 0/1 ellipsoids at different centres."""
    z, y, x = np.meshgrid(*[np.arange(N)] * 3, indexing="ij")
    out = []
    for k in range(n):
        c = (7.0 + k, 8.0 - k, 7.5)
        out.append(((((z - c[0]) / 5.0) ** 2 + ((y - c[1]) / 4.0) ** 2 + ((x - c[2]) / 3.5) ** 2) <= 1))
    return np.stack(out).astype(np.int32)


def _config(**changes) -> simnet_train.SimConfig:
    base = dict(shape_zyx=(N, N, N), augment_mode="joint", augment_probability=1.0, shift_max=4,
                rotation_max=math.pi / 8, translation_max=2.0, scale_range=(0.85, 1.45))
    return simnet_train.SimConfig(**{**base, **changes})


def _inputs():
    labels = _blobs()
    image = labels[..., None].astype(np.float32)  # the target image is its label's foreground
    one_hot = biregnet.one_hot(labels, TABLE)
    return image, one_hot


def test_one_transform_moves_target_image_target_label_and_atlas_label_together():
    image, one_hot = _inputs()
    moved_image, moved_target, moved_atlas = simnet_train.joint_augmentation(
        image, one_hot, one_hot, _config(shift_max=0), tf.constant([1, 2]))
    moved_image, moved_target, moved_atlas = moved_image.numpy(), moved_target.numpy(), moved_atlas.numpy()
    assert np.abs(moved_target - one_hot).max() == 1.0  # moved
    np.testing.assert_array_equal(moved_atlas, moved_target)  # the atlas went with the target: agreement kept
    np.testing.assert_allclose(moved_target.sum(-1), 1.0)  # still one-hot
    agree = np.mean((moved_image[..., 0] > 0.5) == (moved_target[..., 1] > 0.5))
    assert agree > 0.98, agree  # the image followed its label


def test_then_the_atlas_label_alone_is_shifted_along_axes_0_and_1():
    image, one_hot = _inputs()
    config = _config(rotation_max=0.0, translation_max=0.0, scale_range=(1.0, 1.0))
    moved_image, moved_target, moved_atlas = (t.numpy() for t in simnet_train.joint_augmentation(
        image, one_hot, one_hot, config, tf.constant([5, 7])))
    np.testing.assert_allclose(moved_image, image, atol=1e-5)  # identity similarity: target untouched
    np.testing.assert_array_equal(moved_target, one_hot)
    for b in range(len(one_hot)):
        found = [(dz, dy) for dz in range(-4, 4) for dy in range(-4, 4)
                 if np.array_equal(moved_atlas[b, 6:10, 6:10, :, 1],
                                   one_hot[b, 6 - dz:10 - dz, 6 - dy:10 - dy, :, 1])]
        assert found, "the atlas label is an integer shift of itself along axes 0 and 1"
    assert np.abs(moved_atlas - one_hot).max() == 1.0


def test_probability_zero_changes_nothing_and_bad_modes_are_refused():
    image, one_hot = _inputs()
    out = simnet_train.joint_augmentation(image, one_hot, one_hot, _config(augment_probability=0.0),
                                          tf.constant([1, 1]))
    for got, expected in zip(out, (image, one_hot, one_hot)):
        np.testing.assert_array_equal(got.numpy(), expected)
    with pytest.raises(ModelError, match="augment_mode"):
        _config(augment_mode="both")
    with pytest.raises(ModelError, match="arch"):
        _config(arch="unet")


@pytest.mark.slow
def test_the_original_simnet_trains_with_joint_augmentation_and_loads_back(tmp_path):
    labels = _blobs()
    pairs = training_pairs.TrainingPairs.from_arrays(labels.astype(np.float32), labels, [labels[::-1], labels])
    config = _config(arch="original", levels=5, c0=2, steps=2, steps_per_epoch=2, batch=1)
    path = simnet_train.train(config, pairs, TABLE, tmp_path, progress=False)
    loaded = training.load_model(path, "simnet")
    assert loaded.count_params() == build_simnet((N, N, N), 2, c0=2, arch="original").count_params()
    assert loaded.count_params() != build_simnet((N, N, N), 2, c0=2).count_params()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["arch"] == "original" and saved["augment_mode"] == "joint"
