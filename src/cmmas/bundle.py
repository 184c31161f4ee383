"""A bundle: one folder a user hands to ``cmmas segment --bundle``.

Layout (the names of :mod:`cmmas.segment`)::

    BUNDLE/atlas_set/          the prepared atlas set (manifest.json, images/, labels/, ...)
    BUNDLE/reg_model.keras     the trained BiRegNet (and its model card, when it has one)
    BUNDLE/simnet.keras        the trained SimNet (optional; and its card)
    BUNDLE/README.txt          what it holds, what it was trained on and how well it did

The bundle is assembled in a temporary folder beside ``out`` and renamed into place, so that an
interrupted call leaves no half bundle.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from cmmas.align.atlas_set import AtlasSet
from cmmas.errors import CmmasError
from cmmas.segment import BUNDLE_ATLAS_SET, BUNDLE_REG_MODEL, BUNDLE_SIMNET, atlas_ids_of

README = "README.txt"


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
