"""Rebuild the generated tables of docs/results.md and the README from the records under runs/
(cmmas.evaluate.results_page): each table between its markers, with the commit and command of its
runs, "(current)" when no code changed since, or "not run at this commit"; and the labelled-scan
curve's figure (docs/figures/labelled_curve.png) where its runs (make reproduce-abdomen LABELLED=K)
exist.

Example (what `make results` runs):
  python experiments/make_results.py --runs=runs --results=docs/results.md --readme=README.md
  python experiments/make_results.py --check     # only report which tables are out of date
"""

from __future__ import annotations

from absl import app, flags

from cmmas.scripts import absl_main

FLAGS = flags.FLAGS

flags.DEFINE_string("runs", "runs", "Folder of the runs (evaluations' summary.json, bench JSON files).")
flags.DEFINE_string("results", "docs/results.md", "The results page.")
flags.DEFINE_string("readme", "README.md", "The README (its headline table).")
flags.DEFINE_string("figures", "docs/figures", "Folder of the generated figures (the labelled curve).")
flags.DEFINE_bool("check", False, "Write nothing; exit 1 when a page's tables differ from the runs.")


def _run() -> int:
    from pathlib import Path

    from cmmas.evaluate.plots import labelled_curve
    from cmmas.evaluate.results_page import labelled_curve_points, regenerate, statuses
    from cmmas.io import atomic_write_text

    stale = []
    for page, (old, new) in regenerate(FLAGS.runs, [FLAGS.results, FLAGS.readme]).items():
        for name, source in statuses(new).items():
            print(f"make_results: {page} [{name}]: {source}")
        if old == new:
            print(f"make_results: {page}: up to date")
        elif FLAGS.check:
            stale.append(page)
            print(f"make_results: {page}: its tables differ from {FLAGS.runs}/ (run make results)")
        else:
            atomic_write_text(page, new)
            print(f"make_results: {page}: tables rebuilt from {FLAGS.runs}/")
    points = labelled_curve_points(FLAGS.runs)
    if points and not FLAGS.check:
        print(f"make_results: {labelled_curve(points, Path(FLAGS.figures) / 'labelled_curve.png')}: "
              f"the labelled curve from {FLAGS.runs}/")
    return 1 if stale else 0


if __name__ == "__main__":
    app.run(absl_main("make_results", _run))
