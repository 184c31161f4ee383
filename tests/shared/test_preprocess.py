"""Preprocessing keeps physical positions, and its inverse (one resample) restores labels exactly."""

import numpy as np
import pytest

from cmmas.errors import CmmasError, GeometryError, LabelError
from cmmas.io import Geometry, Image
from cmmas.preprocess import (
    back_to_grid,
    body_mask,
    bounding_box,
    crop_or_pad,
    normalize_intensity,
    physical_center,
    reorient,
    resample,
    roi_from_mask,
    sample,
    to_working_grid,
    working_geometry,
)

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
# NIfTI radiological (LAS) and neurological (RAS) files as ITK reads them, and a scan stored with
# its axes permuted and flipped (voxel x along -z, y along x, z along -y).
LAS = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
RAS = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
PERMUTED = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0, -1.0, 0.0, 0.0)
DIRECTIONS = {"LPS": IDENTITY, "LAS": LAS, "RAS": RAS, "permuted": PERMUTED}


def make_image(array, spacing_zyx=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=IDENTITY, path="scan.nii.gz"):
    geometry = Geometry(
        size=tuple(int(s) for s in reversed(array.shape)),
        spacing=tuple(float(s) for s in reversed(spacing_zyx)),
        origin=tuple(float(o) for o in origin),
        direction=tuple(float(d) for d in direction),
    )
    return Image(array, geometry, path)


def ball(shape, center, radius, spacing=(1.0, 1.0, 1.0)):
    grid = np.indices(shape).astype(np.float64)
    dist2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, center, spacing))
    return dist2 <= radius**2


def heart_label(shape=(30, 36, 40)):
    """MM-WHS-like codes: two blobs and a one-voxel structure (the first to vanish if smoothed)."""
    label = np.zeros(shape, np.int16)
    label[ball(shape, (12, 15, 18), 6)] = 500
    label[ball(shape, (16, 20, 24), 4)] = 205
    label[10, 22, 12] = 820
    return label


def physical_of_argmax(image):
    index_zyx = np.unravel_index(np.argmax(image.array), image.shape)
    return image.geometry.index_to_physical(np.asarray(index_zyx[::-1], dtype=np.float64))


def working_spacing_zyx(geometry):
    """The spacing along physical x, y, z of an axis-aligned grid, in (z, y, x) order."""
    return tuple((np.abs(geometry.direction_matrix) @ np.asarray(geometry.spacing))[::-1])


@pytest.mark.parametrize("kind", ["nearest", "label"])
@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_label_round_trip_through_working_grid_is_exact(name, kind):
    label = make_image(heart_label(), spacing_zyx=(2.0, 0.9, 0.7), origin=(-12.3, 40.1, 7.7), direction=DIRECTIONS[name])
    roi = roi_from_mask(label, label.array != 0, margin_mm=3.0)

    work = to_working_grid(label, working_spacing_zyx(label.geometry), (26, 26, 26), roi.center_mm, kind=kind)
    back = back_to_grid(work, label.geometry)

    assert work.geometry.direction == IDENTITY
    assert sorted(np.unique(work.array)) == [0, 205, 500, 820]
    assert np.count_nonzero(work.array) == np.count_nonzero(label.array)
    assert back.geometry == label.geometry
    assert back.array.dtype == label.array.dtype
    np.testing.assert_array_equal(back.array, label.array)


def test_image_on_working_grid_copies_voxels_when_spacing_is_unchanged():
    rng = np.random.default_rng(1)
    image = make_image(rng.normal(size=(20, 22, 24)).astype(np.float32), (1.5, 1.0, 0.8), (3.3, -2.1, 0.4), LAS)
    work = to_working_grid(image, working_spacing_zyx(image.geometry), (16, 16, 16), physical_center(image.geometry) + 0.3)
    back = back_to_grid(work, image.geometry, kind="linear", default=np.nan)
    inside = np.isfinite(back.array)
    assert inside.sum() == 16**3
    np.testing.assert_allclose(back.array[inside], image.array[inside], atol=1e-6)


