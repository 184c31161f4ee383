"""notebooks/results.ipynb runs headless (nbclient) on a small folder laid out like a real run,
and on an empty one; the registration figures of cmmas.evaluate.plots it draws."""

import struct
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from cmmas.align import prepare
from cmmas.evaluate import report as reports
from cmmas.evaluate import scoring
from cmmas.evaluate import plots
from cmmas.datasets import open_dataset
from cmmas.datasets.loading import load_case
from cmmas.datasets.mmwhs import MMWHS_LABELS
from cmmas.errors import GeometryError
from cmmas.io import write_image
from phantom_data import write_phantom_folder

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "results.ipynb"
SHAPE = (24, 24, 24)
SPACING = (4.0, 4.0, 4.0)
STRUCTURES = {500: MMWHS_LABELS[500], 205: MMWHS_LABELS[205]}
DIRECTION = "ct->mr"


def _png_size(path):
    with open(path, "rb") as handle:
        head = handle.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """RUN/ct2mr/fold1/{atlas_set, reg/model.keras, eval/} as the chain writes them (untrained network)."""
    from cmmas.nn.networks import build_biregnet
    from cmmas.nn.training import save_model

    root = tmp_path_factory.mktemp("run")
    subjects = {f"{modality}_{seed:02d}": seed for modality, seeds in (("ct", (0, 1)), ("mr", (10, 11)))
                for seed in seeds}
    dataset = open_dataset(write_phantom_folder(root / "data", subjects), "folder")
    atlases, targets = list(dataset.of("ct")), list(dataset.of("mr"))
    fold = root / "ct2mr" / "fold1"
    space = prepare.prepare(atlases + targets, dataset.labels, fold / "atlas_set", SHAPE, SPACING,
                              roi_ids=[c.id for c in atlases], roles={c.id: "test" for c in targets}, progress=False)
    (fold / "reg").mkdir(parents=True)
    save_model(build_biregnet(SHAPE, c0=4, levels=2), fold / "reg" / "model.keras")
    rows = []
    for shift, case in enumerate(targets, start=1):
        _, truth = load_case(case)
        predictions = {"mv": np.roll(truth.array, shift, axis=2), "lwv": truth.array}
        for method, prediction in predictions.items():
            write_image(truth.with_array(prediction), fold / "eval" / case.id / f"pred_{method}.nii.gz")
            rows += scoring.score(prediction, truth.array, STRUCTURES, truth.spacing_zyx,
                                     method=method, case=case.id, direction=DIRECTION, seconds=0.1)
    timings = [{"case": c.id, "direction": DIRECTION, "step": "fusion", "method": m, "seconds": 0.1}
               for c in targets for m in ("mv", "lwv")]
    reports.write_report(rows, fold / "eval", timings)
    best = plots.best_median_worst(rows, method="mv", direction=DIRECTION)["best"]
    plots.overlay(space.image(best), space.label(best), {}, fold / "eval" / f"overlay_ct2mr_best_{best}.png")
    return root, rows, [c.id for c in targets]


