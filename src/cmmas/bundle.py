"""A bundle: one folder a user hands to ``cmmas segment --bundle``; writing and reading it.

Layout::

    BUNDLE/atlas_set/          the prepared atlas set (manifest.json, images/, labels/, ...)
    BUNDLE/reg_model.keras     the trained BiRegNet (and its model card, when it has one)
    BUNDLE/simnet.keras        the learned fusions' networks, each optional (and their cards):
    BUNDLE/dlf.keras             SimNet, Deep Label Fusion, the U-Net baseline
    BUNDLE/unet.keras            (file names: :data:`cmmas.fuse.registry.LEARNED`)
    BUNDLE/finder.keras        the organ finder (optional, and its card): the QC's second opinion
    BUNDLE/bundle.json         the bundle's default fusion and why it was chosen
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

import numpy as np

from cmmas.align.atlas_set import MANIFEST, AtlasSet
from cmmas.errors import AtlasSetError, CmmasError
from cmmas.fuse import registry
from cmmas.io import atomic_write_text
from cmmas.models import learned_models
from cmmas.segment import DEFAULT_FUSION, atlas_ids_of

#: Names inside a bundle folder (the learned fusions' files: :data:`cmmas.fuse.registry.LEARNED`).
BUNDLE_ATLAS_SET = "atlas_set"
BUNDLE_REG_MODEL = "reg_model.keras"
BUNDLE_FINDER = "finder.keras"
BUNDLE_FILE = "bundle.json"
README = "README.txt"


@dataclasses.dataclass(frozen=True)
class Bundle:
    """Where the atlas set and the trained models are (the BiRegNet may be absent: None), and the
    bundle's default fusion (None: not recorded; ``cmmas segment`` then uses its own default).

    Attributes:
        atlas_set: the atlas set folder.
        reg_model: the BiRegNet file.
        bundled: learned fusion name -> the bundle's network file, those present.
        fusion_model: an explicit learned fusion's network, whose fusion its kind says (read by
            :func:`cmmas.models.learned_models` where it is used); it replaces the bundle's
            network of that fusion.
        fusion: the default fusion recorded in ``bundle.json``.
        finder: the organ finder file (None: none).
    """

    atlas_set: Path
    reg_model: Path | None
    bundled: dict[str, Path]
    fusion_model: Path | None = None
    fusion: str | None = None
    finder: Path | None = None


def resolve_bundle(
    bundle: str | os.PathLike | None = None,
    atlas_set: str | os.PathLike | None = None,
    reg_model: str | os.PathLike | None = None,
    fusion_model: str | os.PathLike | None = None,
    finder_model: str | os.PathLike | None = None,
) -> Bundle:
    """Combine a bundle folder with explicit paths; an explicit path wins over the bundle's (an
    explicit ``fusion_model`` replaces the bundle's network of its fusion only).

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
    bundled = {name: root / learned.file for name, learned in registry.LEARNED.items()
               if root is not None and (root / learned.file).is_file()}
    return Bundle(chosen, pick(reg_model, BUNDLE_REG_MODEL), bundled, None if fusion_model is None else Path(fusion_model),
                  _recorded_fusion(root), pick(finder_model, BUNDLE_FINDER))


