"""Fusion scoring and the report (cmmas.evaluate), figures (cmmas.evaluate.plots), experiments/evaluate.py,
and the classical pipeline end to end on two real abdomen cases."""

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from cmmas.align import pairwise
from cmmas.evaluate import report as reports
from cmmas.evaluate import runs
from cmmas.evaluate import scoring
from cmmas.fuse import registry
from cmmas.evaluate import plots
from cmmas.datasets import open_dataset
from cmmas.errors import CmmasError, GeometryError
from cmmas.io import Geometry, Image, read_label, write_image
from cmmas.metrics import dice
from phantom_data import numbered, write_phantom_folder
from scripts import run_experiment

REPO = Path(__file__).resolve().parents[2]
LABELS = {1: "alpha", 2: "beta", 3: "gamma"}
SHAPE = (24, 24, 24)
SPACING = (2.0, 2.0, 2.0)


def _truth():
    z, y, x = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    label = np.zeros(SHAPE, np.int32)
    label[(z - 8) ** 2 + (y - 9) ** 2 + (x - 8) ** 2 <= 30] = 1
    label[(z - 15) ** 2 + (y - 14) ** 2 + (x - 15) ** 2 <= 20] = 2
    label[(abs(z - 12) <= 3) & (abs(y - 5) <= 2) & (abs(x - 17) <= 3)] = 3
    return label


def _image(label, seed=0):
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(np.asarray([10.0, 80.0, 150.0, 220.0])[label], 1.0) + rng.normal(0, 2, label.shape)


def _noisy_atlases(truth, n=5, seed=0):
    """Atlases = the truth with 20% of the voxels near the structures relabelled at random (independently)."""
    rng = np.random.default_rng(seed)
    near = ndimage.binary_dilation(truth > 0, iterations=2)
    atlases = []
    for _ in range(n):
        flip = near & (rng.random(truth.shape) < 0.2)
        atlases.append(np.where(flip, rng.integers(0, 4, truth.shape), truth).astype(np.int32))
    return np.stack(atlases)


def _by(rows, method):
    return {r["name"]: r for r in rows if r["method"] == method}


def test_identical_atlases_score_dice_one_with_every_method():
    truth = _truth()
    image = _image(truth)
    atlases = np.stack([truth] * 3)
    scored = scoring.fuse_and_score(
        truth, atlases, np.stack([image] * 3), image, LABELS, SPACING,
        methods=("mv", "staple", "lwv", "jlf"), case="c1", direction="ct->mr",
    )
    methods = ("mv", "staple", "lwv", "jlf") + scoring.BOUNDS
    assert [r["method"] for r in scored.rows] == [m for m in methods for _ in LABELS]
    for row in scored.rows:
        assert row["dice"] == pytest.approx(1.0) and row["hd95"] == pytest.approx(0.0), row
        assert row["case"] == "c1" and row["direction"] == "ct->mr"
        assert tuple(row) == scoring.COLUMNS
    assert set(scored.seconds) == {"mv", "staple", "lwv", "jlf"}
    assert all(s >= 0 for s in scored.seconds.values())
    assert all(_by(scored.rows, m)["alpha"]["seconds"] == scored.seconds[m] for m in scored.seconds)
    for prediction in scored.predictions.values():
        np.testing.assert_array_equal(prediction, truth)


def test_oracle_beats_majority_vote_which_beats_a_single_atlas():
    truth = _truth()
    atlases = _noisy_atlases(truth)
    scored = scoring.fuse_and_score(truth, atlases, None, None, LABELS, SPACING, methods=("mv",))
    oracle, mv, single = (_by(scored.rows, m) for m in ("oracle", "mv", "single-atlas mean"))
    for name in LABELS.values():
        assert oracle[name]["dice"] >= mv[name]["dice"] >= single[name]["dice"]
        assert oracle[name]["dice"] > single[name]["dice"] + 0.05
    assert single["alpha"]["dice"] == pytest.approx(np.mean([dice(a == 1, truth == 1) for a in atlases]))
    assert np.isnan(single["alpha"]["seconds"])


