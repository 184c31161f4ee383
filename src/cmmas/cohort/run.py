"""``cmmas segment-batch``: a manifest segmented with a bundle (:mod:`cmmas.cohort.batch`), in one
process or as one shard of many (``--shard I/N``, a SLURM array), and the merge of the shards."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cmmas.cohort import batch
from cmmas.cohort.manifest import Scan, read_manifest, shard

if TYPE_CHECKING:
    from cmmas.segment import SegmentConfig, Segmenter


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a bundle run will use, read without loading a network: the bundle's parts, the
    segmentation settings, the fusion's network (None for a classic fusion), the run's key and the
    organ finder (None: none)."""

    bundle: Path
    atlas_set: Path
    reg_model: Path
    config: SegmentConfig
    network: Path | None
    key: str
    finder: Path | None = None


def plan_bundle(bundle: str | os.PathLike, fusion: str | None = None, maps: bool = True, preview: bool = False
                ) -> Plan:
    """The :class:`Plan` of segmenting with ``bundle``.

    Args:
        bundle: a bundle folder (``make bundle``, :func:`cmmas.bundle.write_bundle`).
        fusion: the fusion (None: the bundle's recorded one, else :data:`cmmas.segment.DEFAULT_FUSION`).
        maps: map the probability and agreement maps back too.
        preview: each scan's preview PNG is written (part of the key: a run asking for previews
            redoes scans done without).

    Raises:
        CmmasError: the bundle lacks its atlas set or registration network.
    """
    from cmmas import bundle as bundles
    from cmmas.errors import CmmasError
    from cmmas.segment import DEFAULT_FUSION, SegmentConfig

    found = bundles.resolve_bundle(bundle)
    if found.reg_model is None:
        raise CmmasError(Path(bundle) / bundles.BUNDLE_REG_MODEL, "the bundle has no registration network")
    config = SegmentConfig(fusion=fusion or found.fusion or DEFAULT_FUSION, maps=maps,
                           organ_alignment=found.finder is not None)
    network = found.bundled.get(config.fusion)
    files = [Path(found.atlas_set) / bundles.MANIFEST, found.reg_model, *([network] if network else []),
             *([found.finder] if found.finder else [])]
    return Plan(Path(bundle), Path(found.atlas_set), Path(found.reg_model), config, network,
                batch.run_key({**config.to_dict(), "preview": preview}, files), found.finder)


def open_bundle(plan: Plan, progress: bool = False) -> Segmenter:
    """The plan's :class:`cmmas.segment.Segmenter`, its networks loaded once.

    Raises:
        CmmasError: a network that does not fit the atlas set, or a learned fusion without one.
    """
    from cmmas.segment import Segmenter

    fusion_model = {plan.config.fusion: plan.network} if plan.network else None
    return Segmenter(plan.atlas_set, plan.reg_model, fusion_model, plan.config, progress=progress,
                     finder_model=plan.finder)


def segmenter_of(segmenter: Segmenter, extras: bool, preview: bool, strict: bool = False
                 ) -> Callable[[Scan, Path], dict]:
    """``segment_one`` for :func:`cmmas.cohort.batch.run_scans`: read the scan, segment it, write
    its outputs into its folder and return its record's fields."""
    from cmmas.io import read_image
    from cmmas.outputs import write_segmentation

    def segment_one(scan: Scan, folder: Path) -> dict:
        start = time.perf_counter()
        result = segmenter.segment(read_image(scan.path, dtype=None, strict=strict))
        written = write_segmentation(result, folder / batch.SEGMENTATION, extras=extras, preview=preview)
        return batch.segment_record(result, written, time.perf_counter() - start)

    return segment_one


def segment_cohort(manifest: str | os.PathLike, bundle: str | os.PathLike, out: str | os.PathLike,
                   fusion: str | None = None, extras: bool = True, preview: bool = False,
                   shard_of: tuple[int, int] | None = None, strict: bool = False,
                   report: Callable[[str], None] | None = print) -> batch.Summary:
    """Segment a manifest's scans (or one shard of them) into ``out``; without a shard, write the
    cohort tables (:func:`cmmas.cohort.batch.merge`) at the end.

    Raises:
        CmmasError: a bad manifest or bundle, or an output that would replace an input (before
            any scan is read).
    """
    scans = read_manifest(manifest)
    check_inputs_kept(manifest, scans, out)
    mine = shard(scans, *shard_of) if shard_of else scans
    Path(out).mkdir(parents=True, exist_ok=True)
    plan = plan_bundle(bundle, fusion, maps=extras, preview=preview)
    segment_one = segmenter_of(open_bundle(plan, progress=report is not None), extras, preview, strict)
    summary = batch.run_scans(mine, segment_one, out, plan.key, report)
    if shard_of is None:
        batch.merge(out, scans, plan.key)
    return summary


def check_inputs_kept(manifest: str | os.PathLike, scans: list[Scan], out: str | os.PathLike) -> None:
    """Refuse a run whose outputs could replace one of its inputs: the manifest as a cohort table,
    or a scan inside a scan's output folder ``OUT/<id>/``.

    Raises:
        CmmasError: naming the input.
    """
    from cmmas.errors import CmmasError

    out = Path(out).resolve()
    if Path(manifest).resolve() in (out / batch.COHORT, out / batch.FAILURES):
        raise CmmasError(manifest, f"the manifest would be replaced by the cohort table: choose another --out than {out}")
    folders = {out / scan.id for scan in scans}
    for scan in scans:
        inside = [f for f in folders if f == scan.path.resolve() or f in scan.path.resolve().parents]
        if inside:
            raise CmmasError(scan.path, f"scan {scan.id!r} lies in the output folder {inside[0]} of a scan: "
                                        "choose another --out")


def merge_cohort(manifest: str | os.PathLike | None, out: str | os.PathLike, bundle: str | os.PathLike | None = None,
                 fusion: str | None = None, extras: bool = True, preview: bool = False) -> tuple[int, int, int]:
    """Write the cohort tables of ``out`` from its records (after the shards ran).

    Args:
        manifest: the cohort's manifest (its scans without a record are failures), or None.
        out: the cohort folder.
        bundle, fusion, extras, preview: the shards' settings: with ``bundle``, only records of
            this run's key count (:func:`plan_bundle`); without, any record does.

    Returns:
        The numbers of cohort rows, of failures and of distinct settings keys among the rows.
    """
    key = plan_bundle(bundle, fusion, maps=extras, preview=preview).key if bundle else None
    rows, failures = batch.merge(out, read_manifest(manifest) if manifest else None, key)
    return len(rows), len(failures), len({row.get("key") for row in rows})
