"""The MM-WHS reader skips the challenge's ``*_test_*`` images, saying so in its log."""

import logging
from pathlib import Path

import numpy as np
import pytest

from cmmas.datasets import fold_split, open_dataset
from cmmas.errors import DatasetError
from cmmas.io import Geometry, Image, write_image


def _write(path: Path, value: int) -> None:
    array = np.full((4, 5, 6), value, dtype=np.int16)
    write_image(Image(array, Geometry.identity(array.shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))), path)


def test_test_images_are_skipped_with_a_note_and_never_enter_a_fold(tmp_path, caplog):
    for number in range(1001, 1005):
        _write(tmp_path / "ct_train" / f"ct_train_{number}_image.nii.gz", 1)
        _write(tmp_path / "ct_train" / f"ct_train_{number}_label.nii.gz", 0)
    for number in (2001, 2002):
        _write(tmp_path / "ct_test" / f"ct_test_{number}_image.nii.gz", 2)
    _write(tmp_path / "mr_test_2001_image.nii.gz", 2)
    with caplog.at_level(logging.INFO, logger="cmmas.datasets.mmwhs"):
        data = open_dataset(tmp_path, "mmwhs")
    assert [c.id for c in data.of("ct")] == ["ct_1001", "ct_1002", "ct_1003", "ct_1004"]
    assert "mr" not in data.cases
    assert "skipped 3 challenge test file(s)" in caplog.text
    folds = [fold_split(data.of("ct"), k, n_folds=2) for k in (1, 2)]
    in_folds = {c.id for targets, atlases in folds for c in targets + atlases}
    assert in_folds == {"ct_1001", "ct_1002", "ct_1003", "ct_1004"}


def test_a_folder_of_test_images_only_has_no_cases(tmp_path):
    _write(tmp_path / "ct_test_2001_image.nii.gz", 2)
    with pytest.raises(DatasetError, match="no MM-WHS images found"):
        open_dataset(tmp_path, "mmwhs")
