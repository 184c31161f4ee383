"""Label-driven intensity randomisation: deterministic per seed, a new contrast per seed, the label
structure kept, and a CT and an MR rendering of the same labels no longer told apart by intensity."""

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from cmmas.datasets.phantom import LABEL_CODES, render, tissues_and_labels
from cmmas.errors import CmmasError
from cmmas.nn.labelmix import LabelMix, class_masks, randomise, randomise_some

SHAPE = 24


def normalised(volume: np.ndarray) -> np.ndarray:
    low, high = np.percentile(volume, (0.5, 99.5))
    return ((np.clip(volume, low, high) - low) / (high - low)).astype(np.float32)


@pytest.fixture(scope="module")
def phantom():
    """One subject's labels rendered as CT and as MR (same tissue map), normalised to [0, 1]."""
    tissue, label = tissues_and_labels("ct", 5, SHAPE)
    labels = label.array
    one_hot = np.stack([labels == c for c in LABEL_CODES], axis=-1).astype(np.float32)
    ct = normalised(render(tissue.array, "ct", 5).astype(np.float32))
    mr = normalised(render(tissue.array, "mr", 5).astype(np.float32))
    return labels, one_hot, ct, mr


def _run(image, one_hot, seed, params=LabelMix()):
    return randomise(image[None, ..., None], one_hot[None], tf.constant(seed, tf.int64), params).numpy()[0, ..., 0]


def test_same_seed_same_contrast_other_seed_another(phantom):
    labels, one_hot, ct, _ = phantom
    a, b, c = _run(ct, one_hot, [1, 2]), _run(ct, one_hot, [1, 2]), _run(ct, one_hot, [1, 3])
    assert np.array_equal(a, b)
    assert a.min() >= 0.0 and a.max() <= 1.0 and a.shape == ct.shape
    means = lambda y: np.array([y[labels == code].mean() for code in LABEL_CODES])  # noqa: E731
    assert np.abs(means(a) - means(c)).max() > 0.1


def test_each_class_gets_one_curve_of_its_own(phantom):
    """Without bias, gamma, blur and noise, a label of constant intensity stays constant inside
    (its structure is the label map's), and different labels get different levels."""
    labels, one_hot, _, _ = phantom
    flat = np.where(labels > 0, 0.5, 0.2).astype(np.float32)
    bare = LabelMix(bias_std=0, gamma_std=0, blur_max=0, noise_max=0)
    y = _run(flat, one_hot, [4, 4], bare)
    present = [c for c in LABEL_CODES[1:] if (labels == c).any()]
    assert all(y[labels == c].std() < 1e-5 for c in present)
    assert len({round(float(y[labels == c].mean()), 3) for c in present}) == len(present)


def test_the_background_keeps_its_structure_in_clusters():
    image = tf.constant(np.linspace(0, 1, 12, dtype=np.float32).reshape(1, 1, 3, 4, 1))
    one_hot = tf.concat([tf.ones_like(image), tf.zeros_like(image)], axis=-1)
    masks = class_masks(image, one_hot, 3).numpy()[0, 0]
    assert masks.shape == (3, 4, 4)
    np.testing.assert_allclose(masks.sum(-1), np.ones((3, 4)), atol=1e-6)
    assert np.array_equal(masks.argmax(-1).ravel(), [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    assert masks[..., 3].max() == 0 and masks[0, 0, 0] > 0.99, "the dark end is all cluster 0"


def test_ct_and_mr_of_the_same_labels_become_indistinguishable_by_label_intensity(phantom):
    """Measure: per label, the distribution over 40 draws of the label's median intensity; a
    two-sample Kolmogorov-Smirnov test between the draws from the CT and from the MR rendering.
    Before randomisation the two renderings differ by 0.2-0.3 in the background's and the
    myocardium's median (every draw of a modality being the same image, the KS statistic is 1);
    after it no label's KS test rejects at 1 %."""
    labels, one_hot, ct, mr = phantom
    n = 40
    batch = lambda image: np.repeat(image[None, ..., None], n, axis=0)  # noqa: E731
    one_hots = np.repeat(one_hot[None], n, axis=0)
    mixed_ct = randomise(batch(ct), one_hots, tf.constant([7, 0], tf.int64)).numpy()[..., 0]
    mixed_mr = randomise(batch(mr), one_hots, tf.constant([7, 1], tf.int64)).numpy()[..., 0]
    present = [c for c in LABEL_CODES if (labels == c).sum() > 20]
    assert max(abs(np.median(ct[labels == c]) - np.median(mr[labels == c])) for c in present) > 0.2
    for code in present:
        inside = labels == code
        ct_medians = [np.median(y[inside]) for y in mixed_ct]
        mr_medians = [np.median(y[inside]) for y in mixed_mr]
        assert stats.ks_2samp(ct_medians, mr_medians).pvalue > 0.01, code


def test_randomise_some_keeps_the_others_and_is_deterministic(phantom):
    _, one_hot, ct, _ = phantom
    images, one_hots = np.repeat(ct[None, ..., None], 16, axis=0), np.repeat(one_hot[None], 16, axis=0)
    out = randomise_some(images, one_hots, tf.constant([3, 3], tf.int64), 0.5).numpy()
    same = [np.array_equal(o, images[0]) for o in out]
    assert 3 <= sum(same) <= 13
    assert np.array_equal(out, randomise_some(images, one_hots, tf.constant([3, 3], tf.int64), 0.5).numpy())
    assert np.array_equal(randomise_some(images, one_hots, tf.constant([3, 3], tf.int64), 0.0).numpy(), images)


def test_bad_ranges_are_refused_in_one_line():
    with pytest.raises(CmmasError, match="background_clusters must be an integer >= 1.*noise_max must be >= 0"):
        LabelMix(background_clusters=0, noise_max=-1)


def test_the_blur_keeps_a_constant_image_constant_to_its_edges():
    from cmmas.nn.labelmix import _blur

    flat = tf.fill([2, 6, 7, 8, 1], 0.8)
    out = _blur(flat, tf.constant([1.0, 0.0])).numpy()
    np.testing.assert_allclose(out, 0.8, atol=1e-6)
    with pytest.raises(CmmasError, match="blur_max must be <= 1"):
        LabelMix(blur_max=2.0)