def test_oracle_label_takes_the_truth_where_an_atlas_has_it():
    truth = np.array([1, 2, 0, 3]).reshape(1, 1, 4)
    atlases = np.array([[1, 0, 0, 0], [0, 0, 2, 1]]).reshape(2, 1, 1, 4)
    majority = np.array([1, 0, 2, 0]).reshape(1, 1, 4)
    np.testing.assert_array_equal(scoring.oracle_label(atlases, truth, majority).ravel(), [1, 0, 0, 0])


def test_oracle10_needs_a_tenth_of_the_atlases_to_hold_the_truth():
    truth = _truth()
    wrong = np.where(truth == 1, 0, truth)  # structure 1 lost
    rows = {r["method"]: r for r in scoring.bound_rows(np.stack([truth] + [wrong] * 19), truth, LABELS, SPACING)
            if r["name"] == "alpha"}
    assert rows["oracle"]["dice"] == pytest.approx(1.0)  # one atlas of 20 holds it
    assert rows["oracle10"]["dice"] == pytest.approx(0.0)  # two are needed
    rows = {r["method"]: r for r in scoring.bound_rows(np.stack([truth] * 2 + [wrong] * 18), truth, LABELS, SPACING)
            if r["name"] == "alpha"}
    assert rows["oracle10"]["dice"] == pytest.approx(1.0)


def test_extra_predictions_are_scored_and_unlabelled_targets_only_fused():
    truth = _truth()
    atlases = _noisy_atlases(truth, n=3)
    scored = scoring.fuse_and_score(
        truth, atlases, None, None, LABELS, SPACING, methods=("mv",), extra={"perfect": truth}, bounds=False
    )
    assert {r["method"] for r in scored.rows} == {"mv", "perfect"}
    assert all(r["dice"] == 1.0 for r in scored.rows if r["method"] == "perfect")
    assert np.isnan(_by(scored.rows, "perfect")["alpha"]["seconds"])
    blind = scoring.fuse_and_score(None, atlases, None, None, LABELS, SPACING, methods=("mv", "staple"))
    assert blind.rows == [] and set(blind.predictions) == {"mv", "staple"}
    with pytest.raises(CmmasError, match="clashes"):
        scoring.fuse_and_score(truth, atlases, None, None, LABELS, SPACING, methods=("mv",), extra={"mv": truth})
    with pytest.raises(CmmasError, match="unknown fusion 'vote'"):
        scoring.fuse_and_score(truth, atlases, None, None, LABELS, SPACING, methods=("vote",))


def test_cropped_metrics_equal_whole_volume_metrics():
    from cmmas.metrics import evaluate_labels

    truth = np.pad(_truth(), ((0, 8), (3, 0), (0, 0)))
    truth[:, :, 0] = np.where(truth[:, :, 1] == 1, 1, 0)  # a structure touching the array's edge
    pred = np.roll(_noisy_atlases(truth, n=1)[0], 2, axis=1)
    spacing = (1.0, 2.0, 3.0)
    for got, want in zip(scoring.evaluate_cropped(pred, truth, LABELS, spacing),
                         evaluate_labels(pred, truth, LABELS, spacing)):
        assert got == pytest.approx(want)


def test_presets_resolve_with_overrides():
    assert registry.resolve("jlf") == ("jlf", {"rad": 1, "r_search": 1})
    assert registry.resolve("jlf", {"rad": 2}) == ("jlf", {"rad": 2, "r_search": 1})
    assert registry.resolve("lwv") == ("lwv", {"similarity": "mi"})


def _rows():
    """Two cases x two methods x two structures; case b's beta prediction is empty (hd95 nan)."""
    rows = []
    values = {("a", "mv"): (0.9, 0.8), ("b", "mv"): (0.7, 0.0), ("a", "jlf"): (0.95, 0.85), ("b", "jlf"): (0.75, 0.6)}
    for (case, method), dices in values.items():
        for (code, name), d in zip(LABELS.items(), dices):
            rows.append({
                "case": case, "direction": "ct->mr", "method": method, "label": code, "name": name,
                "dice": d, "jaccard": d / (2 - d), "hd95": float("nan") if d == 0 else 10 * (1 - d),
                "assd": float("nan") if d == 0 else 3 * (1 - d), "seconds": 1.5,
                "volume_pred_ml": 1.0, "volume_true_ml": 1.0,
            })
    return rows


