"""Segmenting a cohort: every scan of a manifest by one bundle, each into its own folder, resumable,
one bad scan never stopping the run.

Layout of the output folder ``DIR``::

    DIR/<id>/seg.nii.gz (+ its maps, volumes, QC record: cmmas.outputs.write_segmentation)
    DIR/<id>/record.json     written last, atomically: the scan is done
    DIR/<id>/failure.json    the one-line reason it failed (removed once it succeeds)
    DIR/cohort.csv           one row per segmented scan (manifest order)
    DIR/failures.csv         one row per manifest scan without a record, with its reason
    DIR/cohort.html          the table as a page: flagged scans first (cmmas.cohort.page)

A scan is done when its ``record.json`` holds the run's key (:func:`run_key`: the segmentation
settings and the hashes of the bundle's files) and names the same scan file; a re-run skips it,
so a killed run restarted finishes the rest. The tables are assembled from the records
(:func:`merge`): a sharded run (each shard a SLURM array task) leaves records, and one merge
writes the tables. Rows of ``cohort.csv`` + rows of ``failures.csv`` = rows of the manifest.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cmmas.cohort.manifest import Scan
from cmmas.cohort.page import cohort_page
from cmmas.errors import CmmasError
from cmmas.io import atomic_write_text

if TYPE_CHECKING:
    from cmmas.segment import Segmentation

SEGMENTATION = "seg.nii.gz"
RECORD = "record.json"
FAILURE = "failure.json"
COHORT = "cohort.csv"
FAILURES = "failures.csv"
PAGE = "cohort.html"

#: The reason given for a scan whose record is of other settings or another bundle than the run's.
OTHER_KEY = "segmented with other settings or another bundle than this run's (run it again to redo it)"
#: The reason given for a manifest scan that has neither record nor failure.
NOT_RUN = "not segmented (no record: its shard has not run, or it was stopped during this scan)"


@dataclasses.dataclass(frozen=True)
class Summary:
    """What a run did: scans segmented now, found done, failed (ids)."""

    segmented: int
    skipped: int
    failed: list[str]

    def line(self, out: str | os.PathLike) -> str:
        failed = f", {len(self.failed)} failed (see {Path(out) / FAILURES})" if self.failed else ", none failed"
        return f"{self.segmented} segmented, {self.skipped} already done{failed}"


def run_key(settings: dict, files: Sequence[str | os.PathLike]) -> str:
    """The key of a run's results: a hash of the segmentation settings (JSON values) and of the
    content of ``files`` (the atlas set's manifest, the networks)."""
    from cmmas.provenance import config_hash, sha256_file

    return config_hash({"settings": settings, "files": [sha256_file(f) for f in files]})


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_done(out: str | os.PathLike, scan: Scan, key: str) -> bool:
    """Whether ``scan`` has a finished record of this run's key for the same file."""
    record = _read_json(Path(out) / scan.id / RECORD)
    return bool(record and record.get("key") == key and record.get("path") == str(scan.path)
                and (Path(out) / scan.id / SEGMENTATION).exists())


def read_failure(out: str | os.PathLike, scan_id: str) -> str | None:
    """The recorded reason a scan failed, None when it has no failure record."""
    return (_read_json(Path(out) / scan_id / FAILURE) or {}).get("reason")


def record_failure(out: str | os.PathLike, scan: Scan, key: str, reason: str) -> None:
    """Write ``out/<id>/failure.json`` (atomically) with the one-line ``reason``."""
    folder = Path(out) / scan.id
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / FAILURE, json.dumps({"id": scan.id, "path": str(scan.path), "key": key,
                                                    "reason": reason}, indent=1))


def reason_of(err: BaseException) -> str:
    """One line saying why a scan failed (a cmmas error names its file already)."""
    text = " ".join(str(err).split())
    return text if isinstance(err, CmmasError) else f"{type(err).__name__}: {text}"


