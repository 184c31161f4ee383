"""BiRegNet, SimNet, their shared blocks and the Upsample3D layer."""

import numpy as np
import pytest
import tensorflow as tf
import keras

from cmmas.errors import ModelError
from cmmas.nn.layers import ResizeDisplacement
from cmmas.nn.folding import _foldable_pairs, folded_copy, inference_copy
from cmmas.nn.blocks import Upsample3D
from cmmas.nn.networks import attention_gate, build_biregnet, build_simnet
from network_weights import randomise_weights

SHAPE = (16, 16, 24)  # non-cubic, divisible by 2**3


@pytest.fixture(scope="module")
def biregnet():
    keras.utils.set_random_seed(0)
    return build_biregnet(SHAPE, c0=2, levels=4)


@pytest.fixture(scope="module")
def simnet():
    keras.utils.set_random_seed(0)
    return build_simnet(SHAPE, n_label_channels=3, c0=2, levels=4)


def _reg_inputs(batch=2, shape=SHAPE):
    rng = np.random.default_rng(1)
    return {"atlas": rng.random((batch, *shape, 1), dtype=np.float32),
            "target": rng.random((batch, *shape, 1), dtype=np.float32)}


def _sim_inputs(batch=2, shape=SHAPE, n_labels=3):
    rng = np.random.default_rng(2)
    labels = rng.integers(0, n_labels, (batch, *shape))
    return {"target": rng.random((batch, *shape, 1), dtype=np.float32),
            "atlas_label": np.eye(n_labels, dtype=np.float32)[labels]}


def _heads(model, prefix):
    return sorted((layer for layer in model.layers if layer.name.startswith(prefix)
                   and layer.name.split("_head")[-1].isdigit()), key=lambda layer: layer.name)


def _perturb_heads(model, prefixes, seed=3):
    """Make the outputs non-trivial: random head kernels and biases (undo with _zero_heads)."""
    rng = np.random.default_rng(seed)
    for prefix in prefixes:
        for layer in _heads(model, prefix):
            layer.set_weights([0.05 * rng.standard_normal(w.shape).astype(np.float32)
                               for w in layer.get_weights()])


def _zero_heads(model, prefixes):
    for prefix in prefixes:
        for layer in _heads(model, prefix):
            layer.set_weights([np.zeros_like(w) for w in layer.get_weights()])


# ---------------------------------------------------------------------------------------- #
# Upsample3D
# ---------------------------------------------------------------------------------------- #


@pytest.mark.parametrize("factor", [1, 2, 3, 4])
@pytest.mark.parametrize("scale_values", [False, True])
def test_upsample_constant(factor, scale_values):
    x = np.full((2, 3, 4, 5, 3), 1.5, np.float32)
    y = keras.ops.convert_to_numpy(Upsample3D(factor, scale_values=scale_values)(x))
    assert y.shape == (2, 3 * factor, 4 * factor, 5 * factor, 3)
    np.testing.assert_allclose(y, 1.5 * (factor if scale_values else 1), rtol=1e-6)


