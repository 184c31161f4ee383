"""Pre-alignment of atlas -> target pairs (cmmas.align.pairwise) and experiments/prealign.py.

Synthetic cross-modality data: 48^3 volumes at 2 mm holding a body and three ellipsoid
organs; the MR target and each CT atlas are the same anatomy displaced (shift + rotation)
and rendered with different, non-monotonic intensity maps.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from cmmas.align import pairwise
from cmmas.datasets import open_dataset
from cmmas.errors import CmmasError, DatasetError, ImageReadError
from cmmas.io import Geometry, Image, read_image, read_label, write_image
from cmmas.metrics import dice
from cmmas.datasets.loading import load_case
from scripts import run_experiment

REPO = Path(__file__).resolve().parents[2]
SHAPE = (48, 48, 48)
#: Anatomy size factor: the ellipsoids below are given for a 32^3 grid.
SCALE = 1.5
SPACING = 2.0
LABELS = {1: "alpha", 2: "beta", 3: "gamma"}
#: Intensity of background, body and organs 1..3 per modality (non-monotonic between them).
INTENSITY = {"ct": (0.0, 60.0, 140.0, 200.0, 100.0), "mr": (0.0, 120.0, 40.0, 90.0, 220.0)}
#: (shift in voxels (z, y, x), rotation about z in degrees) of each atlas; the target is (0, 0).
ATLAS_MOTION = {"a_0": ((2.0, -2.5, 3.0), 8.0), "a_1": ((-2.0, 3.0, -1.5), -6.0), "a_2": ((1.0, 1.5, 2.5), 4.0)}


def _anatomy(shift, angle_deg):
    """Tissue map: 0 outside, 1 body, 2..4 organs 1..3, displaced by ``shift``/``angle``."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in SHAPE], indexing="ij"))
    centre = (np.asarray(SHAPE) - 1) / 2
    a = np.deg2rad(angle_deg)
    rotation = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rel = grid - (centre + SCALE * np.asarray(shift))[:, None, None, None]
    p = np.einsum("ij,j...->i...", rotation.T, rel) / SCALE

    def ellipsoid(c, r):
        return sum(((p[k] - c[k]) / r[k]) ** 2 for k in range(3)) <= 1

    tissue = ellipsoid((0, 0, 0), (12, 13, 11)).astype(np.int32)
    tissue[ellipsoid((-3, -3, -4), (6, 6, 5))] = 2
    tissue[ellipsoid((4, 4, -3), (3, 4, 3))] = 3
    tissue[ellipsoid((2, -2, 5), (4, 3, 3))] = 4
    return tissue


def _case(modality, shift, angle, origin, seed):
    tissue = _anatomy(shift, angle)
    rng = np.random.default_rng(seed)
    image = np.asarray(INTENSITY[modality])[tissue]
    image = ndimage.gaussian_filter(image, 0.7) + rng.normal(0, 3.0, SHAPE)
    geometry = Geometry.identity(SHAPE, (SPACING,) * 3, origin=origin)
    label = np.where(tissue >= 2, tissue - 1, 0).astype(np.int32)
    return Image(image.astype(np.float32), geometry), Image(label, geometry)


def write_folder_dataset(root: Path, atlases=("a_0", "a_1"), targets=("t_0",)) -> Path:
    """A folder-layout data set: CT atlases and MR targets (t_0 undisplaced)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "labels.json").write_text(json.dumps({"0": "background", **{str(k): v for k, v in LABELS.items()}}))
    for k, name in enumerate(targets):
        image, label = _case("mr", (0.5 * k, 0, -0.5 * k), 2.0 * k, (5.0, -3.0, 2.0), 100 + k)
        write_image(image, root / "mr" / f"{name}_image.nii.gz")
        write_image(label, root / "mr" / f"{name}_label.nii.gz")
    for k, name in enumerate(atlases):
        shift, angle = ATLAS_MOTION[name]
        image, label = _case("ct", shift, angle, (0.0, 0.0, 0.0), k)
        write_image(image, root / "ct" / f"{name}_image.nii.gz")
        write_image(label, root / "ct" / f"{name}_label.nii.gz")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return open_dataset(write_folder_dataset(tmp_path_factory.mktemp("blobs"), atlases=tuple(ATLAS_MOTION)), "folder")


@pytest.fixture(scope="module")
def aligned(data, tmp_path_factory):
    """Two atlases affinely aligned to the target, on the target's own grid."""
    out = tmp_path_factory.mktemp("pairs")
    atlases = [data.case("a_0"), data.case("a_1")]
    result = pairwise.prealign_pairs(atlases, data.case("t_0"), data.labels, out, fast=True, progress=False)
    return out, result


def _overlap(label_a, label_b):
    return np.mean([dice(label_a == k, label_b == k) for k in LABELS])


