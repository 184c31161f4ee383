"""Generated results tables: rendered from fake runs folders, the absent case, marker idempotence."""

import json
import subprocess

import pytest

from cmmas.errors import CmmasError
from cmmas.evaluate import report, results_page as page

ORGANS = ("liver", "spleen")


def _rows(direction, dice):
    """Score rows: method -> per-case list of per-organ Dice."""
    rows = []
    for method, cases in dice.items():
        for k, per_organ in enumerate(cases):
            for code, (name, value) in enumerate(zip(ORGANS, per_organ), start=1):
                rows.append({"case": f"t{k}", "direction": direction, "method": method, "label": code, "name": name,
                             "dice": value, "jaccard": value, "hd95": 10.0 * (1 - value), "assd": 1.0})
    return rows


def _write(path, record):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def _summary(direction, dice, commit="a" * 40, command="make reproduce-abdomen"):
    summary = report.summarize(_rows(direction, dice))
    summary["provenance"] = {"code": {"commit": commit, "dirty": False}, "command": command}
    return summary


CT2MR = {"affine+mv": [(0.5, 0.3), (0.7, 0.5)], "jlf": [(0.9, 0.7), (0.8, 0.6)]}


def test_chain_table_reads_mean_std_worst_target_and_hd95_from_summary():
    table = page.chain_table(_summary("ct->mr", CT2MR), "ct->mr")
    lines = table.splitlines()
    assert lines[0] == "| method | liver | spleen | mean Dice | worst target | mean HD95 (mm) |"
    # jlf: liver mean 0.85, std of (0.9, 0.8); per-case means 0.8 and 0.7 -> mean 0.75, worst 0.70
    assert lines[3].startswith("| jlf | 0.850 ± 0.071 | 0.650 ± 0.071 | 0.750 | 0.700 | 2.5 |")


def test_tables_from_a_fake_runs_folder_name_commit_state_and_command(tmp_path):
    runs = tmp_path / "runs"
    _write(runs / page.CHAIN["ct->mr"], _summary("ct->mr", CT2MR, commit="c" * 40))
    _write(runs / page.BENCH["bench_mas"], {
        "provenance": {"code": {"commit": "d" * 40, "dirty": True}}, "command": "bench/bench_mas.py --out x",
        "rows": [{"target": "t0", "direction": "ct->mr", "pipeline": "cmmas robust", "fusion": "jlf_tf",
                  "name": o, "dice": 0.8, "seconds": 4.04, "peak_mb": 2100.0} for o in ORGANS]})
    records = page.load_records(runs, [*page.CHAIN.values(), *page.BENCH.values()])
    tables = page.render_tables(records, lambda commit: commit.startswith("d"))
    head = tables["headline"]
    assert "commit cccccccccc (current); command: `make reproduce-abdomen`" in head
    assert "from commit dddddddddd (code changed since), dirty tree; command: `bench/bench_mas.py --out x`" in head
    assert "`runs/abdomen/mr2ct/fold1/eval/summary.json`: not run at this commit" in head
    assert "| jlf: mean Dice (worst target) | 0.750 (worst 0.700) | not run at this commit |" in head
    assert "| cmmas robust jlf_tf: seconds per scan | 4.0 (1 target) |  |" in head
    assert "| t0 | ct->mr | cmmas robust | jlf_tf | 4.0 | 2100 | 0.800 | 0.800 | 0.800 |" in tables["bench_mas"]
    assert tables["bench_alignment"] == "_`runs/bench_alignment/bench_alignment.json`: not run at this commit_"


def test_every_table_reads_not_run_when_runs_is_empty(tmp_path):
    tables = page.render_tables(page.load_records(tmp_path, [*page.CHAIN.values(), *page.BENCH.values()]),
                                lambda commit: False)
    assert set(tables) == {"headline", "chain", "settings", "precision", "crossfit", "ablation", "finder", "organ_qc", "labelled", "bench_mas",
                           "bench_alignment",
                           "bench_accuracy", "bench_training", "bench_cohort", "bench_cohort_abdomen", "bench_alignment_organs"}
    for text in tables.values():
        assert "|---" not in text and page.NOT_RUN in text


def test_alignment_and_accuracy_tables_summarise_their_rows():
    calls = [{"method": "robust", "direction": "ct->mr", "target": "mr_01", "call": call, "mean": mean,
              "seconds": 2.0, "qc": {"flagged": mean < 0.3}, "label_md5": "x"}
             for call, mean in (("repeat1", 0.5), ("repeat2", 0.5), ("seed1", 0.2))]
    line = page.alignment_table(calls).splitlines()[2]
    assert line.startswith("| ct->mr | robust | 0.400 | 0.200 (mr_01 seed1) | 1 of 3 | 1 of 1 | 0.000 | 1 of 1 |")
    assert line.endswith("| - | 1 of 1 / 0 of 2 |")
    rows = [{"case": c, "direction": "ct2mr fold1", "method": m, "name": o, "dice": d, "fuse_s": f,
             "refine_s": 0.0, "folding_after": 0.5}
            for m, f in (("jlf_tf", 1.0), ("jlf_mind", 4.0)) for c, d in (("a", 0.6), ("b", 0.8)) for o in ORGANS]
    table = page.accuracy_table(rows)
    assert "| jlf_mind | 0.700 | 0.700 | 0.700 | 0.600 | 0.0 | 4.00 (4.0x) | 0.50 |" in table


