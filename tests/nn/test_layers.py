"""SpatialTransformer, VecInt, ResizeDisplacement, warp and compose: exactness, accuracy, serialisation."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from cmmas.nn import layers
from cmmas.errors import GeometryError, ModelError
from cmmas.nn.layers import ResizeDisplacement, SpatialTransformer, VecInt, compose, warp


def _random(shape, seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def _smooth_field(shape, amplitude, seed=0):
    """A smooth ``[1, D, H, W, 3]`` field: sums of low-frequency sines, max about ``amplitude``."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    field = np.zeros((*shape, 3))
    for c in range(3):
        for _ in range(2):
            freq = rng.uniform(0.1, 0.3, size=3)
            phase = rng.uniform(0, 2 * np.pi)
            field[..., c] += np.sin(sum(f * g for f, g in zip(freq, grid)) + phase)
    return (amplitude / 2 * field)[None].astype(np.float32)


def _smooth_image(shape):
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    img = np.sin(z / 3.0) * np.cos(y / 4.0) + 0.5 * np.sin(x / 5.0 + z / 7.0)
    return img[None, ..., None].astype(np.float32)


def test_zero_field_is_bit_exact_identity():
    vol = _random((2, 12, 10, 8, 3))
    zero = np.zeros((2, 12, 10, 8, 3), np.float32)
    for interpolation in ("linear", "nearest"):
        out = SpatialTransformer(interpolation)([vol, zero]).numpy()
        assert np.array_equal(out, vol)


@pytest.mark.parametrize("axis, shift", [(0, 3), (1, -2), (2, 5)])
def test_integer_shift_moves_volume_exactly(axis, shift):
    vol = _random((2, 16, 16, 16, 2))
    ddf = np.zeros((2, 16, 16, 16, 3), np.float32)
    ddf[..., axis] = shift
    expected = np.roll(vol, -shift, axis=axis + 1)
    inside = [slice(None)] * 5
    inside[axis + 1] = slice(0, 16 - shift) if shift > 0 else slice(-shift, 16)
    for interpolation in ("linear", "nearest"):
        out = warp(vol, ddf, interpolation).numpy()
        assert np.array_equal(out[tuple(inside)], expected[tuple(inside)])


def test_positions_outside_are_clamped_to_the_border():
    vol = _random((1, 8, 9, 10, 1))
    ddf = np.zeros((1, 8, 9, 10, 3), np.float32)
    ddf[..., 0] = 100.0
    ddf[..., 2] = -100.0
    out = warp(vol, ddf).numpy()
    expected = np.broadcast_to(vol[:, -1:, :, :1], out.shape)
    assert np.array_equal(out, expected)


def test_linear_and_nearest_match_scipy_map_coordinates():
    vol = _random((1, 12, 14, 16, 1))
    ddf = (3.0 * (_random((1, 12, 14, 16, 3), seed=1) - 0.5)).astype(np.float32)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in (12, 14, 16)], indexing="ij"), axis=0)
    coords = grid + np.moveaxis(ddf[0], -1, 0)
    for interpolation, order in (("linear", 1), ("nearest", 0)):
        expected = ndimage.map_coordinates(vol[0, ..., 0], coords, order=order, mode="nearest")
        out = warp(vol, ddf, interpolation).numpy()[0, ..., 0]
        np.testing.assert_allclose(out, expected, atol=1e-5)


def test_nearest_keeps_integer_labels():
    labels = np.random.default_rng(0).integers(0, 5, (1, 8, 8, 8, 1)).astype(np.int32)
    ddf = _random((1, 8, 8, 8, 3))
    out = warp(labels, ddf, "nearest")
    assert out.dtype == tf.int32
    assert set(np.unique(out.numpy())) <= set(np.unique(labels))


def test_gradients_reach_both_inputs_with_unknown_batch():
    layer = SpatialTransformer()
    spec = tf.TensorSpec([None, 8, 8, 8, None], tf.float32)

    @tf.function(input_signature=[spec, tf.TensorSpec([None, 8, 8, 8, 3], tf.float32)])
    def grads(vol, ddf):
        with tf.GradientTape() as tape:
            tape.watch([vol, ddf])
            loss = tf.reduce_sum(layer([vol, ddf]) ** 2)
        return tape.gradient(loss, [vol, ddf])

    vol = _smooth_image((8, 8, 8))
    ddf = _random((1, 8, 8, 8, 3)) - 0.5
    for batch in (1, 3):
        g_vol, g_ddf = grads(np.repeat(vol, batch, 0), np.repeat(ddf, batch, 0))
        g_vol = tf.convert_to_tensor(g_vol).numpy()
        assert g_vol.shape == (batch, 8, 8, 8, 1) and g_ddf.shape == (batch, 8, 8, 8, 3)
        assert np.all(np.isfinite(g_vol)) and np.abs(g_vol).sum() > 0
        assert np.all(np.isfinite(g_ddf)) and np.abs(g_ddf.numpy()).sum() > 0