def _execute(folder, monkeypatch):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("CMMAS_RESULTS", str(folder))
    client = NotebookClient(notebook, kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": str(folder)}})
    client.execute()
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def _outputs(cell, kind):
    """Texts of one output type of a cell: "stdout", "text/markdown" or "image/png"."""
    if kind == "stdout":
        return [o["text"] for o in cell.outputs if o.output_type == "stream" and o.name == "stdout"]
    return [o["data"][kind] for o in cell.outputs if o.output_type in ("display_data", "execute_result") and kind in o["data"]]


def _cell(cells, source_start):
    found = [c for c in cells if c.source.startswith(source_start)]
    assert len(found) == 1, source_start
    return found[0]


@pytest.fixture(scope="module")
def executed(run_folder):
    with pytest.MonkeyPatch.context() as monkeypatch:
        return _execute(run_folder[0], monkeypatch)


@pytest.mark.slow
def test_every_cell_runs_without_error(executed):
    assert all(cell.execution_count for cell in executed)
    assert not [o for cell in executed for o in cell.outputs if o.output_type == "error"]


@pytest.mark.slow
def test_tables_read_what_evaluate_wrote(executed, run_folder):
    _, rows, targets = run_folder
    load = _cell(executed, "aggregated =")
    assert f"{len(rows)} rows from 1 file(s); directions ['ct->mr']; methods ['mv', 'lwv']" in "".join(_outputs(load, "stdout"))
    (table,) = _outputs(_cell(executed, "if rows:"), "text/markdown")
    assert f"**ct->mr — Dice, mean ± std over {len(targets)} target(s)**" in table
    assert "**ct->mr — HD95 (mm)" in table and "Wall time" in table
    lwv = next(line for line in table.splitlines() if line.startswith("| lwv |"))
    assert lwv.count("1.000 ± 0.000") == len(STRUCTURES) + 1
    mv = reports.summarize(rows)["metrics"][DIRECTION]["mv"][STRUCTURES[500]]["dice"]["mean"]
    assert f"{mv:.3f}" in next(line for line in table.splitlines() if line.startswith("| mv |"))


@pytest.mark.slow
def test_box_plots_per_metric(executed):
    assert len(_outputs(_cell(executed, "for direction in directions:"), "image/png")) == 2


@pytest.mark.slow
def test_registration_panel_is_drawn_from_the_atlas_set_and_model(executed, run_folder):
    _, _, targets = run_folder
    cell = _cell(executed, "runs = ")
    text = "".join(_outputs(cell, "stdout"))
    assert "ct2mr/fold1: ct_0" in text and f"-> {targets[0]}" in text
    assert "'folding_percent': 0.0" in text  # an untrained BiRegNet returns zero fields
    assert len(_outputs(cell, "image/png")) == 1


@pytest.mark.slow
def test_fusion_figures(executed):
    overlays = _cell(executed, "overlays = ")
    assert len(_outputs(overlays, "image/png")) == 1
    assert "overlay_ct2mr_best_" in "".join(_outputs(overlays, "text/markdown"))
    predictions = _cell(executed, "from cmmas.align.atlas_set import Manifest")
    assert len(_outputs(predictions, "image/png")) == 2  # best and worst of two targets (median = best)


def test_missing_pieces_are_reported_not_raised(tmp_path, monkeypatch):
    cells = _execute(tmp_path, monkeypatch)
    assert not [o for cell in cells for o in cell.outputs if o.output_type == "error"]
    text = "".join(t for cell in cells for t in _outputs(cell, "stdout"))
    for message in ("no results.csv found", "no results to tabulate", "no results to plot", "no reg model found",
                    "no overlay figures found", "no pred_<method>.nii.gz with a ground truth found"):
        assert message in text
    assert not [o for cell in cells for o in _outputs(cell, "image/png")]


def test_displaced_grid_lines():
    zero = plots.displaced_grid_lines(np.zeros((9, 7, 2)), step=4)
    assert len(zero) == 3 + 3  # rows 0, 4, 8; columns 0, 4, 6
    np.testing.assert_array_equal(zero[1], np.stack([np.full(7, 4.0), np.arange(7.0)], axis=-1))
    np.testing.assert_array_equal(zero[-1], np.stack([np.arange(9.0), np.full(9, 6.0)], axis=-1))
    shifted = plots.displaced_grid_lines(np.broadcast_to([0.5, -1.0], (9, 7, 2)), step=4)
    for before, after in zip(zero, shifted):
        np.testing.assert_allclose(after - before, np.broadcast_to([0.5, -1.0], before.shape))
    with pytest.raises(GeometryError):
        plots.displaced_grid_lines(np.zeros((9, 7, 3)))


def test_registration_panel_draws_a_folding_field(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.random(SHAPE).astype(np.float32)
    label = np.zeros(SHAPE, np.int32)
    label[8:16, 8:16, 8:16] = 500
    x = np.arange(SHAPE[2])
    ddf = np.zeros(SHAPE + (3,))
    ddf[..., 2] = np.where(np.abs(x - 12) < 3, -2.0 * (x - 12), 0.0)  # det J = -1 in a slab: folds
    out = plots.registration_panel(image, image, image, ddf, tmp_path / "r.png", label, label, label,
                                   axis=1, spacing_zyx=(2.0, 1.0, 1.0), title="t")
    width, height = _png_size(out)
    assert width > 3 * height
    with pytest.raises(GeometryError, match="displacement field"):
        plots.registration_panel(image, image, image, ddf[..., :2], tmp_path / "bad.png")
    with pytest.raises(GeometryError, match="target label"):
        plots.registration_panel(image, image, image, ddf, tmp_path / "bad.png", target_label=label[:-1])
    with pytest.raises(GeometryError, match="slice 30"):
        plots.registration_panel(image, image, image, ddf, tmp_path / "bad.png", index=30)
