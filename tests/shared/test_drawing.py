"""drawing.py: the colour of each code and the slices every figure shows."""

import itertools

import numpy as np
import pytest

from cmmas import drawing
from cmmas.errors import CmmasError


def test_palette_is_deterministic_by_rank_and_distinct_for_twelve_codes():
    codes = [0, 3, 850, 1, 500, 205, 11, 12, 13, 14, 15, 16, 17]
    first = drawing.palette(codes)
    assert first == drawing.palette(reversed(codes)) and 0 not in first and len(first) == 12
    assert drawing.palette([5, 9]) == {5: first[1], 9: first[3]}  # colours follow the rank, not the value
    for a, b in itertools.combinations(first.values(), 2):
        assert np.linalg.norm(np.subtract(a, b)) > 60, (a, b)
    assert all(0 <= c <= 255 for colour in drawing.palette(range(40)).values() for c in colour)
    assert len(set(drawing.palette(range(1, 31)).values())) == 30


def test_slice_indices_go_through_the_mask_centre_or_the_middle():
    mask = np.zeros((10, 20, 30), bool)
    mask[2:5, 10:13, 3:6] = True
    assert drawing.slice_indices(mask.shape, mask, "auto") == (3, 11, 4)
    assert drawing.slice_indices(mask.shape, mask, "mid") == (5, 10, 15)
    assert drawing.slice_indices(mask.shape, np.zeros_like(mask), "auto") == (5, 10, 15)
    with pytest.raises(CmmasError, match="'mid' or 'auto'"):
        drawing.slice_indices(mask.shape, mask, "centre")


def test_orthogonal_views_take_the_aspect_from_the_spacing():
    volume = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    views = drawing.orthogonal_views((1, 2, 3), (2.0, 0.5, 1.0))
    assert [title for title, *_ in views] == ["axial z=1", "coronal y=2", "sagittal x=3"]
    assert [volume[where].shape for _, where, _, _ in views] == [(5, 6), (4, 6), (4, 5)]
    assert [aspect for _, _, aspect, _ in views] == [0.5, 2.0, 4.0]
    assert [origin for *_, origin in views] == ["upper", "lower", "lower"]
