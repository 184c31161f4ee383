"""Writing a segmentation: the label map, its maps and the side outputs that a person reads.

:func:`write_segmentation` writes the label map (:func:`write_label`), the probability and
agreement maps and, beside them (:func:`output_paths` names every file):

- ``<stem>_volumes.csv`` (:func:`label_volumes`, :func:`write_volumes_csv`): each structure's
  voxel count, volume in millilitres and mean atlas agreement;
- ``<stem>_labels.itksnap.txt`` (:func:`write_itksnap_labels`): an ITK-SNAP label description
  file (Segmentation > Import Label Descriptions);
- ``<stem>_labels.ctbl`` (:func:`write_slicer_color_table`): a 3D Slicer colour table (load it
  with the label map, then pick it as the label map's lookup table);
- ``<stem>_preview.png`` (:func:`write_preview`): three orthogonal slices with the labels filled.

A clinical scan's label map has hundreds of millions of voxels: each output reads it once
(volumes: one counting pass; preview: three slices and a subsample), never copying it whole.

A code has the same colour in all three (:func:`cmmas.drawing.palette`). Every file is written
atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cmmas.drawing import draw_filled, orthogonal_views, palette, slice_indices
from cmmas.errors import CmmasError, LabelError
from cmmas.io import (
    IMAGE_SUFFIXES,
    PROBABILITY_SCALE,
    Image,
    atomic_path,
    atomic_write_text,
    check_same_grid,
    label_dtype,
    write_image,
)

if TYPE_CHECKING:
    from cmmas.segment import Segmentation

#: Columns of the volumes CSV.
VOLUME_COLUMNS = ("code", "name", "voxels", "millilitres", "mean_agreement")


#: Voxels counted per pass of :func:`_sums` (bounds its temporary copies to a few tens of MB).
_CHUNK = 1 << 22


def _sums(label: Image, agreement: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Voxels of each code of ``label`` (``[max code + 1]``) and the sum of ``agreement`` over them
    (None without it), in one pass over the map, in chunks: only the foreground voxels (a few
    percent of a scan) are gathered, so no full-size copy is made."""
    flat = np.asarray(label.array).reshape(-1)
    if flat.size and int(flat.min()) < 0:
        raise LabelError(label.path, f"label codes must not be negative, found {int(flat.min())}")
    length = int(flat.max()) + 1 if flat.size else 1
    counts = np.zeros(length, dtype=np.int64)
    sums = None if agreement is None else np.zeros(length, dtype=np.float64)
    weights = None if agreement is None else agreement.reshape(-1)
    for start in range(0, flat.size, _CHUNK):
        part = flat[start:start + _CHUNK]
        inside = np.flatnonzero(part)
        codes = part[inside]
        counts += np.bincount(codes, minlength=length)
        if sums is not None:
            sums += np.bincount(codes, weights=weights[start:start + _CHUNK][inside], minlength=length)
    counts[0] = flat.size - counts[1:].sum()
    return counts, sums


def _voxel_counts(label: Image, names: Mapping[int, str]) -> dict[int, int]:
    """Voxels of each foreground code of ``names`` in ``label``; raises on a code ``names`` lacks."""
    counts, _ = _sums(label, None)
    return _named(label, names, counts)


def _named(label: Image, names: Mapping[int, str], counts: np.ndarray) -> dict[int, int]:
    codes = sorted({int(c) for c in names} - {0})
    unknown = sorted(set(np.flatnonzero(counts).tolist()) - set(codes) - {0})
    if unknown:
        raise LabelError(label.path, f"label codes {unknown} have no name (named: {codes})")
    return {code: int(counts[code]) if code < len(counts) else 0 for code in codes}