def test_marker_replacement_is_idempotent_and_leaves_the_prose(tmp_path):
    text = "# Page\n\nprose\n\n<!-- results:chain -->\nold table\n<!-- /results:chain -->\n\nmore prose\n"
    once = page.replace_blocks(text, {"chain": "NEW\n\n| a |"})
    assert once == "# Page\n\nprose\n\n<!-- results:chain -->\nNEW\n\n| a |\n<!-- /results:chain -->\n\nmore prose\n"
    assert page.replace_blocks(once, {"chain": "NEW\n\n| a |"}) == once
    assert page.statuses(once) == {"chain": "NEW"}
    empty = "intro `<!-- results:NAME -->` in prose\n<!-- results:chain -->\n<!-- /results:chain -->\n"
    assert page.markers(empty) == ["chain"]
    assert page.replace_blocks(empty, {"chain": "T"}) == empty.replace("-->\n<!-- /", "-->\nT\n<!-- /")
    with pytest.raises(CmmasError, match="no generated table"):
        page.replace_blocks(text, {"other": "x"})
    with pytest.raises(CmmasError, match="has no"):
        page.replace_blocks("<!-- results:chain -->\nx\n", {"chain": "y"})


def test_code_changed_compares_watched_paths_with_head(tmp_path):
    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True,
                              text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("1\n")
    git("add", "src")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    first = git("rev-parse", "HEAD")
    (tmp_path / "docs.md").write_text("words\n")
    git("add", "docs.md")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "docs only")
    assert page.code_changed(first, tmp_path) is False
    (tmp_path / "src" / "a.py").write_text("2\n")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "code")
    assert page.code_changed(first, tmp_path) is True
    assert page.code_changed("f" * 40, tmp_path) is None


