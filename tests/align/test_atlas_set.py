"""atlas_set.py: preparing an atlas set once, reading it back, rejecting bad atlases."""

import os

import numpy as np
import pytest

from cmmas import preprocess
from cmmas.align import atlas_set
from cmmas.align import mapping
from cmmas.align import prepare
from cmmas.datasets import open_dataset
from cmmas.datasets.mmwhs import MMWHS_LABELS
from cmmas.errors import AtlasSetError, ImageReadError, LabelError
from phantom_data import numbered, write_phantom_folder
from cmmas.datasets.loading import load_case

SHAPE = (24, 24, 24)
SPACING = (4.0, 4.0, 4.0)


def _folder(root, n=3):
    return open_dataset(write_phantom_folder(root, numbered("ct", range(n))), "folder")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("atlases")
    dataset = _folder(root / "data")
    cases = list(dataset.of("ct"))
    out = root / "set"
    aset = prepare.prepare(cases, dataset.labels, out, shape_zyx=SHAPE, spacing_zyx=SPACING,
                             roles={cases[-1].id: "test"}, progress=False)
    return dataset, cases, out, aset


def _whole_grid_back(array, geometry, transforms, target, kind):
    """Reference map-back: the whole working grid resampled through the inverse alignment by ANTs."""
    from cmmas.align import ants as align_ants
    from cmmas.io import Image

    return align_ants.apply(list(transforms), Image(array, geometry), target, kind=kind, invert=True)


def test_manifest_round_trips(prepared):
    dataset, cases, out, aset = prepared
    again = atlas_set.AtlasSet(out)
    assert again.manifest == aset.manifest
    assert again.geometry.shape == SHAPE
    np.testing.assert_allclose(again.geometry.spacing, SPACING[::-1])
    assert again.labels == dataset.labels
    assert again.manifest.reference in {c.id for c in cases}
    assert again.ids(role="train") == [c.id for c in cases[:-1]]
    assert again.ids(role="test") == [cases[-1].id]


def test_stored_cases_are_on_the_working_grid(prepared):
    _, cases, _, aset = prepared
    images, labels = aset.arrays(aset.ids())
    assert images.shape == (len(cases),) + SHAPE and labels.shape == images.shape
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert set(np.unique(labels)) <= {0, *MMWHS_LABELS}
    for case_id in aset.ids():
        assert aset.image(case_id).geometry.matches(aset.geometry)


def test_stack_gives_what_the_niftis_hold(prepared, tmp_path):
    _, _, out, aset = prepared
    assert (out / atlas_set.STACK).is_file()
    ids = aset.ids()[::-1]
    stacked = atlas_set.AtlasSet(out).arrays(ids)
    copy = tmp_path / "set"
    copy.mkdir()
    for name in ("manifest.json", "images", "labels"):
        os.symlink(out / name, copy / name)
    from_niftis = atlas_set.AtlasSet(copy).arrays(ids)  # no stack.npz there
    np.testing.assert_array_equal(stacked[0], from_niftis[0])
    np.testing.assert_array_equal(stacked[1], from_niftis[1])
    assert stacked[0].dtype == np.float32 and stacked[1].dtype == np.int32


def test_stack_of_other_cases_is_one_line(prepared, tmp_path):
    _, _, out, aset = prepared
    copy = tmp_path / "set"
    copy.mkdir()
    for name in ("manifest.json", "images", "labels"):
        os.symlink(out / name, copy / name)
    images, labels = aset.arrays(aset.ids()[:1])
    np.savez(copy / atlas_set.STACK, ids=np.asarray(["other"]), images=images, labels=labels)
    with pytest.raises(AtlasSetError) as err:
        atlas_set.AtlasSet(copy).arrays(aset.ids()[:1])
    assert "stack.npz" in str(err.value) and "does not match the manifest" in str(err.value)
    assert "\n" not in str(err.value)


def _overlap(a, b):
    return 2 * np.count_nonzero(a & b) / (a.sum() + b.sum())


