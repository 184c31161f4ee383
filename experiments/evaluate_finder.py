"""Score an organ finder on its own: the Dice per organ of the labels it finds in a fold's test
scans (the target modality's --fold cases), each against the scan's label resampled
(nearest-neighbour) onto the finder's grid. The finder is a baseline users will ask about next
to the whole pipeline, and the QC's second opinion.

Prints one line per scan and the mean per organ; --out gets evaluate_finder.json ({"provenance",
"command", "rows": one per scan with its Dice per organ, mean and seconds}).

Example:
  python experiments/evaluate_finder.py --finder runs/finder-ct/finder.keras \
      --data ../shared/data/abdomen-ctmr --fold 1 --target_modality mr --out runs/finder-ct/eval
"""

from __future__ import annotations

import time

from absl import app, flags

from cmmas.scripts import absl_main, write_bench_json

FLAGS = flags.FLAGS

flags.DEFINE_string("finder", None, "The organ finder (.keras, with its model card).")
flags.DEFINE_string("data", None, "Data-set root folder.")
flags.DEFINE_enum("layout", "folder", ["mmwhs", "chaos", "folder"], "On-disk layout of --data.")
flags.DEFINE_integer("fold", None, "1-based cross-validation fold: its target-modality cases are scored.",
                     lower_bound=1)
flags.DEFINE_integer("n_folds", 4, "Number of folds.", lower_bound=2)
flags.DEFINE_enum("target_modality", "mr", ["ct", "mr"], "Modality of the scans to score.")
flags.DEFINE_string("out", None, "Folder for evaluate_finder.json (default: print only).")


def _run() -> int:
    from pathlib import Path

    import numpy as np

    from cmmas import preprocess
    from cmmas.datasets import load_case, open_dataset
    from cmmas.datasets.splits import fold_split
    from cmmas.errors import ModelError
    from cmmas.metrics import dice
    from cmmas.nn import model_card

    card = model_card.read_card(FLAGS.finder)
    if card is None or card.kind != "finder":
        raise ModelError(FLAGS.finder, "not an organ finder with its model card (experiments/train_finder.py)")
    dataset = open_dataset(FLAGS.data, FLAGS.layout)
    cases = [c for c in fold_split(dataset.of(FLAGS.target_modality), FLAGS.fold, FLAGS.n_folds)[0]
             if c.label_path is not None]

    from cmmas.align import finder
    from cmmas.nn import training

    model = training.load_model(FLAGS.finder, "finder")
    codes = [0, *sorted(card.labels)]
    rows = []
    for case in cases:
        image, label = load_case(case, dict(dataset.labels))
        start = time.perf_counter()
        found = finder.find_organs(model, image, card.align_spacing_mm, codes)
        seconds = time.perf_counter() - start
        truth = preprocess.resample(label, geometry=found.geometry, kind="label").array
        got = found.label().array
        scores = {card.labels[c]: round(dice(got == c, truth == c), 4) for c in codes[1:]}
        rows.append({"case": case.id, **scores, "mean": round(float(np.mean(list(scores.values()))), 4),
                     "seconds": round(seconds, 3)})
        print(f"evaluate_finder: {case.id}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
              + f"; mean {rows[-1]['mean']:.3f} ({seconds:.2f} s)")
    names = [card.labels[c] for c in codes[1:]]
    print("evaluate_finder: mean " + ", ".join(f"{n} {np.mean([r[n] for r in rows]):.3f}" for n in names)
          + f"; mean {np.mean([r['mean'] for r in rows]):.3f}, worst scan {min(r['mean'] for r in rows):.3f}")
    if FLAGS.out:
        path = write_bench_json(Path(FLAGS.out) / "evaluate_finder.json", rows, models={"finder": FLAGS.finder},
                                data=FLAGS.data, cases=[c.id for c in cases])
        print(f"evaluate_finder: {path}")
    return 0


if __name__ == "__main__":
    flags.mark_flags_as_required(["finder", "data", "fold"])
    app.run(absl_main("evaluate_finder", _run))