def test_write_report_files_summary_and_table(tmp_path):
    rows = _rows()
    timings = [
        {"case": "a", "direction": "ct->mr", "step": "registration", "method": "affine", "seconds": 10.0},
        {"case": "a", "direction": "ct->mr", "step": "registration", "method": "affine", "seconds": 12.0},
        {"case": "a", "direction": "ct->mr", "step": "fusion", "method": "mv", "seconds": 0.5},
    ]
    report = reports.write_report(rows, tmp_path / "report", timings)
    back = reports.read_results(report.results_csv)
    assert len(back) == len(rows)
    for got, want in zip(back, rows):
        for key in scoring.COLUMNS:
            if isinstance(want[key], float) and np.isnan(want[key]):
                assert np.isnan(got[key])
            else:
                assert got[key] == want[key]
    summary = json.loads(report.summary_json.read_text())
    mv = summary["metrics"]["ct->mr"]["mv"]
    assert mv["alpha"]["dice"]["mean"] == pytest.approx(0.8)
    assert mv["alpha"]["dice"]["std"] == pytest.approx(np.std([0.9, 0.7], ddof=1))
    assert mv["beta"]["hd95"]["n"] == 1 and mv["beta"]["hd95"]["n_missing"] == 1
    assert mv["mean"]["dice"]["mean"] == pytest.approx(np.mean([0.85, 0.35]))
    assert (mv["mean"]["dice"]["min"], mv["mean"]["dice"]["max"]) == pytest.approx((0.35, 0.85))
    assert summary["seconds"]["ct->mr"]["registration"]["affine"]["mean"] == pytest.approx(11.0)
    assert summary["n_cases"] == {"ct->mr": 2}
    table = report.table
    assert "| mv | 0.800 ± 0.141 | 0.400 ± 0.566 | 0.600 ± 0.354 | 0.350 |" in table
    assert "| method | alpha | beta | mean | worst target |" in table  # Dice: the worst per-case mean
    assert "| method | alpha | beta | mean |" in table  # HD95 and ASSD: no worst column
    assert "(1/2)" in table and "| ct->mr | registration | affine | 11.00 ± 1.41 | 2 |" in table
    assert report.timings_csv.read_text().splitlines()[0] == ",".join(reports.TIMING_COLUMNS)
    with pytest.raises(CmmasError, match="no results"):
        reports.write_report([], tmp_path)


