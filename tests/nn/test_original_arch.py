"""``arch="original"``: the original cmmas BiRegNet and SimNet (cmmas.nn.original).

The expected trainable-parameter counts are read off the original TF1 code (NanYoMy/cmmas,
proj/tf_help/layers.py): ``downsample_resnet_block(ci, co, k)`` holds ``k^3 ci co + 2 * 27 co^2``
kernel weights and 3 batch norms (``2 co`` each); the bottleneck ``conv3_block`` ``27 ci co + 2 co``;
BiRegNet's ``att_upsample_resnet_block(cg, c)`` three 1x1x1 convolutions with bias
(``cg c + c``, ``c^2 + c``, ``c^2 + c``) and two 3x3x3 convolutions with batch norm
(``2 * (27 c^2 + 2 c)``); SimNet's ``upsample_resnet_block(ci, co)`` a 3x3x3 transposed
convolution ``27 ci co`` and three batch norms and two 3x3x3 convolutions (``54 co^2``); each
head ``ddf_summand`` / ``sim_summand`` ``27 c n + n`` for ``n`` output channels.
"""

import contextlib
import re

import keras
import numpy as np
import pytest

from cmmas.errors import ModelError
from cmmas.nn.folding import inference_copy
from cmmas.nn.networks import ARCH_LEVELS, build_biregnet, build_simnet

SHAPE = (32, 32, 32)


def _down(ci, co, k=3):
    return k**3 * ci * co + 54 * co**2 + 6 * co


def _gated_up(cg, c):
    return cg * c + 56 * c**2 + 7 * c


def _additive_up(ci, co):
    return 27 * ci * co + 54 * co**2 + 6 * co


def original_biregnet_params(c0=4):
    nc = [c0 * 2**i for i in range(5)]
    encoder = _down(2, nc[0], 7) + sum(_down(nc[i], nc[i + 1]) for i in range(3)) + 27 * nc[3] * nc[4] + 2 * nc[4]
    decoder = sum(_gated_up(nc[i + 1], nc[i]) for i in range(4))
    heads = 2 * sum(27 * c * 3 + 3 for c in nc)  # U and V
    return encoder + decoder + heads


def original_simnet_params(c0=16):
    nc = [c0 * 2**i for i in range(5)]
    encoder = _down(2, nc[0], 7) + sum(_down(nc[i], nc[i + 1]) for i in range(3)) + 27 * nc[3] * nc[4] + 2 * nc[4]
    decoder = sum(_additive_up(nc[i + 1], nc[i]) for i in range(4))
    heads = sum(27 * c + 1 for c in nc)
    return encoder + decoder + heads


def _trainable(model):
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


@pytest.fixture(scope="module")
def biregnet():
    keras.utils.set_random_seed(0)
    return build_biregnet(SHAPE, c0=4, arch="original")


@pytest.fixture(scope="module")
def simnet():
    keras.utils.set_random_seed(0)
    return build_simnet(SHAPE, n_label_channels=2, c0=16, arch="original")


def _resolutions(model):
    """Distinct spatial sizes of the layer outputs (one per resolution level)."""
    return sorted({layer.output.shape[1] for layer in model.layers if len(layer.output.shape) == 5})


def test_the_original_counts_read_off_its_code():
    assert original_biregnet_params() == 249_530
    assert original_simnet_params() == 4_727_925


def test_original_biregnet_has_five_resolutions_and_the_original_parameter_count(biregnet):
    assert ARCH_LEVELS["original"] == 5
    assert _resolutions(biregnet) == [2, 4, 8, 16, 32]  # bottleneck at 1/16
    assert _trainable(biregnet) == original_biregnet_params() == 249_530
    assert sorted(lay.name for lay in biregnet.layers if re.fullmatch(r"u_head\d", lay.name)) == [
        f"u_head{i}" for i in range(5)]  # one U head per level
    gate = biregnet.get_layer("reg_up0_gate")
    assert gate.kernel.shape[-1] == 4  # one gate channel per skip channel


