"""The project's own plain layout (that of ``shared/data/abdomen-ctmr``)::

    root/labels.json                 {"0": "background", "1": "liver", ...}
    root/ct/<case>_image.nii.gz      one folder per modality (ct, mr; either may be absent)
    root/ct/<case>_label.nii.gz      optional: cases without one are unlabelled targets
    root/mr/...

The case id is ``<case>`` (e.g. ``"ct_00"``); ``.nii`` files are accepted as well.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from cmmas.datasets.base import MODALITIES, Case, Dataset, group_by_modality
from cmmas.errors import DatasetError

_NAME = re.compile(r"^(.+)_(image|label)\.nii(\.gz)?$")
_EXPECTED = "{ct,mr}/<case>_image.nii.gz (+ <case>_label.nii.gz) and a labels.json at the root"


def open_folder(root: Path) -> Dataset:
    """Read ``labels.json`` and list the cases of ``root/ct`` and ``root/mr``.

    Raises:
        DatasetError: no labels.json or an invalid one, no images, a case found twice,
            or a label without its image.
    """
    labels = read_label_table(root / "labels.json")
    cases = []
    for modality in MODALITIES:
        folder = root / modality
        if folder.is_dir():
            cases.extend(_cases_in(folder, modality))
    if not cases:
        raise DatasetError(root, f"no images found; expected {_EXPECTED}")
    return Dataset("folder", root, labels, group_by_modality(cases))


def read_label_table(path: Path) -> dict[int, str]:
    """Parse a ``{"code": "name"}`` JSON table into ``{code: name}`` without background (0).

    Raises:
        DatasetError: file missing, not JSON, not such a table, or no non-zero code.
    """
    if not path.is_file():
        raise DatasetError(path, f"label table not found; expected {_EXPECTED}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(path, f"not a readable JSON file ({err})") from None
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise DatasetError(path, 'expected a JSON object {"code": "name", ...}, e.g. {"0": "background", "1": "liver"}')
    try:
        table = {int(code): name for code, name in raw.items()}
    except ValueError:
        raise DatasetError(path, f"label codes must be integers, got {sorted(raw)}") from None
    if any(code < 0 for code in table):
        raise DatasetError(path, f"label codes must be non-negative, got {sorted(table)}")
    table.pop(0, None)
    if not table:
        raise DatasetError(path, "the table names no label besides background (0)")
    return dict(sorted(table.items()))


def _cases_in(folder: Path, modality: str) -> list[Case]:
    images: dict[str, Path] = {}
    labels: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        match = _NAME.match(path.name)
        if match is None or path.name.startswith(".") or not path.is_file():
            continue
        case_id, kind, _ = match.groups()
        found = images if kind == "image" else labels
        if case_id in found:
            raise DatasetError(path, f"case {case_id} found twice (also {found[case_id].name})")
        found[case_id] = path
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise DatasetError(labels[orphans[0]], f"label without an image for case(s) {orphans}")
    return [Case(case_id, modality, path, labels.get(case_id)) for case_id, path in images.items()]
