"""evaluate_oracle_set: the paper's setting scored on the crop and, beside it, on the original grid."""

import json

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from cmmas.align import prepare  # noqa: E402
from cmmas.datasets import open_dataset  # noqa: E402
from cmmas.errors import AtlasSetError  # noqa: E402
from cmmas.evaluate import oracle, report, runs  # noqa: E402
from cmmas.io import read_label  # noqa: E402
from cmmas.nn import training  # noqa: E402
from cmmas.nn.networks import build_biregnet  # noqa: E402
from phantom_data import numbered, write_phantom_folder  # noqa: E402

SHAPE = (16, 16, 16)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle_eval")
    dataset = open_dataset(write_phantom_folder(root / "data", {**numbered("ct", range(4)),
                                                                 **numbered("mr", range(10, 14))}), "folder")
    cases = list(dataset.of("ct")) + list(dataset.of("mr"))
    aset = prepare.prepare_oracle(cases, dataset.labels, root / "set", SHAPE, roles={cases[-1].id: "test"},
                                  component=500, progress=False)
    reg = training.save_model(build_biregnet(SHAPE, levels=2), root / "reg.keras")  # untrained: the identity
    result = oracle.evaluate_oracle_set(aset, reg, None, root / "eval", methods=("mv",), holdout=1, plots=False,
                                        progress=False)
    return aset, cases, root / "eval", result


def test_crop_and_original_grid_reports_are_written_with_every_method(evaluated):
    aset, cases, out, result = evaluated
    crop_rows = report.read_results(out / "crop" / "results.csv")
    rows = report.read_results(out / "results.csv")
    expected = {oracle.CROP_MV, "mv", "single-atlas mean", "oracle", "oracle10"}
    assert {r["method"] for r in crop_rows} == expected == {r["method"] for r in rows}
    assert {r["case"] for r in rows} == {cases[-1].id} and {r["direction"] for r in rows} == {"ct->mr"}
    for r in crop_rows + rows:
        assert 0.0 <= r["dice"] <= 1.0 and np.isfinite(r["assd"])
    by_method = {r["method"]: r for r in crop_rows}
    assert by_method["mv"]["dice"] == pytest.approx(by_method[oracle.CROP_MV]["dice"])  # identity BiRegNet
    assert "On the oracle crop" in result.table and "On the original grid" in result.table


def test_the_original_grid_prediction_is_the_crop_one_mapped_back(evaluated):
    aset, cases, out, _ = evaluated
    target = cases[-1].id
    image, truth = runs.original_target(aset, target)
    on_original = read_label(out / target / "pred_mv.nii.gz", like=image)
    on_crop = read_label(out / target / "crop" / "pred_mv.nii.gz")
    assert on_original.shape == truth.shape and on_crop.shape == SHAPE
    assert set(np.unique(on_original.array)) <= {0, 500} and (on_original.array == 500).any()


def test_the_holdout_atlases_are_not_fused(evaluated):
    aset, _, out, _ = evaluated
    summary = json.loads((out / "summary.json").read_text())
    assert summary["atlases"] == ["ct_00", "ct_01", "ct_02"]  # ct_03 withheld from BiRegNet
    assert runs.fused_atlases(aset, "ct", "mr", 0) == ["ct_00", "ct_01", "ct_02", "ct_03"]


def test_an_aligned_set_is_refused(tmp_path, evaluated):
    aset, _, out, _ = evaluated
    manifest = json.loads((aset.root / "manifest.json").read_text())
    manifest["roi"] = "atlases"
    copy = tmp_path / "set"
    copy.mkdir()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(AtlasSetError, match="not an oracle atlas set"):
        oracle.evaluate_oracle_set(copy, None, None, tmp_path / "eval")
