"""The `cmmas` command (prepare-atlases, segment, register) and bench/bench_mas.py.

The session's shared phantom (conftest ``phantom``): CT atlases and an MR target (a rotated grid)
in one folder-layout data set, their atlas set and untrained networks for the 24^3 working grid.
Commands run in this process (cli.main) where the exit status and the files are what is checked,
and in a subprocess where stderr or the imports are.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cmmas import cli
from cmmas.fuse import registry
from cmmas.align.atlas_set import AtlasSet
from cmmas.datasets.mmwhs import MMWHS_LABELS
from cmmas.io import read_image, read_label
from phantom_data import CODES, GRID as SHAPE, write_folder

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO / "src")}


def _python(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, encoding="utf-8", env=ENV, cwd=cwd, timeout=300)


def _foreground_dice(label: np.ndarray, truth: np.ndarray) -> float:
    a, b = label > 0, truth > 0
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _check_maps(out: Path, phantom) -> np.ndarray:
    """Every written map lies on the target's grid; returns the label map."""
    target = read_image(phantom.target)
    stem = out.name[: -len(".nii.gz")]
    extras = [f"{stem}_agreement.nii.gz"] + [f"{stem}_prob_{c}.nii.gz" for c in CODES]
    for path in [out] + [out.with_name(name) for name in extras]:
        assert target.geometry.differences(read_image(path).geometry) == [], path
    return read_label(out, allowed=MMWHS_LABELS).array


# ----------------------------------------------------------------------------- help and imports


def test_help_is_instant_and_imports_neither_tensorflow_nor_ants():
    code = (
        "import sys\n"
        "from cmmas import cli\n"
        "for argv in (['--help'], ['prepare-atlases', '--help'], ['segment', '--help'], ['register', '--help']):\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, argv\n"
        "print('HEAVY', sorted(m for m in ('tensorflow', 'keras', 'ants') if m in sys.modules))\n"
    )
    done = _python("-c", code)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout
    for flag in ("--target", "--atlas-set", "--bundle", "--reg-model", "--fusion-model", "--prealign",
                 "--no-prealign", "--atlases", "--modality", "--reference", "--moving", "--fixed"):
        assert flag in done.stdout, flag
    script = Path(sys.executable).with_name("cmmas")
    if script.exists():  # the console script of the editable install
        assert subprocess.run([script, "segment", "--help"], capture_output=True, env=ENV).returncode == 0


def test_tensorflow_imported_first_without_onednn_warns():
    env = {k: v for k, v in ENV.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    run = [sys.executable, "-c"]
    late = subprocess.run([*run, "import tensorflow, cmmas"], capture_output=True, encoding="utf-8", env=env)
    first = subprocess.run([*run, "import cmmas, tensorflow"], capture_output=True, encoding="utf-8", env=env)
    assert late.returncode == 0 and first.returncode == 0, late.stderr + first.stderr
    assert "TensorFlow was imported before cmmas without TF_ENABLE_ONEDNN_OPTS=1" in late.stderr
    assert "imported before cmmas" not in first.stderr


def test_fusion_choices_are_the_library_s():
    assert list(cli.FUSIONS) == registry.names()


# ----------------------------------------------------------------------------- prepare-atlases


def test_prepare_atlases_writes_a_readable_set(phantom, tmp_path):
    out = tmp_path / "atlas_set"
    status = cli.main(["prepare-atlases", "--atlases", str(phantom.data), "--modality", "ct", "--out", str(out),
                       "--shape", "24", "--spacing", "4"])
    assert status == 0
    aset = AtlasSet(out)
    assert aset.ids() == ["ct_00", "ct_01", "ct_02"]  # the MR case of the folder is not an atlas
    assert aset.geometry.shape == SHAPE and aset.labels == MMWHS_LABELS
    np.testing.assert_allclose(aset.geometry.spacing, 4.0)
    assert all((out / aset.case(i).transform).is_file() for i in aset.ids())


@pytest.mark.parametrize("problem", ["label table", "not 3D"])
def test_a_bad_atlas_is_one_stderr_line_naming_its_file(tmp_path, problem):
    data = write_folder(tmp_path / "data", n=2)
    if problem == "label table":
        table = {"0": "background", **{str(k): v for k, v in MMWHS_LABELS.items() if k != 850}}
        (data / "labels.json").write_text(json.dumps(table))
        culprit, words = data / "ct" / "ct_00_label.nii.gz", "850"
    else:
        import SimpleITK as sitk

        culprit, words = data / "ct" / "ct_01_image.nii.gz", "3D"
        culprit.unlink()
        sitk.WriteImage(sitk.Image(8, 8, sitk.sitkFloat32), str(culprit))
    done = _python("-m", "cmmas.cli", "prepare-atlases", "--atlases", str(data), "--modality", "ct",
                   "--out", str(tmp_path / "set"), "--shape", "24")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"cmmas: error: {culprit}:") and words in lines[0]
    assert not (tmp_path / "set" / "transforms").exists()  # checked before any alignment