def test_prealign_pairs_writes_the_layout_and_aligns(data, aligned):
    out, result = aligned
    folder = out / "t_0"
    assert result.folder == folder and result.target_id == "t_0"
    assert result.atlas_ids == ("a_0", "a_1") and result.registered == ("a_0", "a_1")
    assert all(s > 0 for s in result.seconds.values())
    manifest = json.loads((folder / "pairs.json").read_text())
    assert manifest["settings"]["kind"] == "affine" and set(manifest["atlases"]) == {"a_0", "a_1"}
    target = read_image(folder / "target_image.nii.gz")
    truth = read_label(folder / "target_label.nii.gz")
    original, _ = load_case(data.case("t_0"), data.labels)
    assert target.geometry.matches(original.geometry)
    gains = []
    for atlas_id in ("a_0", "a_1"):
        image_path, label_path, transforms = pairwise.atlas_files(folder, atlas_id)
        assert (transforms / "affine.mat").is_file()
        warped = read_label(label_path, allowed=LABELS, like=target)
        assert read_image(image_path).geometry.matches(target.geometry)
        _, atlas_label = load_case(data.case(atlas_id), data.labels)
        from cmmas import preprocess

        before = preprocess.resample(atlas_label, geometry=target.geometry, kind="nearest").array
        after = _overlap(warped.array, truth.array)
        assert after > 0.7
        gains.append(after - _overlap(before, truth.array))
    assert np.mean(gains) > 0.2


def test_rerun_skips_done_pairs_and_adds_new_ones(data, aligned, tmp_path):
    out = tmp_path / "pairs"
    shutil.copytree(aligned[0], out)
    atlas_files = [p for p in (out / "t_0").rglob("*") if p.is_file()]
    mtimes = {p: p.stat().st_mtime_ns for p in atlas_files}
    again = pairwise.prealign_pairs(
        [data.case("a_0"), data.case("a_1")], data.case("t_0"), data.labels, out, fast=True, progress=False
    )
    assert again.registered == ()
    assert again.seconds == aligned[1].seconds
    assert {p: p.stat().st_mtime_ns for p in atlas_files} == mtimes
    more = pairwise.prealign_pairs(
        [data.case(i) for i in ("a_0", "a_1", "a_2")], data.case("t_0"), data.labels, out, fast=True, progress=False
    )
    assert more.registered == ("a_2",) and more.atlas_ids == ("a_0", "a_1", "a_2")
    assert {p: p.stat().st_mtime_ns for p in atlas_files if p.name != "pairs.json"} == {
        p: t for p, t in mtimes.items() if p.name != "pairs.json"
    }


def test_other_settings_are_refused_in_the_same_folder(data, aligned, tmp_path):
    out = tmp_path / "pairs"
    shutil.copytree(aligned[0], out)
    with pytest.raises(DatasetError, match="other settings: kind 'affine'"):
        pairwise.prealign_pairs([data.case("a_0")], data.case("t_0"), data.labels, out, kind="syn", progress=False)


def test_syn_at_a_working_spacing(data, tmp_path):
    result = pairwise.prealign_pairs(
        [data.case("a_0")], data.case("t_0"), data.labels, tmp_path, kind="syn", spacing_mm=4.0, fast=True, progress=False
    )
    folder = result.folder
    target = read_image(folder / "target_image.nii.gz")
    assert target.spacing_zyx == pytest.approx((4.0, 4.0, 4.0))
    assert target.shape == (24, 24, 24)
    assert read_label(folder / "target_label.nii.gz").geometry.matches(target.geometry)
    _, label_path, transforms = pairwise.atlas_files(folder, "a_0")
    assert {p.name for p in transforms.iterdir()} == {"affine.mat", "warp.nii.gz", "inverse_warp.nii.gz"}
    warped = read_label(label_path, like=target)
    truth = read_label(folder / "target_label.nii.gz")
    assert _overlap(warped.array, truth.array) > 0.5


def test_load_pairs_reads_the_stacks(aligned):
    out, _ = aligned
    pairs = pairwise.load_pairs(out / "t_0")
    assert pairs.atlas_ids == ("a_0", "a_1") and pairs.target_id == "t_0"
    assert pairs.atlas_images.shape == (2,) + SHAPE and pairs.atlas_images.dtype == np.float32
    assert pairs.atlas_labels.shape == (2,) + SHAPE and pairs.atlas_labels.dtype == np.int32
    assert set(np.unique(pairs.atlas_labels)) <= {0, 1, 2, 3}
    assert pairs.seconds.shape == (2,) and np.all(pairs.seconds > 0)
    assert pairs.labels == LABELS and pairs.direction == "ct->mr" and pairs.kind == "affine"
    assert pairs.target_label is not None and pairs.target_label.shape == SHAPE
    one = pairwise.load_pairs(out / "t_0", atlas_ids=["a_1"])
    np.testing.assert_array_equal(one.atlas_labels[0], pairs.atlas_labels[1])
    with pytest.raises(DatasetError, match="no finished pair for atlas"):
        pairwise.load_pairs(out / "t_0", atlas_ids=["a_2"])
    assert pairwise.target_folders(out) == [out / "t_0"]


