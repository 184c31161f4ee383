"""The organ finder: its network, its input, its training boxes and a short training run that
finds the organs of a modality it was not trained on."""

import numpy as np
import pytest
import keras

from cmmas import preprocess
from cmmas.align import finder, finder_train
from cmmas.datasets.phantom import LABEL_CODES, make_subject
from cmmas.errors import ModelError
from cmmas.metrics import dice
from cmmas.nn import training
from cmmas.nn.finder import build_finder

CODES = list(LABEL_CODES)
SPACING = 4.0


def test_finder_takes_any_size_divisible_by_its_pooling():
    net = build_finder(3, c0=2, levels=3)
    for shape in ((8, 12, 16), (20, 4, 8)):
        out = net({"image": np.random.default_rng(0).random((1, *shape, 1), dtype=np.float32)})
        probabilities = keras.ops.convert_to_numpy(out["probabilities"])
        assert probabilities.shape == (1, *shape, 3)
        np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)
    training.check_kind(net, "finder")
    with pytest.raises(ModelError, match="n_labels"):
        build_finder(1)


def test_pad_to_multiple_pads_with_the_minimum_and_cuts_back():
    array = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7) + 3
    padded, crop = finder.pad_to_multiple(array, 4)
    assert padded.shape == (8, 8, 8) and padded[5:].min() == padded[5:].max() == 3
    np.testing.assert_array_equal(padded[crop], array)
    assert finder.pad_to_multiple(np.zeros((4, 8, 4)), 4)[0].shape == (4, 8, 4)


def test_random_box_cuts_a_larger_scan_and_embeds_a_smaller_one():
    image = np.random.default_rng(1).random((10, 4, 6), dtype=np.float32) + 1
    label = np.ones(image.shape, np.int8)
    box, box_label = finder_train.random_box(image, label, (8, 8, 6), np.random.default_rng(2))
    assert box.shape == box_label.shape == (8, 8, 6)
    assert box_label.sum() == 8 * 4 * 6  # 8 of the 10 slices, the 4 rows inside 8, the 6 columns
    assert np.all(box[box_label == 0] == image.min())  # the padding: the scan's minimum, background
    rows = np.flatnonzero(box_label.any(axis=(0, 2)))
    assert len(rows) == 4 and rows[-1] - rows[0] == 3  # the scan's rows, contiguous
    again = finder_train.random_box(image, label, (8, 8, 6), np.random.default_rng(2))
    np.testing.assert_array_equal(again[0], box)


def test_config_refuses_a_box_the_network_cannot_take():
    with pytest.raises(ModelError, match="crop_zyx"):
        finder_train.FinderConfig(crop_zyx=(30, 32, 32), levels=4)
    with pytest.raises(ModelError, match="labelmix"):
        finder_train.FinderConfig(labelmix=1.5)


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            raise RuntimeError("interrupted at epoch 1")


@pytest.fixture(scope="module")
def finder_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finder")
    cases = [finder_train.prepare_case(f"ct{s}", *make_subject("ct", s, shape=40), SPACING, CODES) for s in (1, 2, 3)]
    config = finder_train.FinderConfig(spacing_mm=SPACING, crop_zyx=(24, 24, 24), levels=3, c0=8, lr=3e-3, steps=240,
                                       steps_per_epoch=80, decay_steps=1000, labelmix=1.0)
    with pytest.raises(RuntimeError, match="interrupted"):
        finder_train.train(config, cases, CODES, out, progress=False, callbacks=[_Interrupt()])
    path = finder_train.train(config, cases, CODES, out, progress=False)
    return {"out": out, "path": path}


def _found_dice(model, modality: str) -> float:
    image, label = make_subject(modality, 7, shape=40)
    found = finder.find_organs(model, image, SPACING, CODES)
    truth = preprocess.resample(label, geometry=found.geometry, kind="label").array
    got = found.label().array
    return float(np.mean([dice(got == c, truth == c) for c in CODES[1:]]))


@pytest.mark.slow
def test_finder_trained_on_ct_with_random_contrasts_finds_mr_organs(finder_run):
    with open(finder_run["out"] / "history.csv") as handle:
        epochs = [int(line.split(",")[0]) for line in handle.readlines()[1:]]
    assert epochs == [0, 1, 2]  # resumed after the kill at epoch 1
    model = training.load_model(finder_run["path"], "finder")
    untrained = build_finder(len(CODES), c0=8, levels=3)
    assert _found_dice(model, "ct") > 0.3
    assert _found_dice(model, "mr") > max(0.1, _found_dice(untrained, "mr") + 0.05)  # a modality it never saw


def test_organ_agreement_is_the_dice_of_the_finder_and_a_segmentation_per_organ():
    from cmmas.io import Geometry, Image

    geometry = Geometry(size=(8, 8, 8), spacing=(4.0, 4.0, 4.0), origin=(0.0, 0.0, 0.0),
                        direction=tuple(np.eye(3).ravel()))
    probabilities = np.zeros((3, 8, 8, 8), np.float32)
    probabilities[0] = 1
    probabilities[:, 2:6, 2:6, 2:6] = [[[[0.0]]], [[[1.0]]], [[[0.0]]]]  # organ 1 found, organ 2 not
    found = finder.FoundOrgans((0, 1, 2), probabilities, geometry)
    fine = Geometry(size=(16, 16, 16), spacing=(2.0, 2.0, 2.0), origin=(-1.0, -1.0, -1.0),
                    direction=tuple(np.eye(3).ravel()))
    segmentation = np.zeros((16, 16, 16), np.uint8)
    segmentation[4:12, 4:12, 4:8] = 1  # half of organ 1's box
    assert finder.organ_agreement(found, Image(segmentation, fine)) == {1: pytest.approx(2 / 3, abs=1e-3), 2: None}


def test_the_qc_calls_a_deliberately_broken_organ_doubtful_and_only_it():
    """A finder that found every organ right (the truth's one-hot) against a segmentation whose one
    organ is painted in the wrong place: that organ, and no other, is doubtful."""
    from cmmas.io import Image

    _, truth = make_subject("ct", 3, shape=32)
    codes = sorted(int(c) for c in np.unique(truth.array))
    found = finder.FoundOrgans(tuple(codes), np.stack([(truth.array == c).astype(np.float32) for c in codes]),
                               truth.geometry)
    broken = truth.array.copy()
    wrong = codes[4]
    count = int((broken == wrong).sum())
    broken[broken == wrong] = 0
    corner = np.zeros(broken.shape, bool)
    corner[:8, :8, :8] = True
    assert not truth.array[corner].any()
    broken[np.unravel_index(np.flatnonzero(corner)[:count], broken.shape)] = wrong
    agreement = finder.organ_agreement(found, Image(broken, truth.geometry))
    assert agreement[wrong] == 0.0 and all(v == 1.0 for c, v in agreement.items() if c != wrong)
    assert finder.doubtful(agreement) == [wrong]
    assert finder.doubtful({**agreement, wrong: None}) == []  # absent from both: nothing to doubt


def test_the_finder_reads_the_alignment_image_it_is_given_only_at_its_own_spacing():
    from cmmas.align.target import alignment_image

    image, _ = make_subject("mr", 5, shape=32)
    own = finder.finder_image(image, SPACING)
    shared = finder.finder_image(image, SPACING, seen=alignment_image(image, SPACING))
    other = finder.finder_image(image, SPACING, seen=alignment_image(image, 2 * SPACING))
    for given in (shared, other):
        np.testing.assert_array_equal(given.array, own.array)
        assert given.geometry.matches(own.geometry)
