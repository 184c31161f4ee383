"""prepare_oracle: the paper's oracle atlas set (each case cropped around its own label, no alignment)."""

import numpy as np
import pytest

from cmmas.align import atlas_set, prepare
from cmmas.datasets import open_dataset, oracle_roi
from cmmas.datasets.base import Case
from cmmas.datasets.loading import load_case
from cmmas.errors import AtlasSetError
from cmmas.segment import segment
from cmmas.align.cards import ORACLE_NORMALISATION, card_from_atlas_set
from phantom_data import numbered, write_phantom_folder

SHAPE = (16, 16, 16)


@pytest.fixture(scope="module")
def oracle_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle")
    dataset = open_dataset(write_phantom_folder(root / "data", {**numbered("ct", range(3)),
                                                                 **numbered("mr", range(10, 13))}), "folder")
    cases = list(dataset.of("ct")) + list(dataset.of("mr"))
    aset = prepare.prepare_oracle(cases, dataset.labels, root / "set", SHAPE, roles={cases[-1].id: "test"},
                                  component=500, progress=False)
    return dataset, cases, aset


def test_every_case_lies_on_the_box_of_its_own_label(oracle_set):
    dataset, cases, aset = oracle_set
    assert aset.manifest.oracle and aset.labels == {500: dataset.labels[500]}
    assert atlas_set.AtlasSet(aset.root).manifest == aset.manifest  # round trip through manifest.json
    assert aset.ids(role="test") == [cases[-1].id]
    for case in cases:
        _, label = load_case(case, dataset.labels, component=500)
        expected = oracle_roi.oracle_geometry(label, (500,), oracle_roi.MARGIN_MM, SHAPE)
        image, stored = aset.image(case.id), aset.label(case.id)
        for got in (image, stored):
            assert got.shape == SHAPE
            np.testing.assert_allclose(got.geometry.spacing, expected.spacing, rtol=1e-5)
            np.testing.assert_allclose(got.geometry.origin, expected.origin, atol=1e-4)
            np.testing.assert_allclose(got.geometry.direction_matrix, np.eye(3), atol=1e-6)
        assert set(np.unique(stored.array)) == {0, 500}
        assert abs(float(image.array.mean())) < 1e-3 and abs(float(image.array.std()) - 1.0) < 1e-3  # z-scored
    images, labels = aset.arrays(aset.ids())
    assert images.shape == (len(cases), *SHAPE) and labels.shape == images.shape


def test_rerun_keeps_the_cases_and_the_card_says_z_score(oracle_set):
    dataset, cases, aset = oracle_set
    written = {p: p.stat().st_mtime_ns for p in (aset.root / "images").iterdir()}
    again = prepare.prepare_oracle(cases, dataset.labels, aset.root, SHAPE, roles={cases[-1].id: "test"},
                                   component=500, progress=False)
    assert {p: p.stat().st_mtime_ns for p in (aset.root / "images").iterdir()} == written
    assert again.manifest == aset.manifest
    assert card_from_atlas_set(aset, "biregnet", "ct", "mr").normalisation == ORACLE_NORMALISATION


def test_a_case_without_a_label_and_segmenting_with_the_set_are_refused(oracle_set, tmp_path):
    dataset, cases, _ = oracle_set
    with pytest.raises(AtlasSetError, match="no alignment"):
        oracle_set[2].transform(cases[0].id)
    with pytest.raises(AtlasSetError, match="cannot segment a new scan"):
        segment(cases[0].image_path, oracle_set[2], reg_model=None, fusion="mv")
    bare = Case("ct_x", "ct", cases[0].image_path, None)
    with pytest.raises(AtlasSetError, match="ct_x"):
        prepare.prepare_oracle([cases[0], bare], dataset.labels, tmp_path / "set", SHAPE, progress=False)
