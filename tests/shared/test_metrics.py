"""Metrics against hand-computed values and an all-pairs brute-force reference."""

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from cmmas.errors import GeometryError, LabelError
from cmmas.metrics import (
    EmptyMaskWarning,
    assd,
    dice,
    evaluate_labels,
    hd95,
    jaccard,
    jacobian_determinant,
    jacobian_stats,
)


def _cubes(axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Two 10^3 cubes in a 16^3 volume, B shifted by 2 voxels along ``axis``."""
    a = np.zeros((16, 16, 16), dtype=bool)
    a[2:12, 2:12, 2:12] = True
    return a, np.roll(a, 2, axis=axis)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_offset_cubes_by_hand(axis):
    """Cubes offset by 2 voxels along ``axis`` whose spacing is 0.5 mm, the other axes >= 1 mm.

    Overlap 8*10*10 = 800 of 1000 + 1000 voxels: Dice 0.8, Jaccard 800/1200.
    Each surface has 10^3 - 8^3 = 488 voxels. From A's surface to B's (s = 0.5 mm):
      * the 100 voxels of A's face outside B (layer 0): 2 layers away, 2s = 1 mm;
      * the 36 side-face voxels of layer 1: 1 layer away, s = 0.5 mm;
      * the 36 * 7 side-face voxels of layers 2..8 and the 36 side-face voxels of layer 9
        lie on B's side faces: 0;
      * the 64 inner voxels of A's face inside B (layer 9): B's far face is 2s = 1 mm away and
        B's side faces at least 1 voxel of >= 1 mm away: 1 mm.
    So each direction has 164 x 1 mm, 36 x 0.5 mm, 288 x 0, and by symmetry both do.
    ASSD = 2 * (164 + 18) / 976 mm; the 95th percentile of the 976 sorted values
    (576 zeros, 72 halves, 328 ones) is 1 mm.
    """
    a, b = _cubes(axis)
    spacing = [1.0, 1.25]
    spacing.insert(axis, 0.5)
    assert dice(a, b) == pytest.approx(0.8)
    assert jaccard(a, b) == pytest.approx(800 / 1200)
    assert hd95(a, b, spacing) == pytest.approx(1.0)
    assert assd(a, b, spacing) == pytest.approx(2 * (164 + 18) / 976)
    assert hd95(b, a, spacing) == pytest.approx(hd95(a, b, spacing))


def _brute_force(a, b, spacing):
    """Directed distances by all pairs of surface voxel centres (6-neighbour surface)."""
    from scipy import ndimage

    def surface(m):
        return np.argwhere(m & ~ndimage.binary_erosion(m, ndimage.generate_binary_structure(3, 1)))

    pa, pb = surface(a) * spacing, surface(b) * spacing
    d = cdist(pa, pb)
    return np.concatenate([d.min(axis=1), d.min(axis=0)])


def test_surface_distances_match_brute_force_on_blobs():
    rng = np.random.default_rng(1)
    from scipy import ndimage

    spacing = np.array([2.0, 0.8, 1.3])
    a = ndimage.gaussian_filter(rng.random((20, 20, 20)), 2) > 0.5
    b = ndimage.gaussian_filter(rng.random((20, 20, 20)), 2) > 0.5
    assert a.any() and b.any()
    ref = _brute_force(a, b, spacing)
    assert hd95(a, b, spacing) == pytest.approx(np.percentile(ref, 95))
    assert assd(a, b, spacing) == pytest.approx(ref.mean())


def test_identical_masks():
    a, _ = _cubes(0)
    assert dice(a, a) == 1.0 and jaccard(a, a) == 1.0
    assert hd95(a, a, (1, 1, 1)) == 0.0 and assd(a, a, (1, 1, 1)) == 0.0


def test_empty_prediction_gives_defined_values_and_warns():
    _, truth = _cubes(0)
    empty = np.zeros_like(truth)
    assert dice(empty, truth) == 0.0
    assert jaccard(empty, truth) == 0.0
    with pytest.warns(EmptyMaskWarning):
        assert np.isnan(hd95(empty, truth, (1, 1, 1)))
    with pytest.warns(EmptyMaskWarning):
        assert np.isnan(assd(truth, empty, (1, 1, 1)))
    with pytest.warns(EmptyMaskWarning):
        assert dice(empty, empty) == 1.0
    with pytest.warns(EmptyMaskWarning):
        assert jaccard(empty, empty) == 1.0


def test_evaluate_labels_rows():
    truth = np.zeros((16, 16, 16), dtype=np.int32)
    truth[2:12, 2:12, 2:12] = 1
    truth[13:15, 13:15, 13:15] = 2
    pred = np.roll(truth, 2, axis=0) * (np.roll(truth, 2, axis=0) == 1)
    spacing = (2.0, 1.0, 1.0)
    with pytest.warns(EmptyMaskWarning, match="structure 2 .spleen. is empty in the prediction"):
        rows = evaluate_labels(pred, truth, {1: "liver", 2: "spleen"}, spacing)
    assert [r["label"] for r in rows] == [1, 2] and [r["name"] for r in rows] == ["liver", "spleen"]
    liver, spleen = rows
    assert liver["dice"] == pytest.approx(0.8) and liver["jaccard"] == pytest.approx(2 / 3)
    assert liver["volume_true_ml"] == pytest.approx(1000 * 2.0 / 1000)
    assert liver["volume_pred_ml"] == pytest.approx(2.0)
    assert liver["hd95"] == pytest.approx(hd95(pred == 1, truth == 1, spacing))
    assert liver["assd"] == pytest.approx(assd(pred == 1, truth == 1, spacing))
    assert spleen["dice"] == 0.0 and np.isnan(spleen["hd95"]) and np.isnan(spleen["assd"])
    assert spleen["volume_pred_ml"] == 0.0 and spleen["volume_true_ml"] == pytest.approx(8 * 2.0 / 1000)


def test_evaluate_labels_rejects_bad_input():
    with pytest.raises(GeometryError, match="differs"):
        evaluate_labels(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), {1: "x"}, (1, 1, 1))
    with pytest.raises(GeometryError, match="spacing"):
        evaluate_labels(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), {1: "x"}, (1, 0, 1))
    with pytest.raises(LabelError):
        evaluate_labels(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), {}, (1, 1, 1))


def _grid(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), axis=-1)


def test_jacobian_of_affine_field_is_det_a():
    a = np.array([[1.1, 0.2, 0.0], [-0.1, 0.9, 0.3], [0.05, 0.0, 1.2]])
    x = _grid((12, 14, 16))
    ddf = x @ (a - np.eye(3)).T + np.array([0.5, -1.0, 2.0])
    det = jacobian_determinant(ddf)
    assert det.shape == (12, 14, 16)
    np.testing.assert_allclose(det, np.linalg.det(a), rtol=1e-10)
    stats = jacobian_stats(ddf)
    assert stats["folding_percent"] == 0.0
    assert stats["std_log_jac"] == pytest.approx(0.0, abs=1e-10)
    assert stats["min_det"] == pytest.approx(np.linalg.det(a))


def test_jacobian_of_zero_field_is_one():
    stats = jacobian_stats(np.zeros((8, 9, 10, 3)))
    assert stats == {"folding_percent": 0.0, "std_log_jac": 0.0, "min_det": 1.0, "max_det": 1.0}


def test_jacobian_folding_and_mask():
    x = _grid((10, 10, 10))
    ddf = np.zeros((10, 10, 10, 3))
    ddf[..., 2] = np.where(x[..., 2] < 5, 0.0, -2.0 * x[..., 2])  # x -> -x in the right half
    det = jacobian_determinant(ddf)
    assert np.all(det[..., 6:] == pytest.approx(-1.0))
    mask = np.zeros((10, 10, 10), dtype=bool)
    mask[..., 6:] = True
    assert jacobian_stats(ddf, mask)["folding_percent"] == 100.0
    assert np.isnan(jacobian_stats(ddf, mask)["std_log_jac"])
    # the seam folds too: central differences at x = 4 and 5 see the jump from 0 to -10
    assert jacobian_stats(ddf, ~mask)["folding_percent"] == pytest.approx(100 * 2 / 6)
    with pytest.raises(LabelError, match="empty"):
        jacobian_stats(ddf, np.zeros((10, 10, 10), dtype=bool))
    with pytest.raises(GeometryError, match=r"\[D, H, W, 3\]"):
        jacobian_determinant(np.zeros((10, 10, 10, 2)))
