"""A synthetic CT/MR heart in a chest, written in the MM-WHS 2017 layout.

The phantom is the project's embedded default data set: readers, scripts and the Makefile run
on it without any real data. Each subject is a thorax (body outline, subcutaneous fat, chest
wall with ribs, two lungs over a diaphragm, liver, spine with discs and spinal canal, sternum,
mediastinal fat, descending aorta and caval veins) around a heart made of the seven MM-WHS
structures, labelled with the challenge's codes (:data:`cmmas.datasets.mmwhs.MMWHS_LABELS`).

How a subject is made:

1. Anatomy is defined analytically in a *body frame* (millimetres; x to the patient's left,
   y posterior, z superior, as ITK's LPS) by ellipsoids, elliptic cylinders and tubes around
   polylines, with per-subject sizes and heart orientation.
2. Every voxel centre of the output grid is mapped into the body frame through the subject's
   pose (scale, rotation, offset) and a smooth random deformation (a few low-frequency sine
   modes); evaluating the anatomy there equals deforming the label map before rendering.
3. The tissue map is rendered with a modality's contrast (CT angiography in HU, or bSSFP MR
   in arbitrary units), blurred for partial volume (Gaussian, sigma 0.7 voxel), given a smooth
   multiplicative bias field (MR) and noise (Gaussian for CT, Rician for MR).

Grids (array order ``(z, y, x)``): the field of view is fixed per modality and the spacing
scales with ``96 / shape``. CT: 1.0 x 1.1 x 1.1 mm at 96^3, identity direction, centred on the
heart. MR: 1.5 x 1.25 x 1.25 mm at 96^3, a slightly oblique direction, centred on the chest.

The same ``seed`` gives the same individual in both modalities (a paired scan);
:func:`generate` draws a different seed for every (modality, subject), so its CT and MR
subjects are different individuals, as in MM-WHS.

Command line::

    python experiments/make_phantom.py --out DIR --n 20 [--shape 96] [--seed 0] [--preview FILE.png]
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cmmas.datasets.mmwhs import MMWHS_LABELS
from cmmas.errors import DatasetError
from cmmas.io import Geometry, Image, read_image, read_label, write_image

logger = logging.getLogger(__name__)

#: Modalities the phantom renders.
MODALITIES = ("ct", "mr")

#: MM-WHS codes of the heart structures.
MYO, LA, LV, RA, RV, AO, PA = 205, 420, 500, 550, 600, 820, 850
LABEL_CODES = (0, MYO, LA, LV, RA, RV, AO, PA)

#: Tissue classes of the tissue map (what the intensity renderer sees).
AIR, LUNG, FAT, MUSCLE, SOFT, MYOCARDIUM, BLOOD, VENOUS_BLOOD, BONE, LIVER, CSF = range(11)
TISSUE_NAMES = (
    "air", "lung", "fat", "muscle", "soft tissue", "myocardium",
    "arterial blood", "venous blood", "bone", "liver", "csf",
)

#: Mean intensity per tissue: CT angiography in HU; bSSFP MR in arbitrary units.
_CONTRAST = {
    "ct": np.array([-1000, -850, -100, 50, 35, 110, 420, 330, 700, 90, 10], np.float32),
    "mr": np.array([0, 30, 780, 170, 320, 230, 950, 950, 90, 280, 1000], np.float32),
}

#: Voxel size at 96^3 in array order (z, y, x), millimetres.
_BASE_SPACING = {"ct": (1.0, 1.1, 1.1), "mr": (1.5, 1.25, 1.25)}
BASE_SHAPE = 96
#: Physical grid centre (x, y, z) in millimetres; the body centre sits at the origin.
_GRID_CENTRE = {"ct": (10.0, -6.0, 1.0), "mr": (4.0, 0.0, -6.0)}
#: Grid rotation (degrees about x, y, z): MR is acquired slightly oblique.
_GRID_ANGLES = {"ct": (0.0, 0.0, 0.0), "mr": (6.0, -4.0, 8.0)}

_PARTIAL_VOLUME_SIGMA = 0.7
MIN_SHAPE = 16


# ----------------------------------------------------------------------------- geometry


def _rotation(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation matrix ``[3, 3]`` for angles (degrees) about x, then y, then z."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _axis_angle(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    """Rotation matrix ``[3, 3]`` about a unit ``axis`` by ``angle_rad`` (Rodrigues)."""
    x, y, z = axis / np.linalg.norm(axis)
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + np.sin(angle_rad) * k + (1 - np.cos(angle_rad)) * (k @ k)


def _shape3(shape: int | Sequence[int]) -> tuple[int, int, int]:
    dims = (shape,) * 3 if np.isscalar(shape) else tuple(shape)
    if len(dims) != 3 or any(int(d) != d or d < MIN_SHAPE for d in dims):
        raise DatasetError(
            None, f"phantom shape must be one int or three ints >= {MIN_SHAPE} (z, y, x), got {shape!r}"
        )
    return tuple(int(d) for d in dims)  # type: ignore[return-value]


def _check_modality(modality: str) -> str:
    if modality not in MODALITIES:
        raise DatasetError(None, f"unknown phantom modality {modality!r}; expected one of {MODALITIES}")
    return modality


def grid_geometry(modality: str, shape: int | Sequence[int] = BASE_SHAPE) -> Geometry:
    """The voxel grid of a modality: fixed field of view, spacing scaled by ``96 / shape``.

    Args:
        modality: ``"ct"`` or ``"mr"``.
        shape: voxels per axis, one int or ``(z, y, x)``.
    """
    shape_zyx = _shape3(shape)
    spacing_zyx = [s * BASE_SHAPE / n for s, n in zip(_BASE_SPACING[_check_modality(modality)], shape_zyx)]
    size_xyz = np.array(shape_zyx[::-1], dtype=np.float64)
    spacing_xyz = np.array(spacing_zyx[::-1], dtype=np.float64)
    direction = _rotation(_GRID_ANGLES[modality])
    centre_offset = direction @ ((size_xyz - 1) / 2 * spacing_xyz)
    origin = np.asarray(_GRID_CENTRE[modality]) - centre_offset
    return Geometry(
        size=tuple(int(s) for s in size_xyz),  # type: ignore[arg-type]
        spacing=tuple(float(s) for s in spacing_xyz),  # type: ignore[arg-type]
        origin=tuple(float(o) for o in origin),  # type: ignore[arg-type]
        direction=tuple(float(d) for d in direction.ravel()),
    )


def _voxel_centres(geometry: Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Physical (x, y, z) positions in mm of every voxel centre: three ``[z*y*x]`` arrays, C order."""
    nz, ny, nx = geometry.shape
    sx, sy, sz = geometry.spacing
    d = geometry.direction_matrix.astype(np.float32)
    k = np.meshgrid(
        np.arange(nz, dtype=np.float32) * np.float32(sz),
        np.arange(ny, dtype=np.float32) * np.float32(sy),
        np.arange(nx, dtype=np.float32) * np.float32(sx),
        indexing="ij",
        sparse=True,
    )[::-1]
    return tuple(  # type: ignore[return-value]
        (d[i, 0] * k[0] + d[i, 1] * k[1] + d[i, 2] * k[2] + np.float32(geometry.origin[i])).ravel()
        for i in range(3)
    )