@pytest.mark.parametrize("factor", [2, 4])
def test_upsample_linear_function_stays_linear_in_interior(factor):
    """f(z, y, x) = a.z + b.y + c.x + d sampled at coarse centres is reproduced exactly at
    fine centres (half-pixel convention: fine j <-> coarse (j + 0.5) / factor - 0.5)."""
    shape = (4, 5, 6)
    coef = np.array([0.7, -1.3, 2.1], np.float32)
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1)
    x = (grid @ coef + 0.25).astype(np.float32)[None, ..., None]
    y = keras.ops.convert_to_numpy(Upsample3D(factor)(x))[0, ..., 0]
    fine = [(np.arange(n * factor) + 0.5) / factor - 0.5 for n in shape]
    expected = np.stack(np.meshgrid(*fine, indexing="ij"), -1) @ coef + 0.25
    interior = tuple(slice(factor // 2, -(factor // 2)) for _ in range(3))
    np.testing.assert_allclose(y[interior], expected[interior], atol=1e-5)
    # beyond the outermost centres the value is clamped to the edge voxel's value
    np.testing.assert_allclose(y[0, 0, 0], x[0, 0, 0, 0, 0], atol=1e-6)


def test_upsample_symbolic_shape_and_config():
    layer = Upsample3D(4, scale_values=True, name="up")
    out = layer(keras.Input((2, None, 3, 5)))
    assert tuple(out.shape) == (None, 8, None, 12, 5)
    clone = Upsample3D.from_config(layer.get_config())
    assert (clone.factor, clone.scale_values, clone.name) == (4, True, "up")


@pytest.mark.parametrize("factor", [2, 4])
def test_upsample_of_a_field_agrees_with_resize_displacement(factor):
    """Both resamplers use the same half-pixel convention and voxel scaling."""
    field = np.random.default_rng(0).standard_normal((1, 3, 4, 5, 3)).astype(np.float32)
    ours = keras.ops.convert_to_numpy(Upsample3D(factor, scale_values=True)(field))
    theirs = keras.ops.convert_to_numpy(ResizeDisplacement(factor=factor)(field))
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("factor", [0, -2, 1.5])
def test_upsample_rejects_bad_factor(factor):
    with pytest.raises(ModelError, match="positive integer"):
        Upsample3D(factor)


def test_attention_gate_scales_each_voxel_by_one_coefficient_in_0_1():
    skip_in, gate_in = keras.Input((4, 4, 4, 6)), keras.Input((4, 4, 4, 5))
    model = keras.Model([skip_in, gate_in], attention_gate(skip_in, gate_in, name="g"))
    rng = np.random.default_rng(0)
    skip = rng.random((1, 4, 4, 4, 6), dtype=np.float32) + 0.5
    gated = keras.ops.convert_to_numpy(model([skip, rng.standard_normal((1, 4, 4, 4, 5))]))
    ratio = gated / skip
    assert np.all((ratio > 0) & (ratio < 1))
    np.testing.assert_allclose(ratio, ratio[..., :1] * np.ones_like(ratio), rtol=1e-5)
    assert np.ptp(ratio[..., 0]) > 0  # the coefficient varies over voxels


# ---------------------------------------------------------------------------------------- #
# BiRegNet
# ---------------------------------------------------------------------------------------- #


def test_biregnet_outputs_are_zero_fields_of_the_input_shape(biregnet):
    out = biregnet(_reg_inputs(), training=False)
    assert set(out) == {"U", "V"}
    for field in out.values():
        assert tuple(field.shape) == (2, *SHAPE, 3)
        assert np.all(keras.ops.convert_to_numpy(field) == 0.0)
    assert [len(_heads(biregnet, p)) for p in ("u_head", "v_head")] == [4, 4]


def test_biregnet_fields_are_in_fine_voxels(biregnet):
    """A bias b on the head of level i (at 1/2**i resolution) is a displacement of 2**i * b."""
    heads = _heads(biregnet, "u_head")
    try:
        for level, layer in enumerate(heads):
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, np.array([1.0, -2.0, 0.5], np.float32) * (level + 1)])
        u = keras.ops.convert_to_numpy(biregnet(_reg_inputs(1), training=False)["U"])
    finally:
        _zero_heads(biregnet, ["u_head"])
    expected = sum(2**level * (level + 1) for level in range(4)) * np.array([1.0, -2.0, 0.5])
    np.testing.assert_allclose(u, np.broadcast_to(expected, u.shape), rtol=1e-5)


def test_biregnet_gradients_reach_every_zero_initialised_head(biregnet):
    inputs = _reg_inputs()
    rng = np.random.default_rng(4)
    weights = {k: rng.standard_normal((2, *SHAPE, 3)).astype(np.float32) for k in ("U", "V")}
    heads = _heads(biregnet, "u_head") + _heads(biregnet, "v_head")
    variables = [layer.kernel for layer in heads]
    with tf.GradientTape() as tape:
        out = biregnet(inputs, training=True)
        loss = sum(tf.reduce_sum(out[k] * weights[k]) for k in ("U", "V"))
    grads = tape.gradient(loss, variables)
    assert all(g is not None and float(tf.reduce_max(tf.abs(g))) > 0 for g in grads)


