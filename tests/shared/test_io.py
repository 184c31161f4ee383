"""io.py: geometry survives write/read, writes are atomic, each bad input gets its one-line error."""

import os

import numpy as np
import pytest
import SimpleITK as sitk

from cmmas.errors import CmmasError, GeometryError, ImageReadError, LabelError
from cmmas.io import (Geometry, Image, atomic_path, atomic_write_text, label_dtype, read_image, read_label,
                      write_image)


def _image(shape=(6, 7, 8), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1)) -> Image:
    geometry = Geometry(
        size=tuple(reversed(shape)),
        spacing=(0.8, 1.25, 3.5),
        origin=(-12.5, 40.0, 7.25),
        direction=tuple(float(d) for d in direction),
    )
    array = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    return Image(array, geometry)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_geometry_survives_write_and_read(tmp_path, suffix):
    img = _image()
    path = write_image(img, tmp_path / f"a{suffix}")
    back = read_image(path)
    assert back.geometry.matches(img.geometry)
    assert back.shape == (6, 7, 8)
    np.testing.assert_array_equal(back.array, img.array)
    assert back.path == str(path)


def test_array_order_is_zyx_and_physical_mapping(tmp_path):
    img = _image()
    assert img.geometry.shape == (6, 7, 8)
    assert img.spacing_zyx == (3.5, 1.25, 0.8)
    point = img.geometry.index_to_physical(np.array([2.0, 3.0, 4.0]))
    ref = sitk.Image(8, 7, 6, sitk.sitkFloat32)
    ref.SetSpacing(img.geometry.spacing)
    ref.SetOrigin(img.geometry.origin)
    ref.SetDirection(img.geometry.direction)
    np.testing.assert_allclose(point, ref.TransformContinuousIndexToPhysicalPoint((2.0, 3.0, 4.0)))
    np.testing.assert_allclose(img.geometry.physical_to_index(point), [2.0, 3.0, 4.0])


def test_sub_grid_keeps_every_voxel_where_it_was():
    geometry = _image().geometry
    box = (slice(1, 4), slice(2, 7), slice(3, 5))
    sub = geometry.sub_grid(box)
    assert sub.shape == (3, 5, 2) and sub.spacing == geometry.spacing and sub.direction == geometry.direction
    np.testing.assert_allclose(sub.index_to_physical(np.array([1.0, 2.0, 0.0])),
                               geometry.index_to_physical(np.array([4.0, 4.0, 1.0])))
    assert geometry.sub_grid((slice(None),) * 3) == geometry
    corners = geometry.corners()  # voxel edges: half a voxel beyond the first and last centres
    np.testing.assert_allclose(corners[0], geometry.index_to_physical(np.array([-0.5, -0.5, -0.5])))
    np.testing.assert_allclose(corners[-1], geometry.index_to_physical(np.array([7.5, 6.5, 5.5])))
    with pytest.raises(GeometryError, match="empty"):
        geometry.sub_grid((slice(2, 2), slice(None), slice(None)))


def test_dicom_series_folder_is_read_as_one_volume(tmp_path):
    volume = sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 1000, (4, 10, 12)).astype(np.int16))
    volume.SetSpacing((0.7, 0.7, 2.5))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(4):
        sl = volume[:, :, z]
        for tag, value in {
            "0008|0060": "MR",
            "0020|000e": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.2",
            "0020|0032": "\\".join(map(str, volume.TransformIndexToPhysicalPoint((0, 0, z)))),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0013": str(z + 1),
            "0028|0030": "0.7\\0.7",
        }.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(tmp_path / f"slice{z:02d}.dcm"))
        writer.Execute(sl)
    img = read_image(tmp_path)
    assert img.shape == (4, 10, 12)
    np.testing.assert_allclose(img.spacing_zyx, (2.5, 0.7, 0.7), atol=1e-3)
    np.testing.assert_array_equal(img.array, sitk.GetArrayFromImage(volume))


@pytest.mark.parametrize("codes, dtype", [([0, 1, 4], np.uint8), ([0, 255], np.uint8), ([0, 205, 850], np.int16),
                                          ([-1, 3], np.int16), ([0, 40000], np.int32), ([], np.uint8)])
def test_label_dtype_is_the_smallest_that_holds_the_codes(codes, dtype):
    assert label_dtype(codes) == np.dtype(dtype)


def test_write_is_atomic_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out" / "x.nii.gz"
    write_image(_image(), target)
    write_image(_image(), target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.nii.gz"]
    atomic_write_text(tmp_path / "t.json", "{}")
    assert (tmp_path / "t.json").read_text() == "{}"
    umask = os.umask(0o022)
    try:
        write_image(_image(), target)
        atomic_write_text(tmp_path / "t.json", "{}")
    finally:
        os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "t.json").stat().st_mode & 0o777 == 0o644


def test_atomic_path_keeps_the_old_file_on_error_and_publishes_with_the_umask(tmp_path):
    target = tmp_path / "figure.png"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="half-written"):
        with atomic_path(target, ".png") as tmp:
            assert tmp.endswith(".png") and os.path.dirname(tmp) == str(tmp_path)
            with open(tmp, "w") as handle:
                handle.write("new")
            raise RuntimeError("half-written")
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["figure.png"]
    umask = os.umask(0o022)
    try:
        with atomic_path(target, ".png") as tmp:
            with open(tmp, "w") as handle:
                handle.write("new")
    finally:
        os.umask(umask)
    assert target.read_text() == "new" and target.stat().st_mode & 0o777 == 0o644


