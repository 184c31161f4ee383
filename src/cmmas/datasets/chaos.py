"""CHAOS challenge training data (``Train_Sets``): DICOM slices with one PNG mask per slice.

Layout (``root`` may be ``Train_Sets`` or the folder holding it)::

    CT/<n>/DICOM_anon/*.dcm           CT/<n>/Ground/*.png           (liver: any non-zero grey)
    MR/<n>/T2SPIR/DICOM_anon/*.dcm    MR/<n>/T2SPIR/Ground/*.png    (four organs by grey value)

Case ids are ``"ct_<n>"`` / ``"mr_<n>"``; only the T2-SPIR MR sequence is read.

Volumes are stacked here, slice by slice, rather than by a DICOM series reader: every file's
ImagePositionPatient (0020|0032) is read, slices are ordered along the slice normal (the
third direction cosine, from ImageOrientationPatient), and each file's PNG mask is placed at
the z index of that file's slice. Which PNG belongs to which DICOM file: the one with the same
file stem when the two folders' stems coincide, else the one at the same rank when both lists
are sorted naturally by file name (the PNG names follow the DICOM instance order, and that
order need not be the z order: in CHAOS CT it runs opposite to it).

Assumption (checked as a shape, not as an orientation): a PNG's array ``(rows, cols)`` is the
DICOM slice's array ``(y, x)``, with no flip or transpose.

MR grey values map to codes as in the challenge's own converter: ``(55, 70]`` -> 1 liver,
``(110, 135]`` -> 2 right kidney, ``(175, 200]`` -> 3 left kidney, ``(240, 255]`` -> 4 spleen
(the masks use 63/126/189/252); other non-zero values raise :class:`LabelError`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from cmmas.datasets.base import Case, Dataset, group_by_modality, natural_key
from cmmas.errors import DatasetError, GeometryError, ImageReadError, LabelError
from cmmas.io import Geometry, Image

#: CHAOS label code -> organ (background 0 excluded). CT masks hold the liver only.
CHAOS_LABELS = {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"}

#: MR mask grey-value ranges ``(low, high]`` -> label code.
CHAOS_MR_GREY = {1: (55, 70), 2: (110, 135), 3: (175, 200), 4: (240, 255)}

_EXPECTED = "CT/<n>/DICOM_anon/*.dcm (+ Ground/*.png) or MR/<n>/T2SPIR/DICOM_anon/*.dcm (+ T2SPIR/Ground/*.png)"

#: Relative tolerance on the spacing between consecutive slice positions.
_SLICE_GAP_RTOL = 0.01


def open_chaos(root: Path) -> Dataset:
    """List the CT and T2-SPIR MR cases under ``root`` (or ``root/Train_Sets``).

    Raises:
        DatasetError: no case folder of the CHAOS layout found.
    """
    base = root / "Train_Sets" if (root / "Train_Sets").is_dir() else root
    cases = []
    for modality, series in (("ct", Path()), ("mr", Path("T2SPIR"))):
        folder = base / modality.upper()
        if not folder.is_dir():
            continue
        for subject in sorted(folder.iterdir(), key=lambda p: natural_key(p.name)):
            dicom = subject / series / "DICOM_anon"
            if dicom.is_dir():
                ground = subject / series / "Ground"
                cases.append(Case(f"{modality}_{subject.name}", modality, dicom, ground if ground.is_dir() else None))
    if not cases:
        raise DatasetError(root, f"no CHAOS cases found; expected {_EXPECTED}")
    return Dataset("chaos", root, dict(CHAOS_LABELS), group_by_modality(cases))


def read_chaos_case(case: Case) -> tuple[Image, Image | None]:
    """Read a CHAOS case: DICOM slices stacked by position and, if present, its PNG masks.

    Returns:
        ``(image, label)``: float32 ``(z, y, x)`` image with the DICOM geometry (slice spacing
        from the positions, millimetres) and an int32 label map on the same grid (CHAOS codes),
        or None when the case has no ``Ground`` folder.
    """
    files = _files(case.image_path, ".dcm", "DICOM slices")
    image, z_of_file = stack_dicom_slices(files, case.image_path)
    if case.label_path is None:
        return image, None
    return image, read_ground_masks(case.label_path, files, z_of_file, image, case.modality)


def stack_dicom_slices(files: list[Path], source: Path) -> tuple[Image, np.ndarray]:
    """Stack single-slice DICOM files into a volume ordered along the slice normal.

    Args:
        files: one DICOM file per slice, any order.
        source: the folder, named in errors and kept as the image's path.

    Returns:
        ``(image, z_of_file)``: the float32 volume and, for ``files[i]``, its z index.

    Raises:
        ImageReadError: a file is unreadable.
        DatasetError: missing positions, fewer than two slices, mixed slice shapes or
            orientations, repeated or unevenly spaced positions, or slices shifted in-plane.
    """
    if len(files) < 2:
        raise DatasetError(source, f"{len(files)} DICOM slice(s); a volume needs at least two")
    slices = [_read_slice(f) for f in files]
    arrays, positions, directions, spacings = (list(x) for x in zip(*slices))
    for i, path in enumerate(files):
        if arrays[i].shape != arrays[0].shape:
            raise DatasetError(path, f"slice shape {arrays[i].shape} differs from {files[0].name}'s {arrays[0].shape}")
        if not np.allclose(directions[i], directions[0], atol=1e-4):
            raise DatasetError(path, f"slice orientation differs from {files[0].name}'s")
        if not np.allclose(spacings[i], spacings[0], atol=1e-4):
            raise DatasetError(path, f"pixel spacing {spacings[i]} differs from {files[0].name}'s {spacings[0]}")
    direction = directions[0]
    normal = direction[:, 2]
    positions = np.asarray(positions)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    gaps = np.diff(along[order])
    if np.any(gaps < 1e-3):
        i = int(np.argmin(gaps))
        raise DatasetError(
            source, f"{files[order[i]].name} and {files[order[i + 1]].name} lie at the same slice position"
        )
    gap = float(np.median(gaps))
    if np.any(np.abs(gaps - gap) > _SLICE_GAP_RTOL * gap):
        raise DatasetError(
            source, f"slice positions are not evenly spaced (gaps {gaps.min():.4g}..{gaps.max():.4g} mm)"
        )
    offsets = positions - positions[order[0]]
    in_plane = offsets - np.outer(offsets @ normal, normal)
    if np.max(np.linalg.norm(in_plane, axis=1)) > 0.1 * min(spacings[0]):
        raise DatasetError(source, "slices are shifted in-plane from one another (tilted stack); not supported")
    geometry = Geometry(
        size=(arrays[0].shape[1], arrays[0].shape[0], len(files)),
        spacing=(float(spacings[0][0]), float(spacings[0][1]), gap),
        origin=tuple(float(v) for v in positions[order[0]]),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in direction.ravel()),
    )
    volume = np.stack([arrays[i] for i in order]).astype(np.float32)
    z_of_file = np.empty(len(files), dtype=np.int64)
    z_of_file[order] = np.arange(len(files))
    return Image(volume, geometry, str(source)), z_of_file


def read_ground_masks(
    ground: Path, dicom_files: list[Path], z_of_file: np.ndarray, image: Image, modality: str
) -> Image:
    """Stack a case's PNG masks onto its DICOM volume.

    Args:
        ground: the ``Ground`` folder, one PNG per DICOM file.
        dicom_files: the case's DICOM files, in the order ``z_of_file`` refers to.
        z_of_file: z index of each DICOM file's slice in ``image``.
        image: the stacked DICOM volume ``(z, y, x)``.
        modality: ``"ct"`` (non-zero = liver, 1) or ``"mr"`` (grey ranges, codes 1..4).

    Returns:
        int32 label map on ``image``'s grid.

    Raises:
        DatasetError: no PNGs, or not one PNG per DICOM file.
        GeometryError: a PNG's ``(rows, cols)`` differs from the slices' ``(y, x)``.
        LabelError: a PNG that is not grey-level, or MR grey values outside the CHAOS ranges.
    """
    from skimage import io as skio

    pngs = _files(ground, ".png", "PNG masks")
    rank = {p.stem: i for i, p in enumerate(dicom_files)}
    if sorted(p.stem for p in pngs) == sorted(rank):
        file_of_png = [rank[p.stem] for p in pngs]
    elif len(pngs) == len(dicom_files):
        file_of_png = list(range(len(pngs)))
    else:
        raise DatasetError(
            ground,
            f"{len(pngs)} PNG masks for {len(dicom_files)} DICOM slices in {image.path}; expected one mask per slice",
        )
    slice_shape = image.shape[1:]
    label = np.zeros(image.shape, dtype=np.int32)
    for png, i in zip(pngs, file_of_png):
        grey = skio.imread(png)
        if grey.ndim != 2:
            raise LabelError(png, f"expected a grey-level mask, got an array of shape {grey.shape}")
        if grey.shape != slice_shape:
            raise GeometryError(
                png, f"mask is {grey.shape} (rows, cols) but {dicom_files[i].name} is {slice_shape} (y, x)"
            )
        label[z_of_file[i]] = grey_to_codes(grey, modality, png)
    return Image(label, image.geometry, str(ground))


def grey_to_codes(grey: np.ndarray, modality: str, source: Path | None = None) -> np.ndarray:
    """Map a CHAOS mask's grey values to label codes (int32, same shape).

    CT: any non-zero value is liver (1). MR: :data:`CHAOS_MR_GREY` ranges; other non-zero values
    raise :class:`LabelError` naming ``source``.
    """
    if modality == "ct":
        return (grey > 0).astype(np.int32)
    codes = np.zeros(grey.shape, dtype=np.int32)
    for code, (low, high) in CHAOS_MR_GREY.items():
        codes[(grey > low) & (grey <= high)] = code
    stray = (codes == 0) & (grey != 0)
    if stray.any():
        values = np.unique(grey[stray]).tolist()
        ranges = ", ".join(f"({lo}, {hi}]" for lo, hi in CHAOS_MR_GREY.values())
        raise LabelError(source, f"grey values {values[:8]} are outside the CHAOS MR ranges {ranges}")
    return codes


def _files(folder: Path, suffix: str, what: str) -> list[Path]:
    files = sorted(
        (p for p in folder.iterdir() if p.suffix.lower() == suffix and not p.name.startswith(".") and p.is_file()),
        key=lambda p: natural_key(p.name),
    )
    if not files:
        raise DatasetError(folder, f"no {what} ({suffix} files) found; expected {_EXPECTED}")
    return files


def _read_slice(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]:
    """One DICOM slice: ``(array (y, x), position (x, y, z) mm, direction [3, 3], spacing (x, y) mm)``."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        raise ImageReadError(path, "unreadable DICOM slice") from None
    if image.GetDimension() != 3 or image.GetSize()[2] != 1:
        raise DatasetError(path, f"expected one 2D slice per DICOM file, got size {image.GetSize()}")
    if not image.HasMetaDataKey("0020|0032"):
        raise DatasetError(path, "DICOM slice has no ImagePositionPatient (0020|0032); cannot place it")
    try:
        position = np.array([float(v) for v in image.GetMetaData("0020|0032").split("\\")])
    except ValueError:
        position = np.empty(0)
    if position.shape != (3,):
        raise DatasetError(path, f"unreadable ImagePositionPatient {image.GetMetaData('0020|0032')!r}")
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    array = sitk.GetArrayFromImage(image).reshape(image.GetSize()[1], image.GetSize()[0])
    spacing = tuple(float(s) for s in image.GetSpacing()[:2])
    return array, position, direction, spacing  # type: ignore[return-value]

