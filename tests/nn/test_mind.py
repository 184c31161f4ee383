"""MIND-SSC: what makes it a modality-independent descriptor."""

import keras
import numpy as np
import pytest
from scipy import ndimage

from cmmas.datasets.phantom import tissues_and_labels
from cmmas.errors import CmmasError
from cmmas.nn.mind import CHANNELS, PAIRS, MindSSC, descriptors


def tissue_image(seed: int, values: np.ndarray) -> np.ndarray:
    """A 32^3 phantom whose tissue classes get ``values`` (slightly blurred, as a scanner would)."""
    tissue = tissues_and_labels("mr", seed, 32)[0].array
    return ndimage.gaussian_filter(values[tissue], 0.7).astype(np.float32)


VALUES = np.linspace(0.0, 1.0, 11)


def mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(descriptors(a[None]) - descriptors(b[None])).mean())


def test_twelve_pairs_of_the_six_neighbourhood():
    assert len(PAIRS) == CHANNELS == 12
    assert len(set(PAIRS)) == 12


@pytest.mark.parametrize("remap", [lambda x: np.sqrt(x), lambda x: (x - 0.45) ** 2, lambda x: np.sin(3 * np.pi * x)],
                         ids=["monotone", "non-monotone", "oscillating"])
def test_invariant_to_an_intensity_remap(remap):
    image = tissue_image(3, VALUES)
    other_subject = tissue_image(4, VALUES)
    changed = mean_difference(image, remap(image).astype(np.float32))
    assert changed < 0.1
    assert changed < 0.5 * mean_difference(image, other_subject)


def test_a_permutation_of_tissue_intensities_changes_the_descriptor_less_than_the_anatomy():
    image = tissue_image(3, VALUES)
    permuted = tissue_image(3, np.random.default_rng(0).permutation(VALUES))
    assert np.abs(permuted - image).mean() > np.abs(tissue_image(4, VALUES) - image).mean()  # raw: worse
    assert mean_difference(image, permuted) < 0.6 * mean_difference(image, tissue_image(4, VALUES))


def test_equivariant_to_an_integer_shift():
    image = np.pad(tissue_image(3, VALUES), 6)  # a margin of background: the shift moves no tissue out
    shift = (3, -2, 1)
    moved = descriptors(np.roll(image, shift, (0, 1, 2))[None])[0]
    expected = np.roll(descriptors(image[None])[0], shift, (0, 1, 2))
    inner = (slice(6, -6),) * 3  # the box filter sees fewer voxels within radius + dilation of a border
    np.testing.assert_allclose(moved[inner], expected[inner], atol=2e-3)  # the clamp follows the mean


def test_finite_on_constant_regions_and_in_range():
    constant = descriptors(np.full((1, 16, 16, 16), 3.0, np.float32))
    np.testing.assert_array_equal(constant, 1.0)
    half = np.zeros((1, 16, 16, 16), np.float32)
    half[:, 8:] = 1.0
    values = descriptors(half)
    assert np.isfinite(values).all() and values.min() > 0 and values.max() <= 1.0
    assert np.allclose(values.max(axis=-1), 1.0)


def test_layer_shape_config_and_gradient():
    import tensorflow as tf

    layer = MindSSC(radius=1, dilation=1)
    image = tf.constant(tissue_image(3, VALUES)[None, ..., None])
    with tf.GradientTape() as tape:
        tape.watch(image)
        out = layer(image)
        loss = tf.reduce_mean(out)
    assert tuple(out.shape) == (1, 32, 32, 32, 12)
    assert layer.compute_output_shape((None, 32, 32, 32, 1)) == (None, 32, 32, 32, 12)
    assert np.isfinite(tape.gradient(loss, image).numpy()).all()
    clone = keras.layers.deserialize(keras.layers.serialize(layer))
    assert (clone.radius, clone.dilation) == (1, 1)


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(CmmasError, match="dilation"):
        MindSSC(dilation=0)
    with pytest.raises(CmmasError, match=r"\[N, D, H, W\]"):
        descriptors(np.zeros((8, 8, 8)))
