"""The experiment configs (experiments/configs/<exp>/<stage>.flags), as the Makefile's chain uses them.

Every flagfile must parse in its stage script with the arguments the Makefile adds, and the
paper setting for MM-WHS (paper-mmwhs: oracle crop, the original networks, the SimNet hold-out,
scores on the crop and on the original grid) must run end to end on the MM-WHS-layout phantom,
its schedules shortened by flags given after the flagfile (absl: the last value wins).
"""

from __future__ import annotations

import json

import pytest

from scripts import REPO, run_experiment

CONFIGS = REPO / "experiments" / "configs"
MODS = ["--atlas_modality=ct", "--target_modality=mr"]

# What the Makefile passes to each stage besides its flagfile.
STAGE_ARGS = {
    "prealign": ["--data=DATA", "--fold=1", "--out=SET"],
    "train_reg": ["--atlas_set=SET", "--out=REG"],
    "train_fusion": ["--atlas_set=SET", "--reg_model=REG/model.keras", "--out=FUSION"],
    "evaluate": ["--atlas_set=SET", "--reg_model=REG/model.keras", "--fusion_model=FUSION/simnet.keras", "--out=EVAL"],
}
# Stages an experiment may add (the Makefile trains them where their flagfile exists).
OPTIONAL_STAGE_ARGS = {
    "train_dlf": ["--atlas_set=SET", "--reg_model=REG/model.keras", "--cache=FUSION/pairs", "--out=DLF"],
    "train_unet": ["--atlas_set=SET", "--cache=FUSION/pairs", "--out=UNET"],
    "train_finder": ["--data=DATA", "--fold=1", "--out=FINDER"],
}


def _flagfiles() -> list[tuple[str, str]]:
    return [(folder.name, stage) for folder in sorted(CONFIGS.iterdir())
            for stage in {**STAGE_ARGS, **OPTIONAL_STAGE_ARGS} if (folder / f"{stage}.flags").is_file()]


def test_every_experiment_has_a_flagfile_per_stage():
    for folder in CONFIGS.iterdir():
        stages = {p.stem for p in folder.glob("*.flags")}
        assert set(STAGE_ARGS) <= stages <= set(STAGE_ARGS) | set(OPTIONAL_STAGE_ARGS), folder.name


@pytest.mark.parametrize("exp, stage", _flagfiles())
def test_flagfile_parses_in_its_stage_script(exp, stage):
    args = {**STAGE_ARGS, **OPTIONAL_STAGE_ARGS}[stage]
    done = run_experiment(stage, f"--flagfile={CONFIGS / exp / f'{stage}.flags'}", *args, *MODS,
                          "--only_check_args")  # from the repository root, as the Makefile (nested --flagfile paths)
    assert done.returncode == 0, done.stderr[-2000:]


def test_crossfit_trains_k_withholding_biregnets_and_dlf_on_their_warps():
    import subprocess

    plan = subprocess.run(["make", "-n", "train-dlf", "EXP=abdomen", "CROSSFIT=2", "RUN=/nonexistent/run", "DATA=x"],
                          cwd=REPO, capture_output=True, text=True, check=True).stdout
    folder = "/nonexistent/run/ct2mr/fold1"
    assert plan.count("--withhold_fold=") == 2 and "--withhold_fold=0/2" in plan and "--withhold_fold=1/2" in plan
    assert (f"--crossfit_models={folder}/reg_withhold0of2/model.keras,{folder}/reg_withhold1of2/model.keras "
            f"--cache={folder}/dlf/pairs_crossfit") in " ".join(plan.split())
    plain = subprocess.run(["make", "-n", "train-dlf", "EXP=abdomen", "RUN=/nonexistent/run", "DATA=x"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "--withhold_fold" not in plain and f"--reg_model={folder}/reg/model.keras --cache={folder}/fusion/pairs" in plain


def test_a_bundle_of_every_case_trains_on_all_and_quotes_fold_1():
    import subprocess

    plan = subprocess.run(["make", "-n", "bundle", "EXP=abdomen", "FOLD=all", "RUN=/nonexistent/run", "DATA=x"],
                          cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "prealign.py" in plan and "--fold=0 " in plan and "--out=/nonexistent/run/ct2mr/foldall/atlas_set" in plan
    assert "--summary=/nonexistent/run/ct2mr/fold1/eval/summary.json" in plan and "evaluate.py" not in plan


@pytest.mark.slow
def test_paper_mmwhs_chain_runs_on_the_phantom(tmp_path):
    data, root = tmp_path / "data", tmp_path / "run"
    cfg = CONFIGS / "paper-mmwhs"
    made = run_experiment("make_phantom", f"--out={data}", "--n=10", "--shape=32")
    assert made.returncode == 0, made.stderr[-2000:]
    short = ["--shape=32", "--steps=2", "--steps_per_epoch=2"]
    steps = [
        ("prealign", [f"--data={data}", "--fold=1", "--component=500", "--shape=32", f"--out={root / 'set'}"]),
        ("train_reg", [f"--atlas_set={root / 'set'}", *short, f"--out={root / 'reg'}"]),
        ("train_fusion", [f"--atlas_set={root / 'set'}", f"--reg_model={root / 'reg' / 'model.keras'}", *short,
                          "--c0=4", f"--out={root / 'fusion'}"]),
        ("evaluate", [f"--atlas_set={root / 'set'}", f"--reg_model={root / 'reg' / 'model.keras'}",
                      f"--fusion_model={root / 'fusion' / 'simnet.keras'}", "--plots=false", f"--out={root / 'eval'}"]),
    ]
    for stage, args in steps:
        done = run_experiment(stage, f"--flagfile={cfg / f'{stage}.flags'}", *args, *MODS, timeout=600)
        assert done.returncode == 0, f"{stage}: {done.stderr[-3000:]}"
    assert json.loads((root / "reg" / "config.json").read_text())["arch"] == "original"
    original = json.loads((root / "eval" / "summary.json").read_text())
    crop = json.loads((root / "eval" / "crop" / "summary.json").read_text())
    # fold 1 of 4 over 10 subjects: 7 CT atlases, of which the last 4 are withheld for SimNet.
    assert original["atlases"] == ["ct_1004", "ct_1005", "ct_1006"]
    assert original["n_cases"] == {"ct->mr": 3}
    assert (original["grid"], crop["grid"]) == ("original", "oracle crop")
    methods = {line.split(",")[2] for line in (root / "eval" / "results.csv").read_text().splitlines()[1:]}
    assert {"mv", "staple", "lwv", "jlf", "simnet"} <= methods
