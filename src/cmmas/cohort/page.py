"""``cohort.html``: one static page (no server) over a cohort's table: the scans the QC flagged
first, then those that failed, then the others; a row per scan with its preview thumbnail (when
``--preview`` wrote one), the carried columns, volumes per structure, QC values, seconds and a link
to its folder; every column sortable by a click on its header. Plain HTML and a few lines of
script, images loaded lazily, so that 2,000 rows stay readable.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

#: Background of a flagged row and of a failed one.
FLAGGED_COLOUR = "#f8c9c4"
FAILED_COLOUR = "#e9d3f5"

_SCRIPT = """
document.querySelectorAll('th').forEach((th, column) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0];
  const up = th.dataset.order !== 'up';
  th.dataset.order = up ? 'up' : 'down';
  const key = row => row.cells[column]?.dataset.value ?? row.cells[column]?.textContent ?? '';
  const rows = Array.from(body.rows).sort((a, b) => {
    const x = key(a), y = key(b), nx = parseFloat(x), ny = parseFloat(y);
    const order = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
    return up ? order : -order;
  });
  rows.forEach(row => body.appendChild(row));
}));
"""


def _cell(value) -> str:
    text = "" if value is None else str(value)
    try:
        number = float(text)
    except ValueError:
        return f"<td>{html.escape(text)}</td>"
    shown = text if number.is_integer() and "." not in text else f"{number:.4g}"
    return f'<td data-value="{number}">{html.escape(shown)}</td>'


def _flagged(row: dict) -> bool:
    return str(row.get("flagged")).lower() == "true"


def cohort_page(rows: Sequence[dict], failures: Sequence[dict], title: str = "cmmas cohort") -> str:
    """The page's HTML.

    Args:
        rows: ``cohort.csv``'s rows (:func:`cmmas.cohort.batch.merge`), each with ``id`` and
            ``flagged``; a row may carry ``preview`` (the thumbnail's path relative to the page).
        failures: ``failures.csv``'s rows (``id``, ``path``, ``reason``).
        title: the page's title.
    """
    columns = [c for c in dict.fromkeys(k for row in rows for k in row) if c not in ("id", "preview", "path")]
    ordered = sorted(rows, key=lambda row: not _flagged(row))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["preview", "id", "status", *columns])
    lines = []
    for row in ordered[: sum(map(_flagged, ordered))]:
        lines.append(_row(row, columns, "QC flagged", FLAGGED_COLOUR))
    for failure in failures:
        lines.append(f'<tr style="background:{FAILED_COLOUR}"><td></td><td>{html.escape(failure["id"])}</td>'
                     f'<td>failed</td><td colspan="{len(columns)}">{html.escape(failure.get("reason", ""))}</td></tr>')
    for row in ordered[sum(map(_flagged, ordered)):]:
        lines.append(_row(row, columns, "ok", None))
    flagged = sum(map(_flagged, rows))
    summary = (f"{len(rows) + len(failures)} scans: {len(rows)} segmented ({flagged} QC flagged), "
               f"{len(failures)} without a result")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;font-size:13px}"
            "th,td{border:1px solid #ccc;padding:2px 6px;text-align:right}th{cursor:pointer;background:#eee;"
            "position:sticky;top:0}td:nth-child(2),td:nth-child(3){text-align:left}img{height:64px}"
            f"</style></head><body><h1>{html.escape(title)}</h1><p>{html.escape(summary)}; flagged scans first, "
            "then failures; click a column to sort.</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(lines)
            + f"\n</tbody></table><script>{_SCRIPT}</script></body></html>\n")


def _row(row: dict, columns: Sequence[str], status: str, colour: str | None) -> str:
    style = f' style="background:{colour}"' if colour else ""
    scan_id = html.escape(str(row["id"]))
    preview = row.get("preview")
    image = f'<img loading="lazy" src="{html.escape(preview)}" alt="">' if preview else ""
    return (f"<tr{style}><td>{image}</td><td><a href=\"{scan_id}/\">{scan_id}</a></td><td>{status}</td>"
            + "".join(_cell(row.get(c)) for c in columns) + "</tr>")