def test_original_simnet_has_five_resolutions_no_attention_and_the_original_parameter_count(simnet):
    assert _resolutions(simnet) == [2, 4, 8, 16, 32]
    assert _trainable(simnet) == original_simnet_params() == 4_727_925
    first = simnet.get_layer("sim_down0_in_conv")
    assert tuple(first.kernel.shape) == (7, 7, 7, 2, 16)  # target image + binary label, c0 16
    assert not [lay for lay in simnet.layers if "gate" in lay.name or "att" in lay.name]
    assert any(isinstance(lay, keras.layers.Conv3DTranspose) for lay in simnet.layers)


def test_original_networks_run_on_32_cubed_and_start_neutral(biregnet, simnet):
    rng = np.random.default_rng(0)
    image = rng.random((1, *SHAPE, 1), dtype=np.float32)
    fields = biregnet({"atlas": image, "target": image[:, ::-1]}, training=False)
    for key in ("U", "V"):
        assert tuple(fields[key].shape) == (1, *SHAPE, 3)
        assert float(np.abs(keras.ops.convert_to_numpy(fields[key])).max()) == 0.0
    label = np.eye(2, dtype=np.float32)[rng.integers(0, 2, (1, *SHAPE))]
    out = simnet({"target": image, "atlas_label": label}, training=False)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(out["similarity"]), 0.5)


@contextlib.contextmanager
def _random_heads(model, seed):
    """Random head weights inside the block (the output then depends on the input), zeros after."""
    rng = np.random.default_rng(seed)
    heads = [layer for layer in model.layers if "_head" in layer.name and layer.weights]
    for layer in heads:
        layer.set_weights([0.1 * rng.standard_normal(w.shape).astype(np.float32) for w in layer.get_weights()])
    try:
        yield
    finally:
        for layer in heads:
            layer.set_weights([np.zeros(w.shape, np.float32) for w in layer.get_weights()])


def test_original_simnet_reads_the_label_without_its_background_channel(simnet):
    rng = np.random.default_rng(1)
    image = rng.random((1, *SHAPE, 1), dtype=np.float32)
    label = np.eye(2, dtype=np.float32)[rng.integers(0, 2, (1, *SHAPE))]
    other = label.copy()
    other[..., 0] = rng.random(SHAPE)  # only the background channel changes
    flipped = label[..., ::-1].copy()  # the structure changes
    with _random_heads(simnet, 1):
        a, b, c = (keras.ops.convert_to_numpy(simnet({"target": image, "atlas_label": x}, training=False)["logits"])
                   for x in (label, other, flipped))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0


def test_original_networks_round_trip_and_fold(biregnet, simnet, tmp_path):
    rng = np.random.default_rng(2)
    image = rng.random((1, *SHAPE, 1), dtype=np.float32)
    label = np.eye(2, dtype=np.float32)[rng.integers(0, 2, (1, *SHAPE))]
    for model, inputs, key in ((biregnet, {"atlas": image, "target": image[:, ::-1]}, "U"),
                               (simnet, {"target": image, "atlas_label": label}, "logits")):
        with _random_heads(model, 3):
            before = keras.ops.convert_to_numpy(model(inputs, training=False)[key])
            path = tmp_path / f"{model.name}.keras"
            model.save(path)
            after = keras.models.load_model(path)(inputs, training=False)[key]
            folded = inference_copy(model)(inputs, training=False)[key]
        assert np.abs(before).max() > 0
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(after), before)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(folded), before, rtol=1e-4, atol=1e-5)


def test_unknown_arch_and_a_label_without_structure_are_rejected():
    with pytest.raises(ModelError, match="unknown architecture"):
        build_biregnet(SHAPE, arch="voxelmorph")
    with pytest.raises(ModelError, match="at least 2"):
        build_simnet(SHAPE, n_label_channels=1, arch="original")
    with pytest.raises(ModelError, match=r"divisible by 2\*\*\(levels-1\) = 16"):
        build_biregnet((24, 32, 32), arch="original")
