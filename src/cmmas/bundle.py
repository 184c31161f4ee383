"""A bundle: one folder a user hands to ``cmmas segment --bundle``; writing and reading it.

Layout::

    BUNDLE/atlas_set/          the prepared atlas set (manifest.json, images/, labels/, ...)
    BUNDLE/reg_model.keras     the trained BiRegNet (and its model card, when it has one)
    BUNDLE/simnet.keras        the trained SimNet (optional; and its card)
    BUNDLE/README.txt          what it holds, what it was trained on and how well it did

:func:`resolve_bundle` reads one (explicit paths win over the bundle's); :func:`write_bundle`
assembles one in a temporary folder beside ``out`` and renames it into place, so that an
interrupted call leaves no half bundle.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

from cmmas.align.atlas_set import MANIFEST, AtlasSet
from cmmas.errors import AtlasSetError, CmmasError
from cmmas.segment import atlas_ids_of

#: Names inside a bundle folder.
BUNDLE_ATLAS_SET = "atlas_set"
BUNDLE_REG_MODEL = "reg_model.keras"
BUNDLE_SIMNET = "simnet.keras"
README = "README.txt"


@dataclasses.dataclass(frozen=True)
class Bundle:
    """Where the atlas set and the two trained models are (a model may be absent: None)."""

    atlas_set: Path
    reg_model: Path | None
    fusion_model: Path | None


def resolve_bundle(
    bundle: str | os.PathLike | None = None,
    atlas_set: str | os.PathLike | None = None,
    reg_model: str | os.PathLike | None = None,
    fusion_model: str | os.PathLike | None = None,
) -> Bundle:
    """Combine a bundle folder with explicit paths; an explicit path wins over the bundle's.

    The bundle's atlas set is ``bundle/atlas_set/`` or, when that is absent and ``bundle``
    holds a ``manifest.json``, the bundle folder itself.

    Raises:
        AtlasSetError: the bundle folder is missing, or no atlas set is given at all.
    """
    root = None if bundle is None else Path(bundle)
    if root is not None and not root.is_dir():
        raise AtlasSetError(root, "bundle folder not found")

    def pick(explicit, name: str) -> Path | None:
        if explicit is not None:
            return Path(explicit)
        if root is not None and (root / name).exists():
            return root / name
        return None

    chosen = pick(atlas_set, BUNDLE_ATLAS_SET)
    if chosen is None and root is not None and (root / MANIFEST).is_file():
        chosen = root
    if chosen is None:
        where = root if root is not None else None
        raise AtlasSetError(where, f"no atlas set given (--atlas-set, or a bundle holding {BUNDLE_ATLAS_SET}/)")
    return Bundle(chosen, pick(reg_model, BUNDLE_REG_MODEL), pick(fusion_model, BUNDLE_SIMNET))


def write_bundle(
    atlas_set: str | os.PathLike,
    reg_model: str | os.PathLike,
    out: str | os.PathLike,
    fusion_model: str | os.PathLike | None = None,
    summary: str | os.PathLike | None = None,
    title: str = "cmmas bundle",
) -> Path:
    """Copy an atlas set and its trained models into the bundle folder ``out`` (replaced if present).

    Args:
        atlas_set: a prepared atlas set folder.
        reg_model: the BiRegNet ``.keras`` file trained on it.
        out: the bundle folder to write.
        fusion_model: the SimNet ``.keras`` file (optional: without it the bundle segments with a
            classic fusion, e.g. ``--fusion jlf_tf``).
        summary: an evaluation's ``summary.json`` (:func:`cmmas.evaluate.report.summarize`): its
            mean Dice per method and structure go into README.txt.
        title: README.txt's first line.

    Returns:
        ``out``.

    Raises:
        CmmasError: a missing input.
    """
    aset = AtlasSet(atlas_set)
    sources = {BUNDLE_REG_MODEL: Path(reg_model)}
    if fusion_model is not None:
        sources[BUNDLE_SIMNET] = Path(fusion_model)
    for path in [*sources.values(), *([Path(summary)] if summary is not None else [])]:
        if not path.is_file():
            raise CmmasError(path, "not found (needed for the bundle)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it 0700: others could not read the bundle
    try:
        shutil.copytree(aset.root, staging / BUNDLE_ATLAS_SET)
        for name, source in sources.items():
            shutil.copyfile(source, staging / name)
            for sidecar in _sidecars(source):
                shutil.copyfile(sidecar, staging / (name + sidecar.name[len(source.name):]))
        (staging / README).write_text(describe(aset, sorted(sources), summary, title))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _sidecars(model: Path) -> list[Path]:
    """Files beside ``model`` whose names extend its own (e.g. ``model.keras.json``, its card)."""
    return sorted(p for p in model.parent.glob(model.name + ".*") if p.is_file())


def describe(aset: AtlasSet, models: list[str], summary: str | os.PathLike | None, title: str) -> str:
    """README.txt of a bundle: the grid, the atlases, the labels, the models and the measured Dice."""
    manifest = aset.manifest
    geometry = manifest.geometry
    atlases = atlas_ids_of(aset)
    modality = aset.case(manifest.reference).modality
    lines = [
        title,
        "",
        "Segment a scan with it:",
        "  cmmas segment --bundle <this folder> --target scan.nii.gz --out seg.nii.gz",
        "",
        f"Atlases: {len(atlases)} labelled {modality.upper()} scans ({', '.join(atlases)}), "
        f"reference {manifest.reference}.",
        f"Working grid: {' x '.join(map(str, geometry.shape))} voxels (z, y, x) at "
        f"{' x '.join(f'{s:g}' for s in geometry.spacing[::-1])} mm; "
        f"scans aligned at {manifest.align_spacing_mm:g} mm.",
        "Labels: " + ", ".join(f"{code} {name}" for code, name in sorted(aset.labels.items())) + ".",
        "Models: " + ", ".join(models) + ("" if BUNDLE_SIMNET in models else " (no SimNet: use --fusion jlf_tf)") + ".",
    ]
    if summary is not None:
        lines += ["", f"Measured on the held-out targets of its evaluation ({Path(summary).name}), mean Dice:"]
        lines += _dice_lines(json.loads(Path(summary).read_text()))
    return "\n".join(lines) + "\n"


def _dice_lines(summary: dict) -> list[str]:
    """One line per direction and method: the mean Dice over cases and per structure."""
    lines = []
    for direction, methods in summary.get("metrics", {}).items():
        cases = summary.get("n_cases", {}).get(direction, "?")
        for method, entry in methods.items():
            structures = [f"{name} {stats['dice']['mean']:.3f}" for name, stats in entry.items() if name != "mean"]
            lines.append(f"  {direction} {method} ({cases} targets): {entry['mean']['dice']['mean']:.3f} "
                         f"({', '.join(structures)})")
    return lines