def _one_line(err: CmmasError, name: str) -> str:
    text = str(err)
    assert "\n" not in text and name in text
    return text


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError) as info:
        read_image(tmp_path / "nope.nii.gz")
    assert "not found" in _one_line(info.value, "nope.nii.gz")


def test_corrupt_and_truncated_files(tmp_path):
    bad = tmp_path / "junk.nii.gz"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(ImageReadError) as info:
        read_image(bad)
    assert "unreadable" in _one_line(info.value, "junk.nii.gz")
    good = write_image(_image((20, 20, 20)), tmp_path / "full.nii")
    cut = tmp_path / "cut.nii"
    cut.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(ImageReadError) as info:
        read_image(cut)
    assert "truncated" in _one_line(info.value, "cut.nii")
    labels = write_image(_image((20, 20, 20)).with_array(np.ones((20, 20, 20), np.uint8)), tmp_path / "lab.nii")
    cut_labels = tmp_path / "cut_labels.nii"
    cut_labels.write_bytes(labels.read_bytes()[:2000])
    with pytest.raises(ImageReadError) as info:
        read_label(cut_labels)
    assert "truncated" in _one_line(info.value, "cut_labels.nii")
    gz = write_image(_image((20, 20, 20)), tmp_path / "full.nii.gz")
    cut_gz = tmp_path / "cut.nii.gz"
    cut_gz.write_bytes(gz.read_bytes()[:-40])
    with pytest.raises(ImageReadError) as info:
        read_image(cut_gz)
    _one_line(info.value, "cut.nii.gz")


def test_not_3d(tmp_path):
    path = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.Image(5, 5, sitk.sitkFloat32), str(path))
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert "3D" in _one_line(info.value, "flat.nii.gz")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha"])
def test_nan_voxels(tmp_path, suffix):
    img = _image()
    array = img.array.copy()
    array[1, 2, 3] = np.nan
    array[2, 2, 3] = np.inf
    path = write_image(img.with_array(array), tmp_path / f"nan{suffix}")
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert "2 voxel(s) are NaN" in _one_line(info.value, f"nan{suffix}")


def test_label_checks(tmp_path):
    img = _image()
    labels = np.zeros(img.shape, np.int16)
    labels[1:3, 2:5, 2:6] = 500
    path = write_image(img.with_array(labels), tmp_path / "lab.nii.gz")
    out = read_label(path, allowed=[205, 500], like=img)
    assert out.array.dtype == np.int32 and set(np.unique(out.array)) == {0, 500}
    with pytest.raises(LabelError) as info:
        read_label(path, allowed=[205])
    assert "unknown label values [500]" in _one_line(info.value, "lab.nii.gz")
    frac = write_image(img.with_array(labels + 0.5), tmp_path / "frac.nii.gz")
    with pytest.raises(LabelError) as info:
        read_label(frac)
    assert "non-integer" in _one_line(info.value, "frac.nii.gz")


def test_label_geometry_mismatch(tmp_path):
    img = _image()
    moved = Image(np.zeros(img.shape, np.int16), Geometry(img.geometry.size, (1.0, 1.25, 3.5), img.geometry.origin, img.geometry.direction))
    path = write_image(moved, tmp_path / "lab.nii.gz")
    with pytest.raises(GeometryError) as info:
        read_label(path, like=img)
    assert "spacing" in _one_line(info.value, "lab.nii.gz")


def test_image_rejects_mismatched_array():
    img = _image()
    with pytest.raises(GeometryError):
        Image(np.zeros((2, 2, 2)), img.geometry)
    with pytest.raises(GeometryError):
        img.with_array(np.zeros((6, 7)))


def test_unsupported_suffix(tmp_path):
    with pytest.raises(ImageReadError):
        write_image(_image(), tmp_path / "a.png")


def test_errors_survive_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(LabelError("/data/a.nii.gz", "unknown label values [7]")))
    assert isinstance(err, LabelError) and str(err) == "/data/a.nii.gz: unknown label values [7]"


def test_read_keeps_the_file_dtype_when_asked(tmp_path):
    array = np.arange(-60, 60, dtype=np.int16).reshape(4, 5, 6)
    path = write_image(Image(array, Geometry.identity(array.shape)), tmp_path / "ct.nii.gz")
    native = read_image(path, dtype=None)
    assert native.array.dtype == np.int16 and np.array_equal(native.array, array)
    assert read_image(path).array.dtype == np.float32 and np.array_equal(read_image(path).array, array)


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
def test_a_scan_read_in_its_own_dtype_is_the_files_buffer_writable_and_outlives_the_reader(tmp_path, suffix):
    import gc

    img = _image()
    path = write_image(img.with_array(img.array.astype(np.int16)), tmp_path / f"a{suffix}")
    native = read_image(path, dtype=None)
    gc.collect()  # the SimpleITK image behind the array is kept alive by the array alone
    assert native.array.dtype == np.int16 and native.array.flags.writeable
    np.testing.assert_array_equal(native.array, img.array.astype(np.int16))
    native.array[0, 0, 0] = 1234  # the buffer is this array's: another read does not see it
    assert read_image(path, dtype=None).array[0, 0, 0] == 0
    assert read_image(path).array.dtype == np.float32