def _png_size(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_boxplot_and_overlay_write_pngs(tmp_path):
    import matplotlib.pyplot as plt

    width, height = _png_size(plots.boxplot(_rows(), "dice", tmp_path / "box.png"))
    assert width > 300 and height > 200
    truth = _truth()
    image = Image(_image(truth).astype(np.float32), Geometry.identity(SHAPE, SPACING))
    out = plots.overlay(image, truth, {"mv": np.roll(truth, 2, axis=0), "jlf": truth}, tmp_path / "o.png", title="t")
    width, height = _png_size(out)
    assert width > 600 and height > 600
    one, _ = _png_size(plots.overlay(image, truth, {}, tmp_path / "truth_only.png"))
    assert width > 2.5 * one  # a column per method: truth, mv, jlf
    assert plt.get_fignums() == []
    with pytest.raises(GeometryError, match="differs from the image"):
        plots.overlay(image, truth, {"mv": truth[:-1]}, tmp_path / "bad.png")
    with pytest.raises(CmmasError, match="no finite"):
        plots.boxplot([dict(r, dice=float("nan")) for r in _rows()], "dice", tmp_path / "none.png")


def test_case_ranking():
    rows = _rows()
    assert plots.best_median_worst(rows, method="jlf") == {"best": "a", "median": "a", "worst": "b"}
    extra = [dict(r, case="c", dice=r["dice"] - 0.05) for r in rows if r["case"] == "a"]
    assert plots.best_median_worst(rows + extra, method="mv") == {"best": "a", "median": "c", "worst": "b"}
    ranked_by_distance = plots.best_median_worst(rows, method="jlf", metric="hd95")
    assert ranked_by_distance["best"] == "a"
    with pytest.raises(CmmasError, match="no finite dice of method 'staple'"):
        plots.best_median_worst(rows, method="staple")


# ----------------------------------------------------------------------------- the script


def _evaluate(*args, timeout=300):
    return run_experiment("evaluate", *args, timeout=timeout)


@pytest.fixture(scope="module")
def phantom_pairs(tmp_path_factory):
    """Two phantom CT atlases affinely aligned to one phantom MR target (32^3), folder layout."""
    root = write_phantom_folder(tmp_path_factory.mktemp("phantom"), {"ct_1": 10, "ct_2": 11, "mr_1": 15}, shape=32)
    data = open_dataset(root, "folder")
    out = tmp_path_factory.mktemp("pairs")
    pairwise.prealign_pairs(
        [data.case("ct_1"), data.case("ct_2")], data.case("mr_1"), data.labels, out, fast=True, progress=False
    )
    return out


def test_script_help_lists_the_flags():
    done = _evaluate("--help", timeout=60)
    assert done.returncode in (0, 1) and not done.stderr  # absl's --help exits with 1
    for flag in ("--pairs", "--space", "--aggregate", "--reg_model", "--fusion_model", "--atlas_modality",
                 "--methods", "--predictions", "--out", "--jlf_rad"):
        assert flag in done.stdout


@pytest.mark.slow
def test_script_writes_report_predictions_and_figures(phantom_pairs, tmp_path):
    other = tmp_path / "other" / "mr_1"
    truth = read_label(phantom_pairs / "mr_1" / "target_label.nii.gz")
    write_image(truth, other / "pred_perfect.nii.gz")
    out = tmp_path / "eval"
    done = _evaluate("--pairs", str(phantom_pairs), "--methods", "mv,staple", "--predictions", str(tmp_path / "other"),
                     "--out", str(out), "--noprogress")
    assert done.returncode == 0, done.stderr
    assert "| method |" in done.stdout and "| mv |" in done.stdout and "| perfect |" in done.stdout
    rows = reports.read_results(out / "results.csv")
    n_structures = len(truth_codes := set(np.unique(truth.array)) - {0})
    assert n_structures >= 1
    methods = {"mv", "staple", "perfect", "single-atlas mean", "oracle", "oracle10"}
    assert {r["method"] for r in rows} == methods and len(rows) == 7 * len(methods)
    assert all(r["dice"] == 1.0 for r in rows if r["method"] == "perfect" and r["label"] in truth_codes)
    for method in ("mv", "staple"):
        pred = read_label(phantom_pairs / "mr_1" / f"pred_{method}.nii.gz", like=truth)
        assert pred.array.shape == truth.shape
    assert (out / "summary.json").is_file() and (out / "timings.csv").is_file()
    figures = sorted(p.name for p in out.glob("*.png"))
    assert figures == ["boxplot_dice.png", "boxplot_hd95.png", "overlay_ct2mr_best-median-worst_mr_1.png"]
    missing = _evaluate("--pairs", str(tmp_path / "nowhere"), "--out", str(out))
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1].startswith("evaluate: ") and "nowhere" in missing.stderr


# ----------------------------------------------------------------------------- a prepared space

SPACE_SHAPE = (24, 24, 24)
STRUCTURES = 7  # the phantom's MM-WHS structures