def _recorded_fusion(root: Path | None) -> str | None:
    """The default fusion of a bundle's ``bundle.json`` (None without one; a bad file says so)."""
    if root is None or not (root / BUNDLE_FILE).is_file():
        return None
    try:
        fusion = json.loads((root / BUNDLE_FILE).read_text())["fusion"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise AtlasSetError(root / BUNDLE_FILE, f"unreadable bundle record ({type(err).__name__}: {err})") from None
    if fusion not in registry.names():
        raise AtlasSetError(root / BUNDLE_FILE, f"names an unknown fusion {fusion!r}")
    return fusion


#: Mean Dice within this of the best counts as a tie, won by the fusion of fewer seconds.
TIE_DICE = 0.005


def best_fusion(summary: dict, runnable: set[str]) -> tuple[str, str]:
    """The fusion of highest mean Dice over every direction of an evaluation's ``summary.json``
    among ``runnable`` (the fusions a bundle can run), fusions within :data:`TIE_DICE` of it
    decided by their mean fusion seconds, and why in words; the default fusion when the summary
    scores none of them.

    Raises:
        CmmasError: a summary of another layout.
    """
    scores: dict[str, list[float]] = {}
    seconds: dict[str, list[float]] = {}
    try:
        for methods in summary.get("metrics", {}).values():
            for method, entry in methods.items():
                mean = entry["mean"]["dice"]["mean"]
                if method in runnable and mean is not None and np.isfinite(mean):
                    scores.setdefault(method, []).append(float(mean))
        for steps in summary.get("seconds", {}).values():
            for method, stats in steps.get("fusion", {}).items():
                if stats.get("mean") is not None:
                    seconds.setdefault(method, []).append(float(stats["mean"]))
    except (AttributeError, KeyError, TypeError) as err:
        raise CmmasError(None, f"not an evaluation summary ({type(err).__name__}: {err})") from None
    if not scores:
        return DEFAULT_FUSION, f"{DEFAULT_FUSION}: cmmas segment's default (no evaluation scored this bundle's fusions)"
    means = {method: float(np.mean(v)) for method, v in scores.items()}
    top = max(means.values())
    tied = [m for m in means if means[m] >= top - TIE_DICE]
    best = min(tied, key=lambda m: (np.mean(seconds.get(m, [np.inf])), -means[m]))
    others = ", ".join(f"{m} {v:.3f}" for m, v in sorted(means.items(), key=lambda kv: -kv[1]) if m != best)
    how = ("the highest mean Dice of its evaluation" if means[best] == top else
           f"the fastest of the fusions within {TIE_DICE} mean Dice of the best of its evaluation")
    return best, f"{best}: {how} ({means[best]:.3f}" + (f"; {others}" if others else "") + ")"


def write_bundle(
    atlas_set: str | os.PathLike,
    reg_model: str | os.PathLike,
    out: str | os.PathLike,
    fusion_models=None,
    summary: str | os.PathLike | None = None,
    title: str = "cmmas bundle",
    fusion: str | None = None,
    finder_model: str | os.PathLike | None = None,
) -> Path:
    """Copy an atlas set and its trained models into the bundle folder ``out`` (replaced if present).

    Args:
        atlas_set: a prepared atlas set folder.
        reg_model: the BiRegNet ``.keras`` file trained on it.
        out: the bundle folder to write.
        fusion_models: the learned fusions' ``.keras`` files (SimNet, DLF, U-Net: a path or a
            list of paths, :func:`cmmas.models.learned_models`; optional: without them the
            bundle segments with a classic fusion).
        summary: an evaluation's ``summary.json`` (:func:`cmmas.evaluate.report.summarize`): its
            mean Dice per method and structure go into README.txt.
        title: README.txt's first line.
        fusion: the bundle's default fusion (``bundle.json``); None: the fusion of highest mean
            Dice in ``summary`` among those the bundle can run (:func:`best_fusion`).
        finder_model: an organ finder ``.keras`` file (experiments/train_finder.py; optional).

    Returns:
        ``out``.

    Raises:
        CmmasError: a missing input; ModelError: a missing fusion network, or a file of another kind.
    """
    aset = AtlasSet(atlas_set)
    sources = {BUNDLE_REG_MODEL: Path(reg_model)}
    learned = learned_models(fusion_models)
    sources.update({registry.LEARNED[name].file: Path(path) for name, path in learned.items()})
    if finder_model is not None:
        sources[BUNDLE_FINDER] = Path(finder_model)
    for path in [*sources.values(), *([Path(summary)] if summary is not None else [])]:
        if not path.is_file():
            raise CmmasError(path, "not found (needed for the bundle)")
    runnable = set(registry.PRESETS) | set(learned)
    if fusion is not None:
        registry.check_names([fusion])
        if fusion not in runnable:
            raise CmmasError(None, f"the bundle's fusion {fusion!r} needs its network (give its --fusion_model)")
        why = f"{fusion}: chosen by whoever made the bundle"
    else:
        fusion, why = best_fusion(_read_summary(summary) if summary is not None else {}, runnable)
    out = Path(out)
    where = out.resolve()
    for source in [aset.root, *sources.values(), *([Path(summary)] if summary is not None else [])]:
        if where == source.resolve() or where in source.resolve().parents:
            raise CmmasError(out, f"the bundle folder would replace its input {source}: choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it 0700: others could not read the bundle
    try:
        shutil.copytree(aset.root, staging / BUNDLE_ATLAS_SET)
        for name, source in sources.items():
            shutil.copyfile(source, staging / name)
            for sidecar in _sidecars(source):
                shutil.copyfile(sidecar, staging / (name + sidecar.name[len(source.name):]))
        atomic_write_text(staging / BUNDLE_FILE, json.dumps({"fusion": fusion, "why": why}, indent=1))
        (staging / README).write_text(describe(aset, sorted(sources), summary, title, why))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _read_summary(path: str | os.PathLike) -> dict:
    """An evaluation's ``summary.json``; a missing or malformed file is one :class:`CmmasError`."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise CmmasError(path, f"unreadable evaluation summary ({type(err).__name__}: {err})") from None


def _sidecars(model: Path) -> list[Path]:
    """Files beside ``model`` whose names extend its own (e.g. ``model.keras.json``, its card)."""
    return sorted(p for p in model.parent.glob(model.name + ".*") if p.is_file())


def describe(aset: AtlasSet, models: list[str], summary: str | os.PathLike | None, title: str, why: str) -> str:
    """README.txt of a bundle: the grid, the atlases, the labels, the models, the default fusion
    and why, and the measured Dice."""
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
        "Models: " + ", ".join(models) + ".",
        f"Default fusion (--fusion), recorded in {BUNDLE_FILE}: {why}.",
    ]
    if summary is not None:
        lines += ["", f"Measured on the held-out targets of its evaluation ({Path(summary).name}), mean Dice:"]
        lines += _dice_lines(_read_summary(summary))
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