def label_volumes(label: Image, names: Mapping[int, str], agreement: Image | None = None) -> list[dict]:
    """The size of each named structure: one row per foreground code of ``names``, by code.

    Args:
        label: label map ``[D, H, W]`` of non-negative integer codes.
        names: code -> structure name (the background 0, if present, is skipped).
        agreement: fraction of atlases agreeing with the label ``[D, H, W]`` on the label's grid:
            floats in [0, 1], or uint8 of :data:`cmmas.io.PROBABILITY_SCALE` (as
            :func:`cmmas.align.mapping.map_back` gives it); or None.

    Returns:
        Rows ``{"code", "name", "voxels", "millilitres", "mean_agreement"}``: millilitres are
        voxels x voxel volume (mm^3) / 1000; mean_agreement is the mean of ``agreement`` over the
        structure's voxels as a fraction (NaN without ``agreement`` or without voxels).

    Raises:
        LabelError: the label holds a code that ``names`` lacks, or a negative one.
        GeometryError: ``agreement`` is not on the label's grid.
    """
    values = None
    if agreement is not None:
        check_same_grid(label, agreement, what="agreement")
        values = np.asarray(agreement.array)
    counts, sums = _sums(label, values)
    named = _named(label, names, counts)
    scale = PROBABILITY_SCALE if values is not None and values.dtype == np.uint8 else 1.0
    voxel_mm3 = math.prod(label.geometry.spacing)
    rows = []
    for code, voxels in named.items():
        mean = float(sums[code]) / voxels / scale if sums is not None and voxels else math.nan
        rows.append({"code": code, "name": names[code], "voxels": voxels,
                     "millilitres": voxels * voxel_mm3 / 1000.0, "mean_agreement": mean})
    return rows