@pytest.fixture(scope="module")
def space_run(tmp_path_factory):
    """A tiny prepared space (3 CT atlases, 1 MR training case, 1 held-out MR target at 24^3, 4 mm)
    with an untrained BiRegNet (zero fields: identity warps) and an untrained SimNet."""
    from cmmas.align import prepare
    from cmmas.nn import training
    from cmmas.nn.networks import build_biregnet, build_simnet

    root = tmp_path_factory.mktemp("space")
    data = write_phantom_folder(root / "data", {**numbered("ct", (0, 1, 2)), **numbered("mr", (10, 11))})
    dataset = open_dataset(data, "folder")
    cases = list(dataset.of("ct")) + list(dataset.of("mr"))
    space = prepare.prepare(cases, dict(dataset.labels), root / "space", SPACE_SHAPE, (4.0, 4.0, 4.0),
                              roi_ids=[c.id for c in dataset.of("ct")], roles={"mr_01": "test"}, progress=False)
    reg = training.save_model(build_biregnet(SPACE_SHAPE, c0=4, levels=2), root / "reg.keras")
    sim = training.save_model(build_simnet(SPACE_SHAPE, n_label_channels=8, c0=4, levels=2), root / "simnet.keras")
    return space, reg, sim, data


def _metrics(rows, method):
    return {r["name"]: [r[m] for m in scoring.METRICS + ("volume_pred_ml", "volume_true_ml")]
            for r in rows if r["method"] == method}


def test_space_evaluation_scores_every_method_on_the_original_grid(space_run, tmp_path):
    from cmmas.io import read_image
    from cmmas.metrics import jacobian_stats

    space, reg, sim, data = space_run
    out = tmp_path / "eval"
    report = runs.evaluate_atlas_set(space, reg, sim, out, methods=("mv", "staple"), progress=False)
    rows = reports.read_results(report.results_csv)
    methods = ["affine+mv", "mv", "staple", "simnet", "single-atlas mean", "oracle", "oracle10"]
    assert [r["method"] for r in rows] == [m for m in methods for _ in range(STRUCTURES)]
    assert {(r["case"], r["direction"]) for r in rows} == {("mr_01", "ct->mr")}
    # An untrained BiRegNet returns zero fields: the warped atlases are the pre-aligned ones.
    mv = _metrics(rows, "mv")
    np.testing.assert_array_equal(np.array(list(_metrics(rows, "affine+mv").values())), np.array(list(mv.values())))
    # An untrained SimNet gives every atlas the same similarity: its weighted vote is the majority vote.
    np.testing.assert_array_equal(np.array(list(_metrics(rows, "simnet").values())), np.array(list(mv.values())))
    for name, values in _metrics(rows, "oracle").items():
        assert values[0] >= mv[name][0]
    assert _metrics(rows, "oracle10") == _metrics(rows, "oracle")  # the same with 10 atlases or fewer
    assert np.mean([v[0] for v in mv.values()]) > 0.3

    # Predictions lie on the MR file's own (oblique, 40^3) grid and are scored against its label file.
    source = read_image(data / "mr" / "mr_01_image.nii.gz")
    truth = read_label(data / "mr" / "mr_01_label.nii.gz").array
    for method in ("affine+mv", "mv", "staple", "simnet"):
        pred = read_label(out / "mr_01" / f"pred_{method}.nii.gz")
        assert pred.geometry.matches(source.geometry), pred.geometry.differences(source.geometry)
    pred = read_label(out / "mr_01" / "pred_mv.nii.gz").array
    assert pred.shape == (40, 40, 40) != SPACE_SHAPE
    for row in (r for r in rows if r["method"] == "mv"):
        assert row["dice"] == pytest.approx(dice(pred == row["label"], truth == row["label"]))
        assert row["volume_true_ml"] == pytest.approx(np.count_nonzero(truth == row["label"]) * 3 * 3 * 3.6 / 1000, rel=1e-4)

    jacobian = reports.read_jacobian(out / "jacobian.csv")
    assert jacobian == [{"case": "mr_01", "direction": "ct->mr", "n_atlases": 3, **jacobian_stats(np.zeros(SPACE_SHAPE + (3,)))}]
    timings = reports.read_timings(report.timings_csv)
    assert [(t["step"], t["method"]) for t in timings] == [("registration", "biregnet")] + [
        ("fusion", m) for m in ("affine+mv", "mv", "staple", "simnet")]
    assert all(t["seconds"] >= 0 for t in timings)
    summary = json.loads(report.summary_json.read_text())
    assert summary["jacobian"]["ct->mr"]["folding_percent"]["mean"] == 0.0
    assert "original grid" in summary["notes"]["scoring"]
    assert "| simnet |" in report.table and "| affine+mv |" in report.table and "folding %" in report.table
    assert sorted(p.name for p in report.figures) == [
        "boxplot_dice.png", "boxplot_hd95.png", "overlay_ct2mr_best-median-worst_mr_01.png"]
    assert all(p.is_file() for p in report.figures)