def test_coarser_working_grid_round_trip_keeps_structures():
    shape, spacing = (30, 36, 40), (2.0, 0.9, 0.7)
    codes = np.zeros(shape, np.int16)
    codes[ball(shape, (14, 16, 18), 9.0, spacing)] = 500
    codes[ball(shape, (16, 22, 26), 6.0, spacing)] = 205
    label = make_image(codes, spacing, direction=RAS)
    work = to_working_grid(label, (2.0, 2.0, 2.0), (20, 20, 20), kind="label")
    back = back_to_grid(work, label.geometry, kind="label")
    for code in (500, 205):
        a, b = label.array == code, back.array == code
        assert 2 * np.sum(a & b) / (a.sum() + b.sum()) > 0.85


def test_working_geometry_is_centred_at_the_point():
    center = np.array([10.0, -20.0, 33.5])
    geometry = working_geometry(center, (2.0, 1.0, 1.5), (8, 9, 10), direction=PERMUTED)
    np.testing.assert_allclose(physical_center(geometry), center, atol=1e-9)
    assert geometry.shape == (8, 9, 10)
    assert geometry.spacing_zyx == (2.0, 1.0, 1.5)
    with pytest.raises(GeometryError, match="orthonormal"):
        working_geometry(center, 1.0, (4, 4, 4), direction=(1.0,) * 9)


def test_working_grid_pads_intensities_with_the_image_minimum():
    image = make_image(np.full((8, 8, 8), -1000.0, np.float32) + np.arange(8, dtype=np.float32))
    work = to_working_grid(image, 1.0, (16, 16, 16))
    assert work.array.min() == -1000.0
    assert work.array[0, 0, 0] == -1000.0


@pytest.mark.parametrize("new_spacing", [(1.0, 1.0, 1.0), (3.0, 2.0, 2.5)])
def test_resample_keeps_extent_and_physical_positions(new_spacing):
    shape, spacing = (16, 20, 24), (2.5, 1.2, 0.8)
    array = np.zeros(shape, np.float32)
    array[ball(shape, (7, 11, 13), 2.5, spacing)] = 100.0
    array[7, 11, 13] = 200.0
    image = make_image(array, spacing, (5.0, -7.0, 2.0), LAS)

    out = resample(image, spacing_zyx=new_spacing)

    extent = np.asarray(shape) * np.asarray(spacing)
    assert out.shape == tuple(int(n) for n in np.ceil(extent / np.asarray(new_spacing)))
    assert out.geometry.origin == image.geometry.origin
    assert out.geometry.direction == image.geometry.direction
    np.testing.assert_allclose(out.spacing_zyx, new_spacing)
    assert out.array.dtype == np.float32
    offset = np.abs(physical_of_argmax(out) - physical_of_argmax(image))
    assert np.all(offset <= np.asarray(new_spacing[::-1]) / 2 + 1e-6)


def test_resample_needs_exactly_one_target():
    image = make_image(np.zeros((4, 4, 4), np.float32))
    with pytest.raises(GeometryError, match="exactly one"):
        resample(image)
    with pytest.raises(GeometryError, match="exactly one"):
        resample(image, spacing_zyx=1.0, geometry=image.geometry)
    with pytest.raises(GeometryError, match="positive"):
        resample(image, spacing_zyx=(1.0, 0.0, 1.0))
    with pytest.raises(CmmasError, match="scan.nii.gz: unknown interpolation kind 'cubic'"):
        resample(image, spacing_zyx=1.0, kind="cubic")


@pytest.mark.parametrize("kind", ["label", "nearest"])
def test_label_resample_keeps_only_original_values(kind):
    label = make_image(heart_label(), spacing_zyx=(2.0, 0.9, 0.7), direction=LAS)
    out = resample(label, spacing_zyx=(1.3, 1.7, 1.1), kind=kind)
    assert out.array.dtype == np.int16
    assert set(np.unique(out.array)) <= {0, 205, 500, 820}
    assert {205, 500} <= set(np.unique(out.array))


def test_label_resample_accepts_integer_valued_floats_and_bools():
    codes = heart_label().astype(np.float32)
    out = resample(make_image(codes), spacing_zyx=1.5, kind="label")
    assert out.array.dtype == np.int32
    assert set(np.unique(out.array)) <= {0, 205, 500, 820}
    mask = resample(make_image(codes > 0), spacing_zyx=0.5, kind="nearest")
    assert mask.array.dtype == np.bool_ and mask.array.any()
    with pytest.raises(LabelError, match="fractions"):
        resample(make_image(codes + 0.5), spacing_zyx=1.5, kind="label")