def run_scans(scans: Sequence[Scan], segment_one: Callable[[Scan, Path], dict], out: str | os.PathLike, key: str,
              report: Callable[[str], None] | None = print) -> Summary:
    """Segment every scan not done yet, each into ``out/<id>/``, recording each failure and going on.

    Args:
        scans: the (shard of the) manifest.
        segment_one: segments one scan into the folder it is given and returns its record's
            fields (``seconds``, ``flagged``, volumes...; :func:`segment_record`); raises on failure.
        out: the cohort folder.
        key: the run's key (:func:`run_key`), stored in each record.
        report: receives one progress line per scan (id, seconds, QC flag, count, ETA); None: quiet.

    Returns:
        The run's :class:`Summary`.
    """
    out = Path(out)
    todo = [scan for scan in scans if not is_done(out, scan, key)]
    skipped, failed, spent = len(scans) - len(todo), [], []
    if report and skipped:
        report(f"{skipped} of {len(scans)} scans already done, skipped")
    for k, scan in enumerate(todo, start=1):
        folder = out / scan.id
        folder.mkdir(parents=True, exist_ok=True)
        for stale in (RECORD, FAILURE):  # an earlier run's verdict no longer holds once this one starts
            (folder / stale).unlink(missing_ok=True)
        start = time.perf_counter()
        try:
            fields = segment_one(scan, folder)
        except Exception as err:  # one bad scan never stops the cohort: recorded, and on to the next
            failed.append(scan.id)
            record_failure(out, scan, key, reason_of(err))
            status = f"FAILED: {reason_of(err)}"
        else:
            record = {"id": scan.id, "path": str(scan.path), "extra": scan.extra, "key": key, **fields}
            atomic_write_text(folder / RECORD, json.dumps(record, indent=1))
            (folder / FAILURE).unlink(missing_ok=True)
            status = "QC FLAGGED" if fields.get("flagged") else "ok"
        spent.append(time.perf_counter() - start)
        if report:
            left = (len(todo) - k) * sum(spent) / len(spent)
            report(f"[{k}/{len(todo)}] {scan.id}: {spent[-1]:.1f} s, {status}; ETA {_duration(left)}")
    return Summary(len(todo) - len(failed), skipped, failed)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(math.ceil(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def segment_record(result: Segmentation, written: Sequence[Path], seconds: float) -> dict:
    """A record's fields from a :class:`cmmas.segment.Segmentation` and the files written for it
    (:func:`cmmas.outputs.write_segmentation`'s): seconds, QC flag and the alignment's scalar QC
    values, fusion, atlases, each structure's millilitres and mean agreement as the volumes file
    holds them (None without the agreement map), with an organ finder each structure's Dice with
    the finder's label (:attr:`cmmas.segment.Segmentation.organ_agreement`), the files (names in the
    scan's folder)."""
    from cmmas.outputs import read_volumes_csv

    [table] = [p for p in written if p.name.endswith("_volumes.csv")]
    volumes = read_volumes_csv(table)  # what was written, not counted again over the scan
    alignment = {k: v for k, v in (result.alignment or {}).items() if isinstance(v, (bool, int, float, str))}
    return {"seconds": round(seconds, 3), "flagged": result.flagged, "alignment": alignment, "fusion": result.fusion,
            "atlases": len(result.atlas_ids), "volumes_ml": {r["name"]: r["millilitres"] for r in volumes},
            "agreement": {r["name"]: _finite(r["mean_agreement"]) for r in volumes},
            "organs": result.organ_agreement or {}, "doubtful": result.doubtful,
            "files": [p.name for p in written]}


def _finite(value: float) -> float | None:
    """JSON has no NaN: a missing value (e.g. no agreement map) is None."""
    return None if value is None or math.isnan(value) else value


def merge(out: str | os.PathLike, scans: Sequence[Scan] | None = None, key: str | None = None
          ) -> tuple[list[dict], list[dict]]:
    """Assemble ``cohort.csv``, ``failures.csv`` and ``cohort.html`` in ``out`` from the scans'
    records (written atomically).

    Args:
        out: the cohort folder.
        scans: the manifest (its order; a scan with no record is a failure, :data:`NOT_RUN`);
            None: every record and failure found in ``out``.
        key: the run's key: a record of other settings is a failure (:data:`OTHER_KEY`); None:
            any record counts.

    Returns:
        The cohort rows and the failure rows written.
    """
    out = Path(out)
    if scans is None:
        scans = [Scan(p.parent.name, Path(str((_read_json(p) or {}).get("path", ""))))
                 for p in sorted(list(out.glob(f"*/{RECORD}")) + list(out.glob(f"*/{FAILURE}")))]
        scans = list({s.id: s for s in scans}.values())
    rows, failures = [], []
    for scan in scans:
        record = _read_json(out / scan.id / RECORD)
        if record is not None and record.get("path") == str(scan.path):
            if key is None or record.get("key") == key:
                rows.append(_cohort_row(record))
                continue
            failures.append({"id": scan.id, "path": str(scan.path), "reason": OTHER_KEY})
            continue
        failure = _read_json(out / scan.id / FAILURE) or {}
        failures.append({"id": scan.id, "path": str(scan.path), "reason": failure.get("reason", NOT_RUN)})
    atomic_write_text(out / COHORT, _csv(rows, ["id", "path"]))
    atomic_write_text(out / FAILURES, _csv(failures, ["id", "path", "reason"]))
    atomic_write_text(out / PAGE, cohort_page(rows, failures, f"cmmas cohort {out.resolve().name}"))
    return rows, failures


def _cohort_row(record: dict) -> dict:
    row = {"id": record["id"], "path": record["path"], **record.get("extra", {}),
           "flagged": record.get("flagged"), "doubtful": " ".join(record.get("doubtful", [])),
           "seconds": record.get("seconds"), "fusion": record.get("fusion"),
           "atlases": record.get("atlases"), "key": record.get("key")}
    row |= {f"{name}_ml": value for name, value in record.get("volumes_ml", {}).items()}
    row |= {f"{name}_agreement": value for name, value in record.get("agreement", {}).items()}
    row |= {f"{name}_finder_dice": value for name, value in record.get("organs", {}).items()}
    row |= {f"qc_{name}": value for name, value in record.get("alignment", {}).items()}
    previews = [name for name in record.get("files", []) if name.endswith("_preview.png")]
    return row | ({"preview": f"{record['id']}/{previews[0]}"} if previews else {})


def _csv(rows: Sequence[dict], first: Sequence[str]) -> str:
    columns = list(dict.fromkeys([*first, *(k for row in rows for k in row)]))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
