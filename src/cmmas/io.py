"""Reading and writing 3D images with their geometry.

An :class:`Image` keeps a numpy array in SimpleITK order ``(z, y, x)`` together with its
:class:`Geometry` (spacing and origin in millimetres, direction cosines), so that any output
can be written back onto the grid it came from. Geometry is converted to and from
SimpleITK only in this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import logging
import os
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from cmmas import headers
from cmmas.errors import GeometryError, ImageReadError, LabelError

_LOG = logging.getLogger(__name__)

#: SimpleITK returns spacing rounded through float32: compare geometry with this tolerance (mm).
GEOMETRY_TOL = 1e-3

#: File endings of the image formats written (and named) here.
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr")

#: Probability and agreement maps on a scan's grid are stored as uint8: the stored value divided
#: by this is the fraction in [0, 1] (rounded to the nearest 1/255).
PROBABILITY_SCALE = 255


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The physical placement of a voxel grid, in ITK conventions.

    Attributes:
        size: number of voxels along (x, y, z), ITK order.
        spacing: voxel size along (x, y, z) in millimetres.
        origin: physical position of voxel (0, 0, 0) in millimetres (LPS, as ITK).
        direction: 3x3 direction-cosine matrix, row-major, 9 floats; column k is the
            physical direction of voxel axis k (x, y, z).
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape in numpy/SimpleITK order ``(z, y, x)``."""
        return tuple(reversed(self.size))  # type: ignore[return-value]

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Spacing in array-axis order ``(z, y, x)``, millimetres."""
        return tuple(reversed(self.spacing))  # type: ignore[return-value]

    @property
    def direction_matrix(self) -> np.ndarray:
        """Direction cosines as a ``[3, 3]`` array (columns are voxel axes x, y, z)."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    def index_to_physical(self, index_xyz: np.ndarray) -> np.ndarray:
        """Map continuous voxel indices ``[..., 3]`` (x, y, z order) to millimetres."""
        index_xyz = np.asarray(index_xyz, dtype=np.float64)
        scaled = index_xyz * np.asarray(self.spacing)
        return scaled @ self.direction_matrix.T + np.asarray(self.origin)

    def physical_to_index(self, point: np.ndarray) -> np.ndarray:
        """Map physical points ``[..., 3]`` in millimetres to continuous (x, y, z) indices."""
        rel = np.asarray(point, dtype=np.float64) - np.asarray(self.origin)
        return (rel @ np.linalg.inv(self.direction_matrix).T) / np.asarray(self.spacing)

    def corners(self) -> np.ndarray:
        """The grid's 8 outer corners (voxel edges, half a voxel beyond the centres), ``[8, 3]`` mm (x, y, z)."""
        size = np.asarray(self.size, dtype=np.float64)
        unit = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=np.float64)
        return self.index_to_physical(unit * size - 0.5)

    def sub_grid(self, box_zyx: Sequence[slice]) -> "Geometry":
        """The grid of ``array[box_zyx]``: three slices (z, y, x, step 1) within the grid."""
        starts, stops = [], []
        for axis, (cut, n) in enumerate(zip(box_zyx, self.shape)):
            start, stop, step = cut.indices(n)
            if step != 1 or stop <= start:
                raise GeometryError(None, f"box {tuple(box_zyx)} is empty or strided along axis {axis}")
            starts.append(start)
            stops.append(stop)
        origin = self.index_to_physical(np.asarray(starts[::-1], dtype=np.float64))
        return dataclasses.replace(
            self,
            size=tuple(int(b - a) for a, b in zip(starts[::-1], stops[::-1])),  # type: ignore[arg-type]
            origin=tuple(float(o) for o in origin),  # type: ignore[arg-type]
        )

    def differences(self, other: "Geometry", tol: float = GEOMETRY_TOL) -> list[str]:
        """Human-readable list of what differs from ``other`` (empty when equal within tol)."""
        out = []
        if tuple(self.size) != tuple(other.size):
            out.append(f"shape {self.shape} vs {other.shape}")
        if not np.allclose(self.spacing, other.spacing, atol=tol):
            out.append(f"spacing {_fmt(self.spacing)} vs {_fmt(other.spacing)} mm")
        if not np.allclose(self.origin, other.origin, atol=max(tol, 1e-2)):
            out.append(f"origin {_fmt(self.origin)} vs {_fmt(other.origin)} mm")
        if not np.allclose(self.direction, other.direction, atol=tol):
            out.append(f"direction {_fmt(self.direction)} vs {_fmt(other.direction)}")
        return out

    def matches(self, other: "Geometry", tol: float = GEOMETRY_TOL) -> bool:
        """True when size, spacing, origin and direction agree within ``tol``."""
        return not self.differences(other, tol)

    @classmethod
    def identity(
        cls,
        shape_zyx: tuple[int, int, int],
        spacing_zyx: tuple[float, float, float] = (1.0, 1.0, 1.0),
        origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
    ) -> "Geometry":
        """An axis-aligned grid given in array order ``(z, y, x)`` (origin in x, y, z)."""
        return cls(
            size=tuple(int(s) for s in reversed(shape_zyx)),  # type: ignore[arg-type]
            spacing=tuple(float(s) for s in reversed(spacing_zyx)),  # type: ignore[arg-type]
            origin=tuple(float(o) for o in origin),  # type: ignore[arg-type]
            direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
        )


