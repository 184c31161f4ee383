"""A prepared space: every case affinely aligned once to a reference, on one working grid.

Aligning each atlas to each target costs an ANTs affine per pair (~12 s on real abdomen
scans, minutes per target). Instead every atlas is aligned once to a *reference* (one of the
atlases) when the set is prepared, and a new target is aligned once to the same reference;
deformable registration (BiRegNet) and fusion then run in that space, on a fixed working grid
centred on the union of the aligned atlas labels (no target label is needed for the ROI).

On disk (``root/``)::

    manifest.json               version, reference, label table, working grid, cases
    reference.nii.gz            the reference image at the alignment spacing (raw intensity)
    images/<id>.nii.gz          each case on the working grid, intensity normalised to [0, 1]
    labels/<id>.nii.gz          each label on the working grid (generic-label interpolation)
    transforms/<id>/affine.mat  the case -> reference affine (ANTs)
    stack.npz                   every case's image and label stacked (a copy of images/ and
                                labels/ that reads in milliseconds; optional, see
                                :meth:`AtlasSet.write_stack`)

The same structure serves as the training set of the networks (cases of both modalities)
and as the atlas set of ``cmmas segment`` (cases of the atlas modality).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cmmas import preprocess
from cmmas.datasets.base import Case, load_case
from cmmas.errors import AtlasSetError, CmmasError
from cmmas.io import Geometry, Image, atomic_path, atomic_write_text, read_image, read_label, write_image

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STACK = "stack.npz"
VERSION = 1
#: Percentiles clipped before min-max scaling to [0, 1] (CT and MR alike).
PERCENTILES = (0.5, 99.5)


@dataclasses.dataclass(frozen=True)
class SpaceCase:
    """One case of a prepared space (paths relative to the set's root).

    ``role`` is "train" (labelled case used to train the networks and, in the atlas
    modality, as an atlas) or "test" (a held-out target: never seen in training).
    """

    id: str
    modality: str
    image: str
    label: str | None
    transform: str
    source_image: str
    source_label: str | None
    role: str = "train"


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a prepared space holds.

    Attributes:
        reference: id of the case whose space all others are aligned to.
        labels: label table, code -> name (0 excluded).
        geometry: the working grid (reference space, LPS directions).
        align_spacing_mm: isotropic spacing the affine alignments ran at.
        roi_margin_mm: margin around the union of atlas labels that centred the grid.
        cases: every case, in the order they were given.
    """

    reference: str
    labels: dict[int, str]
    geometry: Geometry
    align_spacing_mm: float
    roi_margin_mm: float
    cases: tuple[SpaceCase, ...]
    version: int = VERSION

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        """Working-grid shape in array order."""
        return self.geometry.shape

    def to_json(self) -> str:
        """Serialise (label codes become strings, as JSON keys must)."""
        data = dataclasses.asdict(self)
        data["labels"] = {str(k): v for k, v in self.labels.items()}
        return json.dumps(data, indent=1)

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Manifest":
        """Read and validate ``manifest.json``; a bad file raises :class:`AtlasSetError`."""
        path = Path(path)
        if not path.exists():
            raise AtlasSetError(path, "no manifest.json: not a prepared atlas set (run `cmmas prepare-atlases`)")
        try:
            data = json.loads(path.read_text())
            if data.get("version") != VERSION:
                raise AtlasSetError(path, f"manifest version {data.get('version')} is not {VERSION}")
            geometry = Geometry(**{k: tuple(v) for k, v in data["geometry"].items()})
            cases = tuple(SpaceCase(**c) for c in data["cases"])
            return cls(
                reference=data["reference"],
                labels={int(k): v for k, v in data["labels"].items()},
                geometry=geometry,
                align_spacing_mm=float(data["align_spacing_mm"]),
                roi_margin_mm=float(data["roi_margin_mm"]),
                cases=cases,
            )
        except AtlasSetError:
            raise
        except (ValueError, KeyError, TypeError) as err:
            raise AtlasSetError(path, f"invalid manifest ({type(err).__name__}: {err})") from None


class AtlasSet:
    """Read access to a prepared space (see the module docstring for the layout)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.manifest = Manifest.read(self.root / MANIFEST)
        self._cases = {c.id: c for c in self.manifest.cases}
        self._stack: dict[str, np.ndarray] | None = None

    @property
    def geometry(self) -> Geometry:
        """The working grid."""
        return self.manifest.geometry

    @property
    def labels(self) -> dict[int, str]:
        """Label table, code -> name."""
        return self.manifest.labels

    def ids(self, modality: str | None = None, role: str | None = None, labelled: bool = False) -> list[str]:
        """Case ids, optionally of one modality, one role ("train"/"test"), only labelled ones."""
        return [
            c.id
            for c in self.manifest.cases
            if (modality is None or c.modality == modality)
            and (role is None or c.role == role)
            and (not labelled or c.label is not None)
        ]

    def case(self, case_id: str) -> SpaceCase:
        """The entry of one case; unknown ids raise :class:`AtlasSetError`."""
        if case_id not in self._cases:
            raise AtlasSetError(self.root, f"no case {case_id!r}; it holds {sorted(self._cases)}")
        return self._cases[case_id]

    def image(self, case_id: str) -> Image:
        """A case's normalised image on the working grid, float32 in [0, 1]."""
        return read_image(self.root / self.case(case_id).image)

    def label(self, case_id: str) -> Image:
        """A case's label on the working grid (data-set codes, int32)."""
        entry = self.case(case_id)
        if entry.label is None:
            raise AtlasSetError(self.root, f"case {case_id!r} has no label")
        return read_label(self.root / entry.label, allowed=self.labels)

    def arrays(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """Stacked images ``[N, D, H, W]`` float32 and labels ``[N, D, H, W]`` int32 (None if any lacks one).

        Read from ``stack.npz`` when the set has one that matches the manifest (one file, a few
        milliseconds for 16 cases, against ~0.5 s for their 32 NIfTIs), else from the NIfTIs.
        """
        labelled = all([self.case(i).label is not None for i in ids])  # a list: every id is checked
        stack = self._read_stack()
        if stack is not None:
            rows = [stack["row"][i] for i in ids]
            labels = stack["labels"][rows].astype(np.int32) if labelled else None
            return stack["images"][rows].astype(np.float32), labels
        images = np.stack([self.image(i).array for i in ids]).astype(np.float32)
        if not labelled:
            return images, None
        return images, np.stack([self.label(i).array for i in ids]).astype(np.int32)

    def write_stack(self) -> Path:
        """Write ``stack.npz`` (atomically) from the set's NIfTIs: what :meth:`arrays` reads first.

        :func:`prepare` writes it; call this for a set prepared without one, or after editing
        its images or labels.

        Returns:
            The path written.
        """
        ids = [c.id for c in self.manifest.cases]
        images = np.stack([self.image(i).array for i in ids]).astype(np.float32)
        labels = np.stack([
            self.label(i).array if self.case(i).label is not None else np.zeros(self.geometry.shape, np.int32)
            for i in ids
        ]).astype(np.int32)
        path = self.root / STACK
        with atomic_path(path, ".npz") as tmp:
            np.savez(tmp, ids=np.asarray(ids), images=images, labels=labels)
        self._stack = None
        return path

    def _read_stack(self) -> dict | None:
        """``stack.npz`` as ``{"row": id -> index, "images", "labels"}``, None when absent.

        Raises:
            AtlasSetError: a stack that does not match the manifest (other cases or grid).
        """
        if self._stack is None:
            path = self.root / STACK
            if not path.is_file():
                return None
            try:
                with np.load(path) as data:
                    ids, images, labels = [str(i) for i in data["ids"]], data["images"], data["labels"]
            except (OSError, ValueError, KeyError) as err:
                raise AtlasSetError(path, f"unreadable stack ({type(err).__name__}: {err}); "
                                          "delete it or rebuild it with AtlasSet.write_stack()") from None
            expected = (len(self.manifest.cases), *self.geometry.shape)
            if ids != [c.id for c in self.manifest.cases] or images.shape != expected or labels.shape != expected:
                raise AtlasSetError(path, f"does not match the manifest (stack: {len(ids)} cases, arrays "
                                          f"{images.shape}; manifest: {expected[0]} cases, grid {expected[1:]}, or "
                                          "other case ids); delete it or rebuild it with AtlasSet.write_stack()")
            self._stack = {"row": {i: k for k, i in enumerate(ids)}, "images": images, "labels": labels}
        return self._stack

    def transform(self, case_id: str) -> list[str]:
        """The case -> reference transform files (for :func:`cmmas.prealign.apply`)."""
        return [str(self.root / self.case(case_id).transform)]

    def reference_image(self) -> Image:
        """The reference image at the alignment spacing, raw intensities."""
        return read_image(self.root / "reference.nii.gz")


def normalize(image: Image, mask: np.ndarray | None = None) -> Image:
    """Percentile clip then min-max to [0, 1], float32 (the networks' input convention)."""
    return preprocess.normalize_intensity(image, method="minmax", percentiles=PERCENTILES, mask=mask)


def choose_reference(cases: Sequence[Case], labels: dict[int, str]) -> Case:
    """The labelled case of median total label volume (a typical anatomy, no outlier)."""
    labelled = [c for c in cases if c.label_path is not None]
    if not labelled:
        raise AtlasSetError(None, "no labelled case to choose a reference from")
    volumes = []
    for case in labelled:
        _, label = load_case(case, labels)
        voxel_ml = float(np.prod(label.spacing_zyx)) / 1000.0
        volumes.append(np.count_nonzero(label.array) * voxel_ml)
    order = np.argsort(volumes)
    return labelled[int(order[len(order) // 2])]


def _at_spacing(image: Image, spacing_mm: float) -> Image:
    return preprocess.resample(image, spacing_zyx=(spacing_mm,) * 3, kind="linear")


def align(
    image: Image,
    reference: Image,
    transform_dir: str | os.PathLike,
    align_spacing_mm: float,
    fast: bool = True,
    seed: int = 0,
):
    """Affine (rigid then affine, Mattes MI) alignment of ``image`` to ``reference``.

    Both are first resampled to ``align_spacing_mm`` (isotropic, mm); the transform is physical,
    so it applies to the full-resolution image too.

    Returns:
        :class:`cmmas.prealign.Registration` with the transform written to ``transform_dir``.
    """
    from cmmas import prealign

    moving = _at_spacing(image, align_spacing_mm)
    return prealign.register(moving, reference, kind="affine", seed=seed, fast=fast, out_dir=transform_dir)


def working_grid(
    union_mask: Image, shape_zyx: Sequence[int], spacing_zyx: Sequence[float], margin_mm: float
) -> Geometry:
    """The working grid: ``shape_zyx`` voxels of ``spacing_zyx`` mm centred on the mask's box."""
    roi = preprocess.roi_from_mask(union_mask, union_mask.array > 0, margin_mm=margin_mm)
    geometry = preprocess.working_geometry(roi.center_mm, tuple(spacing_zyx), tuple(shape_zyx))
    extent = np.asarray(shape_zyx) * np.asarray(spacing_zyx)
    if np.any(np.asarray(roi.size_mm) > extent):
        log.warning(
            "atlas labels plus %.0f mm margin span %s mm, more than the working grid's %s mm: "
            "structures may be cut; enlarge --shape or --spacing",
            margin_mm,
            np.round(roi.size_mm).tolist(),
            extent.tolist(),
        )
    return geometry


def to_space(image: Image, transforms: Sequence[str], geometry: Geometry, kind: str) -> Image:
    """Resample a case's image ("linear", normalised after) or label ("label") onto the working grid."""
    from cmmas import prealign

    moved = prealign.apply(list(transforms), image, geometry, kind=kind)
    if kind == "label":
        return moved
    return normalize(moved)


def back_to_target(
    array: np.ndarray, geometry: Geometry, transforms: Sequence[str], target: Geometry, kind: str
) -> Image:
    """Map a working-grid array (label or probability) back onto a target's original grid.

    Args:
        array: ``[D, H, W]`` on ``geometry`` (the working grid).
        transforms: the target -> reference transform files.
        target: the target's original geometry.
        kind: "label" (generic-label) or "linear".
    """
    from cmmas import prealign

    return prealign.apply(list(transforms), Image(array, geometry), target, kind=kind, invert=True)


def covered_box(
    geometry: Geometry, transforms: Sequence[str], target: Geometry, source: str | os.PathLike | None = None
) -> tuple[slice, slice, slice]:
    """The voxel box ``(z, y, x)`` of the target grid that the working grid maps back onto
    (:func:`reached_box`). Mapping back onto this box only gives the same values as onto the
    whole grid: the rest lies outside the working grid (0 after resampling).

    Raises:
        AtlasSetError: the two grids do not overlap at all (named by ``source``, the target's file).
    """
    box = reached_box(geometry, transforms, target)
    if box is None:
        raise AtlasSetError(source, "the atlas set's working grid maps outside this scan: its alignment failed")
    return box


def reached_box(
    geometry: Geometry, transforms: Sequence[str], target: Geometry
) -> tuple[slice, slice, slice] | None:
    """The voxel box ``(z, y, x)`` of the target grid that values on ``geometry`` (a working grid
    or a box of it) reach when mapped back; None when it lies outside the target.

    ``transforms`` are the target -> reference affine files; the grid's corners (voxel edges, as
    far as linear interpolation reaches) are mapped into the target's space and their bounding
    box taken, one voxel wider, clipped to the target.
    """
    from cmmas import prealign

    index_xyz = target.physical_to_index(prealign.transform_points(transforms, geometry.corners()))
    low = np.clip(np.floor(index_xyz.min(axis=0)) - 1, 0, target.size).astype(int)
    high = np.clip(np.ceil(index_xyz.max(axis=0)) + 2, 0, target.size).astype(int)
    if np.any(high <= low):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(low[::-1], high[::-1]))  # type: ignore[return-value]


def prepare(
    cases: Sequence[Case],
    labels: dict[int, str],
    out_dir: str | os.PathLike,
    shape_zyx: Sequence[int],
    spacing_zyx: Sequence[float],
    reference: str = "auto",
    roi_ids: Sequence[str] | None = None,
    roles: dict[str, str] | None = None,
    roi_margin_mm: float = 15.0,
    align_spacing_mm: float = 3.0,
    component: int | None = None,
    fast: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> AtlasSet:
    """Align every case once to a reference and store it on the working grid.

    Re-running skips the cases already stored (their transform and image exist), so an
    interrupted preparation resumes; outputs are written atomically.

    Args:
        cases: the cases (any modality); the reference is chosen among them.
        labels: the data set's label table (code -> name); every label is checked against it.
        out_dir: the set's root folder.
        shape_zyx: working-grid shape, array order (divisible by 8 for the networks).
        spacing_zyx: working-grid spacing in mm, array order.
        reference: a case id, or "auto" (:func:`choose_reference` among ``roi_ids``' cases).
        roi_ids: cases whose aligned labels define the ROI (the atlases); default: all labelled.
        roles: case id -> "train" or "test" (held-out targets); default "train" for all.
        roi_margin_mm: margin added around the union of those labels.
        align_spacing_mm: isotropic spacing of the affine alignments.
        component: keep only this label code (others set to 0), as the original's single structure.
        fast: use the fast ANTs schedule (a few seconds per case).
        seed: ANTs sampling seed.
        progress: show a progress bar.

    Returns:
        The prepared :class:`AtlasSet`.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    if component is not None and component not in labels:
        raise AtlasSetError(None, f"component {component} is not in the label table {labels}")
    stored_labels = dict(labels) if component is None else {component: labels[component]}
    by_id = {c.id: c for c in cases}
    bad_roles = sorted({r for r in (roles or {}).values()} - {"train", "test"})
    if bad_roles:
        raise AtlasSetError(out, f"roles must be 'train' or 'test', got {bad_roles}")
    if len(by_id) != len(cases):
        raise AtlasSetError(out, "duplicate case ids")
    roi_ids = list(roi_ids) if roi_ids is not None else [c.id for c in cases if c.label_path is not None]
    unknown = [i for i in roi_ids if i not in by_id]
    if unknown:
        raise AtlasSetError(out, f"ROI cases {unknown} are not among the cases")
    if reference == "auto":
        ref_case = choose_reference([by_id[i] for i in roi_ids], labels)
    elif reference in by_id:
        ref_case = by_id[reference]
    else:
        raise AtlasSetError(out, f"reference {reference!r} is not among the cases")

    ref_image, _ = _load(ref_case, labels, component)
    ref_small = _at_spacing(ref_image, align_spacing_mm)
    write_image(ref_small, out / "reference.nii.gz")

    transforms: dict[str, str] = {}
    bar = tqdm(cases, desc="align to reference", unit="case", disable=not progress)
    for case in bar:
        rel = f"transforms/{case.id}/affine.mat"
        if not (out / rel).exists():
            image, _ = _load(case, labels, component)
            align(image, ref_small, out / "transforms" / case.id, align_spacing_mm, fast=fast, seed=seed)
        transforms[case.id] = rel

    union = None
    for case_id in roi_ids:
        _, label = _load(by_id[case_id], labels, component)
        moved = to_space(label, [str(out / transforms[case_id])], ref_small.geometry, kind="label")
        union = moved.array > 0 if union is None else union | (moved.array > 0)
    if union is None or not union.any():
        raise AtlasSetError(out, "the aligned atlas labels are empty: cannot place the working grid")
    geometry = working_grid(ref_small.with_array(union.astype(np.uint8)), shape_zyx, spacing_zyx, roi_margin_mm)

    entries = []
    for case in tqdm(cases, desc="resample to working grid", unit="case", disable=not progress):
        image_rel, label_rel = f"images/{case.id}.nii.gz", None
        tfm = [str(out / transforms[case.id])]
        image, label = _load(case, labels, component)
        if not (out / image_rel).exists():
            write_image(to_space(image, tfm, geometry, kind="linear"), out / image_rel)
        if label is not None:
            label_rel = f"labels/{case.id}.nii.gz"
            if not (out / label_rel).exists():
                write_image(to_space(label, tfm, geometry, kind="label"), out / label_rel)
        entries.append(
            SpaceCase(
                id=case.id,
                modality=case.modality,
                image=image_rel,
                label=label_rel,
                transform=transforms[case.id],
                source_image=str(Path(case.image_path).resolve()),
                source_label=None if case.label_path is None else str(Path(case.label_path).resolve()),
                role=(roles or {}).get(case.id, "train"),
            )
        )
    manifest = Manifest(
        reference=ref_case.id,
        labels=stored_labels,
        geometry=geometry,
        align_spacing_mm=float(align_spacing_mm),
        roi_margin_mm=float(roi_margin_mm),
        cases=tuple(entries),
    )
    atomic_write_text(out / MANIFEST, manifest.to_json())
    prepared = AtlasSet(out)
    prepared.write_stack()
    return prepared


def _load(case: Case, labels: dict[int, str], component: int | None) -> tuple[Image, Image | None]:
    try:
        return load_case(case, labels, component=component)
    except CmmasError:
        raise
    except (OSError, ValueError) as err:
        raise AtlasSetError(case.image_path, f"cannot load case {case.id}: {err}") from None