def test_compose_matches_sequential_warps():
    shape = (24, 24, 24)
    img = _smooth_image(shape)
    u = _smooth_field(shape, 3.0, seed=1)
    v = _smooth_field(shape, 3.0, seed=2)
    inside = (slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    sequential = warp(warp(img, u), v).numpy()[inside]
    composed = warp(img, compose(u, v)).numpy()[inside]
    naive = warp(img, u + v).numpy()[inside]
    wrong_order = warp(img, compose(v, u)).numpy()[inside]
    error = np.abs(composed - sequential).mean()
    assert error < 0.02
    assert error < 0.2 * np.abs(naive - sequential).mean()
    assert error < 0.2 * np.abs(wrong_order - sequential).mean()


def test_compose_convention_on_a_coordinate_image():
    """Warping the identity map by u then v gives x + compose(u, v)(x) (interpolation is exact)."""
    shape = (16, 16, 16)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)[None]
    grid = grid.astype(np.float32)
    u = _smooth_field(shape, 1.5, seed=4)
    v = _smooth_field(shape, 1.5, seed=5)
    inside = (slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    sequential = warp(warp(grid, u), v).numpy()
    np.testing.assert_allclose(sequential[inside], (grid + compose(u, v).numpy())[inside], atol=1e-4)


def test_vecint_zero_and_constant_velocity():
    zero = np.zeros((2, 8, 8, 8, 3), np.float32)
    assert np.array_equal(VecInt()(zero).numpy(), zero)
    constant = zero + np.array([1.5, -0.75, 3.0], np.float32)
    np.testing.assert_allclose(VecInt(steps=7)(constant).numpy(), constant, atol=1e-5)


def test_vecint_exponentials_of_opposite_velocities_invert_each_other():
    shape = (24, 24, 24)
    velocity = _smooth_field(shape, 2.0, seed=3)
    forward = VecInt()(velocity)
    backward = VecInt()(-velocity)
    inside = (slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    residual = np.abs(compose(forward, backward).numpy()[inside])
    assert residual.mean() < 0.02 * np.abs(forward.numpy()[inside]).mean()


def test_resize_displacement_scales_vectors_and_keeps_linear_fields():
    constant = np.zeros((1, 8, 8, 8, 3), np.float32) + np.array([1.0, -2.0, 0.5], np.float32)
    up = ResizeDisplacement(factor=2)(constant).numpy()
    assert up.shape == (1, 16, 16, 16, 3)
    np.testing.assert_allclose(up, np.broadcast_to(2 * constant[:, :1, :1, :1], up.shape), atol=1e-6)

    m = np.array([[0.1, -0.2, 0.05], [0.0, 0.3, 0.1], [-0.1, 0.02, 0.2]])
    t = np.array([1.0, 2.0, -1.0])
    coarse_grid = np.stack(np.meshgrid(*[np.arange(n) for n in (8, 6, 10)], indexing="ij"), -1)
    coarse = (coarse_grid @ m.T + t)[None].astype(np.float32)
    fine = ResizeDisplacement(shape=(16, 12, 20))(coarse).numpy()
    assert fine.shape == (1, 16, 12, 20, 3)
    fine_grid = np.stack(np.meshgrid(*[np.arange(n) for n in (16, 12, 20)], indexing="ij"), -1)
    # Same extent, voxel centres aligned: fine x_f sits at coarse (x_f + 0.5) / 2 - 0.5.
    expected = 2.0 * (((fine_grid + 0.5) / 2.0 - 0.5) @ m.T + t)
    np.testing.assert_allclose(fine[0, 1:-1, 1:-1, 1:-1], expected[1:-1, 1:-1, 1:-1], atol=1e-5)

    down = ResizeDisplacement(factor=0.5)(fine).numpy()
    np.testing.assert_allclose(down[0, 1:-1, 1:-1, 1:-1], coarse[0, 1:-1, 1:-1, 1:-1], atol=1e-5)


def test_layers_reject_bad_arguments_with_cmmas_errors():
    with pytest.raises(ModelError, match="interpolation"):
        SpatialTransformer("cubic")
    with pytest.raises(ModelError, match="steps"):
        VecInt(steps=-1)
    with pytest.raises(ModelError, match="exactly one"):
        ResizeDisplacement(factor=2, shape=(4, 4, 4))
    with pytest.raises(ModelError, match="shape"):
        ResizeDisplacement(shape=(4, 4.5, 4))
    with pytest.raises(GeometryError, match="differ along spatial axis 1"):
        warp(np.zeros((1, 8, 8, 8, 1), np.float32), np.zeros((1, 8, 9, 8, 3), np.float32))
    with pytest.raises(GeometryError, match=r"\[B, D, H, W, 3\]"):
        warp(np.zeros((1, 8, 8, 8, 1), np.float32), np.zeros((1, 8, 8, 8, 2), np.float32))


def test_model_with_all_layers_round_trips_through_keras_file(tmp_path):
    vol_in = keras.Input((16, 16, 16, 1))
    features = keras.layers.Conv3D(3, 3, padding="same", kernel_initializer="he_normal")(vol_in)
    half = keras.layers.AveragePooling3D(2)(features)
    ddf = ResizeDisplacement(factor=2)(VecInt(steps=4)(half))
    assert tuple(ddf.shape) == (None, 16, 16, 16, 3)
    warped = SpatialTransformer("linear", name="warp_image")([vol_in, ddf])
    warped_nn = SpatialTransformer("nearest")([vol_in, ddf])
    model = keras.Model(vol_in, [warped, warped_nn, ddf])

    vol = _smooth_image((16, 16, 16))
    before = [t.numpy() for t in model(np.repeat(vol, 2, 0))]
    assert np.abs(before[2]).max() > 0.01
    path = tmp_path / "tiny.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    after = [t.numpy() for t in loaded(np.repeat(vol, 2, 0))]
    for a, b in zip(before, after):
        assert np.array_equal(a, b)
    assert isinstance(loaded.get_layer("warp_image"), layers.SpatialTransformer)
    assert loaded.get_layer("warp_image").interpolation == "linear"
