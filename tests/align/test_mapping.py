"""align/mapping.py: the scan <-> working grid mapping on clinical-size terms.

A phantom's label, seen by five shifted "atlases" and fused by majority vote on a 4 mm working grid
(probabilities in tenths of atlases: many exact ties), is mapped back onto a finer, rotated scan
grid through a rotated affine alignment.
"""

import numpy as np
import pytest
import SimpleITK as sitk

from cmmas import preprocess
from cmmas.align import ants as align_ants
from cmmas.align import mapping
from cmmas.datasets.phantom import make_subject
from cmmas.fuse import registry
from cmmas.io import PROBABILITY_SCALE, Image, label_dtype, read_image, write_image


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A fused working grid, the alignment file and a scan grid (rotated, 1.5 mm) larger than it."""
    root = tmp_path_factory.mktemp("mapping")
    _, label = make_subject("ct", 3, shape=40)
    working = preprocess.working_geometry(preprocess.physical_center(label.geometry), 4.0, (24, 24, 24))
    base = preprocess.resample(label, geometry=working, kind="label").array.astype(np.int32)
    codes = [0, *sorted(int(c) for c in np.unique(base) if c)]
    atlases = np.stack([np.roll(base, shift, axis) for shift, axis in ((0, 0), (1, 0), (-1, 1), (1, 2), (2, 1))])
    fused = registry.fuse("mv", atlases, codes)
    angle = np.deg2rad(9.0)
    affine = sitk.AffineTransform(3)  # reference point -> scan point
    affine.SetMatrix([np.cos(angle), 0.0, np.sin(angle), 0.0, 1.0, 0.0, -np.sin(angle), 0.0, np.cos(angle)])
    affine.SetCenter(preprocess.physical_center(working).tolist())
    affine.SetTranslation([3.0, -2.0, 4.0])
    path = str(root / "affine.mat")
    sitk.WriteTransform(affine, path)
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    scan = preprocess.working_geometry(preprocess.physical_center(working) + 5.0, (1.5, 1.4, 1.3), (90, 84, 96),
                                       direction=rotation)
    target = Image(np.zeros(scan.shape, np.int16), scan, str(root / "scan.nii.gz"))
    return {"fused": fused, "working": Image(np.zeros(working.shape, np.float32), working), "transforms": [path],
            "target": target, "codes": codes}


def _full_labels(scene) -> np.ndarray:
    """Every scan voxel interpolated (no box, no cells): what map_back must equal."""
    working, target = scene["working"].geometry, scene["target"].geometry
    matrix = mapping.alignment_matrix(scene["transforms"])
    index_matrix = (np.linalg.inv(mapping._index_matrix(working)) @ np.linalg.inv(matrix)
                    @ mapping._index_matrix(target))
    points = [axis.ravel() for axis in np.indices(target.shape)]
    foreground = np.asarray(scene["fused"].probabilities[1:], np.float32)
    index = mapping._labels_at(foreground, index_matrix, points).reshape(target.shape)
    return np.asarray(scene["codes"])[index]


def test_roi_only_map_back_equals_the_full_map_back(scene):
    label, _, _ = mapping.map_back(scene["fused"], scene["working"], scene["transforms"], scene["target"], maps=False)
    full = _full_labels(scene)
    assert set(np.unique(full)) == set(scene["codes"])  # every structure reaches the scan
    np.testing.assert_array_equal(label.array, full)
    assert label.array.dtype == label_dtype(scene["codes"]) and label.geometry == scene["target"].geometry
    # the shortcut is what makes it fast: most cells need no interpolation, and the labelled box is part of the grid
    cells = mapping._cell_labels(np.asarray(scene["fused"].probabilities[1:], np.float32))
    assert np.mean(cells == 255) < 0.25


def test_map_back_agrees_with_a_whole_grid_resampling_by_ants(scene):
    fused, working, transforms, target = scene["fused"], scene["working"], scene["transforms"], scene["target"]
    label, _, _ = mapping.map_back(fused, working, transforms, target, maps=False)
    moved = [align_ants.apply(transforms, working.with_array(p), target.geometry, invert=True).array
             for p in fused.probabilities[1:]]
    foreground = np.clip(np.stack(moved), 0, 1)
    scores = np.concatenate([np.clip(1 - foreground.sum(0), 0, 1)[None], foreground])
    expected = np.asarray(scene["codes"])[np.argmax(scores, axis=0)]
    assert np.mean(label.array == expected) > 0.9999  # ties resolved by rounding may differ


def test_probability_maps_are_uint8_and_round_trip_within_one_step(scene, tmp_path):
    fused, working, transforms, target = scene["fused"], scene["working"], scene["transforms"], scene["target"]
    label, probabilities, agreement = mapping.map_back(fused, working, transforms, target, maps=True)
    only, _, _ = mapping.map_back(fused, working, transforms, target, maps=False)
    np.testing.assert_array_equal(label.array, only.array)
    floats = {code: np.clip(align_ants.apply(transforms, working.with_array(p), target.geometry, invert=True).array,
                            0, 1) for code, p in zip(scene["codes"][1:], fused.probabilities[1:])}
    covered = align_ants.apply(transforms, working.with_array(np.ones(working.shape, np.float32)), target.geometry,
                               invert=True).array > 0
    floats[0] = np.where(covered, np.clip(1 - sum(floats.values()), 0, 1), 1.0)
    for code, expected in floats.items():
        path = write_image(probabilities[code], tmp_path / f"prob_{code}.nii.gz")
        back = read_image(path, dtype=None)
        assert back.array.dtype == np.uint8 and back.geometry.matches(target.geometry)
        # a foreground map is rounded to 1/255; the background, 255 minus their sum, carries their roundings
        steps = 1 if code else 1 + len(floats) / 2
        np.testing.assert_allclose(back.array / PROBABILITY_SCALE, expected, atol=steps / 255)
    total = sum(p.array.astype(np.int32) for p in probabilities.values())
    assert np.mean(total == PROBABILITY_SCALE) > 0.999  # the maps of a voxel sum to 1, ...
    assert total.min() == PROBABILITY_SCALE and total.max() <= PROBABILITY_SCALE + len(floats) // 2  # ... or round above
    assert probabilities[0].array[~covered].min() == 255 and agreement.array[~covered].max() == 0
    moved = align_ants.apply(transforms, working.with_array(fused.agreement.astype(np.float32)), target.geometry,
                             invert=True).array
    np.testing.assert_allclose(agreement.array / PROBABILITY_SCALE, np.clip(moved, 0, 1), atol=1 / 255)


def test_to_working_reads_only_the_box_it_needs_and_keeps_the_dtype(scene):
    image, _ = make_subject("ct", 3, shape=40)
    assert image.array.dtype == np.int16
    geometry = scene["working"].geometry
    as_float = mapping.to_working(image.with_array(image.array.astype(np.float32)), scene["transforms"], geometry)
    native = mapping.to_working(image, scene["transforms"], geometry)
    np.testing.assert_array_equal(native.array, as_float.array)
    whole = align_ants.apply(scene["transforms"], image, geometry)
    np.testing.assert_allclose(native.array, mapping.normalize(whole).array, atol=1e-4)
    box = mapping.reached_box(geometry, scene["transforms"], image.geometry)
    assert box is not None and np.prod([s.stop - s.start for s in box]) < image.array.size
