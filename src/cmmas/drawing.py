"""What every figure of cmmas shares: one colour per label code, the three orthogonal views of a
volume and a label filled over its scan.

:mod:`cmmas.outputs` (a segmentation's preview) and :mod:`cmmas.evaluate.plots` (the evaluation's
overlays) both draw with these, so a code has the same colour everywhere. Volumes are ``[D, H, W]``
in array order ``(z, y, x)``; spacings in millimetres. No matplotlib import: the functions draw
on the axes they are given.
"""

from __future__ import annotations

import colorsys
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from cmmas.errors import CmmasError

#: matplotlib's tab10 then the lighter tab20 tones, without the two greys (unseen over a grey scan).
_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
            "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5")
#: Opacity of the labels over the scan.
FILL_ALPHA = 0.4


def palette(codes: Iterable[int]) -> dict[int, tuple[int, int, int]]:
    """A fixed colour ``(R, G, B)``, each 0..255, per foreground code, by the code's rank among ``codes``.

    The first 18 ranks take :data:`_COLOURS` (distinct hues); later ones hues spaced by the golden
    ratio. The background 0 gets none.
    """
    ranked = sorted({int(c) for c in codes} - {0})
    return {code: _colour(rank) for rank, code in enumerate(ranked)}


def _colour(rank: int) -> tuple[int, int, int]:
    if rank < len(_COLOURS):
        value = _COLOURS[rank]
        return int(value[1:3], 16), int(value[3:5], 16), int(value[5:7], 16)
    red, green, blue = colorsys.hsv_to_rgb((rank * 0.618034) % 1.0, 0.6, 0.9)
    return round(red * 255), round(green * 255), round(blue * 255)


def slice_indices(shape: Sequence[int], mask: np.ndarray | None = None, slices: str = "mid") -> tuple[int, int, int]:
    """Indices ``(z, y, x)`` of the axial, coronal and sagittal slices to show.

    ``"mid"``: the middle of the volume; ``"auto"``: the centre of mass of ``mask``'s
    foreground (the middle when the mask is empty or None).
    """
    if slices not in ("mid", "auto"):
        raise CmmasError(None, f"slices must be 'mid' or 'auto', got {slices!r}")
    middle = tuple(int(s) // 2 for s in shape)
    if slices == "mid" or mask is None or not np.any(mask):
        return middle  # type: ignore[return-value]
    centre = np.argwhere(mask).mean(axis=0)
    return tuple(int(min(max(round(c), 0), s - 1)) for c, s in zip(centre, shape))  # type: ignore[return-value]


def orthogonal_views(centre_zyx: Sequence[int], spacing_zyx: Sequence[float]) -> list[tuple[str, tuple, float, str]]:
    """The axial, coronal and sagittal slices through voxel ``centre_zyx``: ``(title, index,
    aspect, origin)`` each, for ``imshow`` of a ``[D, H, W]`` volume in array order (axial as
    stored, coronal and sagittal with ``z`` up), the aspect ratio from the spacing (mm)."""
    z, y, x = (int(c) for c in centre_zyx)
    sz, sy, sx = (float(s) for s in spacing_zyx)
    return [(f"axial z={z}", np.s_[z, :, :], sy / sx, "upper"),
            (f"coronal y={y}", np.s_[:, y, :], sz / sx, "lower"),
            (f"sagittal x={x}", np.s_[:, :, x], sz / sy, "lower")]


def draw_filled(ax, scan: np.ndarray, label: np.ndarray | None, colours: Mapping[int, tuple[int, int, int]],
                window: tuple[float, float], aspect: float, origin: str) -> None:
    """Draw a 2D ``scan`` plane in grey (``window``: the intensities shown black and white) on
    ``ax`` and, over it, each code of ``colours`` (R, G, B 0..255) present in the ``label`` plane
    filled at opacity :data:`FILL_ALPHA`."""
    low, high = window
    ax.imshow(scan, cmap="gray", vmin=low, vmax=max(high, low + 1e-6), aspect=aspect, origin=origin)
    if label is not None:
        fill = np.zeros(label.shape + (4,), dtype=np.float32)
        for code, colour in colours.items():
            fill[label == code] = (*(c / 255 for c in colour), FILL_ALPHA)
        ax.imshow(fill, aspect=aspect, origin=origin, interpolation="nearest")
    ax.set_axis_off()