def test_reorient_keeps_physical_positions():
    rng = np.random.default_rng(2)
    image = make_image(rng.normal(size=(6, 7, 8)).astype(np.float32), (2.0, 1.0, 0.5), (1.0, 2.0, 3.0), PERMUTED)

    out = reorient(image, "LPS")

    assert out.geometry.direction == IDENTITY
    index_zyx = np.stack(np.meshgrid(*[np.arange(n) for n in out.shape], indexing="ij"), -1).reshape(-1, 3)
    points = out.geometry.index_to_physical(index_zyx[:, ::-1].astype(np.float64))
    source = np.round(image.geometry.physical_to_index(points)).astype(int)[:, ::-1]
    np.testing.assert_array_equal(out.array[tuple(index_zyx.T)], image.array[tuple(source.T)])
    back = reorient(out, "ila")
    np.testing.assert_allclose(back.geometry.direction, PERMUTED, atol=1e-12)
    np.testing.assert_array_equal(back.array, image.array)
    with pytest.raises(GeometryError, match="scan.nii.gz: invalid orientation 'LPL'"):
        reorient(image, "LPL")


# a crop inside the image; a pad all round; a box overhanging the image's corner
@pytest.mark.parametrize("shape, center", [((5, 6, 7), (4, 5, 6)), ((14, 12, 9), None), ((9, 3, 16), (0, 10, 2))])
def test_crop_or_pad_keeps_physical_positions(shape, center):
    rng = np.random.default_rng(3)
    image = make_image(rng.integers(1, 100, size=(10, 11, 12)).astype(np.int32), (2.0, 1.0, 0.5), (4.0, 5.0, 6.0), RAS)

    out = crop_or_pad(image, shape, center, pad_value=-1)

    assert out.shape == shape and out.array.dtype == np.int32
    index_zyx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    points = out.geometry.index_to_physical(index_zyx[:, ::-1].astype(np.float64))
    source = image.geometry.physical_to_index(points)[:, ::-1]
    np.testing.assert_allclose(source, np.round(source), atol=1e-9)
    source = np.round(source).astype(int)
    inside = np.all((source >= 0) & (source < np.asarray(image.shape)), axis=1)
    values = out.array[tuple(index_zyx.T)]
    np.testing.assert_array_equal(values[inside], image.array[tuple(source[inside].T)])
    assert np.all(values[~inside] == -1)
    assert inside.any()


def test_crop_or_pad_defaults_to_the_middle():
    image = make_image(np.arange(10 * 10 * 10).reshape(10, 10, 10))
    np.testing.assert_array_equal(crop_or_pad(image, (6, 6, 6)).array, image.array[2:8, 2:8, 2:8])


@pytest.mark.parametrize("method", ["zscore", "minmax"])
def test_normalize_constant_image_gives_zeros(method):
    out = normalize_intensity(np.full((8, 8, 8), 7.0), method=method)
    assert out.dtype == np.float32
    assert np.all(out == 0.0)


def test_normalize_zscore_and_minmax():
    rng = np.random.default_rng(4)
    array = rng.normal(50.0, 10.0, size=(16, 16, 16))
    array[0, 0, 0] = 1e6
    z = normalize_intensity(array, "zscore")
    assert abs(float(z.mean())) < 1e-3 and abs(float(z.std()) - 1.0) < 1e-3
    assert z.max() < 4.0, "the outlier is clipped at the 99.5th percentile"
    m = normalize_intensity(make_image(array.astype(np.float32)), "minmax")
    assert isinstance(m, Image) and m.array.dtype == np.float32
    assert m.array.min() == 0.0 and m.array.max() == 1.0
    mask = np.zeros(array.shape, bool)
    mask[4:12] = True
    zm = normalize_intensity(array, "zscore", percentiles=None, mask=mask)
    assert abs(float(zm[mask].mean())) < 1e-4 and abs(float(zm[mask].std()) - 1.0) < 1e-4
    with pytest.raises(LabelError, match="empty"):
        normalize_intensity(array, mask=np.zeros(array.shape, bool))
    with pytest.raises(GeometryError, match="mask shape"):
        normalize_intensity(array, mask=np.ones((2, 2, 2), bool))
    with pytest.raises(CmmasError, match="percentiles"):
        normalize_intensity(array, percentiles=(99.0, 1.0))