def test_reading_what_is_not_a_pairs_folder_fails_clearly(tmp_path):
    with pytest.raises(DatasetError, match="pairs.json"):
        pairwise.load_pairs(tmp_path)
    with pytest.raises(DatasetError, match="holds no target folder"):
        pairwise.target_folders(tmp_path)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "pairs.json").write_text("{not json")
    with pytest.raises(DatasetError, match="unreadable manifest"):
        pairwise.load_pairs(tmp_path / "x")


def test_bad_arguments_raise(data, tmp_path):
    atlas, target = data.case("a_0"), data.case("t_0")
    with pytest.raises(CmmasError, match="registration kind"):
        pairwise.prealign_pairs([atlas], target, data.labels, tmp_path, kind="bspline")
    with pytest.raises(DatasetError, match="both atlas and target"):
        pairwise.prealign_pairs([target], target, data.labels, tmp_path)
    with pytest.raises(DatasetError, match="component 9"):
        pairwise.prealign_pairs([atlas], target, data.labels, tmp_path, component=9)
    with pytest.raises(CmmasError, match="spacing"):
        pairwise.prealign_pairs([atlas], target, data.labels, tmp_path, spacing_mm=-1.0)


def test_worker_errors_come_back_as_cmmas_errors(data, tmp_path):
    """A pool worker's CmmasError reaches the caller with its type, file and message, after the
    other pairs have finished and been recorded."""
    root = tmp_path / "data"
    shutil.copytree(data.root, root)
    image, label = read_image(root / "ct" / "a_1_image.nii.gz"), read_label(root / "ct" / "a_1_label.nii.gz")
    write_image(image.with_array(np.full(image.shape, 7.0, np.float32)), root / "ct" / "flat_image.nii.gz")
    write_image(label, root / "ct" / "flat_label.nii.gz")
    flat = open_dataset(root, "folder")
    with pytest.raises(ImageReadError, match=r"flat_image.nii.gz.*constant.*1 of 2 pair\(s\) failed"):
        pairwise.prealign_pairs(
            [flat.case("a_0"), flat.case("flat")], flat.case("t_0"), flat.labels, tmp_path / "out",
            fast=True, workers=2, progress=False,
        )
    assert pairwise.load_pairs(tmp_path / "out" / "t_0").atlas_ids == ("a_0",)


def _script(*args, timeout=240):
    return run_experiment("prealign", *args, timeout=timeout)


def test_script_help_is_quick_and_lists_the_flags():
    done = _script("--help", timeout=60)
    assert done.returncode in (0, 1) and not done.stderr  # absl's --help exits with 1
    for flag in ("--registration", "--workers", "--mode", "--fold", "--targets", "--spacing"):
        assert flag in done.stdout


def test_script_pairwise_run_then_rerun_then_bad_id(data, aligned, tmp_path):
    """The script adds a third atlas to a folder holding two (same settings), then skips all."""
    out = tmp_path / "pairs"
    shutil.copytree(aligned[0], out)
    args = ["--data", str(data.root), "--layout", "folder", "--targets", "t_0", "--atlases", "a_0,a_1,a_2",
            "--spacing", "0", "--fast", "--noprogress", "--out", str(out)]
    first = _script(*args)
    assert first.returncode == 0, first.stderr
    assert "1 registered now" in first.stdout
    assert pairwise.load_pairs(out / "t_0").atlas_ids == ("a_0", "a_1", "a_2")
    second = _script(*args)
    assert second.returncode == 0 and "0 registered now" in second.stdout
    bad = _script(*[a if a != "a_0,a_1,a_2" else "a_0,nope" for a in args])
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("prealign: ") and "nope" in bad.stderr


def test_script_reference_mode_prepares_a_space(data, tmp_path):
    out = tmp_path / "space"
    done = _script("--data", str(data.root), "--mode", "reference", "--targets", "t_0", "--atlases", "a_0,a_1",
                   "--shape", "16,16,16", "--spacing", "3", "--align_spacing", "4", "--fast", "--noprogress",
                   "--out", str(out))
    assert done.returncode == 0, done.stderr
    from cmmas.align.atlas_set import AtlasSet

    space = AtlasSet(out)
    assert space.manifest.shape_zyx == (16, 16, 16)
    assert space.ids(role="test") == ["t_0"]
    assert sorted(space.ids(role="train")) == ["a_0", "a_1"]