def _rotate(points: Sequence[np.ndarray], matrix: np.ndarray, centre: Sequence[float], scale: float = 1.0):
    """``matrix.T @ (p - centre) / scale`` for points given as three arrays (x, y, z)."""
    m = np.asarray(matrix, np.float32) / np.float32(scale)
    rel = [c - np.float32(o) for c, o in zip(points, centre)]
    return tuple(m[0, i] * rel[0] + m[1, i] * rel[1] + m[2, i] * rel[2] for i in range(3))


# ----------------------------------------------------------------------------- subjects


@dataclasses.dataclass(frozen=True)
class Subject:
    """One individual: pose, deformation and anatomical sizes (millimetres, body frame)."""

    scale: float
    rotation: np.ndarray  # [3, 3], body frame -> physical
    offset: np.ndarray  # [3], physical position of the body centre
    wave_vectors: np.ndarray  # [K, 3] rad/mm, deformation modes
    wave_phases: np.ndarray  # [K]
    wave_amplitudes: np.ndarray  # [K, 3] mm
    body: np.ndarray  # [2] semi-axes (x, y) of the body outline
    fat: float  # subcutaneous fat thickness
    heart_centre: np.ndarray  # [3]
    heart_rotation: np.ndarray  # [3, 3], heart frame -> body frame
    heart_scale: float
    chamber_scale: np.ndarray  # [5] LV, RV, LA, RA, vessels
    myo_thickness: float
    diaphragm: float  # height of the right dome's top


