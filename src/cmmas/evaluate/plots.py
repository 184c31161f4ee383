"""Figures of the evaluation: box plots of a metric per method and structure, and overlays.

matplotlib runs with the non-interactive Agg backend (imported lazily); every figure is saved
as PNG (written atomically) and closed. Volumes are ``(z, y, x)`` arrays; coronal and
sagittal views are drawn with their true aspect ratio when the spacing is known, superior up.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from cmmas.drawing import draw_filled, orthogonal_views, palette, slice_indices
from cmmas.errors import CmmasError, GeometryError
from cmmas.evaluate.report import case_means
from cmmas.io import Image, atomic_path
from cmmas.metrics import jacobian_determinant

logger = logging.getLogger(__name__)

#: Metrics where a higher value is better (the others are distances, lower is better).
HIGHER_IS_BETTER = ("dice", "jaccard")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_png: str | os.PathLike) -> Path:
    """Save atomically as PNG and close the figure."""
    plt = _pyplot()
    out = Path(out_png)
    try:
        with atomic_path(out, ".png") as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return out


def _ordered(values) -> list:
    return list(dict.fromkeys(values))


def boxplot(rows: Sequence[dict], metric: str, out_png: str | os.PathLike, title: str | None = None) -> Path:
    """One box per method per structure (structures along x, methods side by side, coloured).

    Args:
        rows: result rows with ``method``, ``name`` and ``metric`` keys (nan values are left out).
        metric: e.g. "dice" or "hd95".
        out_png: output file.

    Raises:
        CmmasError: no finite value of ``metric`` in ``rows``.
    """
    plt = _pyplot()
    from matplotlib.patches import Patch

    methods = _ordered(r["method"] for r in rows)
    structures = _ordered(r["name"] for r in rows)
    values = {
        (m, s): [float(r[metric]) for r in rows if r["method"] == m and r["name"] == s and np.isfinite(r[metric])]
        for m in methods
        for s in structures
    }
    if not any(values.values()):
        raise CmmasError(out_png, f"no finite {metric!r} value to plot")
    colours = plt.get_cmap("tab10")
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(structures) * max(1, len(methods)) ** 0.5 + 2), 4.5))
    for k, method in enumerate(methods):
        for j, structure in enumerate(structures):
            data = values[(method, structure)]
            if not data:
                continue
            box = ax.boxplot(
                data,
                positions=[j - 0.4 + width * (k + 0.5)],
                widths=width * 0.85,
                patch_artist=True,
                showfliers=True,
                manage_ticks=False,
            )
            for patch in box["boxes"]:
                patch.set_facecolor(colours(k % 10))
                patch.set_alpha(0.75)
            for median in box["medians"]:
                median.set_color("black")
    ax.set_xticks(range(len(structures)))
    ax.set_xticklabels(structures)
    ax.set_xlim(-0.6, len(structures) - 0.4)
    ax.set_ylabel(metric if metric in HIGHER_IS_BETTER else f"{metric} (mm)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(
        handles=[Patch(facecolor=colours(k % 10), alpha=0.75, label=m) for k, m in enumerate(methods)],
        loc="best",
        fontsize="small",
    )
    ax.set_title(title or f"{metric} per structure and method")
    return _save(fig, out_png)


def labelled_curve(points: Mapping[str, Mapping[str, Sequence[tuple]]], out_png: str | os.PathLike) -> Path:
    """Mean Dice (solid) and worst target (dashed), in [0, 1], per method against the number of
    labelled target-modality training scans, one panel per direction; a method keeps its colour
    across panels.

    Args:
        points: direction -> method -> ``[(labelled count, mean Dice, worst target's Dice), ...]``
            (:func:`cmmas.evaluate.results_page.labelled_points`); the counts are categories on the
            x axis, numbers ascending, then words ("all").
        out_png: output file.

    Raises:
        CmmasError: no point to draw.
    """
    if not any(series for methods in points.values() for series in methods.values()):
        raise CmmasError(out_png, "no labelled-curve point to plot")
    plt = _pyplot()
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(points), figsize=(4.5 * len(points), 3.8), squeeze=False)
    counts = sorted({c for methods in points.values() for series in methods.values() for c, _, _ in series},
                    key=lambda c: (isinstance(c, str), 0 if isinstance(c, str) else c, str(c)))
    names = _ordered(m for methods in points.values() for m in methods)
    for ax, (direction, methods) in zip(axes[0], points.items()):
        for method, series in methods.items():
            colour = colours(names.index(method) % 10)
            series = sorted(series, key=lambda point: counts.index(point[0]))
            x = [counts.index(c) for c, _, _ in series]
            ax.plot(x, [m for _, m, _ in series], "-o", color=colour, label=f"{method} mean")
            ax.plot(x, [w for _, _, w in series], "--", marker=".", color=colour, alpha=0.7,
                    label=f"{method} worst target")
        ax.set_xticks(range(len(counts)))
        ax.set_xticklabels([str(c) for c in counts])
        ax.set_xlabel("labelled target-modality training scans")
        ax.set_ylabel("Dice (mean over organs)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.set_title(direction.upper().replace("->", " -> "))
        ax.legend(fontsize="x-small", loc="lower right")
    return _save(fig, out_png)


def _array(volume, what: str) -> np.ndarray:
    array = np.asarray(volume.array if isinstance(volume, Image) else volume)
    if array.ndim != 3:
        raise GeometryError(what, f"expected a 3D (z, y, x) volume, got shape {array.shape}")
    return array


def overlay(
    image: Image | np.ndarray,
    truth: Image | np.ndarray | None,
    preds: Mapping[str, Image | np.ndarray],
    out_png: str | os.PathLike,
    slices: str = "auto",
    spacing_zyx: Sequence[float] | None = None,
    title: str | None = None,
) -> Path:
    """One column per label map (the truth first, then each prediction), one row per view
    (axial, coronal, sagittal): the image in grey with the structures filled semi-transparently
    in the colours of :func:`cmmas.drawing.palette`, so that each method reads at a glance.

    Args:
        image: ``[D, H, W]`` intensities (an :class:`Image` gives the spacing too).
        truth: ground-truth label map, or None (no truth column).
        preds: name -> label map.
        out_png: output file.
        slices: "mid" or "auto" (through the centre of the truth, else of the predictions); the
            same slices in every column.
        spacing_zyx: voxel size in mm for the aspect ratio (default: the image's, else 1).
        title: figure title.

    Raises:
        GeometryError: volumes of different shapes.
    """
    plt = _pyplot()
    from matplotlib.patches import Patch

    volume = _array(image, "image")
    if spacing_zyx is None:
        spacing_zyx = image.spacing_zyx if isinstance(image, Image) else (1.0, 1.0, 1.0)
    maps = {} if truth is None else {"truth": _array(truth, "truth")}
    maps.update({name: _array(p, name) for name, p in preds.items()})
    for name, array in maps.items():
        if array.shape != volume.shape:
            raise GeometryError(name, f"shape {array.shape} differs from the image's {volume.shape}")
    if truth is not None and np.any(maps["truth"]):
        focus = maps["truth"] > 0
    else:
        focus = np.any([m > 0 for m in maps.values()], axis=0) if maps else None
    views = orthogonal_views(slice_indices(volume.shape, focus, slices), spacing_zyx)
    colours = palette(c for m in maps.values() for c in np.unique(m))
    window = tuple(float(v) for v in np.percentile(volume, [1, 99]))
    columns = list(maps) or ["image"]
    fig, axes = plt.subplots(3, len(columns), figsize=(3.2 * len(columns) + 0.6, 9.6), squeeze=False)
    for row, (view, where, aspect, origin) in enumerate(views):
        for col, name in enumerate(columns):
            label = maps[name][where] if name in maps else None
            draw_filled(axes[row, col], volume[where], label, colours, window, aspect, origin)
            axes[row, col].set_title(f"{name}, {view}" if row == 0 else view, fontsize=9)
    if colours:
        handles = [Patch(color=tuple(v / 255 for v in rgb), label=str(c)) for c, rgb in colours.items()]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 10), frameon=False, title="label code")
    if title:
        fig.suptitle(title)
    return _save(fig, out_png)


def best_median_worst(
    rows: Sequence[dict], method: str | None = None, metric: str = "dice", direction: str | None = None
) -> dict[str, str]:
    """Cases with the best, median and worst per-case mean of ``metric`` over structures.

    Args:
        rows: result rows.
        method: the method ranked (default: the first in ``rows``).
        metric: "dice"/"jaccard" (higher is better) or a distance (lower is better).
        direction: restrict to one direction (e.g. "ct->mr").

    Returns:
        ``{"best": case, "median": case, "worst": case}`` (the median is the lower middle one).

    Raises:
        CmmasError: no row of that method (and direction).
    """
    if method is None:
        if not rows:
            raise CmmasError(None, "no result rows to choose cases from")
        method = rows[0]["method"]
    means = {c: v for c, v in case_means(rows, method, metric, direction).items() if np.isfinite(v)}
    if not means:
        where = "" if direction is None else f" ({direction})"
        raise CmmasError(None, f"no finite {metric} of method {method!r}{where} to rank cases by")
    order = sorted(means, key=lambda c: means[c], reverse=metric in HIGHER_IS_BETTER)
    return {"best": order[0], "median": order[(len(order) - 1) // 2], "worst": order[-1]}


# ----------------------------------------------------------------------------- registration


def _plane(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(volume, index, axis=axis)


def _label_contours(ax, plane: np.ndarray, colour, width: float, origin: str) -> None:
    """Outline every non-zero code of a 2D label plane."""
    for code in np.unique(plane):
        if code == 0:
            continue
        mask = (plane == code).astype(np.float32)
        if mask.min() < mask.max():
            ax.contour(mask, levels=[0.5], colors=[colour], linewidths=width, origin=origin)


def displaced_grid_lines(ddf_plane: np.ndarray, step: int = 4) -> list[np.ndarray]:
    """Lines of a regular grid, each point ``p`` moved to ``p + u(p)``.

    Args:
        ddf_plane: ``[H, W, 2]`` in-plane displacement in voxels, channel 0 along the plane's
            rows (its first array axis), channel 1 along its columns.
        step: voxels between grid lines (the first and last row and column are always drawn).

    Returns:
        One ``[K, 2]`` array of ``(row, column)`` points per line: first the lines of constant
        row (``K = W``), then those of constant column (``K = H``). A zero field gives the
        straight lines of the grid, exactly.

    Raises:
        GeometryError: ``ddf_plane`` is not ``[H, W, 2]`` or ``step`` is below 1.
    """
    ddf_plane = np.asarray(ddf_plane, dtype=np.float64)
    if ddf_plane.ndim != 3 or ddf_plane.shape[-1] != 2:
        raise GeometryError("displacement plane", f"expected [H, W, 2], got shape {ddf_plane.shape}")
    if int(step) < 1:
        raise GeometryError("displacement plane", f"grid step must be at least 1 voxel, got {step}")
    height, width = ddf_plane.shape[:2]
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    moved = np.stack([rows, cols], axis=-1) + ddf_plane
    row_lines = sorted(set(range(0, height, int(step))) | {height - 1})
    col_lines = sorted(set(range(0, width, int(step))) | {width - 1})
    return [moved[r, :, :] for r in row_lines] + [moved[:, c, :] for c in col_lines]


def registration_panel(
    atlas: Image | np.ndarray,
    target: Image | np.ndarray,
    warped: np.ndarray,
    ddf: np.ndarray,
    out_png: str | os.PathLike,
    atlas_label: np.ndarray | None = None,
    target_label: np.ndarray | None = None,
    warped_label: np.ndarray | None = None,
    axis: int = 0,
    index: int | None = None,
    spacing_zyx: Sequence[float] | None = None,
    grid_step: int = 4,
    title: str | None = None,
) -> Path:
    """One slice of a registration: atlas, target, warped atlas, deformation grid, Jacobian map.

    All volumes are ``[D, H, W]`` on one grid (the working grid of the registration).

    Args:
        atlas, target: images (an :class:`Image` gives the spacing too).
        warped: the atlas image warped onto the target.
        ddf: ``[D, H, W, 3]`` atlas -> target field in voxels, ``ij`` (``warped(p) = atlas(p + u(p))``).
        out_png: output file.
        atlas_label, target_label, warped_label: label maps outlined on their images; the
            target's outline (white) is drawn on the warped atlas too, for comparison.
        axis: array axis normal to the slice (0 axial, 1 coronal, 2 sagittal).
        index: slice index (default: through the centre of the target label, else the middle).
        spacing_zyx: voxel size in mm for the aspect ratio (default: the target's, else 1).
        grid_step: voxels between the lines of the deformation grid.
        title: figure title.

    Panels 4 and 5: the grid of target voxels drawn at the atlas points they sample
    (``p + u(p)``, in-plane components), and det of the Jacobian of ``p -> p + u(p)``
    (:func:`cmmas.metrics.jacobian_determinant`; 1 is volume-preserving, folds ``<= 0`` are
    outlined black) with the folding percentage of the whole field in its title.

    Raises:
        GeometryError: volumes of different shapes, a field that is not ``[D, H, W, 3]``, or a
            bad axis/index.
    """
    plt = _pyplot()
    from matplotlib.colors import TwoSlopeNorm

    images = {"atlas": _array(atlas, "atlas"), "target": _array(target, "target"), "warped atlas": _array(warped, "warped")}
    shape = images["target"].shape
    ddf = np.asarray(ddf, dtype=np.float64)
    if ddf.shape != shape + (3,):
        raise GeometryError("displacement field", f"expected shape {shape + (3,)}, got {ddf.shape}")
    labels = {"atlas": atlas_label, "target": target_label, "warped atlas": warped_label}
    labels = {k: None if v is None else _array(v, f"{k} label") for k, v in labels.items()}
    for name, array in list(images.items()) + [(f"{k} label", v) for k, v in labels.items() if v is not None]:
        if array.shape != shape:
            raise GeometryError(name, f"shape {array.shape} differs from the target's {shape}")
    if axis not in (0, 1, 2):
        raise GeometryError("registration panel", f"axis must be 0, 1 or 2, got {axis}")
    if index is None:
        focus = None if labels["target"] is None else labels["target"] > 0
        index = slice_indices(shape, focus, "auto")[axis]
    if not 0 <= int(index) < shape[axis]:
        raise GeometryError("registration panel", f"slice {index} is outside axis {axis} of size {shape[axis]}")
    index = int(index)
    if spacing_zyx is None:
        spacing_zyx = target.spacing_zyx if isinstance(target, Image) else (1.0, 1.0, 1.0)
    in_plane = [k for k in range(3) if k != axis]
    aspect = float(spacing_zyx[in_plane[0]]) / float(spacing_zyx[in_plane[1]])
    origin = "upper" if axis == 0 else "lower"
    view = ("axial z", "coronal y", "sagittal x")[axis] + f"={index}"

    det = jacobian_determinant(ddf)
    folding = 100.0 * float(np.mean(det <= 0))
    fig, axes = plt.subplots(1, 5, figsize=(22, 4.8))
    for ax, (name, volume) in zip(axes, images.items()):
        low, high = np.percentile(volume, [1, 99])
        ax.imshow(_plane(volume, axis, index), cmap="gray", vmin=low, vmax=high if high > low else low + 1,
                  aspect=aspect, origin=origin)
        if labels[name] is not None:
            _label_contours(ax, _plane(labels[name], axis, index), "tab:orange", 1.2, origin)
        if name == "warped atlas" and labels["target"] is not None:
            _label_contours(ax, _plane(labels["target"], axis, index), "white", 0.8, origin)
        ax.set_title(name)
    grid_ax, jac_ax = axes[3], axes[4]
    target_plane = _plane(images["target"], axis, index)
    grid_ax.imshow(target_plane, cmap="gray", alpha=0.35, aspect=aspect, origin=origin)
    for line in displaced_grid_lines(_plane(ddf, axis, index)[..., in_plane], grid_step):
        grid_ax.plot(line[:, 1], line[:, 0], color="tab:blue", linewidth=0.8)
    grid_ax.set_xlim(-0.5, shape[in_plane[1]] - 0.5)
    grid_ax.set_ylim(*((shape[in_plane[0]] - 0.5, -0.5) if origin == "upper" else (-0.5, shape[in_plane[0]] - 0.5)))
    grid_ax.set_title(f"deformation grid (max |u| {np.abs(ddf).max():.2f} vox)")
    det_plane = _plane(det, axis, index)
    spread = max(float(np.abs(det - 1.0).max()), 0.05)
    shown = jac_ax.imshow(det_plane, cmap="RdBu_r", norm=TwoSlopeNorm(1.0, 1.0 - spread, 1.0 + spread),
                          aspect=aspect, origin=origin)
    folds = (det_plane <= 0).astype(np.float32)
    if folds.min() < folds.max():
        jac_ax.contour(folds, levels=[0.5], colors=["black"], linewidths=1.0, origin=origin)
    fig.colorbar(shown, ax=jac_ax, fraction=0.046, pad=0.04)
    jac_ax.set_title(f"det J (folding {folding:.2f}%, min {det.min():.2f})")
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(f"{title} — {view}" if title else view)
    return _save(fig, out_png)


#: Loads what one overlay shows: the image, the truth and name -> prediction, on one grid.
OverlaySource = Callable[[], tuple[Image, np.ndarray, dict[str, np.ndarray]]]


def _tag(direction: str) -> str:
    return direction.replace("->", "2")


def write_figures(
    rows: Sequence[dict],
    out_dir: str | os.PathLike,
    overlays: Mapping[tuple[str, str], OverlaySource] | None = None,
    method: str | None = None,
) -> list[Path]:
    """Box plots of Dice and HD95, and overlays of each direction's best, median and worst case.

    Box plots are ``boxplot_<metric>.png``, or ``boxplot_<metric>_<a>2<t>.png`` per direction
    when the rows hold several. Overlays: for each direction among the keys of ``overlays``
    (``(direction, case) -> loader``), the cases ranked by ``method``'s mean Dice
    (:func:`cmmas.evaluate.plots.best_median_worst`; default: the first method of the rows), drawn as
    ``overlay_<a>2<t>_<tags>_<case>.png`` (tags such as ``best`` or ``best-median-worst``).

    Returns:
        The files written.
    """
    out = Path(out_dir)
    written = []
    directions = _ordered(r["direction"] for r in rows)
    for direction in directions:
        mine = [r for r in rows if r["direction"] == direction]
        suffix = "" if len(directions) == 1 else f"_{_tag(direction)}"
        for metric in ("dice", "hd95"):
            if any(np.isfinite(r[metric]) for r in mine):
                title = f"{direction}: {metric} per structure and method"
                written.append(boxplot(mine, metric, out / f"boxplot_{metric}{suffix}.png", title=title))
    overlays = overlays or {}
    for direction in _ordered(d for d, _ in overlays):
        chosen: dict[str, list[str]] = {}
        for tag, case in best_median_worst(rows, method=method, direction=direction).items():
            chosen.setdefault(case, []).append(tag)
        n_cases = len({c for d, c in overlays if d == direction})
        for case, tags in chosen.items():
            if (direction, case) not in overlays:
                logger.warning("no overlay source for %s %s", direction, case)
                continue
            image, truth, preds = overlays[(direction, case)]()
            tag = "-".join(tags)
            title = f"{direction} {case} ({tag} of {n_cases} by {method or rows[0]['method']} Dice)"
            name = f"overlay_{_tag(direction)}_{tag}_{case}.png"
            written.append(overlay(image, truth, preds, out / name, slices="auto", title=title))
    return written