@pytest.mark.parametrize("flags, settings", [
    ([], {}),
    (["--atlases", "2"], {"atlases": 2}),
    (["--atlas-affine"], {"atlas_affine": True}),
    (["--refine-steps", "3"], {"refine_steps": 3}),
], ids=["default", "atlases", "atlas-affine", "refine"])
def test_evaluation_scores_exactly_the_label_that_cmmas_segment_writes(space_run, tmp_path, flags, settings):
    """One engine: for the held-out phantom target, every prediction the evaluation scores is
    byte-identical to the label map ``cmmas segment`` writes with the same atlases, models,
    alignment (the set's stored transform) and settings, for every option the engine has."""
    import random

    from cmmas import cli
    from cmmas.align.atlas_set import AtlasSet
    from cmmas.segment import SegmentConfig

    space, reg, sim, data = space_run
    aset = space if isinstance(space, AtlasSet) else AtlasSet(space)
    seed = 3
    random.seed(seed)
    np.random.seed(seed)
    out = tmp_path / "eval"
    fusions = ("mv", "jlf_tf", "lwv") if not settings else ("jlf_tf",)
    config = SegmentConfig(fusion=fusions[0], modality="ct", maps=False, **settings)
    runs.evaluate_atlas_set(aset, reg, sim, out, methods=fusions, bounds=False, plots=False, progress=False,
                            config=config)
    transform = aset.transform("mr_01")
    for fusion in (*fusions, "simnet"):
        written = tmp_path / f"seg_{fusion}.nii.gz"
        args = ["segment", "--target", str(data / "mr" / "mr_01_image.nii.gz"), "--atlas-set", str(aset.root),
                "--reg-model", str(reg), "--fusion", fusion, "--transform", *transform, "--atlas-modality", "ct",
                "--out", str(written), "--no-extras", *flags]
        if fusion == "simnet":
            args += ["--fusion-model", str(sim)]
        assert cli.main(args) == 0
        scored = out / "mr_01" / f"pred_{fusion}.nii.gz"
        assert written.read_bytes() == scored.read_bytes(), fusion
        mine, theirs = read_label(written), read_label(scored)
        np.testing.assert_array_equal(mine.array, theirs.array)
        assert mine.geometry.matches(theirs.geometry)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["provenance"]["config"] == config.to_dict()
    assert summary["provenance"]["targets"] == ["mr_01"] and summary["provenance"]["code"]["commit"]
    assert set(summary["provenance"]["models"]) == {"reg_model", "simnet_model"}


def test_realigned_evaluation_scores_what_cmmas_segment_writes_without_a_transform(space_run, tmp_path):
    """--realign: the target is aligned anew as ``cmmas segment`` aligns a new scan (no stored
    transform), and its QC record per fusion sits beside the label's true Dice per structure."""
    from cmmas import cli
    from cmmas.align.atlas_set import AtlasSet
    from cmmas.segment import SegmentConfig

    space, reg, sim, data = space_run
    aset = space if isinstance(space, AtlasSet) else AtlasSet(space)
    out = tmp_path / "eval"
    runs.evaluate_atlas_set(aset, reg, None, out, methods=("jlf_tf",), bounds=False, plots=False, progress=False,
                            config=SegmentConfig(fusion="jlf_tf", modality="ct", maps=False), realign=True)
    written = tmp_path / "seg.nii.gz"
    assert cli.main(["segment", "--target", str(data / "mr" / "mr_01_image.nii.gz"), "--atlas-set", str(aset.root),
                     "--reg-model", str(reg), "--fusion", "jlf_tf", "--atlas-modality", "ct", "--out", str(written),
                     "--no-extras"]) == 0
    assert written.read_bytes() == (out / "mr_01" / "pred_jlf_tf.nii.gz").read_bytes()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["provenance"]["evaluation"]["realign"] is True
    (qc,) = summary["qc"]
    assert qc["case"] == "mr_01" and qc["method"] == "jlf_tf" and isinstance(qc["flagged"], bool)
    assert qc["agreement"] is None and set(qc["dice"]) == set(aset.labels.values())
    assert all(0.0 <= d <= 1.0 for d in qc["dice"].values())