def write_volumes_csv(rows: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """Write :func:`label_volumes` rows as CSV (columns :data:`VOLUME_COLUMNS`; millilitres and
    agreement to 4 decimals, a NaN agreement as an empty cell), atomically."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(VOLUME_COLUMNS)
    for row in rows:
        mean = row["mean_agreement"]
        writer.writerow([row["code"], row["name"], row["voxels"], f"{row['millilitres']:.4f}",
                         "" if math.isnan(mean) else f"{mean:.4f}"])
    return atomic_write_text(path, text.getvalue())


def read_volumes_csv(path: str | os.PathLike) -> list[dict]:
    """The rows of a :func:`write_volumes_csv` file, as :func:`label_volumes` gives them (an empty
    agreement cell: NaN)."""
    with open(path, newline="") as handle:
        return [{"code": int(r["code"]), "name": r["name"], "voxels": int(r["voxels"]),
                 "millilitres": float(r["millilitres"]),
                 "mean_agreement": float(r["mean_agreement"]) if r["mean_agreement"] else math.nan}
                for r in csv.DictReader(handle)]


def _words(code: int, name: str) -> list[str]:
    """The words of a name on one line (``label_<code>`` for an empty name)."""
    return str(name).split() or [f"label_{code}"]


def write_itksnap_labels(names: Mapping[int, str], path: str | os.PathLike) -> Path:
    """Write an ITK-SNAP label description file: 0 "Clear Label" (transparent), then each foreground
    code of ``names`` with its :func:`cmmas.drawing.palette` colour (R, G, B 0..255; opacity 0..1
    is 1), visible and meshed. Double quotes in a name become single ones. Written atomically."""
    lines = [
        "################################################",
        "# ITK-SnAP Label Description File",
        "# File format:",
        "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
        "# Fields:",
        "#    IDX:   Zero-based index",
        "#    -R-:   Red color component (0..255)",
        "#    -G-:   Green color component (0..255)",
        "#    -B-:   Blue color component (0..255)",
        "#    -A-:   Label transparency (0.00 .. 1.00)",
        "#    VIS:   Label visibility (0 or 1)",
        "#    MSH:   Label mesh visibility (0 or 1)",
        "#  LABEL:   Label description",
        "################################################",
        f'{0:5d} {0:5d} {0:4d} {0:4d} {0:8d} {0:2d} {0:2d}    "Clear Label"',
    ]
    for code, (red, green, blue) in palette(names).items():
        label = " ".join(_words(code, names[code])).replace('"', "'")
        lines.append(f'{code:5d} {red:5d} {green:4d} {blue:4d} {1:8d} {1:2d} {1:2d}    "{label}"')
    return atomic_write_text(path, "\n".join(lines) + "\n")


def write_slicer_color_table(names: Mapping[int, str], path: str | os.PathLike) -> Path:
    """Write a 3D Slicer colour table (``.ctbl``): ``code name R G B A`` per line (0..255 each),
    0 "Background" transparent, then each foreground code of ``names`` in its
    :func:`cmmas.drawing.palette` colour, opaque; spaces in a name become underscores, as Slicer reads names as one word.
    Written atomically."""
    colours = palette(names)
    lines = [f"# Color table file {Path(path).name}", f"# {len(colours) + 1} values", "0 Background 0 0 0 0"]
    for code, (red, green, blue) in colours.items():
        lines.append(f"{code} {'_'.join(_words(code, names[code]))} {red} {green} {blue} 255")
    return atomic_write_text(path, "\n".join(lines) + "\n")


def write_preview(image: Image, label: Image, names: Mapping[int, str], path: str | os.PathLike) -> Path:
    """Write a PNG of the axial, coronal and sagittal slices through the centroid of the label's
    foreground: the scan in grey (windowed to its 1st-99th percentiles), each structure filled in
    its :func:`cmmas.drawing.palette` colour at opacity :data:`cmmas.drawing.FILL_ALPHA`, a legend
    of the structures present.

    The slices are drawn in array order (axial seen from ``z`` as stored, coronal and sagittal
    with ``z`` up) with their true aspect ratio from the voxel spacing (mm). Written atomically.

    Args:
        image: the scan ``[D, H, W]``.
        label: its label map ``[D, H, W]`` on the same grid.
        names: code -> structure name.
        path: the PNG file.

    Raises:
        GeometryError: ``label`` is not on ``image``'s grid.
        LabelError: the label holds a code that ``names`` lacks.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
    from matplotlib.patches import Patch

    from cmmas.preprocess import sample

    check_same_grid(image, label, what="label")
    counts = _voxel_counts(label, names)
    colours = palette(names)
    scan, codes = np.asarray(image.array), np.asarray(label.array)
    window = tuple(float(v) for v in np.percentile(sample(scan), [1, 99]))
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    views = orthogonal_views(slice_indices(codes.shape, codes > 0, "auto"), image.spacing_zyx)
    for ax, (title, where, aspect, origin) in zip(fig.subplots(1, 3), views):
        draw_filled(ax, scan[where].astype(np.float32), codes[where], colours, window, aspect, origin)
        ax.set_title(title)
    present = [code for code, voxels in counts.items() if voxels]
    if present:
        handles = [Patch(color=tuple(c / 255 for c in colours[code]), label=names[code]) for code in present]
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), frameon=False)
    else:
        fig.suptitle("no structure segmented")
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return Path(path)


def write_label(label: Image, path: str | os.PathLike, codes: Sequence[int]) -> Path:
    """Write a label map atomically as the smallest integer type holding ``codes``
    (:func:`cmmas.io.label_dtype`; a map already of that type is not copied): how every label
    map of the pipeline is written."""
    return write_image(label.with_array(label.array.astype(label_dtype(codes), copy=False)), path)


def label_paths(targets: Sequence[str | os.PathLike], out: str | os.PathLike) -> list[Path]:
    """Where each target's label map goes: ``out`` itself for one target; for several, ``out`` is
    a folder and each map is ``out/<scan name>.nii.gz`` (the file name without its image
    ending, :data:`cmmas.io.IMAGE_SUFFIXES`; a DICOM folder keeps its name).

    Raises:
        CmmasError: several targets and ``out`` names a .nii/.nii.gz file, or two targets share a
            name (their maps would overwrite each other).
    """
    out = Path(out)
    if len(targets) == 1:
        return [out]
    if out.name.endswith((".nii", ".nii.gz")):
        raise CmmasError(out, f"{len(targets)} targets: --out must be a folder, not a .nii.gz file")
    names = []
    for target in targets:
        name = Path(target).name
        ending = next((e for e in IMAGE_SUFFIXES if name.lower().endswith(e)), "")
        names.append(name[: len(name) - len(ending)])
    shared = sorted({n for n in names if names.count(n) > 1})
    if shared:
        raise CmmasError(out, f"targets share the name(s) {shared}: their label maps would overwrite each other")
    return [out / f"{name}.nii.gz" for name in names]