def test_labelled_curve_reads_each_count_run_and_draws_its_figure(tmp_path):
    from cmmas.evaluate.plots import labelled_curve

    runs = tmp_path / "runs"
    assert page.labelled_curve_points(runs) == {}
    _write(runs / page.CHAIN["ct->mr"], _summary("ct->mr", {"jlf_tf": [(0.8, 0.6)], "dlf": [(0.9, 0.7)]}))
    assert page.labelled_curve_points(runs) == {}, "the full chain alone is no curve"
    _write(runs / page.labelled_paths()[("ct->mr", 2)],
           _summary("ct->mr", {"unet": [(0.4, 0.2), (0.6, 0.4)], "dlf": [(0.7, 0.5)]}, commit="e" * 40))
    points = page.labelled_curve_points(runs)
    assert points == {"ct->mr": {"unet": [(2, 0.4, pytest.approx(0.3))], "dlf": [(2, 0.6, 0.6), ("all", 0.8, 0.8)],
                                 "jlf_tf": [("all", 0.7, 0.7)]}}
    table = page.labelled_table(points).splitlines()
    assert table[2] == "| CT -> MR | 2 | 0.400 (worst 0.300) |  | 0.600 (worst 0.600) |"
    assert table[3] == "| CT -> MR | all |  | 0.700 (worst 0.700) | 0.800 (worst 0.800) |"
    records = page.load_records(runs, list(page.labelled_paths().values()))
    block = page.render_tables(records, lambda commit: False)["labelled"]
    assert "`runs/abdomen-labelled2/ct2mr/fold1/eval/summary.json`: commit eeeeeeeeee (current)" in block
    assert "`runs/abdomen-labelled4/ct2mr/fold1/eval/summary.json`: not run at this commit" in block
    assert block.endswith(page.LABELLED_FIGURE)
    png = labelled_curve({"ct->mr": {"dlf": [("all", 0.8, 0.7), (2, 0.6, 0.5)], "jlf_tf": [(0, 0.5, 0.4)]}},
                         tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(CmmasError, match="no labelled-curve point"):
        labelled_curve({}, tmp_path / "none.png")


def test_the_settings_table_compares_today_labelmix_and_zero(tmp_path):
    runs = tmp_path / "runs"
    _write(runs / page.CHAIN["ct->mr"], _summary("ct->mr", {"jlf_tf": [(0.8, 0.6)], "simnet": [(0.7, 0.5)]}))
    assert page.render_tables(page.load_records(runs, list(page.settings_paths().values())),
                              lambda c: False)["settings"].count("not run at this commit") == 5
    _write(runs / page.settings_paths()[("zero", "ct->mr")], _summary("ct->mr", {"jlf_tf": [(0.6, 0.4)]}))
    block = page.render_tables(page.load_records(runs, list(page.settings_paths().values())),
                               lambda c: False)["settings"]
    assert "| today | jlf_tf | 0.800 | 0.600 | 0.700 | 0.700 |" in block
    assert "| zero | jlf_tf | 0.600 | 0.400 | 0.500 | 0.500 |" in block and "| zero | simnet" not in block


def test_the_precision_table_sets_bfloat16_beside_two_float32_seeds(tmp_path):
    runs = tmp_path / "runs"
    paths = page.settings_paths(page.PRECISION_RUNS)
    _write(runs / paths[("float32, seed 0", "ct->mr")], _summary("ct->mr", {"jlf_tf": [(0.8, 0.6)]}))
    wanted = list(paths.values())
    assert "| float32" not in page.render_tables(page.load_records(runs, wanted), lambda c: False)["precision"]
    _write(runs / paths[("mixed_bfloat16, seed 0", "ct->mr")], _summary("ct->mr", {"jlf_tf": [(0.7, 0.7)]}))
    block = page.render_tables(page.load_records(runs, wanted), lambda c: False)["precision"]
    rows = [line for line in block.splitlines() if line.startswith("| float32") or line.startswith("| mixed")]
    assert rows == ["| float32, seed 0 | jlf_tf | 0.800 | 0.600 | 0.700 | 0.700 |",
                    "| mixed_bfloat16, seed 0 | jlf_tf | 0.700 | 0.700 | 0.700 | 0.700 |"]


def test_bench_training_and_cohort_tables():
    before = {"variant": "biregnet", "step_s": 1.4, "steps_per_s": 0.714, "ratio": 1.0, "augment_share": 0.05,
              "forward_share": 0.3, "backward_share": 0.55, "rest_share": 0.1, "data_s": 0.004}
    after = {**before, "precision": "mixed_bfloat16", "step_s": 0.7, "steps_per_s": 1.43, "ratio": 0.5, "speedup": 2.0}
    training = page.training_table([before, after]).splitlines()
    assert training[2] == "| biregnet | float32 | 1.400 | 0.71 | 1.00 | - | 5% | 30% | 55% | 10% | 0.004 |"
    assert training[3] == "| biregnet | mixed_bfloat16 | 0.700 | 1.43 | 0.50 | 2.00 | 5% | 30% | 55% | 10% | 0.004 |"
    cohort = page.cohort_table([{"run": "dask:2", "scans": 40, "wall_s": 300.0, "scans_per_hour": 480.0,
                                 "ratio": 1.8, "peak_mb": 2100.0}])
    assert cohort.splitlines()[2] == "| dask:2 | 40 | 300.0 | 480 | 1.80 | 2100 |"


def test_the_finder_table_summarises_each_direction_and_training():
    rows = [{"case": "mr_01", "liver": 0.8, "spleen": 0.6, "mean": 0.7, "seconds": 0.3},
            {"case": "mr_02", "liver": 0.6, "spleen": 0.4, "mean": 0.5, "seconds": 0.5}]
    table = page.finder_table({("ct->mr", "1,200 steps"): rows}).splitlines()
    assert table[0] == "| direction | training | targets | liver | spleen | mean Dice | worst target | s / scan |"
    assert table[2] == "| ct->mr | 1,200 steps | 2 | 0.700 | 0.500 | 0.600 | 0.500 | 0.50 |"


def test_the_qc_table_counts_flagged_bad_and_good_targets_and_organs():
    def row(case, dice, agreement, flagged=False):
        return {"case": case, "method": "jlf_tf", "flagged": flagged or min(agreement) < 0.3,
                "alignment_flagged": flagged, "organ_overlap": 0.5,
                "dice": {"liver": dice[0], "spleen": dice[1]}, "agreement": {"liver": agreement[0], "spleen": agreement[1]}}

    rows = [row("a", (0.9, 0.8), (0.8, 0.7)),          # good, trusted
            row("b", (0.4, 0.1), (0.35, 0.1), True),   # bad, flagged by the alignment and by the finder
            row("c", (0.9, 0.9), (0.8, 0.45)),         # good, its spleen doubted at 0.5 and above
            {**row("c", (0.1, 0.1), (0.1, 0.1)), "method": "mv"}]  # another fusion: not counted
    table = page.qc_table({("ct->mr", "organs"): [rows]}, thresholds=(0.3, 0.5)).splitlines()
    assert table[0] == ("| direction | alignment | targets x calls | mean Dice | worst call | below 0.3 | largest spread | "
                        "alignment flag | QC flag | lowest agreement < 0.3 | lowest agreement < 0.5 |")
    assert table[2] == ("| ct->mr | organs | 3 x 1 | 0.667 | 0.250 | 1 | 0.000 | 1 of 1 / 0 of 2 | 1 of 1 / 0 of 2 | "
                        "1 of 1 / 0 of 2 | 1 of 1 / 1 of 2 |")
    again = [{**r, "dice": {k: v - 0.1 for k, v in r["dice"].items()}} if r["case"] == "a" else r for r in rows]
    two = page.qc_table({("ct->mr", "organs"): [rows, again]}, thresholds=(0.3,)).splitlines()
    assert two[2].startswith("| ct->mr | organs | 3 x 2 | 0.650 | 0.250 | 2 | 0.100 | 2 of 2 / 0 of 4 |")
    assert table[-1] == "| organs | 6 | 1 of 2 / 0 of 4 | 2 of 2 / 1 of 4 |"