def test_biregnet_save_load_round_trip(biregnet, tmp_path):
    _perturb_heads(biregnet, ["u_head", "v_head"])
    try:
        inputs = _reg_inputs()
        before = biregnet(inputs, training=False)
        path = tmp_path / "biregnet.keras"
        biregnet.save(path)
        after = keras.models.load_model(path)(inputs, training=False)
    finally:
        _zero_heads(biregnet, ["u_head", "v_head"])
    for key in ("U", "V"):
        b, a = (keras.ops.convert_to_numpy(t[key]) for t in (before, after))
        assert np.abs(b).max() > 0
        np.testing.assert_array_equal(a, b)


def test_folded_copy_has_no_batch_norm_and_the_same_outputs():
    keras.utils.set_random_seed(0)
    model = build_biregnet(SHAPE, c0=2, levels=3)
    randomise_weights(model, seed=4)
    folded = folded_copy(model)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    inputs = _reg_inputs()
    want = model(inputs, training=False)
    got = folded(inputs, training=False)
    for key in ("U", "V"):
        w, g = (keras.ops.convert_to_numpy(t[key]) for t in (want, got))
        assert np.abs(w).max() > 0.1
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * np.abs(w).max())


def test_only_normalisations_after_a_bias_free_convolution_read_by_nothing_else_are_folded(monkeypatch):
    x = keras.Input((8, 8, 8, 1))
    a = keras.layers.BatchNormalization(name="a_bn")(keras.layers.Conv3D(2, 3, padding="same", name="a_conv")(x))
    b = keras.layers.BatchNormalization(name="b_bn")(
        keras.layers.Conv3D(2, 3, padding="same", use_bias=False, name="b_conv")(x))
    c_conv = keras.layers.Conv3D(2, 3, padding="same", use_bias=False, name="c_conv")(x)
    c = keras.layers.Add(name="c_add")([keras.layers.BatchNormalization(name="c_bn")(c_conv), c_conv])
    model = keras.Model(x, keras.layers.Concatenate()([a, b, c]))
    randomise_weights(model, seed=7)
    folded = folded_copy(model)
    kept = sorted(layer.name for layer in folded.layers if isinstance(layer, keras.layers.BatchNormalization))
    assert kept == ["a_bn", "c_bn"]  # a: the convolution has a bias; c: its output also feeds the sum
    inputs = np.random.default_rng(8).random((1, 8, 8, 8, 1), dtype=np.float32)
    want = keras.ops.convert_to_numpy(model(inputs))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(folded(inputs)), want, rtol=1e-4, atol=1e-5)
    bn = model.get_layer("b_bn")
    monkeypatch.setattr(bn, "_inbound_nodes", [object()])  # a Keras without these node attributes
    assert _foldable_pairs(model) == {}


def test_inference_copy_is_made_once_and_follows_new_weights():
    keras.utils.set_random_seed(0)
    model = build_simnet(SHAPE, n_label_channels=3, c0=2, levels=3)
    randomise_weights(model, seed=5)
    folded = inference_copy(model)
    randomise_weights(model, seed=6)  # as training would
    inputs = _sim_inputs()
    want = keras.ops.convert_to_numpy(model(inputs)["logits"])
    tolerance = 1e-4 * np.abs(want).max()
    assert not np.allclose(keras.ops.convert_to_numpy(folded(inputs)["logits"]), want, atol=100 * tolerance)
    assert inference_copy(model) is folded
    np.testing.assert_allclose(keras.ops.convert_to_numpy(folded(inputs)["logits"]), want, rtol=1e-4, atol=tolerance)


@pytest.mark.parametrize("shape, levels", [((16, 16, 20), 4), ((12, 16, 16), 4), ((6, 8, 8), 3)])
def test_biregnet_rejects_indivisible_shape(shape, levels):
    step = 2 ** (levels - 1)
    with pytest.raises(ModelError, match=rf"must be divisible by 2\*\*\(levels-1\) = {step}"):
        build_biregnet(shape, c0=2, levels=levels)


def test_biregnet_rejects_bad_arguments():
    with pytest.raises(ModelError, match="3 entries"):
        build_biregnet((16, 16), c0=2)
    with pytest.raises(ModelError, match="levels must be a positive integer"):
        build_biregnet((16, 16, 16), levels=0)
    with pytest.raises(ModelError, match="c0 must be a positive integer"):
        build_biregnet((16, 16, 16), c0=0)


