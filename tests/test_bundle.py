"""A bundle (cmmas.bundle, experiments/make_bundle.py): the README recipe on the phantom, end to end.

The session's shared phantom atlas set and untrained carded networks for the 24^3 grid (conftest
``phantom``), bundled by the script; then `cmmas segment --bundle` on a new MR scan, as the
README's recipe does."""

import csv
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from cmmas import bundle, cli
from cmmas.align.atlas_set import AtlasSet
from cmmas.datasets.mmwhs import MMWHS_LABELS
from cmmas.datasets.phantom import make_subject
from cmmas.errors import CmmasError
from cmmas.fuse import registry
from cmmas.io import read_label, write_image
from cmmas.nn import model_card
from phantom_data import GRID as SHAPE
from scripts import run_experiment


@pytest.fixture(scope="module")
def parts(phantom, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    summary = {"n_cases": {"ct->mr": 3}, "metrics": {"ct->mr": {"jlf": {
        "left atrium": {"dice": {"mean": 0.8}}, "mean": {"dice": {"mean": 0.75}}}}}}
    (root / "summary.json").write_text(json.dumps(summary))
    return {"root": root, "set": phantom.aset.root, "reg": phantom.reg, "sim": phantom.sim,
            "summary": root / "summary.json"}


@pytest.mark.slow
def test_the_readme_recipe_segments_a_new_scan_with_the_bundle(parts, tmp_path):
    out = tmp_path / "bundle-ct2mr"
    done = run_experiment("make_bundle", f"--atlas_set={parts['set']}", f"--reg_model={parts['reg']}",
                          f"--fusion_model={parts['sim']}", f"--summary={parts['summary']}", f"--out={out}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "atlas_set", "bundle.json", "reg_model.keras",
                                                     "reg_model.keras.json", "simnet.keras", "simnet.keras.json"]
    readme = (out / "README.txt").read_text()
    assert "cmmas segment --bundle" in readme and "ct->mr jlf (3 targets): 0.750 (left atrium 0.800)" in readme
    chosen = bundle.best_fusion(json.loads(Path(parts["summary"]).read_text()), {"simnet", *registry.PRESETS})[0]
    assert bundle.resolve_bundle(out).fusion == chosen and f"Default fusion (--fusion), recorded in bundle.json: {chosen}" in readme
    assert "24 x 24 x 24 voxels" in readme and not any(p.name.startswith(".") for p in tmp_path.iterdir())

    image, _ = make_subject("mr", 100, shape=40)
    scan = write_image(image, tmp_path / "scan.nii.gz")
    assert cli.main(["segment", "--bundle", str(out), "--target", str(scan), "--out", str(tmp_path / "seg.nii.gz"),
                     "--no-extras", "--preview"]) == 0
    label = read_label(tmp_path / "seg.nii.gz", allowed=MMWHS_LABELS)
    assert image.geometry.differences(label.geometry) == [] and label.array.any()
    with open(tmp_path / "seg_volumes.csv", newline="") as handle:
        rows = {int(r["code"]): r for r in csv.DictReader(handle)}
    voxel_ml = np.prod(label.geometry.spacing) / 1000.0
    for code, name in MMWHS_LABELS.items():
        voxels = int(np.count_nonzero(label.array == code))
        assert rows[code]["name"] == name and int(rows[code]["voxels"]) == voxels
        assert float(rows[code]["millilitres"]) == pytest.approx(voxels * voxel_ml, abs=1e-4)
    assert all(f'"{name}"' in (tmp_path / "seg_labels.itksnap.txt").read_text() for name in MMWHS_LABELS.values())
    assert plt.imread(tmp_path / "seg_preview.png").shape[0] > 200


def test_a_bundle_is_replaced_whole_and_keeps_the_model_cards(parts, tmp_path):
    out = bundle.write_bundle(parts["set"], parts["reg"], tmp_path / "b")
    (out / "stale.txt").write_text("left from an earlier bundle")
    bundle.write_bundle(parts["set"], parts["reg"], tmp_path / "b")
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "atlas_set", "bundle.json", "reg_model.keras",
                                                     "reg_model.keras.json"]
    assert model_card.read_card(out / "reg_model.keras") == model_card.read_card(parts["reg"])
    assert "Default fusion (--fusion), recorded in bundle.json: jlf_tf" in (out / "README.txt").read_text()
    assert bundle.resolve_bundle(out).fusion == "jlf_tf"
    assert AtlasSet(out / "atlas_set").geometry.shape == SHAPE