def test_bounding_box_with_margin_is_clipped():
    mask = np.zeros((10, 12, 14), bool)
    mask[2:5, 6:8, 10:14] = True
    assert bounding_box(mask) == (slice(2, 5), slice(6, 8), slice(10, 14))
    assert bounding_box(mask, margin_vox=3) == (slice(0, 8), slice(3, 11), slice(7, 14))
    assert bounding_box(mask, margin_vox=(0, 1, 2)) == (slice(2, 5), slice(5, 9), slice(8, 14))
    with pytest.raises(LabelError, match="empty"):
        bounding_box(np.zeros((3, 3, 3)))


def test_body_mask_finds_a_sphere_in_noise():
    rng = np.random.default_rng(5)
    shape = (32, 32, 32)
    sphere = ball(shape, (16, 15, 17), 10)
    array = rng.normal(0.0, 0.4, size=shape) + 4.0 * sphere
    array[14:17, 14:17, 15:18] = 0.0  # a dark cavity inside the body
    array[2, 2, 2] = array[29, 3, 28] = 10.0  # bright specks outside it

    found = body_mask(make_image(array.astype(np.float32)))

    assert found.dtype == np.bool_
    iou = np.sum(found & sphere) / np.sum(found | sphere)
    assert iou > 0.98
    assert found[15, 15, 16] and not found[2, 2, 2] and not found[29, 3, 28]
    with pytest.raises(LabelError, match="threshold"):
        body_mask(array, threshold=100.0)


def test_roi_from_mask_centres_the_mask_with_a_margin():
    image = make_image(np.zeros((20, 30, 40), np.float32), (2.0, 1.0, 0.5), (1.0, 2.0, 3.0), LAS)
    mask = np.zeros(image.shape, bool)
    mask[6:11, 10:15, 20:31] = True

    roi = roi_from_mask(image, mask, margin_mm=2.0)

    expected_center = image.geometry.index_to_physical(np.array([25.0, 12.0, 8.0]))
    np.testing.assert_allclose(roi.center_mm, expected_center)
    assert roi.center_zyx == (8, 12, 25)
    assert roi.box == (slice(5, 12), slice(8, 17), slice(16, 35))
    np.testing.assert_allclose(roi.size_mm, (14.0, 9.0, 9.5))
    assert roi.fits
    fixed = roi_from_mask(image, mask, margin_mm=2.0, shape_zyx=(8, 8, 8))
    assert fixed.box == (slice(4, 12), slice(8, 16), slice(21, 29)) and not fixed.fits
    assert roi_from_mask(image, mask, 2.0, shape_zyx=(10, 10, 20)).fits
    with pytest.raises(LabelError, match="scan.nii.gz: mask is empty"):
        roi_from_mask(image, np.zeros(image.shape), 2.0)


def test_linear_resampling_keeps_the_input_dtype_and_gives_what_float32_gives():
    rng = np.random.default_rng(1)
    image = Image(rng.integers(-1000, 1500, (30, 28, 26)).astype(np.int16), Geometry.identity((30, 28, 26), (1.0, 0.8, 0.7)))
    native = resample(image, spacing_zyx=2.3, kind="linear", default=-1000)
    as_float = resample(image.with_array(image.array.astype(np.float32)), spacing_zyx=2.3, kind="linear", default=-1000)
    assert native.array.dtype == np.float32
    np.testing.assert_array_equal(native.array, as_float.array)


def test_normalisation_of_a_large_array_uses_a_subsample_and_no_double_copy():
    rng = np.random.default_rng(2)
    large = rng.normal(100.0, 20.0, (64, 64, 1100)).astype(np.int16)  # 4.5 M voxels > SAMPLE_VOXELS
    assert sample(large).size <= (1 << 21) and sample(large[:2]).size == large[:2].size
    out = normalize_intensity(large, method="minmax")
    exact_low, exact_high = np.percentile(large, [0.5, 99.5])
    exact = np.clip((large.astype(np.float64) - exact_low) / (exact_high - exact_low), 0, 1)
    assert out.dtype == np.float32 and np.abs(out - exact).max() < 0.01
    small = large[:4]  # all voxels: the exact percentiles
    exact_low, exact_high = np.percentile(small, [0.5, 99.5])
    expected = np.clip((small.astype(np.float64) - exact_low) / (exact_high - exact_low), 0, 1)
    np.testing.assert_allclose(normalize_intensity(small, method="minmax"), expected, atol=1e-6)
