"""What the alignment sees of a scan (cmmas.align.target.alignment_image): the same image whether the
scan comes at its own spacing or resampled onto a fine grid with a larger field of view."""

import numpy as np
import pytest

from cmmas import preprocess
from cmmas.align import target
from cmmas.datasets.phantom import make_subject
from cmmas.io import Geometry, Image


def _enlarged(scan: Image, spacing: float, pad_mm: float) -> Image:
    """``scan`` resampled (linear) onto an isotropic ``spacing`` grid of its direction whose field of
    view reaches ``pad_mm`` beyond the scan's on every side, filled with the scan's minimum there (as
    bench/bench_large.py builds its clinical-size scans), in the scan's dtype."""
    g = scan.geometry
    extent = np.asarray(g.size) * np.asarray(g.spacing) + 2 * pad_mm
    size = np.ceil(extent / spacing).astype(int)
    grid = preprocess.working_geometry(preprocess.physical_center(g), (spacing,) * 3, tuple(size[::-1]),
                                       direction=g.direction)
    low = float(scan.array.min())
    moved = preprocess.resample(scan, geometry=grid, kind="linear", default=low)
    array = np.rint(moved.array).astype(scan.array.dtype) if np.issubdtype(scan.array.dtype, np.integer) \
        else moved.array.astype(scan.array.dtype)
    return moved.with_array(array)


def _common(a: Image, b: Image) -> tuple[np.ndarray, np.ndarray]:
    """The values of two images on the same lattice over the box both cover."""
    offset = np.rint(b.geometry.physical_to_index(np.asarray(a.geometry.origin))).astype(int)  # a's voxel 0 in b, xyz
    np.testing.assert_allclose(b.geometry.physical_to_index(np.asarray(a.geometry.origin)), offset, atol=1e-3)
    lo_b = np.maximum(offset, 0)
    hi_b = np.minimum(offset + np.asarray(a.geometry.size), np.asarray(b.geometry.size))
    assert np.all(hi_b > lo_b)
    box_b = tuple(slice(int(lo), int(hi)) for lo, hi in zip(lo_b[::-1], hi_b[::-1]))
    box_a = tuple(slice(int(lo - o), int(hi - o)) for lo, hi, o in zip(lo_b[::-1], hi_b[::-1], offset[::-1]))
    return a.array[box_a], b.array[box_b]


@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_a_scan_and_its_fine_resampling_with_a_larger_field_of_view_give_the_same_alignment_input(modality):
    scan, _ = make_subject(modality, 3, 40)  # CT 2.4 x 2.6 x 2.6 mm int16 HU; MR 3.6 x 3 x 3 mm, oblique
    large = _enlarged(scan, 0.8, 20.0)
    assert large.array.size > 8 * scan.array.size
    small = target.alignment_image(scan, 4.0)
    big = target.alignment_image(large, 4.0)
    for image in (small, big):
        assert image.array.dtype == np.float32
        np.testing.assert_allclose(image.geometry.spacing, (4.0,) * 3)
        np.testing.assert_allclose(image.geometry.direction, scan.geometry.direction)
    # the padding is cut off: both cover the scan's field of view, within a voxel on each side
    assert np.all(np.abs(np.asarray(big.geometry.size) - np.asarray(small.geometry.size)) <= 2)
    a, b = _common(small, big)
    assert a.size >= 0.8 * small.array.size
    span = float(small.array.max() - small.array.min())
    assert np.mean(np.abs(a - b)) < 0.03 * span
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98
    # the old input (a linear resampling at 4 mm from each grid's own origin) agreed far less
    old_small = preprocess.resample(scan, spacing_zyx=(4.0,) * 3)
    old_big = preprocess.resample(large, spacing_zyx=(4.0,) * 3)
    assert old_big.array.size > 1.5 * old_small.array.size