def sample_subject(seed: int) -> Subject:
    """Draw an individual's anatomy and pose from ``seed`` (independent of the modality)."""
    rng = np.random.default_rng([int(seed), 0])
    axis = rng.normal(size=3) * np.array([0.6, 0.6, 1.0])
    angle = np.deg2rad(rng.uniform(3.0, 15.0)) * rng.choice([-1.0, 1.0])
    k = 4
    wavelengths = rng.uniform(70.0, 140.0, size=k)
    directions = rng.normal(size=(k, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wave_vectors = directions * (2 * np.pi / wavelengths)[:, None]
    # Keep the deformation's gradient below ~0.35 so that it never folds.
    amplitudes = rng.uniform(0.5, 1.0, size=(k, 3)) * (0.35 / k) / (2 * np.pi / wavelengths)[:, None]
    apex = np.array([0.62, -0.45, -0.64]) + rng.normal(scale=0.07, size=3)
    return Subject(
        scale=float(rng.uniform(0.9, 1.1)),
        rotation=_axis_angle(axis, angle),
        offset=rng.normal(scale=3.0, size=3).clip(-7, 7),
        wave_vectors=wave_vectors.astype(np.float32),
        wave_phases=rng.uniform(0, 2 * np.pi, size=k).astype(np.float32),
        wave_amplitudes=amplitudes.astype(np.float32),
        body=np.array([56.0, 41.0]) * rng.uniform(0.94, 1.06, size=2),
        fat=float(rng.uniform(3.5, 7.0)),
        heart_centre=np.array([5.0, -7.0, -4.0]) + rng.normal(scale=2.0, size=3).clip(-4, 4),
        heart_rotation=_heart_frame(apex, np.deg2rad(rng.uniform(-12.0, 12.0))),
        heart_scale=float(rng.uniform(1.02, 1.18)),
        chamber_scale=rng.uniform(0.9, 1.1, size=5),
        myo_thickness=float(rng.uniform(4.5, 6.5)),
        diaphragm=float(rng.uniform(-34.0, -26.0)),
    )


def _heart_frame(apex: np.ndarray, twist: float) -> np.ndarray:
    """Columns: heart-frame axes in the body frame; the heart's z axis points from apex to base."""
    hz = -apex / np.linalg.norm(apex)
    hx = np.array([1.0, 0.0, 0.0]) - hz[0] * hz
    hx /= np.linalg.norm(hx)
    hy = np.cross(hz, hx)
    frame = np.stack([hx, hy, hz], axis=1)
    return frame @ _axis_angle(np.array([0.0, 0.0, 1.0]), twist)


def _to_body(points: Sequence[np.ndarray], subject: Subject) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Physical points (x, y, z arrays, mm) -> deformed body-frame points (x, y, z arrays, mm)."""
    body = _rotate(points, subject.rotation, subject.offset, subject.scale)
    shift = [np.zeros_like(body[0]) for _ in range(3)]
    for k, phase, amplitude in zip(subject.wave_vectors, subject.wave_phases, subject.wave_amplitudes):
        wave = np.sin(k[0] * body[0] + k[1] * body[1] + k[2] * body[2] + phase)
        for axis in range(3):
            shift[axis] += amplitude[axis] * wave
    return tuple(b + s for b, s in zip(body, shift))  # type: ignore[return-value]


# ----------------------------------------------------------------------------- primitives

_Points = tuple[np.ndarray, np.ndarray, np.ndarray]


def _ellipsoid(p: _Points, centre: Sequence[float], semi: Sequence[float]) -> np.ndarray:
    """Normalised radius squared of points (< 1 inside an axis-aligned ellipsoid)."""
    out = np.zeros_like(p[0])
    for c, o, a in zip(p, centre, semi):
        out += ((c - np.float32(o)) * np.float32(1.0 / a)) ** 2
    return out


def _ellipse(p: _Points, centre: Sequence[float], semi: Sequence[float]) -> np.ndarray:
    """Normalised radius squared in the (x, y) plane: an elliptic cylinder along z."""
    return _ellipsoid(p[:2], centre[:2], semi[:2])  # type: ignore[arg-type]


def _tube(p: _Points, path: np.ndarray, radii: Sequence[float]) -> np.ndarray:
    """Distance (mm) from points to a tube around a polyline ``[M, 3]`` (< 0 inside).

    The radius varies linearly along each segment; points outside the path's bounding box
    (plus a margin) get ``+inf`` without being evaluated.
    """
    path = np.asarray(path, np.float32)
    radii = np.asarray(radii, np.float32)
    margin = np.float32(radii.max() + 8.0)
    low, high = path.min(axis=0) - margin, path.max(axis=0) + margin
    near = np.flatnonzero((p[0] > low[0]) & (p[0] < high[0]) & (p[1] > low[1]) & (p[1] < high[1])
                          & (p[2] > low[2]) & (p[2] < high[2]))
    q = [c[near] for c in p]
    best = np.full(len(near), np.inf, np.float32)
    for a, b, ra, rb in zip(path[:-1], path[1:], radii[:-1], radii[1:]):
        d = b - a
        rel = [c - a[i] for i, c in enumerate(q)]
        t = np.clip((rel[0] * d[0] + rel[1] * d[1] + rel[2] * d[2]) * np.float32(1.0 / (d @ d)), 0.0, 1.0)
        dist2 = sum((r - t * d[i]) ** 2 for i, r in enumerate(rel))
        np.minimum(best, np.sqrt(dist2) - (ra + t * (rb - ra)), out=best)
    out = np.full(len(p[0]), np.inf, np.float32)
    out[near] = best
    return out


# ----------------------------------------------------------------------------- anatomy


class _Canvas:
    """Tissue and label values of N points, painted in order (later strokes win)."""

    def __init__(self, tissue: np.ndarray, label: np.ndarray):
        self.tissue = tissue
        self.label = label

    @classmethod
    def empty(cls, n: int) -> "_Canvas":
        return cls(np.full(n, AIR, np.uint8), np.zeros(n, np.uint16))

    def subset(self, index: np.ndarray) -> "_Canvas":
        """A canvas of the points at ``index`` (a copy: write it back with :meth:`put`)."""
        return _Canvas(self.tissue[index], self.label[index])

    def put(self, index: np.ndarray, other: "_Canvas") -> None:
        """Write back a canvas taken with :meth:`subset`."""
        self.tissue[index] = other.tissue
        self.label[index] = other.label

    def paint(self, mask: np.ndarray, tissue: int, label: int = 0, over_labels: bool = True) -> None:
        """Set ``tissue``/``label`` where ``mask``; with ``over_labels=False`` keep labelled points."""
        if not over_labels:
            mask = mask & (self.label == 0)
        self.tissue[mask] = tissue
        self.label[mask] = label

    def vessel(self, distance: np.ndarray, wall: float, tissue: int, label: int = 0,
               over_labels: bool = True) -> None:
        """Paint a tube's lumen (``distance < 0``) inside a soft-tissue wall ``wall`` mm thick."""
        self.paint(distance < wall, SOFT, over_labels=False)
        self.paint(distance < 0, tissue, label, over_labels)


def _paint_thorax(canvas: _Canvas, p: _Points, s: Subject) -> None:
    """Body outline, fat, chest wall with ribs, lungs, diaphragm, liver, spine, sternum."""
    ax, ay = s.body
    x, y, z = p
    canvas.paint(_ellipse(p, (0, 0), (ax, ay)) < 1, FAT)
    canvas.paint(_ellipse(p, (0, 0), (ax - s.fat, ay - s.fat)) < 1, MUSCLE)
    wall_in = (ax - s.fat - 7, ay - s.fat - 6)
    cavity = _ellipse(p, (0, 0), wall_in) < 1
    canvas.paint(cavity, SOFT)
    rib_ring = (_ellipse(p, (0, 0), (wall_in[0] + 4.5, wall_in[1] + 4.5)) < 1) & ~(
        _ellipse(p, (0, 0), (wall_in[0] + 1.5, wall_in[1] + 1.5)) < 1
    )
    canvas.paint(rib_ring & (np.cos(2 * np.pi * (z - 0.35 * y) / 24.0) > 0.7) & (np.abs(x) > 14), BONE)
    # Two diaphragm domes, the right one higher: lungs above, liver and belly below.
    right = s.diaphragm - 0.018 * ((x + 24) ** 2 + 0.6 * (y + 2) ** 2)
    left = s.diaphragm - 7 - 0.018 * ((x - 24) ** 2 + 0.6 * (y + 2) ** 2)
    dome = np.maximum(right, left)
    lungs = (_ellipse(p, (26, 3), (25, 31)) < 1) | (_ellipse(p, (-26, 3), (25, 31)) < 1)
    canvas.paint(cavity & lungs & (z > dome), LUNG)
    canvas.paint(cavity & (z <= dome), MUSCLE)
    canvas.paint(cavity & (z <= dome - 4) & (x < 8 - 0.5 * y), LIVER)
    # Spine: vertebral bodies with discs, spinal canal, laminae and spinous process.
    yv = ay - 22.0
    canvas.paint(_ellipse(p, (0, yv + 13), (26, 12)) < 1, MUSCLE)
    disc = np.mod(z + 0.2 * y, 26.0) < 5.0
    body = _ellipse(p, (0, yv), (11, 9.5)) < 1
    canvas.paint(body & ~disc, BONE)
    canvas.paint(body & disc, SOFT)
    canvas.paint((_ellipse(p, (0, yv + 15.5), (9, 8.5)) < 1) & ~disc, BONE)
    canvas.paint((_ellipse(p, (0, yv + 25), (2.5, 5)) < 1) & ~disc, BONE)
    canvas.paint(_ellipse(p, (0, yv + 15.5), (5.5, 5)) < 1, CSF)
    canvas.paint(_ellipse(p, (0, -(ay - s.fat - 9)), (9, 3.5)) < 1, BONE)


@dataclasses.dataclass(frozen=True)
class _Heart:
    """Chambers as ellipsoids ``(centre, semi-axes)`` in the heart frame (mm; x left, y posterior,
    z from apex to base), valve planes (heart-frame z), and tubes ``(path [M, 3], radii [M])``:
    ``rvot`` in the heart frame, the other vessels in the body frame."""

    lv: tuple[np.ndarray, np.ndarray]
    lv_outer: tuple[np.ndarray, np.ndarray]
    rv: tuple[np.ndarray, np.ndarray]
    la: tuple[np.ndarray, np.ndarray]
    ra: tuple[np.ndarray, np.ndarray]
    lv_base: float
    rv_base: float
    tubes: dict[str, tuple[np.ndarray, np.ndarray]]


def _path(start: np.ndarray, steps: Sequence[Sequence[float]], scale: float) -> np.ndarray:
    """Polyline ``[M, 3]`` from ``start`` through successive ``steps`` (scaled, mm)."""
    return np.cumsum(np.vstack([start, np.asarray(steps, np.float64) * scale]), axis=0)


def _heart_layout(s: Subject) -> _Heart:
    lv_s, rv_s, la_s, ra_s, vessel_s = s.chamber_scale
    w = s.myo_thickness
    k = s.heart_scale

    def body(point: Sequence[float]) -> np.ndarray:
        """Heart-frame point -> body frame."""
        return s.heart_rotation @ (np.asarray(point, np.float64) * k) + s.heart_centre

    lv = (np.array([6.0, 3.0, -10.0]), np.array([10.0, 10.0, 20.0]) * lv_s)
    la = (np.array([4.0, 14.0, 12.0]), np.array([14.0, 9.0, 10.0]) * la_s)
    ra = (np.array([-17.0, 2.0, 10.0]), np.array([11.0, 11.0, 13.0]) * ra_s)
    r_ao, r_pa = 7.0 * k * vessel_s, 7.5 * k * vessel_s
    ascending = _path(body([-1.0, -2.0, 4.0]), [(-4.0, -3.0, 16.0), (-1.0, 0.0, 16.0)], k)
    top = ascending[-1]
    descending = (14.0, s.body[1] - 33.0)
    arch = np.vstack([top, top + np.array([3.0, 6.0, 9.0]) * k, (8.0, descending[1] - 6, top[2] + 9.0 * k),
                      (*descending, top[2]), (*descending, -150.0)])
    trunk = _path(body([2.0, -14.0, 10.0]), [(4.0, 3.0, 9.0), (3.0, 6.0, 7.0)], k)
    la_centre, ra_centre = body(la[0]), body(ra[0])
    tubes = {
        "rvot": (np.array([[-6.0, -12.0, -4.0], [2.0, -14.0, 10.0]]), np.full(2, 7.0 * rv_s)),
        "ascending": (ascending, np.array([1.1, 1.0, 1.0]) * r_ao),
        "arch": (arch, np.array([1.0, 1.0, 0.95, 0.9, 0.85]) * r_ao),
        "trunk": (trunk, np.full(3, r_pa)),
        "lpa": (_path(trunk[-1], [(14.0, 9.0, 0.0), (12.0, 5.0, -6.0)], k), np.array([0.8, 0.75, 0.55]) * r_pa),
        "rpa": (_path(trunk[-1], [(-16.0, 8.0, 0.0), (-18.0, 2.0, -4.0)], k), np.array([0.8, 0.75, 0.55]) * r_pa),
        "svc": (_path(ra_centre, [(0.0, 2.0, 6.0), (-2.0, 2.0, 34.0), (0.0, 2.0, 110.0)], k), np.full(4, 5.5 * k)),
        "ivc": (_path(ra_centre, [(0.0, 2.0, -6.0), (2.0, 6.0, -34.0), (2.0, 4.0, -110.0)], k), np.full(4, 6.5 * k)),
    }
    for i, (side, dz) in enumerate([(1.0, 7.0), (1.0, -6.0), (-1.0, 7.0), (-1.0, -6.0)]):
        tubes[f"vein{i}"] = (_path(la_centre, [(side * 17.0, 5.0, dz)], k), np.array([4.5, 3.5]) * k)
    return _Heart(
        lv=lv,
        lv_outer=(lv[0] - (0, 0, 1.5), lv[1] + (w, w, w)),
        rv=(np.array([-6.0, -9.0, -6.0]), np.array([18.0, 13.0, 21.0]) * rv_s),
        la=la,
        ra=ra,
        lv_base=2.0,
        rv_base=4.0,
        tubes=tubes,
    )


def _paint_heart(canvas: _Canvas, p: _Points, s: Subject) -> None:
    """Mediastinal fat, great vessels and the seven MM-WHS structures."""
    heart = _heart_layout(s)
    h_all = _rotate(p, s.heart_rotation, s.heart_centre, s.heart_scale)
    near = np.flatnonzero(h_all[0] ** 2 + h_all[1] ** 2 + h_all[2] ** 2 < 55.0**2)
    h = tuple(c[near] for c in h_all)
    sub = canvas.subset(near)
    lv_outer = _ellipsoid(h, *heart.lv_outer)
    rv = _ellipsoid(h, *heart.rv)
    la = _ellipsoid(h, *heart.la)
    ra = _ellipsoid(h, *heart.ra)
    sub.paint((lv_outer < 1.3) | (rv < 1.35) | (la < 1.5) | (ra < 1.4), FAT)
    canvas.put(near, sub)

    d = {name: _tube(p, path, radii) for name, (path, radii) in heart.tubes.items() if name != "rvot"}
    d_pa = np.minimum.reduce([d["trunk"], d["lpa"], d["rpa"]])
    d_veins = np.minimum.reduce([d[f"vein{i}"] for i in range(4)])
    halo = np.minimum.reduce([d["arch"], d["ascending"], d_pa, d["svc"]])
    canvas.paint((halo < 5.0) | (d_veins < 3.0), FAT)
    canvas.vessel(d["arch"], 1.5, BLOOD)
    canvas.vessel(d["svc"], 1.0, VENOUS_BLOOD)
    canvas.vessel(d["ivc"], 1.0, VENOUS_BLOOD)

    sub = canvas.subset(near)
    sub.paint(ra < (1 + 1.5 / heart.ra[1].min()) ** 2, MYOCARDIUM)
    sub.paint(ra < 1, VENOUS_BLOOD, RA)
    sub.paint(la < (1 + 1.5 / heart.la[1].min()) ** 2, MYOCARDIUM)
    sub.paint(la < 1, BLOOD, LA)
    d_rvot = _tube(h, *heart.tubes["rvot"])
    sub.paint(((rv < 1.25) & (h[2] < heart.rv_base + 2)) | (d_rvot < 2.0), MYOCARDIUM)
    sub.paint(((rv < 1) & (h[2] < heart.rv_base)) | (d_rvot < 0), VENOUS_BLOOD, RV)
    sub.paint((lv_outer < 1) & (h[2] < heart.lv_base), MYOCARDIUM, MYO)
    sub.paint((_ellipsoid(h, *heart.lv) < 1) & (h[2] < heart.lv_base), BLOOD, LV)
    canvas.put(near, sub)
    canvas.vessel(d_veins, 1.0, BLOOD, LA, over_labels=False)
    canvas.vessel(d["ascending"], 1.5, BLOOD, AO)
    canvas.vessel(d_pa, 1.5, VENOUS_BLOOD, PA)


def tissues_and_labels(modality: str, seed: int, shape: int | Sequence[int] = BASE_SHAPE) -> tuple[Image, Image]:
    """The tissue map and the MM-WHS label map of subject ``seed`` on a modality's grid.

    Returns:
        ``(tissue, label)``: ``uint8`` tissue classes (:data:`TISSUE_NAMES`) and ``uint16``
        MM-WHS codes (:data:`LABEL_CODES`), both ``(z, y, x)`` on :func:`grid_geometry`.
    """
    geometry = grid_geometry(modality, shape)
    subject = sample_subject(seed)
    points = _to_body(_voxel_centres(geometry), subject)
    canvas = _Canvas.empty(len(points[0]))
    _paint_thorax(canvas, points, subject)
    _paint_heart(canvas, points, subject)
    return (
        Image(canvas.tissue.reshape(geometry.shape), geometry),
        Image(canvas.label.reshape(geometry.shape), geometry),
    )


# ----------------------------------------------------------------------------- rendering


def _smooth_field(shape: tuple[int, int, int], rng: np.random.Generator, strength: float) -> np.ndarray:
    """A smooth multiplicative field ``exp(poly)`` of degree 2 over the grid, mean ~1."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    z, y, x = np.meshgrid(*axes, indexing="ij", sparse=True)
    terms = [x, y, z, x * y, y * z, x * z, x * x - 0.33, y * y - 0.33, z * z - 0.33]
    coefficients = rng.normal(scale=strength / 3, size=len(terms))
    return np.exp(sum(c * t for c, t in zip(coefficients, terms))).astype(np.float32)


def render(tissue: np.ndarray, modality: str, seed: int) -> np.ndarray:
    """Intensities ``(z, y, x)`` of a tissue map in a modality's contrast.

    CT: HU (``int16``), blood bright, myocardium mid grey, fat -100, lung dark, bone bright.
    MR (bSSFP, ``float32``, arbitrary units): blood and fat bright, myocardium, bone and lung
    dark; a smooth multiplicative bias field. Both: tissue means jittered per subject,
    Gaussian partial-volume blur (sigma 0.7 voxel), then noise.
    """
    from scipy import ndimage

    rng = np.random.default_rng([int(seed), 1, MODALITIES.index(_check_modality(modality))])
    means = _CONTRAST[modality] * rng.uniform(0.93, 1.07, size=len(TISSUE_NAMES)).astype(np.float32)
    image = ndimage.gaussian_filter(means[tissue], _PARTIAL_VOLUME_SIGMA)
    if modality == "ct":
        image += rng.normal(scale=rng.uniform(12.0, 25.0), size=image.shape).astype(np.float32)
        return np.clip(np.round(image), -1024, 3071).astype(np.int16)
    image *= _smooth_field(image.shape, rng, strength=0.35)
    sigma = np.float32(rng.uniform(0.02, 0.035) * means[BLOOD])
    real = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(image.shape, dtype=np.float32)
    return np.hypot(real, imaginary)


def make_subject(modality: str, seed: int, shape: int | Sequence[int] = BASE_SHAPE) -> tuple[Image, Image]:
    """Image and MM-WHS label of one phantom subject.

    Args:
        modality: ``"ct"`` or ``"mr"``.
        seed: the individual; the same seed gives the same anatomy in both modalities.
        shape: voxels per axis (one int or ``(z, y, x)``, each >= 16); the field of view is
            fixed, so the spacing is ``96 / shape`` times the modality's base spacing.

    Returns:
        ``(image, label)`` on the modality's grid: CT ``int16`` HU or MR ``float32``, and
        ``uint16`` labels with values in :data:`LABEL_CODES`.
    """
    tissue, label = tissues_and_labels(modality, seed, shape)
    return tissue.with_array(render(tissue.array, modality, seed)), label


# ----------------------------------------------------------------------------- data set


def subject_seed(seed: int, modality: str, index: int) -> int:
    """The individual behind subject ``index`` of a modality in the data set drawn from ``seed``."""
    sequence = np.random.SeedSequence([int(seed), MODALITIES.index(_check_modality(modality)), int(index)])
    return int(sequence.generate_state(1)[0])


def case_paths(out_dir: str | os.PathLike, modality: str, number: int) -> tuple[Path, Path]:
    """``(image, label)`` paths of one case in the MM-WHS layout."""
    stem = Path(out_dir) / f"{modality}_train_{number}"
    return Path(f"{stem}_image.nii.gz"), Path(f"{stem}_label.nii.gz")


def _write_case(job: tuple[str, int, int, tuple[int, int, int], str]) -> tuple[Path, Path]:
    modality, number, individual, shape, out_dir = job
    image, label = make_subject(modality, individual, shape)
    image_path, label_path = case_paths(out_dir, modality, number)
    return write_image(image, image_path), write_image(label, label_path)


def generate(
    out_dir: str | os.PathLike,
    n: int = 20,
    shape: int | Sequence[int] = BASE_SHAPE,
    seed: int = 0,
    modalities: Sequence[str] = MODALITIES,
    workers: int | None = None,
) -> list[Path]:
    """Write ``n`` subjects per modality in the MM-WHS layout (``ct_train_1001_image.nii.gz``...).

    Subjects are numbered 1001..1000+n in each modality; every (modality, number) is a
    different individual. Writes are atomic, so an interrupted run leaves no partial file.

    Args:
        out_dir: folder to write into (created).
        n: subjects per modality.
        shape: voxels per axis, one int or ``(z, y, x)``.
        seed: the data set's seed; the same seed writes the same files.
        modalities: any of ``("ct", "mr")``.
        workers: processes to use (default: the CPUs this process may use, at most 4).

    Returns:
        The paths written: image then label, for each case, CT before MR.
    """
    if n < 1:
        raise DatasetError(out_dir, f"phantom needs at least one subject, got n={n}")
    shape3 = _shape3(shape)
    jobs = [
        (_check_modality(m), 1000 + i, subject_seed(seed, m, i), shape3, os.fspath(out_dir))
        for m in modalities for i in range(1, n + 1)
    ]
    if workers is None:
        workers = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if workers > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")  # safe even if the caller runs threads
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
            written = list(pool.map(_write_case, jobs))
    else:
        written = [_write_case(job) for job in jobs]
    logger.debug("phantom: wrote %d cases to %s", len(written), out_dir)
    return [path for pair in written for path in pair]


# ----------------------------------------------------------------------------- preview


def save_preview(cases: Sequence[tuple[str, Image, Image]], path: str | os.PathLike) -> Path:
    """Axial, coronal and sagittal slices through the heart of each ``(modality, image, label)``.

    Each case gets two rows: the image alone, then the image with a translucent label overlay
    and coloured contours; a legend names the MM-WHS structures. Written atomically as PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    codes = [c for c in LABEL_CODES if c]
    colours = plt.get_cmap("tab10")(np.arange(len(codes)))
    fig, axes = plt.subplots(2 * len(cases), 3, figsize=(12, 8 * len(cases)), squeeze=False)
    for i, (modality, image, label) in enumerate(cases):
        _preview_rows(axes[2 * i: 2 * i + 2], modality, image, label, codes, colours, ListedColormap(colours))
    handles = [Patch(color=colours[i], label=f"{c} {MMWHS_LABELS[c]}") for i, c in enumerate(codes)]
    fig.legend(handles=handles, loc="lower center", ncol=4, frameon=False)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def preview_first_cases(out_dir: str | os.PathLike, modalities: Sequence[str], path: str | os.PathLike) -> Path:
    """:func:`save_preview` of the first subject of each modality written to ``out_dir``."""
    cases = []
    for modality in modalities:
        image_path, label_path = case_paths(out_dir, modality, 1001)
        cases.append((modality, read_image(image_path), read_label(label_path)))
    return save_preview(cases, path)


def _preview_rows(rows, modality: str, image: Image, label: Image, codes: list[int], colours, cmap) -> None:
    """Fill two rows of axes: plain slices, then slices with the label overlay."""
    array = image.array.astype(np.float32)
    window = (-250.0, 650.0) if modality == "ct" else tuple(np.percentile(array, [1, 99.5]))
    title = modality.upper() + (f" {Path(image.path).name.split('_image')[0]}" if image.path else "")
    index = np.searchsorted(codes, label.array).astype(np.float32)
    index[label.array == 0] = np.nan
    zc, yc, xc = np.round(np.argwhere(label.array > 0).mean(axis=0)).astype(int)
    sz, sy, sx = image.spacing_zyx
    views = (  # name, slice, row spacing / column spacing, where row 0 is drawn
        ("axial", np.s_[zc], sy / sx, "upper"),
        ("coronal", np.s_[:, yc], sz / sx, "lower"),
        ("sagittal", np.s_[:, :, xc], sz / sy, "lower"),
    )
    for column, (name, where, aspect, origin) in enumerate(views):
        for overlay, ax in enumerate(rows[:, column]):
            ax.imshow(array[where], cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, origin=origin)
            ax.set_title(f"{title}  {name}" + ("  + labels" if overlay else ""))
            ax.set_axis_off()
            if not overlay:
                continue
            ax.imshow(index[where], cmap=cmap, vmin=-0.5, vmax=len(codes) - 0.5, alpha=0.25,
                      aspect=aspect, origin=origin, interpolation="nearest")
            for code, colour in zip(codes, colours):
                mask = (label.array[where] == code).astype(np.float32)
                if mask.any():
                    ax.contour(mask, levels=[0.5], colors=[colour], linewidths=1.0)