# ----------------------------------------------------------------------------- segment


@pytest.fixture(scope="module")
def simnet_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("simnet")


@pytest.fixture(scope="module")
def simnet_label(phantom, simnet_dir):
    out = simnet_dir / "seg.nii.gz"
    status = cli.main(["segment", "--target", str(phantom.target), "--atlas-set", str(phantom.aset.root),
                       "--reg-model", str(phantom.reg), "--fusion-model", str(phantom.sim), "--out", str(out),
                       "--preview"])
    assert status == 0
    return _check_maps(out, phantom)


def test_segment_with_simnet_writes_every_map_on_the_target_grid(phantom, simnet_label, simnet_dir):
    assert set(np.unique(simnet_label)) <= set(CODES)
    beside = simnet_dir
    for name in ("seg_volumes.csv", "seg_labels.itksnap.txt", "seg_labels.ctbl", "seg_preview.png", "seg_qc.json"):
        assert (beside / name).is_file(), name
    assert _foreground_dice(simnet_label, phantom.truth.array) > 0.6


def test_segment_from_a_bundle_with_mv_and_two_atlases(phantom, simnet_label, capsys, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(phantom.aset.root, bundle / "atlas_set")
    shutil.copy(phantom.reg, bundle / "reg_model.keras")
    shutil.copy(phantom.sim, bundle / "simnet.keras")
    out = tmp_path / "seg.nii.gz"
    status = cli.main(["segment", "--target", str(phantom.target), "--bundle", str(bundle), "--fusion", "mv",
                       "--atlases", "2", "--out", str(out)])
    assert status == 0
    assert "from 2 atlases" in capsys.readouterr().out
    assert not (tmp_path / "seg_preview.png").exists()  # without --preview
    label = _check_maps(out, phantom)
    assert _foreground_dice(label, phantom.truth.array) > 0.5


def _dlf_model(phantom, path: Path, atlas_count: int) -> Path:
    """An untrained DLF for the phantom's grid with a model card (trained, so it says, on ``atlas_count``)."""
    import dataclasses

    from cmmas.align import cards
    from cmmas.nn import training
    from cmmas.nn.dlf import build_dlf

    card = dataclasses.replace(cards.card_from_atlas_set(phantom.aset, "dlf", "ct", "mr"), atlas_count=atlas_count)
    return training.save_model(build_dlf(SHAPE, len(CODES), c_vote=2, c_fine=2, vote_levels=2, fine_levels=2), path,
                               card)


def test_a_bundle_segments_with_the_fusion_it_records(phantom, capsys, tmp_path):
    from cmmas import bundle as bundles

    model = _dlf_model(phantom, tmp_path / "dlf.keras", atlas_count=2)
    bundle = bundles.write_bundle(phantom.aset.root, phantom.reg, tmp_path / "bundle",
                                  fusion_models=[phantom.sim, model], fusion="dlf")
    assert sorted(p.name for p in bundle.glob("*.keras")) == ["dlf.keras", "reg_model.keras", "simnet.keras"]
    assert "Default fusion (--fusion), recorded in bundle.json: dlf" in (bundle / "README.txt").read_text()
    out = tmp_path / "seg.nii.gz"
    assert cli.main(["segment", "--target", str(phantom.target), "--bundle", str(bundle), "--out", str(out)]) == 0
    assert "with dlf" in capsys.readouterr().out
    qc = json.loads((tmp_path / "seg_qc.json").read_text())
    assert qc["fusion"] == "dlf" and set(qc["models"]) == {"reg_model", "dlf_model"}
    _check_maps(out, phantom)
    assert cli.main(["segment", "--target", str(phantom.target), "--bundle", str(bundle), "--fusion", "simnet",
                     "--out", str(out)]) == 0
    assert "with simnet" in capsys.readouterr().out


def test_a_dlf_outside_its_atlas_count_range_is_refused_in_one_line(phantom, tmp_path):
    model = _dlf_model(phantom, tmp_path / "dlf.keras", atlas_count=12)
    done = _python("-m", "cmmas.cli", "segment", "--target", str(phantom.target), "--atlas-set",
                   str(phantom.aset.root), "--no-registration", "--fusion-model", str(model),
                   "--out", str(tmp_path / "seg.nii.gz"))
    lines = [line for line in done.stderr.strip().splitlines() if line.startswith("cmmas")]
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert "trained with 12 atlases per target and fuses 6 to 48, not 3" in lines[0]


def test_several_targets_in_one_call_each_get_their_map(phantom, simnet_label, capsys, tmp_path):
    other = tmp_path / "other.nii.gz"
    shutil.copy(phantom.target, other)
    out = tmp_path / "segs"
    status = cli.main(["segment", "--target", str(phantom.target), str(other), "--atlas-set",
                       str(phantom.aset.root), "--reg-model", str(phantom.reg), "--fusion-model", str(phantom.sim),
                       "--out", str(out)])
    assert status == 0
    assert capsys.readouterr().out.count("wrote ") == 2
    first, second = _check_maps(out / "mr_00_image.nii.gz", phantom), _check_maps(out / "other.nii.gz", phantom)
    assert _foreground_dice(first, simnet_label) > 0.9 and _foreground_dice(second, simnet_label) > 0.9


@pytest.mark.parametrize("names, out, problem", [
    (("a.nii.gz", "b/a.nii.gz"), "segs", "share the name(s) ['a']"),
    (("a.nii.gz", "b.mha"), "segs.nii.gz", "must be a folder"),
])
def test_several_targets_need_a_folder_and_distinct_names(names, out, problem, capsys, tmp_path):
    argv = ["segment", "--target", *[str(tmp_path / n) for n in names], "--atlas-set", str(tmp_path / "set"),
            "--fusion", "mv", "--out", str(tmp_path / out)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert problem in err and err.count("\n") == 1


@pytest.mark.parametrize("content, targets, problem", [
    (None, 1, "transform file not found"),
    (b"not a transform", 1, "not an ITK/ANTs transform file"),
    (b"not a transform", 2, "give one --target with it"),
])
def test_a_bad_transform_is_one_stderr_line(content, targets, problem, capsys, tmp_path):
    transform = tmp_path / "affine.mat"
    if content is not None:
        transform.write_bytes(content)
    scans = [str(tmp_path / f"scan{k}.nii.gz") for k in range(targets)]
    argv = ["segment", "--target", *scans, "--atlas-set", str(tmp_path / "set"), "--fusion", "mv",
            "--transform", str(transform), "--out", str(tmp_path / ("segs" if targets > 1 else "seg.nii.gz"))]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert problem in err and str(transform) in err and err.count("\n") == 1


def test_segment_raw_atlas_folder_reuses_the_prepared_set(phantom, phantom_set_copy, simnet_label, capsys):
    out = phantom_set_copy.root.parent / "raw.nii.gz"  # beside a copy of the set, prepared from the same atlases
    argv = ["segment", "--target", str(phantom.target), "--atlases", str(phantom.data), "--reg-model",
            str(phantom.reg), "--fusion", "mv", "--out", str(out)]
    assert cli.main(argv) == 1  # the folder holds labelled CT and MR cases: which are the atlases?
    assert "--atlas-modality" in capsys.readouterr().err
    stamp = (phantom_set_copy.root / "manifest.json").stat().st_mtime_ns
    assert cli.main(argv + ["--atlas-modality", "ct"]) == 0
    assert "from 3 atlases" in capsys.readouterr().out
    assert (phantom_set_copy.root / "manifest.json").stat().st_mtime_ns == stamp
    # an untrained SimNet weighs every atlas alike: majority vote gives nearly the same map (the two
    # runs align the target separately, and multi-threaded ANTs varies a little between runs)
    assert np.mean(_check_maps(out, phantom) == simnet_label) > 0.95


@pytest.mark.parametrize("culprit", ["target", "model"])
def test_a_bad_input_file_is_one_stderr_line(phantom, tmp_path, culprit):
    bad = tmp_path / ("scan.nii.gz" if culprit == "target" else "simnet.keras")
    if culprit == "target":
        bad.write_bytes(b"not an image")
    target = bad if culprit == "target" else phantom.target
    done = _python("-m", "cmmas.cli", "segment", "--target", str(target), "--atlas-set", str(phantom.aset.root),
                   "--fusion-model", str(bad), "--no-registration", "--out", str(tmp_path / "seg.nii.gz"))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()  # no TensorFlow start-up lines: it was not imported
    assert len(lines) == 1 and lines[0].startswith(f"cmmas: error: {bad}:"), done.stderr
    assert not (tmp_path / "seg.nii.gz").exists()


@pytest.mark.slow
def test_deterministic_segment_runs_give_the_same_label_map(phantom, tmp_path):
    env = {k: v for k, v in ENV.items() if k != "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"}  # conftest's 1 thread
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / run / "seg.nii.gz"
        done = subprocess.run([sys.executable, "-m", "cmmas.cli", "segment", "--target", str(phantom.target),
                               "--atlas-set", str(phantom.aset.root), "--reg-model", str(phantom.reg), "--fusion",
                               "mv", "--deterministic", "--no-extras", "--out", str(out)],
                              capture_output=True, encoding="utf-8", env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(read_image(out).array)
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_register_writes_the_warped_atlas_on_the_fixed_grid(phantom, capsys, tmp_path):
    moving = phantom.data / "ct" / "ct_00_image.nii.gz"
    status = cli.main(["register", "--moving", str(moving), "--moving-label", str(moving).replace("_image", "_label"),
                       "--fixed", str(phantom.target), "--model", str(phantom.reg), "--out-dir", str(tmp_path)])
    assert status == 0
    assert "jacobian:" in capsys.readouterr().out
    fixed = read_image(phantom.target)
    for name in ("warped_image", "warped_label", "ddf_x"):
        assert fixed.geometry.differences(read_image(tmp_path / f"{name}.nii.gz").geometry) == []


# ----------------------------------------------------------------------------- bench_mas.py


def test_bench_help_lists_its_flags():
    done = _python(str(REPO / "bench" / "bench_mas.py"), "--help")
    assert done.returncode in (0, 1) and "Traceback" not in done.stderr, done.stderr  # absl's --help exits 1
    for flag in ("--atlas_set", "--reg_model", "--fusion_model", "--targets", "--atlases", "--fusions",
                 "--repeats", "--[no]classical", "--spacing", "--alignments", "--out"):
        assert flag in done.stdout, flag


@pytest.mark.slow
def test_bench_runs_cmmas_on_a_phantom_target(phantom, tmp_path):
    done = _python(str(REPO / "bench" / "bench_mas.py"), f"--data={phantom.data}", f"--atlas_set={phantom.aset.root}",
                   f"--reg_model={phantom.reg}", "--targets=mr_00", "--atlases=2", "--noclassical",
                   "--fusions=simnet,mv,jlf_tf", "--repeats=2", "--alignments=robust,single_mt", f"--out={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no --fusion_model network for simnet with the ct atlases: (b) leaves them out" in done.stdout
    with open(tmp_path / "bench_mas.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["label"]) for r in rows] == sorted(MMWHS_LABELS) * 4
    firsts = rows[::len(MMWHS_LABELS)]
    assert {r["target"] for r in rows} == {"mr_00"} and [r["fusion"] for r in firsts] == ["mv", "jlf_tf"] * 2
    assert [r["pipeline"] for r in firsts] == ["cmmas robust"] * 2 + ["cmmas single_mt"] * 2
    assert all(r["atlases"] == "2" for r in rows)
    dice = np.array([float(r["dice"]) for r in rows])
    assert np.all((dice >= 0) & (dice <= 1)) and dice.mean() > 0.3
    assert float(rows[0]["peak_mb"]) > 100  # the segmenting process's own peak (TensorFlow alone is more)
    assert (tmp_path / "bench_mas.md").read_text().startswith("| target |")
    assert (tmp_path / "mr_00" / "cmmas_robust_mv.nii.gz").is_file()
    assert not (tmp_path / "mr_00" / "cmmas_robust_mv_agreement.nii.gz").exists()  # the label only, as (a)
    record = json.loads((tmp_path / "bench_mas.json").read_text())
    assert record["command"].split()[0].endswith("bench_mas.py") and len(record["rows"]) == len(rows)
    assert record["provenance"]["cases"] == ["mr_00"] and record["provenance"]["models"]["reg_model0"]["sha256"]
    assert "median of 2" in done.stdout and "x robust" in done.stdout
