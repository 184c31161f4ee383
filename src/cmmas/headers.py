"""Header sanity: what an image header says about its grid, checked before the voxels are trusted.

ITK reads some headers in ways that silently change the scan: a NIfTI ``pixdim`` of 0 (or NaN)
becomes 1 mm, a negative ``pixdim`` flips that axis, and when the qform and the sform disagree
one of them is taken without a word. A DICOM series with a slice missing is read with the
averaged slice spacing. The functions here parse the NIfTI-1/2 header themselves (numpy on its
first 348 / 540 bytes, gzip aware) and the slice positions of a DICOM series, and either raise
one :class:`~cmmas.errors.GeometryError` naming the file or return warnings (one line each,
the file first) for the caller to record.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cmmas.errors import GeometryError, ImageReadError

#: Largest distance (mm) between where the qform and the sform put a corner voxel of the grid
#: before they are said to disagree.
QFORM_SFORM_TOL_MM = 0.1

#: A DICOM slice gap differing from the series' median gap by more than this fraction is named.
SLICE_GAP_TOL = 0.01

#: Largest deviation of ``D^T D`` from the identity for a direction matrix to count as orthonormal.
ORTHONORMAL_TOL = 1e-3

_AXES = "xyz"

#: Byte layout of the fields read, per NIfTI version: (offset, dtype) with dtype's byte order set later.
_LAYOUT = {
    1: {"dim": (40, "i2", 8), "datatype": (70, "i2", 1), "bitpix": (72, "i2", 1), "pixdim": (76, "f4", 8),
        "vox_offset": (108, "f4", 1), "qform_code": (252, "i2", 1), "sform_code": (254, "i2", 1),
        "quatern": (256, "f4", 3), "qoffset": (268, "f4", 3), "srow": (280, "f4", 12)},
    2: {"datatype": (12, "i2", 1), "bitpix": (14, "i2", 1), "dim": (16, "i8", 8), "pixdim": (104, "f8", 8),
        "vox_offset": (168, "i8", 1), "qform_code": (344, "i4", 1), "sform_code": (348, "i4", 1),
        "quatern": (352, "f8", 3), "qoffset": (376, "f8", 3), "srow": (400, "f8", 12)},
}
_SIZES = {348: 1, 540: 2}


@dataclasses.dataclass(frozen=True)
class NiftiHeader:
    """The geometry fields of a NIfTI-1 or NIfTI-2 header (``dim``, ``pixdim`` as stored)."""

    version: int
    endian: str
    dim: tuple[int, ...]
    datatype: int
    bitpix: int
    pixdim: tuple[float, ...]
    vox_offset: int
    qform_code: int
    sform_code: int
    quatern: tuple[float, float, float]
    qoffset: tuple[float, float, float]
    srow: tuple[float, ...]

    @property
    def spatial_axes(self) -> int:
        """How many of x, y, z the header has (``dim[0]``, at most 3)."""
        return max(0, min(3, self.dim[0]))

    def qform(self) -> np.ndarray:
        """The qform as a ``[4, 4]`` voxel-to-RAS affine (mm), as the NIfTI standard builds it
        (a spacing <= 0 taken as 1, ``pixdim[0] < 0`` flipping z)."""
        b, c, d = self.quatern
        a = np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
        rotation = np.array([
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
        ])
        zooms = np.array([p if p > 0 else 1.0 for p in self.pixdim[1:4]])
        if self.pixdim[0] < 0:
            zooms[2] = -zooms[2]
        affine = np.eye(4)
        affine[:3, :3] = rotation * zooms
        affine[:3, 3] = self.qoffset
        return affine

    def sform(self) -> np.ndarray:
        """The sform as a ``[4, 4]`` voxel-to-RAS affine (mm)."""
        affine = np.eye(4)
        affine[:3] = np.asarray(self.srow, dtype=np.float64).reshape(3, 4)
        return affine

    def corners(self) -> np.ndarray:
        """The 8 corner voxel indices ``[8, 4]`` (homogeneous, x y z 1) of the grid."""
        last = [max(int(n), 1) - 1 for n in (list(self.dim[1:4]) + [1, 1, 1])[:3]]
        return np.array([[i, j, k, 1.0] for i in (0, last[0]) for j in (0, last[1]) for k in (0, last[2])])


def read_nifti_header(path: str | os.PathLike) -> NiftiHeader:
    """Parse the geometry fields of a ``.nii`` / ``.nii.gz`` file's NIfTI-1 or NIfTI-2 header.

    Raises:
        ImageReadError: the header is incomplete or its size field is neither 348 nor 540.
    """
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as handle:
        raw = handle.read(540)
    for endian in "<>":
        size = int(np.frombuffer(raw[:4], dtype=endian + "i4")[0]) if len(raw) >= 4 else 0
        if size in _SIZES:
            break
    else:
        raise ImageReadError(path, "unreadable or truncated image (not a NIfTI-1 or NIfTI-2 header)")
    if len(raw) < size:
        raise ImageReadError(path, "unreadable or truncated image (NIfTI header is incomplete)")
    version = _SIZES[size]
    fields = {}
    for name, (offset, kind, count) in _LAYOUT[version].items():
        values = np.frombuffer(raw, dtype=endian + kind, count=count, offset=offset)
        fields[name] = tuple(v.item() for v in values) if count > 1 else values[0].item()
    return NiftiHeader(version=version, endian=endian, dim=fields["dim"], datatype=fields["datatype"],
                       bitpix=fields["bitpix"], pixdim=fields["pixdim"], vox_offset=int(fields["vox_offset"]),
                       qform_code=fields["qform_code"], sform_code=fields["sform_code"], quatern=fields["quatern"],
                       qoffset=fields["qoffset"], srow=fields["srow"])


def check_nifti_header(path: str | os.PathLike, header: NiftiHeader, itk_affine: np.ndarray) -> list[str]:
    """Refuse a spacing that is zero, negative or not finite; warn when qform and sform disagree.

    Args:
        path: the file (named in every message).
        header: its parsed header.
        itk_affine: the ``[4, 4]`` voxel-to-RAS affine of the grid ITK read (mm), to say which
            transform was used.

    Returns:
        Warnings, one line each, the file first.

    Raises:
        GeometryError: a ``pixdim`` of a spatial axis is 0, negative or not finite (named).
    """
    for axis in range(header.spatial_axes):
        value = header.pixdim[axis + 1]
        where = f"pixdim[{axis + 1}] ({_AXES[axis]} spacing)"
        if not np.isfinite(value) or value == 0:
            raise GeometryError(path, f"{where} is {value:g}: the voxel size along {_AXES[axis]} is unknown "
                                f"(ITK would assume 1 mm); store the scan with its real spacing")
        if value < 0:
            raise GeometryError(path, f"{where} is negative ({value:g}): ITK flips the {_AXES[axis]} axis of "
                                f"such a header while other readers take its absolute value; store the scan with "
                                f"positive spacings")
    if header.qform_code <= 0 or header.sform_code <= 0:
        return []
    corners = header.corners()
    apart = float(np.max(np.linalg.norm((corners @ header.qform().T - corners @ header.sform().T)[:, :3], axis=1)))
    if not np.isfinite(apart) or apart <= QFORM_SFORM_TOL_MM:
        return []
    itk = corners @ itk_affine.T
    off = {name: float(np.max(np.linalg.norm((itk - corners @ affine.T)[:, :3], axis=1)))
           for name, affine in (("sform", header.sform()), ("qform", header.qform()))}
    used = min(off, key=off.get)
    used = f"the {used} was used" if off[used] <= QFORM_SFORM_TOL_MM else "neither was used as stored"
    return [f"{os.fspath(path)}: qform (code {header.qform_code}) and sform (code {header.sform_code}) disagree, "
            f"placing the grid's corners up to {apart:.3g} mm apart; {used}"]


def check_grid(path: str | os.PathLike, spacing: Sequence[float], direction: Sequence[float]) -> None:
    """Refuse a spacing that is not finite and positive, or a direction that is not orthonormal.

    Args:
        spacing: voxel size along (x, y, z), mm.
        direction: 3x3 direction cosines, row-major (ITK's).

    Raises:
        GeometryError: naming the axis, or the direction matrix.
    """
    for axis, value in enumerate(spacing):
        if not np.isfinite(value) or value <= 0:
            raise GeometryError(path, f"{_AXES[axis]} spacing is {value:g}: it must be a positive number of mm")
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    if not np.all(np.isfinite(matrix)) or np.max(np.abs(matrix.T @ matrix - np.eye(3))) > ORTHONORMAL_TOL:
        raise GeometryError(path, f"direction matrix {np.round(matrix, 4).tolist()} is degenerate or not "
                            f"orthonormal: the axes' orientation is undefined")


def check_slice_positions(folder: str | os.PathLike, files: Sequence[str], positions: np.ndarray,
                          normal: np.ndarray) -> list[str]:
    """Warn when a DICOM series' slices are not evenly spaced along the slice normal.

    Args:
        folder: the series folder (named first).
        files: the slice files in reading order.
        positions: ``[N, 3]`` ImagePositionPatient of each, mm.
        normal: unit slice normal (row cosine x column cosine).

    Returns:
        One warning naming the largest deviating gap and where it lies, or nothing.
    """
    if len(files) < 3:
        return []
    gaps = np.diff(np.asarray(positions, dtype=np.float64) @ np.asarray(normal, dtype=np.float64))
    median = float(np.median(gaps))
    worst = int(np.argmax(np.abs(gaps - median)))
    if abs(gaps[worst] - median) <= SLICE_GAP_TOL * max(abs(median), 1e-3):
        return []
    uneven = int(np.count_nonzero(np.abs(gaps - median) > SLICE_GAP_TOL * max(abs(median), 1e-3)))
    return [f"{os.fspath(folder)}: DICOM slices are not evenly spaced: a gap of {abs(gaps[worst]):.3g} mm between "
            f"slices {worst} and {worst + 1} ({Path(files[worst]).name}, {Path(files[worst + 1]).name}) where the "
            f"median gap is {abs(median):.3g} mm ({uneven} uneven gap(s); a slice missing?); read with the "
            f"averaged spacing"]
