"""BiRegNet training and inference (cmmas.register) and its scripts.

One seeded smoke training (24^3, 2 levels, c0 4, batch 2) is shared by several tests: it is
interrupted at epoch 2 by a callback, re-run (BackupAndRestore resumes it) and finished.
"""

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from cmmas.errors import CmmasError, LabelError, ModelError
from cmmas.io import Geometry, Image, read_image, write_image
from cmmas.scripts import parse_shape

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from cmmas.nn import training

from cmmas.register import apply

from cmmas.register import augment

from cmmas.register import biregnet
from cmmas.nn.layers import warp  # noqa: E402
from cmmas.nn.losses import MindDistance, MultiScaleDice, cycle_consistency  # noqa: E402
from cmmas.metrics import dice  # noqa: E402
from cmmas.nn.networks import ARCH_LEVELS, build_biregnet  # noqa: E402
from cmmas.nn.folding import inference_copy  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
N = 24
CODES = (205, 500)
TABLE = (0, 205, 500)


def _subject(seed: int, modality: str) -> tuple[np.ndarray, np.ndarray]:
    """Two ellipsoids (codes 205, 500) at jittered positions; a non-monotone intensity per modality."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(N)] * 3, indexing="ij")
    label = np.zeros((N, N, N), np.int32)
    for code, centre, radius in ((205, (8, 8, 12), 4.5), (500, (15, 15, 12), 4.0)):
        c = np.asarray(centre) + rng.integers(-3, 4, 3)
        r = radius * rng.uniform(0.85, 1.15, 3)
        label[((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 <= 1] = code
    tone = {"ct": {0: 0.1, 205: 0.8, 500: 0.5}, "mr": {0: 0.5, 205: 0.1, 500: 0.9}}[modality]
    image = np.zeros(label.shape, np.float32)
    for code, value in tone.items():
        image[label == code] = value
    image += rng.normal(0.0, 0.03, label.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0), label


def _stack(pairs):
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


ATLASES = _stack([_subject(s, "ct") for s in (1, 2)])
TARGETS = _stack([_subject(s, "mr") for s in (3, 4)])


def _mean_dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([dice(a == c, b == c) for c in CODES]))


def _batch(n: int = 2) -> dict:
    return {
        "atlas": tf.constant(ATLASES[0][:n, ..., None]),
        "target": tf.constant(TARGETS[0][:n, ..., None]),
        "atlas_label": tf.constant(biregnet.one_hot(ATLASES[1][:n], TABLE)),
        "target_label": tf.constant(biregnet.one_hot(TARGETS[1][:n], TABLE)),
    }


def _with_constant_fields(net: keras.Model, u, v) -> keras.Model:
    """Set the level-0 head biases so that U and V are the constant vectors ``u`` and ``v``."""
    for name, value in (("u_head0", u), ("v_head0", v)):
        kernel, _ = net.get_layer(name).get_weights()
        net.get_layer(name).set_weights([kernel, np.asarray(value, np.float32)])
    return net


# ------------------------------------------------------------------------------------ basics


def test_one_hot_maps_codes_to_channels_background_first():
    labels = np.array([[0, 500], [205, 0]])
    out = biregnet.one_hot(labels, [500, 205])  # 0 omitted: still channel 0
    assert out.dtype == np.float32 and out.shape == (2, 2, 3)
    assert biregnet.label_table([500, 205]) == (0, 500, 205)
    np.testing.assert_array_equal(out.argmax(-1), [[0, 1], [2, 0]])
    np.testing.assert_array_equal(out.sum(-1), 1.0)


def test_one_hot_rejects_unknown_codes():
    with pytest.raises(LabelError, match=r"unknown label values \[7\]"):
        biregnet.one_hot(np.array([0, 205, 7]), TABLE)


def test_config_round_trips_and_validates():
    config = biregnet.RegConfig(shape_zyx=[32, 32, 32], sim_loss="dice+mi", steps=7, steps_per_epoch=3)
    data = json.loads(json.dumps(config.to_dict()))
    assert biregnet.RegConfig.from_dict(data) == config
    assert config.epochs == 3
    with pytest.raises(ModelError, match="sim_loss"):
        biregnet.RegConfig(sim_loss="ssd")
    with pytest.raises(ModelError, match="unknown fields"):
        biregnet.RegConfig.from_dict({"lr": 1e-3, "momentum": 0.9})


# ------------------------------------------------------------------------------ augmentation


def test_zero_parameter_affine_is_the_identity():
    images, labels = ATLASES[0][:2, ..., None], biregnet.one_hot(ATLASES[1][:2], TABLE)
    (out_image,), (out_label,) = augment.random_affine([images], [labels], 0.0, 0.0, 0.0, seed=(3, 4))
    np.testing.assert_array_equal(out_image.numpy(), images)
    np.testing.assert_array_equal(out_label.numpy(), labels)
    identity = augment.affine_matrix(tf.zeros([2, 3]), tf.ones([2, 3]), tf.zeros([2, 3]))
    assert not np.any(augment.affine_ddf(identity, (N, N, N)).numpy())


def test_affine_ddf_of_scaling_and_shift():
    matrix = augment.affine_matrix(tf.zeros([1, 3]), tf.constant([[1.2, 1.0, 0.5]]), tf.constant([[1.0, -2.0, 0.0]]))
    ddf = augment.affine_ddf(matrix, (4, 6, 8)).numpy()[0]
    centre = (np.array([4, 6, 8]) - 1) / 2
    z, y, x = np.meshgrid(np.arange(4), np.arange(6), np.arange(8), indexing="ij")
    np.testing.assert_allclose(ddf[..., 0], 0.2 * (z - centre[0]) + 1.0, atol=1e-5)
    np.testing.assert_allclose(ddf[..., 1], -2.0, atol=1e-6)
    np.testing.assert_allclose(ddf[..., 2], -0.5 * (x - centre[2]), atol=1e-5)


def test_random_affine_keeps_labels_one_hot_and_is_seeded():
    images, labels = ATLASES[0][:2, ..., None], biregnet.one_hot(ATLASES[1][:2], TABLE)
    (a_img,), (a_lab,) = augment.random_affine([images], [labels], 20.0, 0.2, 3.0, seed=(1, 2))
    (b_img,), (b_lab,) = augment.random_affine([images], [labels], 20.0, 0.2, 3.0, seed=(1, 2))
    (c_img,), _ = augment.random_affine([images], [labels], 20.0, 0.2, 3.0, seed=(1, 3))
    lab = a_lab.numpy()
    assert set(np.unique(lab)) == {0.0, 1.0}
    np.testing.assert_array_equal(lab.sum(-1), 1.0)
    np.testing.assert_array_equal(a_img.numpy(), b_img.numpy())
    np.testing.assert_array_equal(lab, b_lab.numpy())
    assert not np.allclose(a_img.numpy(), images, atol=1e-3)
    assert not np.allclose(a_img.numpy(), c_img.numpy(), atol=1e-3)
    # the label moves with its image: the warped image is bright where the warped label is 205
    assert a_img.numpy()[lab[..., 1] == 1].mean() > 0.6


def test_pair_dataset_is_a_function_of_seed_and_start():
    onehot_a, onehot_t = biregnet.one_hot(ATLASES[1], TABLE), biregnet.one_hot(TARGETS[1], TABLE)

    def first(seed, start, count):
        dataset = biregnet.pair_dataset(ATLASES[0], onehot_a, TARGETS[0], onehot_t, 2, seed, start)
        return [b["atlas"].numpy() for b in dataset.take(count)]

    full = first(0, 0, 3)
    assert full[0].shape == (2, N, N, N, 1)
    np.testing.assert_array_equal(first(0, 4, 1)[0], full[2])
    assert any(not np.array_equal(a, b) for a, b in zip(full, first(1, 0, 3)))


# ------------------------------------------------------------------------------------- loss


def _closed_form_dice(a: np.ndarray, b: np.ndarray, sigmas=biregnet.DICE_SIGMAS, eps=1e-5) -> float:
    """Mean soft Dice over sigmas, batch and channels of ``[B, D, H, W, L]`` (scipy blurs)."""
    scores = []
    for sigma in sigmas:
        for i in range(a.shape[0]):
            for c in range(a.shape[-1]):
                x, y = a[i, ..., c].astype(np.float64), b[i, ..., c].astype(np.float64)
                if sigma:
                    x = ndimage.gaussian_filter(x, sigma, mode="constant", truncate=3.0)
                    y = ndimage.gaussian_filter(y, sigma, mode="constant", truncate=3.0)
                scores.append((2 * np.sum(x * y) + eps) / (np.sum(x * x) + np.sum(y * y) + eps))
    return float(np.mean(scores))


def test_loss_at_initialisation_is_the_closed_form():
    config = biregnet.RegConfig(shape_zyx=(N, N, N), levels=2)
    trainer = biregnet.BiRegNetTrainer(build_biregnet((N, N, N), levels=2), config)
    batch = _batch()
    terms = {k: float(v) for k, v in trainer.pair_losses(batch).items()}
    fg_t = batch["target_label"].numpy()[..., 1:]
    fg_a = batch["atlas_label"].numpy()[..., 1:]
    expected = -2.0 * _closed_form_dice(fg_t, fg_a)  # both directions, fields are zero
    assert terms["loss"] == pytest.approx(expected, abs=1e-4)
    assert terms["sim"] == pytest.approx(expected, abs=1e-4)
    assert terms["dice"] == pytest.approx(_closed_form_dice(fg_t, fg_a, sigmas=(0,)), abs=1e-5)
    assert terms["consis"] == 0.0 and terms["smooth"] == 0.0 and terms["fold"] == 0.0


def test_loss_terms_match_the_reference_losses_for_nonzero_fields():
    config = biregnet.RegConfig(shape_zyx=(N, N, N), levels=2, sim_loss="dice+ncc", lambda_smooth=0.5)
    net = _with_constant_fields(build_biregnet((N, N, N), levels=2), [1.5, 0.0, -0.7], [-0.4, 1.0, 0.3])
    trainer = biregnet.BiRegNetTrainer(net, config)
    batch = _batch()
    terms = trainer.pair_losses(batch)
    fields = net({"atlas": batch["atlas"], "target": batch["target"]})
    u, v = fields["U"], fields["V"]
    msd = MultiScaleDice(biregnet.DICE_SIGMAS)
    a, t, la, lt = batch["atlas"], batch["target"], batch["atlas_label"], batch["target_label"]
    dice_terms = msd(lt[..., 1:], warp(la, u)[..., 1:]) + msd(la[..., 1:], warp(lt, v)[..., 1:])
    consis = cycle_consistency(t, u, v) + cycle_consistency(a, v, u)
    assert float(terms["consis"]) == pytest.approx(float(consis), rel=1e-4)
    assert float(terms["consis"]) > 0.01
    assert float(terms["smooth"]) == pytest.approx(0.0, abs=1e-6)  # constant fields
    ncc = trainer._ncc(t, warp(a, u)) + trainer._ncc(a, warp(t, v))
    assert float(terms["sim"]) == pytest.approx(float(dice_terms + ncc), rel=1e-4)
    assert float(terms["loss"]) == pytest.approx(float(terms["sim"]) + 0.1 * float(consis), rel=1e-4)


def test_mind_term_is_weighted_and_not_mistaken_for_mutual_information():
    net = _with_constant_fields(build_biregnet((N, N, N), levels=2), [1.5, 0.0, -0.7], [-0.4, 1.0, 0.3])
    batch = _batch()
    terms = {}
    for kind, weight in (("dice", 1.0), ("dice+mind", 1.0), ("dice+mind", 3.0)):
        config = biregnet.RegConfig(shape_zyx=(N, N, N), levels=2, sim_loss=kind, lambda_mind=weight)
        terms[kind, weight] = float(biregnet.BiRegNetTrainer(net, config).pair_losses(batch)["sim"])
    fields = net({"atlas": batch["atlas"], "target": batch["target"]})
    mind = MindDistance()
    a, t = batch["atlas"], batch["target"]
    expected = float(mind(t, warp(a, fields["U"])) + mind(a, warp(t, fields["V"])))
    assert expected > 0
    assert terms["dice+mind", 1.0] == pytest.approx(terms["dice", 1.0] + expected, rel=1e-4)
    assert terms["dice+mind", 3.0] == pytest.approx(terms["dice", 1.0] + 3.0 * expected, rel=1e-4)


# ------------------------------------------------------------------- training (shared run)


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            raise RuntimeError("interrupted at epoch 2")


class _Epochs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen: list[int] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.seen.append(epoch)


SMOKE = biregnet.RegConfig(shape_zyx=(N, N, N), levels=2, steps=32, steps_per_epoch=8, augment=True, seed=3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("reg_run")
    args = (SMOKE, ATLASES[0], ATLASES[1], TARGETS[0], TARGETS[1], CODES, out)
    with pytest.raises(RuntimeError, match="interrupted"):
        biregnet.train(*args, progress=False, callbacks=[_Interrupt()])
    backup_after_interrupt = sorted(p.name for p in (out / "backup").iterdir())
    resumed = _Epochs()
    path = biregnet.train(*args, progress=False, callbacks=[resumed])
    return {"out": out, "path": path, "resumed": resumed.seen, "backup": backup_after_interrupt}


@pytest.mark.slow
def test_interrupted_training_resumes_at_epoch_2(trained):
    assert "latest.weights.h5" in trained["backup"]
    assert trained["resumed"] == [2, 3]
    with open(trained["out"] / "history.csv") as handle:
        epochs = [int(line.split(",")[0]) for line in handle.readlines()[1:]]
    assert epochs == [0, 1, 2, 3]
    assert not (trained["out"] / "backup").exists()  # removed once training is complete
    assert sorted(p.name for p in (trained["out"] / "checkpoints").iterdir())[-1] == "epoch_004.weights.h5"
    assert (trained["out"] / "curves.png").stat().st_size > 0
    saved = biregnet.RegConfig.from_dict(json.loads((trained["out"] / "config.json").read_text()))
    assert saved == SMOKE


@pytest.mark.slow
def test_training_lowers_the_loss_and_raises_dice(trained):
    import csv

    with open(trained["out"] / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    model = training.load_model(trained["path"])
    before, after = [], []
    for target, target_label in zip(*TARGETS):
        _, warped, _ = apply.warp_atlases(model, ATLASES[0], ATLASES[1], target, CODES)
        before += [_mean_dice(a, target_label) for a in ATLASES[1]]
        after += [_mean_dice(w, target_label) for w in warped]
    assert np.mean(after) > np.mean(before) + 0.1


@pytest.mark.slow
def test_bfloat16_training_also_raises_dice_and_saves_a_float32_inference_network(tmp_path):
    from cmmas.nn.precision import precision_of

    config = dataclasses.replace(SMOKE, precision="mixed_bfloat16")
    path = biregnet.train(config, ATLASES[0], ATLASES[1], TARGETS[0], TARGETS[1], CODES, tmp_path, progress=False)
    model = training.load_model(path)
    assert precision_of(model) == "mixed_bfloat16" and precision_of(inference_copy(model)) == "float32"
    before, after = [], []
    for target, target_label in zip(*TARGETS):
        _, warped, _ = apply.warp_atlases(model, ATLASES[0], ATLASES[1], target, CODES)
        before += [_mean_dice(a, target_label) for a in ATLASES[1]]
        after += [_mean_dice(w, target_label) for w in warped]
    assert np.mean(after) > np.mean(before) + 0.1


@pytest.mark.slow
def test_saved_model_is_the_trained_network_and_reloads_identically(trained, tmp_path):
    model = training.load_model(trained["path"])
    inputs = {"atlas": ATLASES[0][:1, ..., None], "target": TARGETS[0][:1, ..., None]}
    out = model(inputs, training=False)
    assert np.abs(out["U"].numpy()).max() > 0.1  # trained: no longer the identity
    # the saved network equals the last checkpoint of the trainer
    config = biregnet.RegConfig.from_dict(json.loads((trained["out"] / "config.json").read_text()))
    trainer = biregnet.BiRegNetTrainer(build_biregnet((N, N, N), levels=2), config)
    schedule = keras.optimizers.schedules.ExponentialDecay(config.lr, config.decay_steps, config.decay_rate)
    trainer.compile(optimizer=keras.optimizers.Adam(schedule))
    trainer.optimizer.build(trainer.trainable_variables)
    trainer.load_weights(trained["out"] / "checkpoints" / "epoch_004.weights.h5")
    for key in ("U", "V"):
        np.testing.assert_array_equal(trainer.net(inputs, training=False)[key].numpy(), out[key].numpy())
    again = training.load_model(training.save_model(model, tmp_path / "copy.keras"))
    for key in ("U", "V"):
        np.testing.assert_array_equal(again(inputs, training=False)[key].numpy(), out[key].numpy())
    # warp_atlases' compiled pass gives the network's own field
    _, _, ddfs = apply.warp_atlases(again, ATLASES[0][:1], ATLASES[1][:1], TARGETS[0][0], CODES)
    np.testing.assert_allclose(ddfs[0], out["U"].numpy()[0], atol=1e-4)


def test_trainer_augmentation_moves_atlas_and_target_together():
    config = biregnet.RegConfig(shape_zyx=(N, N, N), levels=2, aug_rotation=20.0, aug_scale=0.2, aug_shift=3.0)
    trainer = biregnet.BiRegNetTrainer(build_biregnet((N, N, N), levels=2), config)
    trainer.compile(optimizer=keras.optimizers.Adam(1e-3))
    image, label = ATLASES[0][:2, ..., None], biregnet.one_hot(ATLASES[1][:2], TABLE)
    out = trainer._augment({"atlas": image, "target": image, "atlas_label": label, "target_label": label})
    np.testing.assert_array_equal(out["atlas"].numpy(), out["target"].numpy())
    np.testing.assert_array_equal(out["atlas_label"].numpy(), out["target_label"].numpy())
    assert np.abs(out["atlas"].numpy() - image).max() > 0.1  # it did move them


@pytest.mark.slow
def test_init_weights_starts_from_a_trained_model(trained, tmp_path, capsys):
    config = dataclasses.replace(SMOKE, steps=1, steps_per_epoch=1, lr=1e-12)
    args = (config, ATLASES[0], ATLASES[1], TARGETS[0], TARGETS[1], CODES, tmp_path / "more")
    path = biregnet.train(*args, progress=False, init_weights=trained["path"])
    # without the Keras bar (progress=False, no terminal) the epoch still shows: one line, step and Dice
    [line] = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("train_reg epoch")]
    assert line.startswith("train_reg epoch 1/1 step 1:") and " dice " in line and line.endswith(" s")
    # one step at a negligible rate: the trainable weights are the trained model's (BatchNorm's
    # moving statistics do move in that step, so compare trainable weights, not outputs)
    before = [w.numpy() for w in training.load_model(trained["path"]).trainable_weights]
    after = [w.numpy() for w in training.load_model(path).trainable_weights]
    assert any(np.abs(w).max() > 0 for w in before[-4:])
    for old, new in zip(before, after):
        np.testing.assert_allclose(new, old, atol=1e-6)
    wrong = tmp_path / "wrong.keras"
    training.save_model(build_biregnet((N, N, N), levels=3), wrong)
    with pytest.raises(ModelError, match="do not fit"):
        biregnet.train(*args[:-1], tmp_path / "wrong_run", progress=False, init_weights=wrong)


# -------------------------------------------------------------------------------- inference


def test_warp_atlases_untrained_is_the_identity_with_table_codes():
    model = build_biregnet((N, N, N), levels=2)
    images, labels, ddfs = apply.warp_atlases(model, ATLASES[0], ATLASES[1], TARGETS[0][0], CODES, batch_size=1)
    np.testing.assert_array_equal(images, ATLASES[0])
    np.testing.assert_array_equal(labels, ATLASES[1])
    assert labels.dtype == np.int32 and ddfs.shape == (2, N, N, N, 3) and not ddfs.any()


def test_warp_atlases_returns_only_table_codes_after_a_shift():
    model = _with_constant_fields(build_biregnet((N, N, N), levels=2), [0.5, -1.5, 2.25], [0.0, 0.0, 0.0])
    _, labels, ddfs = apply.warp_atlases(model, ATLASES[0], ATLASES[1], TARGETS[0][0], CODES)
    assert set(np.unique(labels)) <= set(TABLE)
    np.testing.assert_allclose(ddfs[0, N // 2, N // 2, N // 2], [0.5, -1.5, 2.25], atol=1e-5)
    with pytest.raises(LabelError):
        apply.warp_atlases(model, ATLASES[0], ATLASES[1], TARGETS[0][0], (205,))


def test_warp_atlases_pads_the_last_batch_and_traces_once():
    model = _with_constant_fields(build_biregnet((N, N, N), levels=2), [0.5, -1.5, 2.25], [0.0, 0.0, 0.0])
    images = np.concatenate([ATLASES[0], ATLASES[0][:1]])
    labels = np.concatenate([ATLASES[1], ATLASES[1][:1]])
    by_two = apply.warp_atlases(model, images, labels, TARGETS[0][0], CODES, batch_size=2)
    assert apply._compiled_warp(inference_copy(model)).experimental_get_tracing_count() == 1  # 2 + (1 padded to 2)
    by_three = apply.warp_atlases(model, images, labels, TARGETS[0][0], CODES, batch_size=3)
    for two, three in zip(by_two, by_three):
        assert len(two) == 3
        np.testing.assert_allclose(two, three, atol=1e-5)
    np.testing.assert_array_equal(apply.pad_batch(images[:1], 3), images[[0, 0, 0]])
    assert apply.pad_batch(images, 2) is images


def test_warp_atlases_rejects_wrong_shapes():
    model = build_biregnet((N, N, N), levels=2)
    with pytest.raises(CmmasError, match="target image"):
        apply.warp_atlases(model, ATLASES[0], ATLASES[1], np.zeros((N, N, 16)), CODES)


def test_load_model_errors_name_the_file(tmp_path):
    with pytest.raises(ModelError, match="missing.keras: model file not found"):
        training.load_model(tmp_path / "missing.keras")
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a zip archive")
    with pytest.raises(ModelError, match="broken.keras: not a loadable"):
        training.load_model(broken)


def _ramp_image(shape, spacing_zyx, origin) -> Image:
    z = np.arange(shape[0], dtype=np.float32)[:, None, None] * spacing_zyx[0] + origin[2]
    return Image(np.broadcast_to(z, shape).astype(np.float32), Geometry.identity(shape, spacing_zyx, origin))


def test_register_images_maps_a_constant_shift_to_millimetres_on_the_fixed_grid():
    # U = one working voxel along z: every fixed point p corresponds to moving point p + (0, 0, s_z)
    model = _with_constant_fields(build_biregnet((N, N, N), levels=2), [1.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    fixed = _ramp_image((20, 30, 30), (3.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    moving = _ramp_image((50, 50, 50), (1.5, 1.5, 1.5), (-10.0, -10.0, -10.0))
    label = moving.with_array((moving.array > 30).astype(np.int32) * 205)
    result = apply.register_images(model, moving, fixed, label)
    spacing = result["working_geometry"].spacing_zyx
    assert spacing == pytest.approx((60.0 / N,) * 3)  # the fixed image's largest extent, 60 mm
    ddf_x, ddf_y, ddf_z = (c.array for c in result["ddf_mm"])
    for image in (result["warped_image"], result["warped_label"], *result["ddf_mm"]):
        assert image.geometry == fixed.geometry
    inner = (slice(2, -2),) * 3
    np.testing.assert_allclose(ddf_z[inner], spacing[0], atol=1e-4)
    np.testing.assert_allclose(ddf_x[inner], 0.0, atol=1e-5)
    np.testing.assert_allclose(ddf_y[inner], 0.0, atol=1e-5)
    # the moving ramp is its z coordinate in mm: warped = z + shift, inside the moved region
    expected = fixed.array + spacing[0]
    np.testing.assert_allclose(result["warped_image"].array[3:-3], expected[3:-3], atol=1e-3)
    assert set(np.unique(result["warped_label"].array)) == {0, 205}
    assert result["jacobian"]["folding_percent"] == 0.0
    assert result["jacobian"]["min_det"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------- scripts


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_reg_flag_defaults_are_the_config_defaults():
    script = _load_script("train_reg")
    defaults = biregnet.RegConfig()
    for field in biregnet.RegConfig.__dataclass_fields__:
        if field == "shape_zyx":
            assert parse_shape(script.FLAGS["shape"].default) == defaults.shape_zyx
        elif field == "labelmix":  # None: 0, or 1 with --pairs atlas_only
            assert script.FLAGS["labelmix"].default is None and defaults.labelmix == 0.0
        elif field == "levels":  # None: the architecture's, which for the default one is the config's
            assert script.FLAGS["levels"].default is None
            assert ARCH_LEVELS[script.FLAGS["arch"].default] == defaults.levels
        else:
            assert script.FLAGS[field].default == getattr(defaults, field), field
    assert parse_shape("16,24,32") == (16, 24, 32)
    with pytest.raises(CmmasError, match="--shape"):
        parse_shape("9x9")


def test_scripts_help_does_not_import_tensorflow():
    code = (
        "import runpy, sys\n"
        "sys.argv = [sys.argv[1], '--help']\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print('tensorflow' in sys.modules)\n"
    )
    for script in ("experiments/train_reg.py", "experiments/register.py", "bench/bench_registration.py"):
        done = subprocess.run([sys.executable, "-c", code, str(ROOT / script)], capture_output=True, encoding="utf-8",
                              timeout=60)
        assert done.stdout.strip().splitlines()[-1] == "False", script
        assert "--model" in done.stdout or "--atlas_set" in done.stdout


def test_register_files_writes_outputs_on_the_fixed_grid(tmp_path):
    model_path = training.save_model(build_biregnet((N, N, N), levels=2), tmp_path / "net.keras")
    fixed = _ramp_image((20, 30, 30), (3.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    moving = _ramp_image((50, 50, 50), (1.5, 1.5, 1.5), (-10.0, -10.0, -10.0))
    write_image(fixed, tmp_path / "fixed.nii.gz")
    write_image(moving, tmp_path / "moving.nii.gz")
    write_image(moving.with_array((moving.array > 30).astype(np.int16) * 500), tmp_path / "label.nii.gz")
    written, stats = apply.register_files(tmp_path / "moving.nii.gz", tmp_path / "fixed.nii.gz", model_path,
                                        tmp_path / "out", moving_label=tmp_path / "label.nii.gz")
    names = sorted(p.name for p in written)
    assert names == ["ddf_x.nii.gz", "ddf_y.nii.gz", "ddf_z.nii.gz", "jacobian.json",
                     "warped_image.nii.gz", "warped_label.nii.gz"]
    warped = read_image(tmp_path / "out" / "warped_image.nii.gz")
    assert warped.geometry.matches(fixed.geometry)
    assert stats["folding_percent"] == 0.0
    assert not read_image(tmp_path / "out" / "ddf_z.nii.gz").array.any()
