"""An atlas set (the store): every case affinely aligned once to a reference, on one working grid.

Aligning each atlas to each target costs an ANTs affine per pair (~12 s on real abdomen
scans, minutes per target). Instead every atlas is aligned once to a *reference* (one of the
atlases) when the set is prepared (:mod:`cmmas.align.prepare`), and a new target is aligned once to the same reference;
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

An *oracle* set (``roi == "oracle"``, :func:`cmmas.align.prepare.prepare_oracle`, the original
cmmas's setting, for reproducing the paper only) stores every case on its OWN grid instead: the
box of its own ground-truth structure (+10 mm) stretched to the working shape, identity
direction, z-scored intensities, no alignment (no ``transforms/``, no ``reference.nii.gz``).
Every case's array has the working shape, so the networks read it as any set; each NIfTI's
header is that case's grid, and the manifest's ``geometry`` is a nominal one (the shape, the
median spacing of the cases, identity direction, origin 0).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cmmas.errors import AtlasSetError
from cmmas.io import Geometry, Image, atomic_path, read_image, read_label

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"

STACK = "stack.npz"

VERSION = 1

#: How a set's region of interest was placed (:attr:`Manifest.roi`): around the union of the
#: aligned atlas labels (our pipeline), or around each case's own label (the original's oracle).
ROIS = ("atlases", "oracle")


@dataclasses.dataclass(frozen=True)
class SpaceCase:
    """One case of an atlas set (paths relative to the set's root).

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
    """What an atlas set holds.

    Attributes:
        reference: id of the case whose space all others are aligned to.
        labels: label table, code -> name (0 excluded).
        geometry: the working grid (reference space, LPS directions).
        align_spacing_mm: isotropic spacing the affine alignments ran at.
        roi_margin_mm: margin around the union of atlas labels that centred the grid (an
            oracle set: around each case's own label).
        cases: every case, in the order they were given.
        roi: one of :data:`ROIS` ("oracle": each case on its own grid, module docstring).
    """

    reference: str
    labels: dict[int, str]
    geometry: Geometry
    align_spacing_mm: float
    roi_margin_mm: float
    cases: tuple[SpaceCase, ...]
    version: int = VERSION
    roi: str = "atlases"

    @property
    def oracle(self) -> bool:
        """Whether every case was cropped around its own label (:data:`ROIS`)."""
        return self.roi == "oracle"

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
            roi = data.get("roi", "atlases")
            if roi not in ROIS:
                raise AtlasSetError(path, f"unknown roi {roi!r}; expected one of {list(ROIS)}")
            return cls(
                reference=data["reference"],
                labels={int(k): v for k, v in data["labels"].items()},
                geometry=geometry,
                align_spacing_mm=float(data["align_spacing_mm"]),
                roi_margin_mm=float(data["roi_margin_mm"]),
                cases=cases,
                roi=roi,
            )
        except AtlasSetError:
            raise
        except (ValueError, KeyError, TypeError) as err:
            raise AtlasSetError(path, f"invalid manifest ({type(err).__name__}: {err})") from None


class AtlasSet:
    """Read access to an atlas set (see the module docstring for the layout)."""

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
        """A case's normalised image on the working grid, float32 in [0, 1] (an oracle set: its
        own grid, z-scores)."""
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
        """The case -> reference transform files (for :func:`cmmas.align.ants.apply`).

        Raises:
            AtlasSetError: an oracle set (it has no alignment: it cannot segment a new scan).
        """
        self.require_alignment()
        return [str(self.root / self.case(case_id).transform)]

    def require_alignment(self) -> None:
        """Raise :class:`AtlasSetError` for an oracle set: it has no alignment to a reference, so a
        new scan cannot be segmented with it."""
        if self.manifest.oracle:
            raise AtlasSetError(self.root, "an oracle atlas set (the paper's setting: each case cropped around its "
                                           "own label) has no alignment: it cannot segment a new scan; prepare one "
                                           "with experiments/prealign.py --roi atlases")

    def reference_image(self) -> Image:
        """The reference image at the alignment spacing, raw intensities."""
        return read_image(self.root / "reference.nii.gz")