def test_air_around_a_scan_does_not_change_its_alignment_input():
    scan, _ = make_subject("mr", 5, 32)  # 4.5 x 3.75 x 3.75 mm: no block averaging at 4 mm
    low = scan.array.min()
    padded_array = np.pad(scan.array, ((3, 1), (2, 5), (4, 0)), constant_values=low)
    origin = scan.geometry.index_to_physical(np.array([-4.0, -2.0, -3.0]))
    padded = Image(padded_array, Geometry(size=padded_array.shape[::-1], spacing=scan.geometry.spacing,
                                          origin=tuple(origin), direction=scan.geometry.direction))
    a, b = target.alignment_image(scan, 4.0), target.alignment_image(padded, 4.0)
    # the padding is cut off but for the lattice points within two scan voxels of the scan's edge
    # (the smoothing spreads the edge one voxel into the air, the interpolation one more)
    grown = np.asarray(b.geometry.size) - np.asarray(a.geometry.size)
    assert np.all(grown >= 0) and np.all(grown <= 2 * np.ceil(2 * np.asarray(scan.geometry.spacing) / 4.0))
    assert b.array.size < 1.5 * a.array.size < padded.array.size
    inner, outer = _common(a, b)
    assert inner.shape == a.shape
    # the same values, but within a scan voxel of its edge (smoothed against air rather than the edge)
    core = (slice(2, -2),) * 3
    np.testing.assert_allclose(inner[core], outer[core], rtol=1e-5, atol=1e-5 * float(np.ptp(inner)))


def test_the_alignment_grid_lies_on_one_lattice_whatever_the_scans_origin_and_spacing():
    direction = tuple(np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))[0].ravel())
    one = Geometry(size=(60, 50, 40), spacing=(1.1, 0.9, 2.5), origin=(3.3, -7.1, 12.0), direction=direction)
    two = Geometry(size=(200, 210, 150), spacing=(0.7, 0.7, 0.7), origin=(-40.0, -55.5, -20.2), direction=direction)
    grids = [target.alignment_grid(g, 4.0) for g in (one, two)]
    for grid, g in zip(grids, (one, two)):
        # on the lattice: the origin is a multiple of 4 mm along each direction axis
        along = np.asarray(grid.origin) @ grid.direction_matrix / 4.0
        np.testing.assert_allclose(along, np.rint(along), atol=1e-9)
        # inside the hull of the scan's voxel centres, and within a lattice step of its edges
        index = g.physical_to_index(grid.corners())  # voxel edges of the grid: 2 mm beyond its points
        assert np.all(index >= -0.5 - 2.0 / np.min(g.spacing)) and np.all(index <= np.asarray(g.size) - 0.5
                                                                           + 2.0 / np.min(g.spacing))
    points = grids[0].index_to_physical(np.zeros(3))
    index = grids[1].physical_to_index(points)
    np.testing.assert_allclose(index, np.rint(index), atol=1e-6)


def test_the_alignment_input_is_the_same_on_two_calls_and_leaves_the_scan_untouched():
    scan, _ = make_subject("ct", 4, 40)
    before = scan.array.copy()
    first, second = target.alignment_image(scan, 4.0), target.alignment_image(scan, 4.0)
    np.testing.assert_array_equal(first.array, second.array)
    assert first.geometry == second.geometry
    np.testing.assert_array_equal(scan.array, before)


def test_the_block_mean_is_sitk_binshrink_without_its_rounding():
    import SimpleITK as sitk

    from cmmas.io import from_sitk, to_sitk

    rng = np.random.default_rng(2)
    direction = tuple(np.linalg.qr(rng.normal(size=(3, 3)))[0].ravel())
    geometry = Geometry(size=(23, 17, 11), spacing=(0.7, 0.8, 1.5), origin=(5.0, -3.0, 20.0), direction=direction)
    image = Image(rng.integers(-1000, 1000, (11, 17, 23)).astype(np.int16), geometry)
    factors = (5, 4, 2)
    ours = target.block_mean(image, factors)
    theirs = from_sitk(sitk.BinShrink(to_sitk(image.with_array(image.array.astype(np.float32))), list(factors)))
    assert ours.array.dtype == np.float32
    assert ours.geometry.matches(theirs.geometry, tol=1e-5)
    np.testing.assert_allclose(ours.array, theirs.array, atol=1e-3)
    np.testing.assert_allclose(ours.array[0, 0, 0], image.array[:2, :4, :5].mean(), atol=1e-3)
