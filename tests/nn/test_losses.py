"""Losses: each documented property on small synthetic volumes."""

import numpy as np
import pytest
import tensorflow as tf

from cmmas.errors import GeometryError, ModelError
from cmmas.nn.losses import (
    BendingEnergy,
    Grad,
    LocalMutualInformation,
    LocalNCC,
    MindDistance,
    MultiScaleDice,
    MutualInformation,
    NegativeJacobian,
    cycle_consistency,
    jacobian_determinant_tf,
)


def _grid(shape):
    """``[D, H, W, 3]`` voxel coordinates, ``ij`` order."""
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)


def _textured(n=32, seed=0):
    """``[1, n, n, n, 1]`` in [0, 1]: constant 6^3 blocks (not aligned with MI patches) + smooth."""
    rng = np.random.default_rng(seed)
    blocks = np.kron(rng.random((-(-n // 6),) * 3), np.ones((6, 6, 6)))[:n, :n, :n]
    z, y, x = np.moveaxis(_grid((n, n, n)), -1, 0)
    smooth = 0.5 + 0.5 * np.sin(z / 3.0) * np.cos(y / 4.0) * np.sin(x / 5.0)
    return (0.7 * blocks + 0.3 * smooth)[None, ..., None].astype(np.float32)


def _cube(shape, start, size, labels=2):
    """One-hot ``[1, D, H, W, labels]``: channel 1 is a cube, channel 0 the rest."""
    fg = np.zeros(shape, np.float32)
    fg[tuple(slice(s, s + size) for s in start)] = 1.0
    return np.stack([1.0 - fg, fg][:labels], -1)[None]


def _is_scalar_float32(value):
    return isinstance(value, tf.Tensor) and value.shape == () and value.dtype == tf.float32


# ---------------------------------------------------------------- local NCC


def test_local_ncc_optimum_for_identical_and_affinely_related_images():
    x = _textured(24)
    ncc = LocalNCC(window=9)
    for y in (x, 3.0 * x + 1.0, -2.0 * x + 0.5):
        value = ncc(x, y)
        assert _is_scalar_float32(value)
        assert float(value) == pytest.approx(-1.0, abs=1e-4)
    assert float(ncc(x, np.roll(x, 3, axis=2))) > -0.6
    noise = np.random.default_rng(1).random(x.shape).astype(np.float32)
    assert float(ncc(x, noise)) > -0.05


def test_local_ncc_matches_brute_force_windows():
    rng = np.random.default_rng(0)
    x = rng.random((2, 7, 6, 5, 2)).astype(np.float32)
    y = (x + 0.5 * rng.random(x.shape)).astype(np.float32)
    window, eps = 3, 1e-5
    expected = []
    for b in range(2):
        for c in range(2):
            for idx in np.ndindex(7, 6, 5):
                box = tuple(slice(max(i - 1, 0), i + 2) for i in idx)
                a, t = x[b][box][..., c].ravel(), y[b][box][..., c].ravel()
                cross = ((a - a.mean()) * (t - t.mean())).sum()
                var = ((a - a.mean()) ** 2).sum() * ((t - t.mean()) ** 2).sum()
                expected.append(cross**2 / (var + eps))
    np.testing.assert_allclose(float(LocalNCC(window)(x, y)), -np.mean(expected), rtol=1e-4)


# ---------------------------------------------------------- mutual information


@pytest.mark.parametrize(
    "loss", [MutualInformation(), LocalMutualInformation(patch=16), LocalMutualInformation(patch=8)]
)
def test_mutual_information_sees_monotone_and_non_monotone_remaps(loss):
    x = _textured(32)
    squared = 4.0 * (x - 0.5) ** 2
    permutation = np.random.default_rng(1).permutation(8)
    level = np.minimum((x * 8).astype(int), 7)
    permuted = ((permutation[level] + (x * 8 - level)) / 8.0).astype(np.float32)
    monotone = np.sqrt(x)
    shifted = np.roll(x, 4, axis=1)
    noise = np.random.default_rng(2).random(x.shape).astype(np.float32)

    mi = {name: -float(loss(x, y)) for name, y in
          [("monotone", monotone), ("squared", squared), ("permuted", permuted),
           ("shifted", shifted), ("noise", noise)]}
    assert _is_scalar_float32(loss(x, squared))
    for remap in ("monotone", "squared", "permuted"):
        assert mi[remap] > mi["shifted"] + 0.3, mi
    assert mi["shifted"] > mi["noise"]
    assert mi["noise"] < 0.2  # the small-sample bias of 8^3-voxel patches; ~0 globally


def test_mind_distance_ignores_intensity_remaps_but_sees_shifts():
    x = _textured(32)
    affine = 3.0 * x - 1.0
    squared = 4.0 * (x - 0.5) ** 2  # non-monotone
    shifted = np.roll(x, 3, axis=1)
    loss = MindDistance()
    assert _is_scalar_float32(loss(x, x))
    assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-7)
    assert float(loss(x, affine)) == pytest.approx(0.0, abs=1e-4)
    assert float(loss(x, squared)) < 0.5 * float(loss(x, shifted))
    with tf.GradientTape() as tape:
        moving = tf.Variable(shifted)
        value = loss(x, moving)
    gradient = tape.gradient(value, moving)
    assert np.isfinite(gradient.numpy()).all() and float(tf.reduce_max(tf.abs(gradient))) > 0
    with pytest.raises(ModelError, match="radius"):
        MindDistance(radius=0)


def test_mutual_information_is_symmetric_and_differentiable():
    x = tf.constant(_textured(16))
    y = tf.constant(np.roll(_textured(16), 2, axis=3))
    loss = MutualInformation(bins=16)
    assert float(loss(x, y)) == pytest.approx(float(loss(y, x)), abs=1e-5)
    with tf.GradientTape() as tape:
        tape.watch(y)
        value = loss(x, y)
    grad = tape.gradient(value, y).numpy()
    assert np.all(np.isfinite(grad)) and np.abs(grad).sum() > 0


def test_mutual_information_bad_arguments():
    with pytest.raises(ModelError, match="bins"):
        MutualInformation(bins=1)
    with pytest.raises(ModelError, match="maxval"):
        MutualInformation(minval=1.0, maxval=0.0)
    with pytest.raises(GeometryError, match="multiple of patch 16"):
        LocalMutualInformation(patch=16)(np.zeros((1, 24, 32, 32, 1), np.float32),
                                         np.zeros((1, 24, 32, 32, 1), np.float32))


# ---------------------------------------------------------- multi-scale Dice


def test_multiscale_dice_optimum_ordering_and_blur_reach():
    shape = (24, 24, 24)
    truth = _cube(shape, (6, 6, 6), 8)
    loss = MultiScaleDice()
    value = loss(truth, truth)
    assert _is_scalar_float32(value)
    assert float(value) == pytest.approx(-1.0, abs=1e-6)
    values = [float(loss(truth, _cube(shape, (6 + s, 6, 6), 8))) for s in (0, 2, 4, 9)]
    assert values == sorted(values) and values[0] < values[-1]

    fg_true = truth[..., 1:]
    fg_far = _cube(shape, (15, 6, 6), 8)[..., 1:]
    assert float(MultiScaleDice(sigmas=(0,))(fg_true, fg_far)) == pytest.approx(0.0, abs=1e-6)
    assert float(MultiScaleDice(sigmas=(0, 2, 4))(fg_true, fg_far)) < -0.05


def test_multiscale_dice_gradient_reaches_prediction():
    truth = _cube((16, 16, 16), (4, 4, 4), 6)
    logits = tf.Variable(np.random.default_rng(0).normal(size=truth.shape).astype(np.float32))
    with tf.GradientTape() as tape:
        value = MultiScaleDice()(truth, tf.nn.softmax(logits, axis=-1))
    grad = tape.gradient(value, logits).numpy()
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 1e-6


# ---------------------------------------------------------- field regularisers


def _affine_field(a, t, shape=(12, 12, 12)):
    """``u(x) = (A - I) x + t`` as ``[1, D, H, W, 3]`` float32."""
    return (_grid(shape) @ (a - np.eye(3)).T + t)[None].astype(np.float32)


def test_grad_of_affine_fields_has_closed_form():
    rng = np.random.default_rng(0)
    a = np.eye(3) + 0.3 * rng.normal(size=(3, 3))
    m = a - np.eye(3)
    ddf = _affine_field(a, rng.normal(size=3))
    assert float(Grad("l2")(ddf)) == pytest.approx((m**2).sum() / 9.0, rel=1e-4)
    assert float(Grad("l1")(ddf)) == pytest.approx(np.abs(m).sum() / 9.0, rel=1e-4)
    constant = _affine_field(np.eye(3), np.array([1.0, -2.0, 3.0]))
    assert float(Grad("l1")(constant)) == 0.0
    with pytest.raises(ModelError, match="penalty"):
        Grad("l3")


def test_bending_energy_zero_for_affine_and_exact_for_quadratics():
    rng = np.random.default_rng(1)
    energy = BendingEnergy()
    affine = _affine_field(np.eye(3) + 0.3 * rng.normal(size=(3, 3)), rng.normal(size=3))
    assert _is_scalar_float32(energy(affine))
    assert float(energy(affine)) == pytest.approx(0.0, abs=1e-5)
    z, y, x = np.moveaxis(_grid((10, 10, 10)), -1, 0)
    scale = 0.05
    pure = np.stack([scale * z**2] * 3, -1)[None].astype(np.float32)
    assert float(energy(pure)) == pytest.approx(4 * scale**2, rel=1e-3)
    mixed = np.stack([scale * y * x] * 3, -1)[None].astype(np.float32)
    assert float(energy(mixed)) == pytest.approx(2 * scale**2, rel=1e-3)


def test_jacobian_determinant_of_affine_fields_equals_det_a():
    rng = np.random.default_rng(2)
    flip = np.diag([1.0, -1.0, 1.0])
    matrices = [np.eye(3) + 0.2 * rng.normal(size=(3, 3)) for _ in range(3)]
    matrices.append(flip @ (np.eye(3) + 0.1 * rng.normal(size=(3, 3))))
    for a in matrices:
        ddf = _affine_field(a, rng.normal(size=3))
        det = jacobian_determinant_tf(ddf).numpy()
        assert det.shape == (1, 10, 10, 10)
        np.testing.assert_allclose(det, np.linalg.det(a), rtol=1e-4, atol=1e-4)
        penalty = float(NegativeJacobian()(ddf))
        if np.linalg.det(a) > 0:
            assert penalty == 0.0
        else:
            assert penalty == pytest.approx(-np.linalg.det(a), rel=1e-4)


def test_jacobian_determinant_matches_numpy_on_a_random_field():
    shape = (10, 11, 12)
    ddf = np.random.default_rng(3).normal(scale=0.8, size=(1, *shape, 3))
    grads = np.stack([np.stack(np.gradient(ddf[0, ..., c]), -1) for c in range(3)], -2)
    jac = grads + np.eye(3)
    expected = np.linalg.det(jac)[1:-1, 1:-1, 1:-1]
    det = jacobian_determinant_tf(ddf.astype(np.float32)).numpy()[0]
    np.testing.assert_allclose(det, expected, rtol=1e-4, atol=1e-4)
    assert (expected < 0).any()
    assert float(NegativeJacobian()(ddf.astype(np.float32))) == pytest.approx(
        np.maximum(-expected, 0).mean(), rel=1e-4)


# ---------------------------------------------------------- cycle consistency


def test_cycle_consistency_is_zero_for_identity_and_inverse_shifts():
    img = _textured(16)
    zero = np.zeros((1, 16, 16, 16, 3), np.float32)
    assert float(cycle_consistency(img, zero, zero)) == 0.0

    forward = zero.copy()
    forward[..., 2] = 2.0
    backward = -forward
    # warp(img, V)[w] = img[min(w + 2, 15)]; warping that by U = -2 e_w reads it at
    # max(w - 2, 0): img comes back exactly except planes w = 0, 1, which both get img[2].
    expected = img.copy()
    expected[..., :2, :] = img[..., 2:3, :]
    round_trip_error = np.abs(img - expected).mean()
    value = cycle_consistency(img, backward, forward)
    assert _is_scalar_float32(value)
    assert float(value) == pytest.approx(round_trip_error, rel=1e-5)
    assert float(value) < 0.25 * float(cycle_consistency(img, forward, forward))


def test_cycle_consistency_gradients_reach_both_fields():
    img = tf.constant(_textured(16))
    u = tf.Variable(np.full((1, 16, 16, 16, 3), 0.3, np.float32))
    v = tf.Variable(np.full((1, 16, 16, 16, 3), 0.4, np.float32))
    with tf.GradientTape() as tape:
        value = cycle_consistency(img, u, v)
    for grad in tape.gradient(value, [u, v]):
        assert np.all(np.isfinite(grad.numpy())) and np.abs(grad.numpy()).sum() > 0


# ---------------------------------------------------------- all losses in a graph


def test_losses_trace_with_unknown_batch_size():
    image = tf.TensorSpec([None, 16, 16, 16, 1], tf.float32)
    field = tf.TensorSpec([None, 16, 16, 16, 3], tf.float32)

    @tf.function(input_signature=[image, image, field])
    def total(x, y, ddf):
        return (LocalNCC()(x, y) + MutualInformation()(x, y) + LocalMutualInformation(8)(x, y)
                + MultiScaleDice()(x, y) + Grad()(ddf) + BendingEnergy()(ddf)
                + NegativeJacobian()(ddf) + cycle_consistency(x, ddf, -ddf))

    x = np.repeat(_textured(16), 2, 0)
    ddf = np.random.default_rng(0).normal(scale=0.5, size=(2, 16, 16, 16, 3)).astype(np.float32)
    value = total(x, x, ddf)
    assert _is_scalar_float32(value) and np.isfinite(float(value))
