"""ANTs pre-alignment: geometry-exact conversion, recovery of known motions, label handling."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cmmas import io
from cmmas.align import ants as align_ants
from cmmas.errors import CmmasError, GeometryError, ImageReadError
from ants_phantom import CODES, SHAPE, SPACING, rotation_z, two_organ_phantom


def _dice(a: np.ndarray, b: np.ndarray, code: int) -> float:
    a, b = a == code, b == code
    return float(2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))


def _mean_dice(a: np.ndarray, b: np.ndarray, codes=CODES) -> float:
    return float(np.mean([_dice(a, b, c) for c in codes]))


@pytest.fixture(scope="module")
def fixed():
    return two_organ_phantom()


def test_ants_round_trip_keeps_array_and_geometry():
    import ants

    rng = np.random.default_rng(1)
    geometry = io.Geometry(
        size=(7, 6, 5),
        spacing=(0.7, 1.3, 2.9),
        origin=(12.5, -30.25, 7.125),
        direction=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),
    )
    image = io.Image(rng.normal(size=(5, 6, 7)).astype(np.float32), geometry, "a.nii.gz")

    converted = align_ants.to_ants(image)
    back = align_ants.from_ants(converted, image.path)

    np.testing.assert_array_equal(back.array, image.array)
    assert back.geometry == geometry
    assert back.path == "a.nii.gz"
    # ANTs indexes (x, y, z): voxel (x=3, y=2, z=1) is array[1, 2, 3], at the same physical point.
    assert converted.numpy()[3, 2, 1] == image.array[1, 2, 3]
    np.testing.assert_allclose(
        ants.transform_index_to_physical_point(converted, (3, 2, 1)),
        geometry.index_to_physical(np.array([3.0, 2.0, 1.0])),
    )
    # The same grid as SimpleITK sees it.
    sitk_image = io.to_sitk(image)
    np.testing.assert_allclose(
        sitk_image.TransformIndexToPhysicalPoint((3, 2, 1)),
        ants.transform_index_to_physical_point(converted, (3, 2, 1)),
    )


def test_schedule_fits_small_grids():
    small = align_ants.DEFAULT_SCHEDULE.fitted(io.Geometry.identity(SHAPE, SPACING))
    # 36 voxels / 6 leaves fewer than 8: the coarsest level goes; a few hundred samples -> dense.
    assert small.shrink_factors == (4, 2, 1)
    assert small.smoothing_sigmas == (2, 1, 0)
    assert small.iterations == align_ants.DEFAULT_SCHEDULE.iterations[1:]
    assert small.sampling == 1.0
    large = align_ants.FAST_SCHEDULE.fitted(io.Geometry.identity((116, 120, 120), (2.5, 2.5, 2.5)))
    assert large == align_ants.FAST_SCHEDULE
    thin = align_ants.DEFAULT_SCHEDULE.fitted(io.Geometry.identity((4, 40, 44), SPACING))
    assert thin.shrink_factors == (1,)


def test_fine_sampling_splits_off_the_finest_level():
    fitted = align_ants.FAST_SCHEDULE.fitted(io.Geometry.identity(SHAPE, SPACING))
    # 8 mm level: 9 x 10 x 11 voxels -> dense; 4 mm level: 10 % raised to 2000 of 18 x 20 x 22.
    assert fitted.shrink_factors == (4, 2)
    assert fitted.sampling == 1.0
    assert fitted.fine_sampling == pytest.approx(2000 / (18 * 20 * 22))
    assert fitted.calls() == [(slice(0, 1), 1.0), (slice(1, 2), fitted.fine_sampling)]
    # One level left: it is the coarsest, sampled at ``sampling``, in one call.
    thin = align_ants.FAST_SCHEDULE.fitted(io.Geometry.identity((4, 40, 44), SPACING))
    assert thin.fine_sampling is None and len(thin.calls()) == 1
    assert align_ants.DEFAULT_SCHEDULE.fitted(io.Geometry.identity(SHAPE, SPACING)).calls() == [(slice(0, 3), 1.0)]
    # A sampling override applies to every level.
    assert align_ants._schedule(align_ants.FAST_SCHEDULE, None, None, None, 0.5, None).fine_sampling is None
    with pytest.raises(ValueError, match="fine_sampling"):
        align_ants.Schedule(fine_sampling=0.0)


def test_rigid_recovers_translation(fixed):
    import ants

    fixed_image, fixed_label = fixed
    moving, moving_label = two_organ_phantom(shift_mm=(6.0, 0.0, 0.0), seed=1)
    before = _mean_dice(moving_label.array, fixed_label.array)

    reg = align_ants.register(moving, fixed_image, "rigid", moving_label=moving_label, fast=True)

    after = _mean_dice(reg.warped_label.array, fixed_label.array)
    assert before < 0.7
    assert after > 0.9
    assert reg.warped.geometry == fixed_image.geometry
    assert reg.warped_label.geometry == fixed_image.geometry
    assert reg.kind == "rigid" and reg.seconds > 0
    # The fast schedule runs this stage as two ANTs calls (see the test above); ANTs collapses
    # the first's result into the second's, so one transform holds the whole motion.
    assert len(reg.forward) == 1
    # ITK maps fixed points to moving points: a +6 mm moving shift is a +6 mm translation,
    # recovered to within one 2 mm voxel (the fast schedule's random sampling varies with
    # the ITK build and thread count)
    matrix = ants.read_transform(reg.forward[0])
    error = np.asarray(matrix.apply_to_point((0.0, 0.0, 0.0))) - (6.0, 0.0, 0.0)
    assert np.linalg.norm(error) < SPACING[0], error


def test_affine_recovers_rotation_and_shift(fixed):
    fixed_image, fixed_label = fixed
    moving, moving_label = two_organ_phantom(rotation_z(12.0), shift_mm=(0.0, 4.0, -4.0), seed=2)
    before = _mean_dice(moving_label.array, fixed_label.array)

    reg = align_ants.register(moving, fixed_image, "affine", moving_label=moving_label, fast=True)

    after = _mean_dice(reg.warped_label.array, fixed_label.array)
    assert before < 0.75
    assert after > 0.9
    assert after > before + 0.2


def test_mutual_information_aligns_other_modality(fixed):
    fixed_image, fixed_label = fixed
    # Non-monotone remapping: bright background, dark body, organs swapped in brightness.
    moving, moving_label = two_organ_phantom(
        shift_mm=(-4.0, 6.0, 0.0), levels=(80.0, 10.0, 150.0, 220.0), noise=5.0, seed=3
    )
    before = _mean_dice(moving_label.array, fixed_label.array)

    reg = align_ants.register(moving, fixed_image, "affine", moving_label=moving_label, fast=True)

    after = _mean_dice(reg.warped_label.array, fixed_label.array)
    assert before < 0.7
    assert after > 0.9
    # The warped image keeps the moving modality's intensities (background ~80 outside the body).
    assert abs(float(np.median(reg.warped.array[fixed_image.array < 30])) - 80.0) < 15.0


def test_labels_written_and_reapplied(fixed, tmp_path):
    fixed_image, fixed_label = fixed
    moving, moving_label = two_organ_phantom(rotation_z(-8.0), shift_mm=(4.0, 0.0, 2.0), seed=4)
    out_dir = tmp_path / "tx"

    reg = align_ants.register(moving, fixed_image, "affine", moving_label=moving_label, out_dir=out_dir, fast=True)

    # Generic-label interpolation invents no codes and keeps the label dtype.
    assert set(np.unique(reg.warped_label.array).tolist()) <= {0, *CODES}
    assert reg.warped_label.array.dtype == moving_label.array.dtype
    assert sorted(p.name for p in out_dir.iterdir()) == ["affine.mat"]
    assert reg.forward == reg.inverse == [str(out_dir / "affine.mat")]

    again = align_ants.apply(reg.forward, moving_label, fixed_image, kind="label")
    np.testing.assert_array_equal(again.array, reg.warped_label.array)
    image_again = align_ants.apply(reg.forward, moving, fixed_image.geometry)
    np.testing.assert_allclose(image_again.array, reg.warped.array, atol=1e-3)
    # The inverse maps the fixed label back onto the moving grid.
    back = align_ants.apply(reg.inverse, fixed_label, moving, kind="label", invert=True)
    assert back.geometry == moving.geometry
    assert _mean_dice(back.array, moving_label.array) > 0.85


def test_syn_writes_warps_and_aligns(fixed, tmp_path):
    fixed_image, fixed_label = fixed
    moving, moving_label = two_organ_phantom(shift_mm=(0.0, 0.0, 6.0), seed=5)

    reg = align_ants.register(
        moving, fixed_image, "syn", moving_label=moving_label, out_dir=tmp_path, fast=True
    )

    assert sorted(p.name for p in tmp_path.iterdir()) == ["affine.mat", "inverse_warp.nii.gz", "warp.nii.gz"]
    assert reg.forward == [str(tmp_path / "warp.nii.gz"), str(tmp_path / "affine.mat")]
    assert reg.inverse == [str(tmp_path / "affine.mat"), str(tmp_path / "inverse_warp.nii.gz")]
    assert _mean_dice(reg.warped_label.array, fixed_label.array) > 0.9
    back = align_ants.apply(reg.inverse, fixed_label, moving, kind="label", invert=True)
    assert _mean_dice(back.array, moving_label.array) > 0.85


def test_identity_leaves_image_unchanged(fixed):
    fixed_image, fixed_label = fixed

    reg = align_ants.register(fixed_image, fixed_image, "rigid", moving_label=fixed_label)  # default schedule

    scale = float(np.ptp(fixed_image.array))
    assert float(np.mean(np.abs(reg.warped.array - fixed_image.array))) < 0.02 * scale
    assert _mean_dice(reg.warped_label.array, fixed_label.array) > 0.97
    assert reg.forward and all(Path(p).is_file() for p in reg.forward)
    folder = Path(reg.forward[0]).parent
    reg.cleanup()
    assert not folder.exists()


def test_constant_or_nan_image_raises_one_line_error(fixed):
    fixed_image, _ = fixed
    flat = fixed_image.with_array(np.full(SHAPE, 7.0, dtype=np.float32))
    flat = io.Image(flat.array, flat.geometry, "flat_atlas.nii.gz")
    with pytest.raises(ImageReadError) as err:
        align_ants.register(flat, fixed_image)
    message = str(err.value)
    assert message.startswith("flat_atlas.nii.gz: ") and "constant" in message and "\n" not in message

    with pytest.raises(ImageReadError, match="constant"):
        align_ants.register(fixed_image, fixed_image.with_array(np.zeros(SHAPE, np.float32)))

    holed = fixed_image.array.copy()
    holed[0, 0, 0] = np.nan
    with pytest.raises(ImageReadError, match="NaN"):
        align_ants.register(fixed_image.with_array(holed), fixed_image)


def test_label_on_other_grid_raises(fixed):
    fixed_image, fixed_label = fixed
    shifted = io.Geometry.identity(SHAPE, SPACING, origin=(0.0, 0.0, 0.0))
    with pytest.raises(GeometryError, match="label grid differs"):
        align_ants.register(fixed_image, fixed_image, moving_label=io.Image(fixed_label.array, shifted, "l.nii.gz"))


def test_ants_failure_becomes_one_line_error(fixed, tmp_path):
    fixed_image, _ = fixed
    bogus = tmp_path / "broken.mat"
    bogus.write_text("not a transform\n")
    with pytest.raises(CmmasError) as err:
        align_ants.apply([str(bogus)], fixed_image, fixed_image)
    assert "\n" not in str(err.value) and str(err.value).startswith("phantom.nii.gz: ")
    with pytest.raises(ImageReadError, match="transform file not found"):
        align_ants.apply([str(tmp_path / "missing.mat")], fixed_image, fixed_image)


def test_transform_points_follows_the_direction_apply_resamples_with(fixed, tmp_path):
    fixed_image, fixed_label = fixed
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(rotation_z(8.0).ravel().tolist())
    affine.SetCenter([0.0, 20.0, 10.0])
    affine.SetTranslation([4.0, -3.0, 2.0])
    path = str(tmp_path / "affine.mat")
    sitk.WriteTransform(affine, path)
    # apply() pulls moving values from transform_points(fixed point): compare centres of mass
    moved = align_ants.apply([path], fixed_label, fixed_image, kind="label")
    code = CODES[0]
    index = np.argwhere(moved.array == code)[:, ::-1].mean(axis=0)
    source = align_ants.transform_points([path], moved.geometry.index_to_physical(index)[None])[0]
    original = fixed_label.geometry.index_to_physical(np.argwhere(fixed_label.array == code)[:, ::-1].mean(axis=0))
    np.testing.assert_allclose(source, original, atol=0.7)  # mm; voxels are 1-2 mm
    np.testing.assert_allclose(align_ants.transform_points([path, path], np.zeros((1, 3)))[0],
                               affine.TransformPoint(affine.TransformPoint((0.0, 0.0, 0.0))), atol=1e-9)
    warp = tmp_path / "warp.nii.gz"
    warp.write_bytes(b"")
    with pytest.raises(CmmasError, match="only affine"):
        align_ants.transform_points([str(warp), path], np.zeros((1, 3)))


def test_apply_many_equals_apply_one_by_one(fixed, tmp_path):
    fixed_image, fixed_label = fixed
    affine = sitk.AffineTransform(3)
    affine.SetTranslation([2.5, -1.0, 3.0])
    path = str(tmp_path / "shift.mat")
    sitk.WriteTransform(affine, path)
    images = [fixed_image, fixed_image.with_array(fixed_image.array[::-1].copy())]
    many = align_ants.apply_many([path], images, fixed_image.geometry)
    for image, moved in zip(images, many):
        np.testing.assert_array_equal(moved.array, align_ants.apply([path], image, fixed_image.geometry).array)


def test_seeded_single_thread_runs_are_identical():
    """Bit-identical only with one ITK thread, chosen before ANTs' first registration."""
    script = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, sys.argv[1])
        from ants_phantom import rotation_z, two_organ_phantom
        from cmmas.align import ants as align_ants
        align_ants.set_threads(1)
        fixed, _ = two_organ_phantom()
        moving, _ = two_organ_phantom(rotation_z(5.0), shift_mm=(4.0, 0.0, 0.0), seed=1)
        runs = [align_ants.register(moving, fixed, "rigid", seed=s, fast=True) for s in (0, 0, 1)]
        params = [open(r.forward[0], "rb").read() for r in runs]
        print(params[0] == params[1], params[0] != params[2])
        """
    )
    out = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent)], capture_output=True, encoding="utf-8")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True"]


def _downsample(image: io.Image, spacing_mm: float, label: bool) -> io.Image:
    g = image.geometry
    size = [int(round(n * s / spacing_mm)) for n, s in zip(g.size, g.spacing)]
    target = io.Geometry(tuple(size), (spacing_mm,) * 3, g.origin, g.direction)
    interpolator = sitk.sitkLabelGaussian if label else sitk.sitkLinear
    ref = io.reference_image(target, io.to_sitk(image).GetPixelID())
    return io.from_sitk(sitk.Resample(io.to_sitk(image), ref, sitk.Transform(), interpolator, 0), image.path)


def test_real_ct_to_mr_affine_improves_liver_overlap(abdomen_data):
    ct = _downsample(io.read_image(abdomen_data / "ct" / "ct_00_image.nii.gz"), 4.0, label=False)
    ct_label = _downsample(io.read_label(abdomen_data / "ct" / "ct_00_label.nii.gz"), 4.0, label=True)
    mr = _downsample(io.read_image(abdomen_data / "mr" / "mr_01_image.nii.gz"), 4.0, label=False)
    mr_label = _downsample(io.read_label(abdomen_data / "mr" / "mr_01_label.nii.gz"), 4.0, label=True)
    ref = io.reference_image(mr.geometry, sitk.sitkInt32)
    unregistered = io.from_sitk(sitk.Resample(io.to_sitk(ct_label), ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    organs = (1, 2, 3, 4)

    reg = align_ants.register(ct, mr, "affine", moving_label=ct_label, fast=True)

    liver_before = _dice(unregistered.array, mr_label.array, 1)
    liver_after = _dice(reg.warped_label.array, mr_label.array, 1)
    assert liver_after > liver_before, (liver_before, liver_after)
    assert _mean_dice(reg.warped_label.array, mr_label.array, organs) > _mean_dice(
        unregistered.array, mr_label.array, organs
    ) + 0.05