def test_space_evaluation_without_fusion_model_and_bad_input(space_run, tmp_path):
    from cmmas.errors import AtlasSetError, ModelError
    from cmmas.nn.networks import build_biregnet

    space, reg, sim, _ = space_run
    report = runs.evaluate_atlas_set(space, reg, None, tmp_path / "a", methods=("mv",), bounds=False, plots=False,
                                       progress=False)
    rows = reports.read_results(report.results_csv)
    assert {r["method"] for r in rows} == {"affine+mv", "mv"} and report.figures == ()
    assert sorted(p.name for p in (tmp_path / "a" / "mr_01").iterdir()) == ["pred_affine+mv.nii.gz", "pred_mv.nii.gz"]
    with pytest.raises(CmmasError, match="unknown fusion 'vote'"):
        runs.evaluate_atlas_set(space, reg, None, tmp_path / "b", methods=("vote",), progress=False)
    with pytest.raises(CmmasError, match="overlay method 'simnet' is not evaluated"):
        runs.evaluate_atlas_set(space, reg, None, tmp_path / "b", overlay_method="simnet", progress=False)
    with pytest.raises(AtlasSetError, match="no labelled held-out ct target"):
        runs.evaluate_atlas_set(space, reg, None, tmp_path / "b", atlas_modality="mr", target_modality="ct",
                                  progress=False)
    with pytest.raises(ModelError, match=r"BiRegNet takes a \(16, 16, 16\) grid"):
        runs.evaluate_atlas_set(space, build_biregnet((16, 16, 16), c0=4, levels=2), None, tmp_path / "b",
                                  progress=False)
    with pytest.raises(ModelError, match="a BiRegNet is not a fusion network"):
        runs.evaluate_atlas_set(space, reg, reg, tmp_path / "b", progress=False)
    assert not (tmp_path / "b").exists()


def test_original_truth_keeps_only_the_structures_of_the_space(space_run):
    """A space prepared with one component scores against that structure only."""
    import dataclasses

    from cmmas.align.atlas_set import AtlasSet

    space, _, _, data = space_run
    one = AtlasSet(space.root)
    one.manifest = dataclasses.replace(one.manifest, labels={500: "left ventricle blood cavity"})
    image, label = runs.original_target(one, "mr_01")
    full = read_label(data / "mr" / "mr_01_label.nii.gz").array
    np.testing.assert_array_equal(label.array, np.where(full == 500, 500, 0))
    assert image.geometry.matches(label.geometry) and image.shape == (40, 40, 40)


def _fake_run(root):
    """Two fold reports: ct->mr (with jacobian.csv) and mr->ct."""
    for folder, direction in (("ct2mr", "ct->mr"), ("mr2ct", "mr->ct")):
        rows = [dict(r, direction=direction) for r in _rows()]
        timings = [{"case": "a", "direction": direction, "step": "fusion", "method": "mv", "seconds": 0.5}]
        reports.write_report(rows, root / folder / "fold1" / "eval", timings)
    jacobian = "case,direction,n_atlases,folding_percent,std_log_jac,min_det,max_det\na,ct->mr,3,0.5,0.2,-0.1,2.0\n"
    (root / "ct2mr" / "fold1" / "eval" / "jacobian.csv").write_text(jacobian)