def test_alignment_brings_atlases_together(prepared):
    dataset, cases, _, aset = prepared
    ref = aset.label(aset.manifest.reference).array > 0
    before, after = [], []
    for case in cases:
        if case.id == aset.manifest.reference:
            continue
        _, label = load_case(case, dataset.labels)
        unaligned = preprocess.resample(label, geometry=aset.geometry, kind="label").array > 0
        before.append(_overlap(unaligned, ref))
        after.append(_overlap(aset.label(case.id).array > 0, ref))
    assert np.mean(after) > np.mean(before) + 0.05 and np.mean(after) > 0.6, (before, after)


def test_rerun_skips_what_is_done(prepared):
    dataset, cases, out, aset = prepared
    stamp = {p: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    prepare.prepare(cases, dataset.labels, out, shape_zyx=SHAPE, spacing_zyx=SPACING,
                      roles={cases[-1].id: "test"}, progress=False)
    assert {p: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == stamp


def test_wrong_label_table_is_rejected_naming_the_file(tmp_path):
    dataset = _folder(tmp_path / "data", n=2)
    bad = dict(dataset.labels)
    bad.pop(850)
    with pytest.raises(LabelError) as info:
        prepare.prepare(list(dataset.of("ct")), bad, tmp_path / "set", SHAPE, SPACING, progress=False)
    assert "ct_00_label.nii.gz" in str(info.value) and "850" in str(info.value)
    assert "\n" not in str(info.value)


def test_non_3d_atlas_is_rejected_naming_the_file(tmp_path):
    import SimpleITK as sitk

    dataset = _folder(tmp_path / "data", n=2)
    flat = dataset.of("ct")[1].image_path
    os.remove(flat)
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkFloat32), str(flat))
    with pytest.raises(ImageReadError) as info:
        prepare.prepare(list(dataset.of("ct")), dataset.labels, tmp_path / "set", SHAPE, SPACING, progress=False)
    assert flat.name in str(info.value) and "3D" in str(info.value)


def test_bad_manifest_is_one_line(tmp_path):
    with pytest.raises(AtlasSetError) as info:
        atlas_set.AtlasSet(tmp_path)
    assert "manifest.json" in str(info.value)
    (tmp_path / "manifest.json").write_text('{"version": 1, "reference": "x"}')
    with pytest.raises(AtlasSetError) as info:
        atlas_set.AtlasSet(tmp_path)
    assert "invalid manifest" in str(info.value)


def test_reached_box_holds_every_voxel_the_working_grid_reaches(tmp_path):
    import SimpleITK as sitk

    from cmmas.io import Geometry

    target = Geometry.identity((40, 36, 44), (2.0, 2.0, 2.0), origin=(-5.0, 3.0, 1.0))
    working = Geometry.identity((10, 12, 8), (3.0, 3.0, 3.0), origin=(20.0, 15.0, 25.0))
    affine = sitk.AffineTransform(3)  # reference (working grid) point -> target point
    angle = np.deg2rad(12.0)
    affine.SetMatrix([np.cos(angle), -np.sin(angle), 0.0, np.sin(angle), np.cos(angle), 0.0, 0.0, 0.0, 1.0])
    affine.SetCenter([30.0, 30.0, 40.0])
    affine.SetTranslation([4.0, -3.0, 6.0])
    path = str(tmp_path / "affine.mat")
    sitk.WriteTransform(affine, path)

    box = mapping.reached_box(working, [path], target)
    reached = _whole_grid_back(np.ones(working.shape, np.float32), working, [path], target,
                                       kind="linear").array > 0
    outside = reached.copy()
    outside[box] = False
    assert reached[box].any() and not outside.any()
    assert np.prod([s.stop - s.start for s in box]) < 0.25 * reached.size  # the crop saves work
    far = sitk.AffineTransform(3)
    far.SetTranslation([900.0, 0.0, 0.0])
    sitk.WriteTransform(far, str(tmp_path / "far.mat"))
    assert mapping.reached_box(working, [str(tmp_path / "far.mat")], target) is None
