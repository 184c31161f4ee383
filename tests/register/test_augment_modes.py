"""BiRegNet's two augmentations (one affine per pair, ours; one per image, the original's) and
the original architecture trained, saved and loaded back (cmmas.register)."""

import json

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from cmmas.errors import ModelError  # noqa: E402
from cmmas.nn import training  # noqa: E402
from cmmas.nn.networks import build_biregnet  # noqa: E402
from cmmas.register import augment, biregnet  # noqa: E402

N = 16
TABLE = (0, 1)


def _blob(seed: int) -> np.ndarray:
    """``[N, N, N]`` 0/1 ellipsoid at a jittered centre."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(N)] * 3, indexing="ij")
    c = 7.5 + rng.uniform(-1.5, 1.5, 3)
    return ((((z - c[0]) / 5.0) ** 2 + ((y - c[1]) / 4.0) ** 2 + ((x - c[2]) / 3.5) ** 2) <= 1).astype(np.int32)


def _trainer(mode: str, labelmix: float = 0.0) -> biregnet.BiRegNetTrainer:
    config = biregnet.RegConfig(shape_zyx=(N, N, N), levels=2, augment_mode=mode, labelmix=labelmix, seed=3)
    trainer = biregnet.BiRegNetTrainer(build_biregnet((N, N, N), levels=2), config)
    trainer.compile(optimizer=keras.optimizers.Adam(1e-3))
    return trainer


def test_corner_affine_without_moves_is_the_identity_and_maps_the_corners():
    shape = (16, 20, 24)
    identity = augment.corner_affine_matrix(tf.zeros([1, 4, 3]), shape).numpy()[0]
    np.testing.assert_allclose(identity, np.hstack([np.eye(3), np.zeros((3, 1))]), atol=1e-6)
    moves = np.random.default_rng(0).uniform(0.0, 0.1, (1, 4, 3)).astype(np.float32)
    matrix = augment.corner_affine_matrix(moves, shape).numpy()[0]
    half = (np.asarray(shape, float) - 1) / 2
    for corner, sign, move in zip(augment._CORNERS, augment._CORNER_SIGNS, moves[0]):
        voxel = np.asarray(corner) * half  # relative to the centre
        moved = matrix[:, :3] @ voxel + matrix[:, 3]
        np.testing.assert_allclose(moved, (np.asarray(corner) + np.asarray(sign) * move) * half, atol=1e-4)


@pytest.mark.parametrize("mode", ["pair", "image"])
def test_labels_follow_their_images_and_only_image_mode_moves_them_apart(mode):
    foreground = np.stack([_blob(1), _blob(2)])
    image = foreground[..., None].astype(np.float32)  # the image is the label's foreground
    label = biregnet.one_hot(foreground, TABLE)
    out = _trainer(mode)._augment({"atlas": image, "target": image, "atlas_label": label, "target_label": label})
    for side in ("atlas", "target"):
        moved_image, moved_label = out[side].numpy()[..., 0], out[f"{side}_label"].numpy()[..., 1]
        assert np.abs(moved_image - image[..., 0]).max() > 0.5  # it moved
        # the label went through the image's own transform: its foreground is where the image is > 0.5
        agree = np.mean((moved_image > 0.5) == (moved_label > 0.5))
        assert agree > 0.995, agree
    differ = np.abs(out["atlas"].numpy() - out["target"].numpy()).max()
    if mode == "pair":
        assert differ == 0.0  # one affine per pair: identical inputs stay identical
    else:
        assert differ > 0.5  # an independent affine per image


def test_labelmix_changes_each_side_s_contrast_on_its_own_and_keeps_the_labels():
    foreground = np.stack([_blob(1), _blob(2), _blob(3), _blob(4)])
    image = (0.2 + 0.6 * foreground[..., None]).astype(np.float32)
    label = biregnet.one_hot(foreground, TABLE)
    data = {"atlas": image, "target": image, "atlas_label": label, "target_label": label}
    out = _trainer("pair", labelmix=1.0)._randomise(data)
    again = _trainer("pair", labelmix=1.0)._randomise(data)
    for side in ("atlas", "target"):
        assert out[f"{side}_label"] is data[f"{side}_label"]
        assert np.array_equal(out[side].numpy(), again[side].numpy())
        assert np.abs(out[side].numpy() - image).max() > 0.2
    assert np.abs(out["atlas"].numpy() - out["target"].numpy()).max() > 0.2, "drawn independently"
    with pytest.raises(ModelError, match="labelmix must be a probability"):
        biregnet.RegConfig(labelmix=1.5)


def test_config_rejects_unknown_modes_and_architectures():
    with pytest.raises(ModelError, match="augment_mode"):
        biregnet.RegConfig(augment_mode="both")
    with pytest.raises(ModelError, match="arch"):
        biregnet.RegConfig(arch="unet")
    config = biregnet.RegConfig(arch="original", levels=5, augment_mode="image")
    assert biregnet.RegConfig.from_dict(config.to_dict()) == config


@pytest.mark.slow
def test_the_original_architecture_is_trained_saved_and_loaded_as_such(tmp_path):
    shape = (N, N, N)
    images = np.stack([_blob(s) for s in (1, 2)]).astype(np.float32)
    config = biregnet.RegConfig(shape_zyx=shape, levels=5, arch="original", augment_mode="image", steps=2,
                                steps_per_epoch=2, batch=1)
    path = biregnet.train(config, images, images.astype(np.int32), images, images.astype(np.int32), (1,), tmp_path,
                          progress=False)
    loaded = training.load_model(path, "biregnet")
    original = build_biregnet(shape, arch="original")
    assert loaded.count_params() == original.count_params() != build_biregnet(shape).count_params()
    assert sorted(w.name for w in loaded.layers) == sorted(w.name for w in original.layers)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["arch"] == "original" and saved["augment_mode"] == "image"


def test_train_reg_atlas_only_trains_without_the_target_modality_and_says_so(phantom, tmp_path):
    from scripts import run_experiment

    args = [f"--atlas_set={phantom.aset.root}", "--shape=24", "--levels=2", "--c0=4", "--steps=2",
            "--steps_per_epoch=2", "--batch=2", "--atlas_modality=ct", "--target_modality=mr", "--progress=false"]
    done = run_experiment("train_reg", *args, "--pairs=atlas_only", f"--out={tmp_path / 'reg'}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "3 ct atlases x 3 ct targets" in done.stdout and "random contrasts (labelmix 1)" in done.stdout
    card = json.loads((tmp_path / "reg" / "model.keras.json").read_text())
    assert (card["training_pairs"], card["target_modality"]) == ("atlas_only", "mr")
    assert json.loads((tmp_path / "reg" / "config.json").read_text())["labelmix"] == 1.0
    refused = run_experiment("train_reg", *args, "--pairs=atlas_only", "--labelmix=0", f"--out={tmp_path / 'no'}")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "--pairs atlas_only needs random contrasts" in refused.stderr.strip().splitlines()[-1]


def test_distinct_pairs_never_pair_a_case_with_itself():
    images = np.stack([np.full((N, N, N), k, np.float32) for k in range(3)])
    onehot = biregnet.one_hot(np.zeros((3, N, N, N), np.int32), TABLE)
    stream = biregnet.pair_dataset(images, onehot, images, onehot, batch=4, seed=0, distinct=True)
    pairs = [(int(b["atlas"][i, 0, 0, 0, 0]), int(b["target"][i, 0, 0, 0, 0])) for b in stream.take(12) for i in range(4)]
    assert all(a != t for a, t in pairs) and len(set(pairs)) == 6
