"""The synthetic CT/MR heart phantom: labels, determinism, contrast, files on disk, command line."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cmmas
from cmmas.datasets import open_dataset
from cmmas.datasets import phantom
from cmmas.datasets.mmwhs import MMWHS_LABELS
from cmmas.errors import DatasetError
from cmmas.io import read_image, read_label
from cmmas.datasets.loading import load_case
from scripts import run_experiment

SHAPE = 32


@pytest.fixture(scope="module")
def subjects():
    """``{(modality, seed): (image, label, tissue)}`` for two individuals at 32^3."""
    out = {}
    for modality in phantom.MODALITIES:
        for seed in (0, 1):
            image, label = phantom.make_subject(modality, seed, SHAPE)
            tissue, _ = phantom.tissues_and_labels(modality, seed, SHAPE)
            out[modality, seed] = image, label, tissue
    return out


@pytest.mark.parametrize("modality", phantom.MODALITIES)
def test_labels_are_exactly_the_mmwhs_codes(subjects, modality):
    image, label, _ = subjects[modality, 0]
    assert set(np.unique(label.array).tolist()) == {0, *MMWHS_LABELS}
    assert set(phantom.LABEL_CODES) == {0, *MMWHS_LABELS}
    assert image.geometry == label.geometry == phantom.grid_geometry(modality, SHAPE)
    assert image.shape == (SHAPE,) * 3


@pytest.mark.parametrize("modality", phantom.MODALITIES)
def test_every_structure_survives_the_smallest_grid(modality):
    for seed in range(5):
        _, label = phantom.tissues_and_labels(modality, seed, 16)
        assert set(np.unique(label.array).tolist()) == {0, *MMWHS_LABELS}


@pytest.mark.parametrize("modality", phantom.MODALITIES)
def test_deterministic_for_a_seed_and_different_across_seeds(subjects, modality):
    image, label, _ = subjects[modality, 0]
    again_image, again_label = phantom.make_subject(modality, 0, SHAPE)
    np.testing.assert_array_equal(again_image.array, image.array)
    np.testing.assert_array_equal(again_label.array, label.array)
    other_image, other_label, _ = subjects[modality, 1]
    heart, other_heart = label.array > 0, other_label.array > 0
    overlap = 2 * np.count_nonzero(heart & other_heart) / (heart.sum() + other_heart.sum())
    assert overlap < 0.95
    assert not np.array_equal(other_image.array, image.array)


def test_subjects_differ_in_pose_and_shape():
    """Centroid of the left ventricle (mm) and heart volume vary between individuals."""
    centroids, volumes = [], []
    for seed in range(6):
        _, label = phantom.tissues_and_labels("ct", seed, SHAPE)
        voxel = np.prod(label.spacing_zyx)
        centroids.append(np.argwhere(label.array == phantom.LV).mean(axis=0) * label.spacing_zyx)
        volumes.append(np.count_nonzero(label.array) * voxel)
    assert np.ptp(np.asarray(centroids), axis=0).max() > 3.0
    assert np.ptp(volumes) / np.mean(volumes) > 0.1


def test_ct_and_mr_grids_and_images_differ(subjects):
    ct_image, ct_label, _ = subjects["ct", 0]
    mr_image, mr_label, _ = subjects["mr", 0]
    assert not np.allclose(ct_image.geometry.spacing, mr_image.geometry.spacing)
    assert not np.allclose(mr_image.geometry.direction, np.eye(3).ravel())
    assert ct_image.array.dtype == np.int16 and mr_image.array.dtype == np.float32
    # The same seed is the same individual: the heart's physical volume agrees across grids.
    ct_volume = np.count_nonzero(ct_label.array) * np.prod(ct_label.spacing_zyx)
    mr_volume = np.count_nonzero(mr_label.array) * np.prod(mr_label.spacing_zyx)
    assert abs(ct_volume - mr_volume) / ct_volume < 0.1
    # The data set draws different individuals for CT and MR.
    assert phantom.subject_seed(0, "ct", 1) != phantom.subject_seed(0, "mr", 1)


def _means(image, label, tissue):
    a = image.array.astype(np.float64)
    return {
        "fat": a[tissue.array == phantom.FAT].mean(),
        "bone": a[tissue.array == phantom.BONE].mean(),
        "myocardium": a[label.array == phantom.MYO].mean(),
        "blood": a[label.array == phantom.LV].mean(),
    }


@pytest.mark.parametrize("seed", (0, 1))
def test_contrast_differs_between_modalities(subjects, seed):
    ct = _means(*subjects["ct", seed])
    mr = _means(*subjects["mr", seed])
    assert ct["fat"] < ct["myocardium"] < ct["bone"]
    assert mr["bone"] < mr["myocardium"] < mr["fat"]
    assert ct["blood"] > ct["myocardium"] + 100  # HU
    assert mr["blood"] > 1.5 * mr["myocardium"]


def test_bad_arguments_raise_dataset_errors(tmp_path):
    with pytest.raises(DatasetError, match="modality"):
        phantom.make_subject("pet", 0, SHAPE)
    with pytest.raises(DatasetError, match="shape"):
        phantom.make_subject("ct", 0, 8)
    with pytest.raises(DatasetError, match="at least one"):
        phantom.generate(tmp_path, n=0)


def test_written_files_read_back_with_their_geometry(tmp_path):
    paths = phantom.generate(tmp_path, n=2, shape=20, seed=5, workers=1)
    names = sorted(p.name for p in paths)
    assert names == sorted(
        f"{m}_train_{n}_{kind}.nii.gz" for m in ("ct", "mr") for n in (1001, 1002) for kind in ("image", "label")
    )
    for modality in phantom.MODALITIES:
        image_path, label_path = phantom.case_paths(tmp_path, modality, 1002)
        image = read_image(image_path)
        label = read_label(label_path, allowed=MMWHS_LABELS, like=image)
        expected_image, expected_label = phantom.make_subject(modality, phantom.subject_seed(5, modality, 2), 20)
        assert image.geometry.matches(expected_image.geometry)
        np.testing.assert_array_equal(label.array, expected_label.array)
        np.testing.assert_allclose(image.array, expected_image.array, rtol=1e-6)
    ct, mr = (read_label(phantom.case_paths(tmp_path, m, 1001)[1]) for m in phantom.MODALITIES)
    assert ct.array.shape == mr.array.shape and not np.array_equal(ct.array, mr.array)
    dataset = open_dataset(tmp_path, "mmwhs")
    assert [c.id for c in dataset.of("mr")] == ["mr_1001", "mr_1002"]
    image, label = load_case(dataset.of("ct")[0], dataset.labels)
    assert set(np.unique(label.array).tolist()) == {0, *MMWHS_LABELS}


def test_generate_is_reproducible_with_parallel_workers(tmp_path):
    serial = phantom.generate(tmp_path / "serial", n=2, shape=16, seed=3, modalities=("mr",), workers=1)
    parallel = phantom.generate(tmp_path / "parallel", n=2, shape=16, seed=3, modalities=("mr",), workers=2)
    for a, b in zip(serial, parallel):
        assert a.name == b.name
        np.testing.assert_array_equal(read_image(a).array, read_image(b).array)


def _run_cli(*args):
    return run_experiment("make_phantom", *args, timeout=120)


def test_cli_writes_the_data_set_and_a_preview(tmp_path):
    preview = tmp_path / "preview.png"
    result = _run_cli("--out", str(tmp_path / "data"), "--n", "1", "--shape", "24", "--preview", str(preview))
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1 and "wrote 2 cases" in result.stdout
    written = sorted(p.name for p in (tmp_path / "data").iterdir())
    assert written == sorted(f"{m}_train_1001_{k}.nii.gz" for m in ("ct", "mr") for k in ("image", "label"))
    assert preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and preview.stat().st_size > 20_000


def test_cli_help_does_not_import_tensorflow():
    result = _run_cli("--help")
    assert result.returncode in (0, 1) and "--preview" in result.stdout  # absl exits 1 after --help
    env = dict(os.environ, PYTHONPATH=str(Path(cmmas.__file__).resolve().parents[1]))
    probe = "import sys, cmmas.datasets.phantom; print('tensorflow' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, encoding="utf-8", env=env, check=True)
    assert out.stdout.split() == ["False", "False"]