def test_a_missing_model_is_one_line_naming_it(parts, tmp_path):
    with pytest.raises(CmmasError, match="not found") as err:
        bundle.write_bundle(parts["set"], tmp_path / "nope.keras", tmp_path / "b")
    assert "nope.keras" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "b").exists()


def test_the_best_fusion_breaks_near_ties_by_speed_and_skips_unscored():
    def entry(dice):
        return {"mean": {"dice": {"mean": dice}}}

    summary = {"metrics": {"ct->mr": {"jlf": entry(0.7103), "jlf_tf": entry(0.7100), "mv": entry(0.6),
                                      "simnet": entry(None)}},
               "seconds": {"ct->mr": {"fusion": {"jlf": {"mean": 7.0}, "jlf_tf": {"mean": 2.0}}}}}
    best, why = bundle.best_fusion(summary, {"jlf", "jlf_tf", "mv", "simnet"})
    assert best == "jlf_tf" and "fastest of the fusions within" in why
    assert bundle.best_fusion(summary, {"mv"})[0] == "mv"
    assert bundle.best_fusion({}, {"mv"})[0] == "jlf_tf"  # the engine's default
    with pytest.raises(CmmasError, match="not an evaluation summary"):
        bundle.best_fusion({"metrics": {"ct->mr": {"mv": 0.5}}}, {"mv"})


def test_a_bundle_never_replaces_one_of_its_inputs(parts, tmp_path):
    for out in (parts["set"], Path(parts["reg"]).parent):
        with pytest.raises(CmmasError, match="would replace its input"):
            bundle.write_bundle(parts["set"], parts["reg"], out)
    assert Path(parts["reg"]).is_file() and AtlasSet(parts["set"]).geometry.shape == SHAPE


def test_a_bundle_with_an_organ_finder_adds_the_organs_to_each_qc_record(parts, phantom, tmp_path):
    import datetime

    from cmmas.align import finder as finder_module
    from cmmas.nn import training
    from cmmas.nn.finder import build_finder

    aset = phantom.aset
    card = model_card.ModelCard(kind="finder", shape_zyx=(16, 16, 16), spacing_zyx=(4.0, 4.0, 4.0),
                                labels=dict(aset.labels), atlas_modality="ct", target_modality=None,
                                normalisation="minmax", align_spacing_mm=4.0, training_set=str(tmp_path),
                                created=datetime.datetime.now().isoformat())
    finder = training.save_model(build_finder(len(aset.labels) + 1, c0=2, levels=3), tmp_path / "f.keras", card=card)
    out = bundle.write_bundle(parts["set"], parts["reg"], tmp_path / "b", finder_model=finder)
    assert (out / "finder.keras").is_file() and (out / "finder.keras.json").is_file()
    assert bundle.resolve_bundle(out).finder == out / "finder.keras"
    assert bundle.resolve_bundle(out, finder_model=finder).finder == finder
    image, _ = make_subject("mr", 101, shape=40)
    scan = write_image(image, tmp_path / "scan.nii.gz")
    assert cli.main(["segment", "--bundle", str(out), "--target", str(scan), "--out", str(tmp_path / "seg.nii.gz"),
                     "--fusion", "mv", "--no-extras", "--single-start"]) == 0
    record = json.loads((tmp_path / "seg_qc.json").read_text())
    assert set(record["organs"]) == set(aset.labels.values())
    assert record["doubtful"] == [name for name, value in record["organs"].items()  # an untrained finder doubts
                                  if value is not None and value < finder_module.DOUBTFUL_BELOW]
    assert record["flagged"] is (bool(record["doubtful"]) or record["alignment"]["flagged"])
    assert record["models"]["finder_model"] == str(out / "finder.keras")
    (tmp_path / "scans.csv").write_text(f"id,path\ns1,{scan}\n")  # a cohort's table carries them per structure
    assert cli.main(["segment-batch", "--manifest", str(tmp_path / "scans.csv"), "--bundle", str(out), "--out",
                     str(tmp_path / "cohort"), "--fusion", "mv", "--no-extras", "--quiet"]) == 0
    with open(tmp_path / "cohort" / "cohort.csv", newline="") as handle:
        [row] = list(csv.DictReader(handle))
    assert {f"{name}_finder_dice" for name in aset.labels.values()} <= set(row)
    assert "doubtful" in row