def test_biregnet_diffeomorphic_is_zero_at_init_and_round_trips(tmp_path):
    keras.utils.set_random_seed(0)
    model = build_biregnet((16, 16, 16), c0=2, levels=3, diffeomorphic=True, int_steps=4)
    inputs = _reg_inputs(1, (16, 16, 16))
    out = model(inputs, training=False)
    for key in ("U", "V"):
        assert tuple(out[key].shape) == (1, 16, 16, 16, 3)
        assert np.all(keras.ops.convert_to_numpy(out[key]) == 0.0)
    _perturb_heads(model, ["u_head", "v_head"])
    before = model(inputs, training=False)
    velocity = keras.Model(model.inputs, model.get_layer("U_velocity").output)(inputs)
    path = tmp_path / "diffeo.keras"
    model.save(path)
    after = keras.models.load_model(path)(inputs, training=False)
    for key in ("U", "V"):
        b, a = (keras.ops.convert_to_numpy(t[key]) for t in (before, after))
        np.testing.assert_array_equal(a, b)
    u = keras.ops.convert_to_numpy(before["U"])
    assert np.abs(u).max() > 0
    assert not np.allclose(u, keras.ops.convert_to_numpy(velocity))  # integrated, not copied


# ---------------------------------------------------------------------------------------- #
# SimNet
# ---------------------------------------------------------------------------------------- #


def test_simnet_is_one_half_at_init(simnet):
    out = simnet(_sim_inputs(), training=False)
    assert set(out) == {"similarity", "logits"}
    assert tuple(out["similarity"].shape) == tuple(out["logits"].shape) == (2, *SHAPE, 1)
    assert np.all(keras.ops.convert_to_numpy(out["similarity"]) == 0.5)
    assert np.all(keras.ops.convert_to_numpy(out["logits"]) == 0.0)
    assert len(_heads(simnet, "sim_head")) == 4


def test_simnet_logits_sum_heads_without_scaling_and_similarity_is_their_sigmoid(simnet):
    heads = _heads(simnet, "sim_head")
    try:
        for level, layer in enumerate(heads):
            layer.set_weights([layer.get_weights()[0], np.array([0.1 * (level + 1)], np.float32)])
        out = simnet(_sim_inputs(1), training=False)
    finally:
        _zero_heads(simnet, ["sim_head"])
    logits = keras.ops.convert_to_numpy(out["logits"])
    np.testing.assert_allclose(logits, 1.0, rtol=1e-5)  # 0.1 + 0.2 + 0.3 + 0.4
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out["similarity"]),
                               1 / (1 + np.exp(-logits)), rtol=1e-6)


def test_simnet_gradients_reach_every_zero_initialised_head(simnet):
    inputs = _sim_inputs()
    agreement = np.random.default_rng(5).random((2, *SHAPE, 1)).astype(np.float32)
    variables = [layer.kernel for layer in _heads(simnet, "sim_head")]
    with tf.GradientTape() as tape:
        logits = simnet(inputs, training=True)["logits"]
        loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(agreement, logits))
    grads = tape.gradient(loss, variables)
    assert all(g is not None and float(tf.reduce_max(tf.abs(g))) > 0 for g in grads)


def test_simnet_save_load_round_trip(simnet, tmp_path):
    _perturb_heads(simnet, ["sim_head"])
    try:
        inputs = _sim_inputs()
        before = simnet(inputs, training=False)
        path = tmp_path / "simnet.keras"
        simnet.save(path)
        after = keras.models.load_model(path)(inputs, training=False)
    finally:
        _zero_heads(simnet, ["sim_head"])
    for key in ("similarity", "logits"):
        b, a = (keras.ops.convert_to_numpy(t[key]) for t in (before, after))
        np.testing.assert_array_equal(a, b)
    assert np.ptp(keras.ops.convert_to_numpy(before["similarity"])) > 0


def test_simnet_rejects_bad_shape_and_label_count():
    with pytest.raises(ModelError, match=r"simnet: input shape \(16, 16, 12\) must be divisible"):
        build_simnet((16, 16, 12), n_label_channels=2, c0=2)
    with pytest.raises(ModelError, match="n_label_channels must be a positive integer"):
        build_simnet((16, 16, 16), n_label_channels=0, c0=2)