def _fmt(values: Iterable[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


@dataclasses.dataclass(frozen=True)
class Image:
    """A 3D array in ``(z, y, x)`` order with its geometry and (optionally) where it came from.

    ``warnings`` are what reading the file found suspicious but usable (one line each, the file
    first: :func:`read_image`); they travel with every array put on this grid (:meth:`with_array`).
    """

    array: np.ndarray
    geometry: Geometry
    path: str | None = None
    warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise GeometryError(self.path, f"expected a 3D array, got shape {self.array.shape}")
        if tuple(self.array.shape) != tuple(self.geometry.shape):
            raise GeometryError(
                self.path,
                f"array shape {self.array.shape} does not match geometry shape {self.geometry.shape}",
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(z, y, x)``."""
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Voxel size in array order, millimetres."""
        return self.geometry.spacing_zyx

    def with_array(self, array: np.ndarray) -> "Image":
        """The same grid holding other values (e.g. a prediction on this image's grid)."""
        return Image(np.asarray(array), self.geometry, self.path, self.warnings)


def to_sitk(image: Image) -> sitk.Image:
    """Convert to a SimpleITK image with the same geometry."""
    out = sitk.GetImageFromArray(np.ascontiguousarray(image.array))
    g = image.geometry
    out.SetSpacing(g.spacing)
    out.SetOrigin(g.origin)
    out.SetDirection(g.direction)
    return out


def geometry_of(image: sitk.Image) -> Geometry:
    """The :class:`Geometry` of a 3D SimpleITK image."""
    return Geometry(
        size=tuple(int(s) for s in image.GetSize()),  # type: ignore[arg-type]
        spacing=tuple(float(s) for s in image.GetSpacing()),  # type: ignore[arg-type]
        origin=tuple(float(o) for o in image.GetOrigin()),  # type: ignore[arg-type]
        direction=tuple(float(d) for d in image.GetDirection()),
    )


def reference_image(geometry: Geometry, pixel_type: int = sitk.sitkFloat32) -> sitk.Image:
    """An empty SimpleITK image on ``geometry`` (a resampling reference grid)."""
    ref = sitk.Image([int(s) for s in geometry.size], pixel_type)
    ref.SetSpacing(geometry.spacing)
    ref.SetOrigin(geometry.origin)
    ref.SetDirection(geometry.direction)
    return ref


def from_sitk(image: sitk.Image, path: str | os.PathLike | None = None,
              dtype: np.dtype | type | None = None, share: bool = False) -> Image:
    """Convert a 3D single-component SimpleITK image to an :class:`Image` (its array as ``dtype``,
    None: the image's own pixel type), with one copy of the voxels; with ``share`` (and the
    image's own pixel type) none: the array is the image's buffer (:class:`_Pixels`), for an
    image nothing else will use (one just read)."""
    src = None if path is None else os.fspath(path)
    if image.GetDimension() != 3:
        raise ImageReadError(src, f"expected a 3D image, got {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(
            src, f"expected one value per voxel, got {image.GetNumberOfComponentsPerPixel()}"
        )
    if dtype is None or np.dtype(dtype) == sitk.GetArrayViewFromImage(image).dtype:
        array = np.asarray(_Pixels(image)) if share else sitk.GetArrayFromImage(image)
    else:  # converted straight from a view of the image's buffer: no second copy
        array = sitk.GetArrayViewFromImage(image).astype(dtype)
    return Image(array, geometry_of(image), src)


class _Pixels:
    """The pixel buffer of a SimpleITK image as a writable numpy array that keeps the image alive
    (``np.asarray(_Pixels(image))``: the array's base holds the image).

    ``sitk.GetArrayFromImage`` copies the buffer (a 512 x 512 x 600 int16 CT: 315 MB more at the
    peak and 0.1-0.7 s of page faults on 2 busy cores); ``sitk.GetArrayViewFromImage`` does not,
    but leaves the image's lifetime to the caller and is read-only. Here the image is made the
    sole owner of its buffer (``MakeUnique``) and held by the array; writing into the array changes
    the image too, so it is used only for an image nothing else holds (:func:`read_image`)."""

    def __init__(self, image: sitk.Image) -> None:
        self.image = image
        view = sitk.GetArrayViewFromImage(image)  # calls image.MakeUnique()
        interface = dict(view.__array_interface__)
        interface["data"] = (interface["data"][0], False)  # writable: the buffer is this image's alone
        self.__array_interface__ = interface


def _read_sitk(path: Path) -> tuple[sitk.Image, list[str]]:
    """The image ITK reads, and the warnings of a DICOM folder's slice positions."""
    if not path.exists():
        raise ImageReadError(path, "file not found")
    try:
        if path.is_dir():
            return _read_series(path)
        return sitk.ReadImage(str(path)), []
    except RuntimeError as err:
        lines = str(err).strip().splitlines()
        detail = next((ln for ln in lines if "ERROR" in ln or "error" in ln), lines[-1] if lines else "")
        if "orthonormal" in detail:
            raise GeometryError(path, "direction matrix is degenerate or not orthonormal: the axes' orientation "
                                "is undefined") from None
        raise ImageReadError(path, f"unreadable or truncated image ({detail.strip()[:160]})") from None


def _read_series(path: Path) -> tuple[sitk.Image, list[str]]:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(path))
    if not series:
        raise ImageReadError(path, "folder holds no DICOM series")
    if len(series) > 1:
        raise ImageReadError(path, f"folder holds {len(series)} DICOM series; point to one series folder")
    files = reader.GetGDCMSeriesFileNames(str(path), series[0])
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    image = reader.Execute()
    try:
        positions = np.array([[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")]
                              for i in range(len(files))])
        cosines = [float(v) for v in reader.GetMetaData(0, "0020|0037").split("\\")]
    except (RuntimeError, ValueError):  # no positions: ITK stacks by file order, nothing to check
        return image, []
    if len(cosines) != 6 or positions.ndim != 2 or positions.shape[1] != 3:
        raise GeometryError(path, f"malformed DICOM orientation/position (ImageOrientationPatient has {len(cosines)} "
                                  f"values, ImagePositionPatient {positions.shape[-1] if positions.ndim == 2 else '?'})")
    normal = np.cross(cosines[:3], cosines[3:6])
    return image, headers.check_slice_positions(path, files, positions, normal)


#: NIfTI-1 datatype codes of floating-point voxels and their numpy dtypes.
_NIFTI_FLOAT_TYPES = {16: np.float32, 64: np.float64}


def _check_nifti(path: Path, image: sitk.Image) -> list[str]:
    """Checks ITK's NIfTI reader skips: the header's spacings and transforms
    (:func:`cmmas.headers.check_nifti_header`), a truncated ``.nii`` and NaN/inf voxels.

    ITK assumes 1 mm for a zero spacing, flips an axis of negative spacing, zero-fills the
    missing tail of a truncated uncompressed NIfTI and reads NaN as 0, which would silently
    corrupt the data; this reads the raw header and payload to catch them.

    Returns:
        The header's warnings (one line each, the file first).
    """
    try:
        header = headers.read_nifti_header(path)
        warnings = headers.check_nifti_header(path, header, _ras_affine(image))
        _check_nifti_payload(path, header)
    except (EOFError, OSError, zlib.error) as err:
        raise ImageReadError(path, f"unreadable or truncated image ({err})") from None
    return warnings


def _ras_affine(image: sitk.Image) -> np.ndarray:
    """The ``[4, 4]`` voxel-to-RAS affine (mm) of a 3D SimpleITK image."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3) * np.asarray(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # ITK's LPS to NIfTI's RAS


def _check_nifti_payload(path: Path, header: headers.NiftiHeader) -> None:
    n_voxels = int(np.prod([max(d, 1) for d in header.dim[1 : 1 + max(header.dim[0], 0)]]))
    expected = n_voxels * header.bitpix // 8
    dtype = _NIFTI_FLOAT_TYPES.get(header.datatype)
    compressed = path.name.endswith(".gz")
    if dtype is None and not compressed:
        if path.stat().st_size < header.vox_offset + expected:
            raise ImageReadError(
                path, f"truncated file: {path.stat().st_size} bytes, {header.vox_offset + expected} expected"
            )
        return
    if dtype is None:
        return
    with (gzip.open if compressed else open)(path, "rb") as handle:
        handle.seek(header.vox_offset)
        payload = handle.read(expected)
    if len(payload) < expected:
        raise ImageReadError(path, f"truncated file: {len(payload)} of {expected} voxel bytes present")
    values = np.frombuffer(payload, dtype=np.dtype(dtype).newbyteorder(header.endian))
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        raise ImageReadError(path, f"{bad} voxel(s) are NaN or infinite")


def _squeeze_to_3d(image: sitk.Image, path: Path) -> sitk.Image:
    """Accept 4D images whose last axis has length one (common in NIfTI); reject others."""
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        return sitk.Extract(image, list(image.GetSize()[:3]) + [0], [0, 0, 0, 0])
    if image.GetDimension() != 3:
        raise ImageReadError(path, f"expected a 3D image, got {image.GetDimension()}D of size {image.GetSize()}")
    return image


def read_image(path: str | os.PathLike, dtype: np.dtype | type | None = np.float32, strict: bool = False) -> Image:
    """Read a NIfTI/MHA/NRRD file or a DICOM series folder as a 3D image, its header checked.

    Refused: a spacing that is zero, negative or not finite (a NIfTI ``pixdim`` is read from the
    header itself, as ITK would replace it), a direction matrix that is not orthonormal. Warned
    (in :attr:`Image.warnings`, each logged once): a NIfTI whose qform and sform disagree (which
    one was used is said), a DICOM series whose slices are not evenly spaced (a slice missing).

    Args:
        path: file path, or a folder holding exactly one DICOM series.
        dtype: numpy dtype of the returned array (float32 by default); None keeps the file's own
            (an int16 CT stays int16: half the memory of float32, and no conversion pass).
        strict: refuse what would be a warning.

    Returns:
        :class:`Image` with the array in ``(z, y, x)`` order, the file's geometry and the warnings.

    Raises:
        ImageReadError: missing, unreadable, not 3D, or holding NaN/inf voxels.
        GeometryError: a bad spacing or direction; with ``strict``, any warning.
    """
    path = Path(path)
    raw, warnings = _read_sitk(path)
    image = _squeeze_to_3d(raw, path)
    if path.name.endswith((".nii", ".nii.gz")):
        warnings += _check_nifti(path, image)
    headers.check_grid(path, image.GetSpacing(), image.GetDirection())
    if strict and warnings:
        raise GeometryError(path, warnings[0].removeprefix(f"{path}: ") + " (refused: strict)")
    for line in warnings:
        _log_once(line)
    out = from_sitk(image, path, dtype, share=True)  # the image read is nobody else's: no copy
    array = out.array
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise ImageReadError(path, f"{bad} voxel(s) are NaN or infinite")
    return dataclasses.replace(out, warnings=tuple(warnings))


_LOGGED: set[str] = set()


def _log_once(line: str) -> None:
    """``logging.warning`` a read warning the first time this process meets it."""
    if line not in _LOGGED:
        _LOGGED.add(line)
        _LOG.warning(line)


def read_label(
    path: str | os.PathLike,
    allowed: Iterable[int] | None = None,
    like: Image | None = None,
) -> Image:
    """Read an integer label map.

    Args:
        path: label file or DICOM folder.
        allowed: label codes that may occur (0 is always allowed); others raise.
        like: an image the label must share its grid with (shape, spacing, origin, direction).

    Returns:
        :class:`Image` with an ``int32`` array.

    Raises:
        LabelError: non-integer or unknown values.
        GeometryError: the grid differs from ``like``'s.
    """
    path = Path(path)
    raw = read_image(path, dtype=np.float64)
    values = raw.array
    if not np.all(values == np.round(values)):
        raise LabelError(path, "label map holds non-integer values")
    labels = raw.with_array(values.astype(np.int32))
    if allowed is not None:
        present = set(np.unique(labels.array).tolist()) - {0}
        unknown = sorted(present - set(int(a) for a in allowed))
        if unknown:
            raise LabelError(path, f"unknown label values {unknown}; expected some of {sorted(set(allowed))}")
    if like is not None:
        check_same_grid(like, labels, what="label")
    return labels


def check_same_grid(reference: Image, other: Image, what: str = "image") -> None:
    """Raise :class:`GeometryError` naming ``other``'s file when its grid differs."""
    diffs = reference.geometry.differences(other.geometry)
    if diffs:
        ref = reference.path or "reference"
        raise GeometryError(other.path, f"{what} grid differs from {ref}: " + "; ".join(diffs))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Write a file atomically: yield a temporary name beside ``path`` for the caller to write.

    When the block ends without an error the file gets the permissions the umask gives new files
    (``mkstemp`` makes it 0600) and is renamed onto ``path``; on an error it is deleted and
    ``path`` is left as it was. The parent folder is created.

    Args:
        path: the final file.
        suffix: ending of the temporary name, for writers that choose the format by it
            (``".nii.gz"``, ``".png"``, ``".keras"``, ``".npz"``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_image(image: Image, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write atomically (temporary file in the same folder, then rename), keeping the geometry.

    Returns:
        The path written.
    """
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    if suffix not in IMAGE_SUFFIXES:
        raise ImageReadError(path, f"unsupported output format {suffix!r}; use one of {IMAGE_SUFFIXES}")
    array = image.array
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8)
    with atomic_path(path, suffix) as tmp:
        sitk.WriteImage(to_sitk(image.with_array(array)), tmp, useCompression=compress)
    return path


def label_dtype(codes: Iterable[int]) -> np.dtype:
    """The smallest of uint8, int16 and int32 that holds every label code.

    Label maps written in it are smaller and faster to compress (a CT-sized uint8 map gzips
    ~4x faster than int32) and read back with the same codes.
    """
    values = [int(c) for c in codes]
    low, high = min(values, default=0), max(values, default=0)
    for dtype in (np.uint8, np.int16):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return np.dtype(dtype)
    return np.dtype(np.int32)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically (temporary file + rename)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w") as handle:
        handle.write(text)
    return path