def test_aggregate_concatenates_the_fold_reports(tmp_path):
    _fake_run(tmp_path / "run")
    report = runs.aggregate(tmp_path / "run")
    rows = reports.read_results(tmp_path / "run" / "results.csv")
    assert len(rows) == 2 * len(_rows())
    assert [r["direction"] for r in rows] == ["ct->mr"] * len(_rows()) + ["mr->ct"] * len(_rows())
    summary = json.loads(report.summary_json.read_text())
    assert set(summary["metrics"]) == {"ct->mr", "mr->ct"}
    assert summary["metrics"]["mr->ct"]["mv"]["alpha"]["dice"]["mean"] == pytest.approx(0.8)
    assert summary["sources"] == ["ct2mr/fold1/eval/results.csv", "mr2ct/fold1/eval/results.csv"]
    assert summary["jacobian"]["ct->mr"]["folding_percent"]["mean"] == 0.5
    assert len(reports.read_timings(report.timings_csv)) == 2
    assert "**ct->mr — Dice" in report.table and "**mr->ct — Dice" in report.table
    assert sorted(p.name for p in report.figures) == [
        "boxplot_dice_ct2mr.png", "boxplot_dice_mr2ct.png", "boxplot_hd95_ct2mr.png", "boxplot_hd95_mr2ct.png"]
    with pytest.raises(CmmasError, match="no \\*/fold\\*/eval/results.csv"):
        runs.aggregate(tmp_path / "empty")


@pytest.mark.slow
def test_script_space_and_aggregate_modes(space_run, tmp_path):
    space, reg, sim, _ = space_run
    out = tmp_path / "run" / "ct2mr" / "fold1" / "eval"
    done = _evaluate("--space", str(space.root), "--reg_model", str(reg), "--fusion_model", str(sim),
                     "--atlas_modality=ct", "--target_modality=mr", "--methods=mv", "--out", str(out),
                     "--noprogress", "--noplots")
    assert done.returncode == 0, done.stderr
    assert "| affine+mv |" in done.stdout and "| simnet |" in done.stdout
    assert {r["method"] for r in reports.read_results(out / "results.csv")} == {
        "affine+mv", "mv", "simnet", "single-atlas mean", "oracle", "oracle10"}
    assert (out / "jacobian.csv").is_file() and (out / "mr_01" / "pred_simnet.nii.gz").is_file()
    done = _evaluate("--aggregate", str(tmp_path / "run"), "--out", str(tmp_path / "run"), "--noplots")
    assert done.returncode == 0, done.stderr
    assert len(reports.read_results(tmp_path / "run" / "results.csv")) == 6 * STRUCTURES
    missing = _evaluate("--aggregate", str(tmp_path / "nothing"), "--out", str(tmp_path / "x"))
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"evaluate: {tmp_path / 'nothing'}: no */fold*/eval/results.csv under it: evaluate the folds first"]
    bad = _evaluate("--space", str(space.root), "--out", str(tmp_path / "y"))
    assert bad.returncode == 1 and "--reg_model" in bad.stderr


# ----------------------------------------------------------------------------- real data


def test_classical_pipeline_on_two_real_cases(abdomen_data, tmp_path):
    """ct_00 as atlas -> mr_01 as target: affine at 5 mm, mv + staple, evaluate.py's report."""
    data = open_dataset(abdomen_data, "folder")
    pairs = tmp_path / "pairs"
    result = pairwise.prealign_pairs(
        [data.case("ct_00")], data.case("mr_01"), data.labels, pairs, spacing_mm=5.0, fast=True, progress=False
    )
    assert result.atlas_ids == ("ct_00",)
    out = tmp_path / "eval"
    done = _evaluate("--pairs", str(pairs), "--methods", "mv,staple", "--out", str(out), "--noprogress", "--noplots")
    assert done.returncode == 0, done.stderr
    rows = reports.read_results(out / "results.csv")
    liver = {r["method"]: r for r in rows if r["name"] == "liver"}
    assert liver["mv"]["direction"] == "ct->mr" and liver["mv"]["case"] == "mr_01"
    assert liver["mv"]["dice"] > 0.5, liver["mv"]
    assert liver["oracle"]["dice"] >= liver["mv"]["dice"]
