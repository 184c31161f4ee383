"""A cohort's manifest: a CSV with one scan per row, ``id`` and ``path`` columns (any others are
carried through to the cohort table), and its shards.

An id names the scan's output folder, so it is a plain name (letters, digits, ``.``, ``_``,
``-``; not starting with a dot) and unique in the manifest. A relative path is read relative to
the manifest's folder and kept absolute (the same manifest given another way names the same scans;
Dask workers read them from their own working folder).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
from collections.abc import Sequence
from pathlib import Path

from cmmas.errors import CmmasError

#: The columns every manifest has.
REQUIRED = ("id", "path")

_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


@dataclasses.dataclass(frozen=True)
class Scan:
    """One manifest row: the scan's id, its file or DICOM folder, and the other columns."""

    id: str
    path: Path
    extra: dict[str, str] = dataclasses.field(default_factory=dict)


def read_manifest(path: str | os.PathLike) -> list[Scan]:
    """The scans of a manifest, in its order.

    Raises:
        CmmasError: the file is missing or not a CSV with ``id`` and ``path`` columns, a row lacks
            either, an id is not a plain name or repeats, or there is no row (naming the file and
            the row).
    """
    path = Path(path)
    if not path.is_file():
        raise CmmasError(path, "manifest not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            missing = [c for c in REQUIRED if c not in columns]
            if missing:
                raise CmmasError(path, f"manifest lacks the column(s) {', '.join(missing)} (found: "
                                       f"{', '.join(columns) or 'none'}); it needs id,path")
            raw = list(reader)
    except (UnicodeDecodeError, csv.Error) as err:
        raise CmmasError(path, f"not a readable CSV manifest ({err})") from None
    for number, row in enumerate(raw, start=2):
        if None in row:
            raise CmmasError(path, f"row {number} has more fields than the header's {len(columns)}")
    rows = [{k.strip(): (v or "").strip() for k, v in row.items()} for row in raw]
    folder = path.resolve().parent
    scans, seen = [], {}
    for number, row in enumerate(rows, start=2):
        scan_id, scan_path = row.get("id", ""), row.get("path", "")
        if not scan_id or not scan_path:
            raise CmmasError(path, f"row {number} lacks its {'id' if not scan_id else 'path'}")
        if not _ID.fullmatch(scan_id):
            raise CmmasError(path, f"row {number}: id {scan_id!r} is not a plain name (letters, digits, '.', '_', '-')")
        if scan_id in seen:
            raise CmmasError(path, f"row {number}: id {scan_id!r} repeats row {seen[scan_id]}")
        seen[scan_id] = number
        location = Path(scan_path).expanduser()
        extra = {k: v for k, v in row.items() if k not in REQUIRED}
        scans.append(Scan(scan_id, location if location.is_absolute() else folder / location, extra))
    if not scans:
        raise CmmasError(path, "manifest has no scan")
    return scans


def parse_shard(text: str, flag: str = "--shard") -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N`` (a SLURM array's task id over its size, or a
    cross-fitting fold of train_reg's ``--withhold_fold``).

    Raises:
        CmmasError: anything else (naming ``flag``).
    """
    found = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not found or not int(found.group(1)) < int(found.group(2)):
        raise CmmasError(flag, f"expected I/N with 0 <= I < N (e.g. 3/100), got {text!r}")
    return int(found.group(1)), int(found.group(2))


def shard(scans: Sequence[Scan], index: int, count: int) -> list[Scan]:
    """Every ``count``-th scan from ``index`` (the shards of a manifest partition it)."""
    return list(scans[index::count])