def output_paths(out: str | os.PathLike, codes: Sequence[int]) -> dict[str, Path]:
    """Where :func:`write_segmentation` puts each file, in the order it writes them: "label",
    "prob_<code>", "agreement", "volumes", "itksnap", "slicer", "preview", "qc". The probability
    and agreement maps take the label map's format (its ending of :data:`cmmas.io.IMAGE_SUFFIXES`:
    ``.nii.gz``, or the uncompressed ``.nii`` / ``.mha``; ``.nii.gz`` when it has none of them)."""
    out = Path(out)
    ending = next((e for e in sorted(IMAGE_SUFFIXES, key=len, reverse=True) if out.name.endswith(e)), None)
    stem = out.name[: -len(ending)] if ending else out.stem
    ending = ending or ".nii.gz"
    paths = {"label": out}
    paths.update({f"prob_{int(c)}": out.with_name(f"{stem}_prob_{int(c)}{ending}") for c in codes})
    paths["agreement"] = out.with_name(f"{stem}_agreement{ending}")
    paths["volumes"] = out.with_name(f"{stem}_volumes.csv")
    paths["itksnap"] = out.with_name(f"{stem}_labels.itksnap.txt")
    paths["slicer"] = out.with_name(f"{stem}_labels.ctbl")
    paths["preview"] = out.with_name(f"{stem}_preview.png")
    paths["qc"] = out.with_name(f"{stem}_qc.json")
    return paths


def write_segmentation(result: Segmentation, out: str | os.PathLike, extras: bool = True,
                       preview: bool = False) -> list[Path]:
    """Write the label map to ``out`` (as :func:`cmmas.io.label_dtype` of its codes) and beside it,
    each atomically (:func:`output_paths`; the image format follows ``out``'s ending):

    - with ``extras``, ``<stem>_prob_<code>.nii.gz`` and ``<stem>_agreement.nii.gz`` (on the
      target's grid; uint8, value / 255 = the fraction: :data:`cmmas.io.PROBABILITY_SCALE`);
    - ``<stem>_volumes.csv``, each structure's voxels, millilitres and mean agreement (empty when
      the segmentation has no agreement map), ``<stem>_labels.itksnap.txt`` and
      ``<stem>_labels.ctbl``, the label names and colours for ITK-SNAP and 3D Slicer
      (:func:`write_itksnap_labels`, :func:`write_slicer_color_table`);
    - with ``preview``, ``<stem>_preview.png``: three slices of the scan with the labels filled;
    - ``<stem>_qc.json``, the QC record (:meth:`Segmentation.qc`).

    Returns:
        The paths written, the label map first, the QC record last.

    Raises:
        CmmasError: ``extras`` asked of a segmentation made without its maps (``maps=False``).
    """
    if extras and (result.probabilities is None or result.agreement is None):
        raise CmmasError(out, "this segmentation has no probability or agreement maps (SegmentConfig.maps False); "
                              "write it with extras=False")
    paths = output_paths(out, result.codes)
    written = [write_label(result.label, paths["label"], result.codes)]
    if extras:
        for code, prob in result.probabilities.items():
            written.append(write_image(prob, paths[f"prob_{code}"]))
        written.append(write_image(result.agreement, paths["agreement"]))
    rows = label_volumes(result.label, result.names, result.agreement)
    written.append(write_volumes_csv(rows, paths["volumes"]))
    written.append(write_itksnap_labels(result.names, paths["itksnap"]))
    written.append(write_slicer_color_table(result.names, paths["slicer"]))
    if preview:
        written.append(write_preview(result.target, result.label, result.names, paths["preview"]))
    written.append(atomic_write_text(paths["qc"], json.dumps(result.qc(), indent=1) + "\n"))
    return written
