"""Placing a scan by its organs: centroids, the similarity between centroid sets, its file."""

from pathlib import Path

import numpy as np
import pytest

from cmmas.align import ants, organs
from cmmas.errors import GeometryError
from cmmas.io import Geometry


def _rotation_z(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])


def test_similarity_fit_recovers_a_known_similarity_and_never_reflects():
    rng = np.random.default_rng(0)
    source = rng.normal(0, 50, (5, 3))
    truth = np.eye(4)
    truth[:3, :3] = 1.1 * _rotation_z(20) @ _rotation_z(0)
    truth[:3, 3] = [10.0, -30.0, 55.0]
    target = source @ truth[:3, :3].T + truth[:3, 3]
    np.testing.assert_allclose(organs.similarity_fit(source, target), truth, atol=1e-9)
    mirrored = organs.similarity_fit(source, source * [-1, 1, 1])
    assert np.linalg.det(mirrored[:3, :3]) > 0
    rigid = organs.similarity_fit(source, target, scale=False)
    np.testing.assert_allclose(np.linalg.svd(rigid[:3, :3])[1], 1.0, atol=1e-9)
    one = organs.similarity_fit(source[:1], source[:1] + [1.0, 2.0, 3.0])
    np.testing.assert_allclose(one[:3, :3], np.eye(3)) and np.testing.assert_allclose(one[:3, 3], [1, 2, 3])
    with pytest.raises(GeometryError):
        organs.similarity_fit(source, target[:4])


def _ball_maps(shape, centres, radius, geometry):
    grid = np.indices(shape).astype(float)
    maps = np.zeros((len(centres) + 1, *shape), np.float32)
    for k, centre in enumerate(centres, 1):
        maps[k] = (((grid - np.asarray(centre, float).reshape(3, 1, 1, 1)) ** 2).sum(0) <= radius**2)
    maps[0] = 1 - maps[1:].sum(0)
    return maps


def test_a_shifted_scan_is_placed_by_its_organ_centroids(tmp_path):
    geometry = Geometry(size=(40, 36, 32), spacing=(2.0, 2.0, 3.0), origin=(-40.0, -30.0, -50.0),
                        direction=tuple(np.eye(3).ravel()))
    codes = [0, 1, 2, 3]
    centres = [(10, 12, 14), (20, 24, 10), (16, 10, 28)]  # z, y, x voxels
    reference = organs.centroids_mm(_ball_maps(geometry.shape, centres, 4, geometry), codes, geometry)
    shift_vox = np.array([3, -2, 5])  # z, y, x
    scan = organs.centroids_mm(_ball_maps(geometry.shape, [np.add(c, shift_vox) for c in centres], 4, geometry),
                               codes, geometry)
    assert sorted(reference) == [1, 2, 3]
    np.testing.assert_allclose(reference[1][0], geometry.index_to_physical(np.array([[14, 12, 10]]))[0], atol=1e-9)
    matrix = organs.organ_start(reference, scan)
    shift_mm = shift_vox[::-1] * np.asarray(geometry.spacing)
    np.testing.assert_allclose(matrix[:3, :3], np.eye(3), atol=1e-9)
    np.testing.assert_allclose(matrix[:3, 3], shift_mm, atol=1e-9)
    path = organs.write_affine(matrix, tmp_path / "organs.mat")
    points = np.array([reference[c][0] for c in sorted(reference)])
    np.testing.assert_allclose(ants.transform_points([path], points), points + shift_mm, atol=1e-4)
    assert organs.organ_start(reference, {}) is None
    shrunk = {c: (0.6 * point, volume) for c, (point, volume) in reference.items()}
    np.testing.assert_allclose(np.linalg.svd(organs.organ_start(reference, shrunk)[:3, :3])[1], 1.0, atol=1e-9)
    np.testing.assert_allclose(np.linalg.svd(organs.organ_start(reference, shrunk, scale=True)[:3, :3])[1], 0.6,
                               atol=1e-9)
    small = organs.centroids_mm(_ball_maps(geometry.shape, centres, 1, geometry), codes, geometry, min_ml=1.0)
    assert small == {}  # 7 voxels of 12 mm^3: below 1 ml, not found


def _ellipsoid_label(shape, ellipsoids):
    """A label map (codes 1..) of ellipsoids ``(centre zyx, radii zyx)`` in voxels."""
    grid = np.indices(shape).astype(float)
    label = np.zeros(shape, np.int16)
    for code, (centre, radii) in enumerate(ellipsoids, 1):
        inside = sum(((grid[a] - centre[a]) / radii[a]) ** 2 for a in range(3)) <= 1
        label[inside] = code
    return label


def test_the_organ_maps_rank_the_organs_and_the_registration_recovers_a_stretch_the_centroids_miss(tmp_path):
    from cmmas.io import Image

    codes = [0, 1, 2, 3]
    probabilities = np.zeros((4, 2, 1, 1), np.float32)
    probabilities[:, 0, 0, 0] = [0.0, 0.0, 0.5, 0.5]
    probabilities[:, 1, 0, 0] = [1.0, 0.0, 0.0, 0.0]
    np.testing.assert_allclose(organs.organ_map(probabilities)[:, 0, 0], [2.5, 0.0])

    geometry = Geometry(size=(40, 40, 44), spacing=(3.0, 3.0, 3.0), origin=(-60.0, -60.0, -66.0),
                        direction=tuple(np.eye(3).ravel()))
    organs_ref = [((22, 16, 14), (9, 6, 8)), ((16, 26, 28), (5, 4, 4)), ((26, 26, 28), (5, 4, 4))]
    stretch = np.array([1.25, 1.0, 1.0])  # z, y, x: along z only, about the volume's centre
    centre = (np.array(geometry.shape) - 1) / 2
    organs_scan = [(centre + (np.array(c) - centre) * stretch + [0, 2, -1], np.array(r) * stretch)
                   for c, r in organs_ref]
    reference = Image(_ellipsoid_label(geometry.shape, organs_ref), geometry)
    scan = _ellipsoid_label(geometry.shape, organs_scan)
    guide = organs.OrganGuide.of(np.stack([scan == c for c in codes]).astype(np.float32), geometry, reference, codes)
    assert guide.reference_map.array.max() == 3 and guide.scan_map.geometry == geometry
    start = organs.write_affine(guide.start, tmp_path / "start.mat")
    by_centroids = guide.overlap([start])
    registered = guide.register(start)
    assert all(Path(f).parent == tmp_path for f in registered)
    assert guide.overlap(registered) > max(by_centroids + 0.05, 0.85)
