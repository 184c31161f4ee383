"""Data-set readers: MM-WHS, CHAOS (DICOM + PNG) and plain-folder layouts, splits, errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from skimage import io as skio

from cmmas.datasets import Case, explicit_split, fold_split, load_case, open_dataset
from cmmas.datasets.chaos import CHAOS_LABELS
from cmmas.datasets.mmwhs import MMWHS_LABELS
from cmmas.errors import DatasetError, GeometryError, LabelError
from cmmas.io import Geometry, Image, write_image

SHAPE = (5, 6, 7)  # (z, y, x): all sides differ, so a swapped axis cannot go unnoticed
SPACING = (2.5, 0.8, 0.7)  # (z, y, x) millimetres
ORIGIN = (10.0, -20.0, 30.0)  # (x, y, z) millimetres


def _write(path: Path, array: np.ndarray, spacing=SPACING, origin=ORIGIN) -> Path:
    return write_image(Image(array, Geometry.identity(array.shape, spacing, origin)), path)


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=SHAPE).astype(np.float32)


# ---------------------------------------------------------------- MM-WHS


def _heart_label() -> np.ndarray:
    label = np.zeros(SHAPE, dtype=np.int16)
    label[1:3, 1:4, 1:4] = 500
    label[3, 2:5, 2:6] = 420
    label[3, 5, 6] = 421  # the stray code of some released label files
    label[0, :2, :2] = 205
    return label


@pytest.fixture
def mmwhs_root(tmp_path: Path) -> Path:
    root = tmp_path / "mmwhs"
    for modality, number in (("ct", 1001), ("ct", 1002), ("mr", 1001)):
        folder = root / f"{modality}_train"
        _write(folder / f"{modality}_train_{number}_image.nii.gz", _image(number))
        _write(folder / f"{modality}_train_{number}_label.nii.gz", _heart_label())
    _write(root / "extra" / "ct_test" / "ct_test_2001_image.nii.gz", _image(2001))  # two levels down
    _write(root / "a" / "b" / "c" / "ct_train_1003_image.nii.gz", _image(3))  # three levels: not searched
    return root


def test_mmwhs_lists_cases_per_modality(mmwhs_root):
    data = open_dataset(mmwhs_root, "mmwhs")
    assert data.name == "mmwhs"
    assert [c.id for c in data.of("ct")] == ["ct_1001", "ct_1002"]  # ct_test_2001: skipped
    assert [c.id for c in data.of("mr")] == ["mr_1001"]
    assert data.labels == MMWHS_LABELS
    assert sorted(MMWHS_LABELS) == [205, 420, 500, 550, 600, 820, 850]
    assert data.case("ct_1001").label_path.name == "ct_train_1001_label.nii.gz"


def test_mmwhs_load_reads_421_as_left_atrium(mmwhs_root):
    data = open_dataset(mmwhs_root, "mmwhs")
    image, label = load_case(data.case("ct_1002"), data.labels)
    np.testing.assert_allclose(image.array, _image(1002))
    assert image.array.dtype == np.float32 and label.array.dtype == np.int32
    np.testing.assert_allclose(image.spacing_zyx, SPACING, atol=1e-3)
    expected = _heart_label().astype(np.int32)
    expected[expected == 421] = 420
    np.testing.assert_array_equal(label.array, expected)
    assert label.geometry.matches(image.geometry)


def test_load_case_component_keeps_one_code(mmwhs_root):
    data = open_dataset(mmwhs_root, "mmwhs")
    _, label = load_case(data.case("mr_1001"), data.labels, component=420)
    assert set(np.unique(label.array).tolist()) == {0, 420}
    assert int((label.array == 420).sum()) == int(np.isin(_heart_label(), (420, 421)).sum())
    with pytest.raises(LabelError, match="component 999"):
        load_case(data.case("mr_1001"), data.labels, component=999)


def test_load_case_rejects_unknown_label_value(tmp_path):
    label = _heart_label()
    label[4, 0, 0] = 300
    case = Case("ct_1", "ct", _write(tmp_path / "i.nii.gz", _image(1)), _write(tmp_path / "l.nii.gz", label))
    # 421 is unknown too: only MM-WHS cases carry the 421 -> 420 alias
    with pytest.raises(LabelError, match=r"l\.nii\.gz: unknown label values \[300, 421\]"):
        load_case(case, MMWHS_LABELS)
    _, raw = load_case(case)  # without a table any integer code is accepted
    assert 300 in raw.array


def test_load_case_rejects_label_off_the_image_grid(tmp_path):
    image = _write(tmp_path / "i.nii.gz", _image(1))
    label = _write(tmp_path / "lab.nii.gz", _heart_label(), spacing=(2.5, 0.8, 0.9))
    with pytest.raises(GeometryError, match=r"lab\.nii\.gz: label grid differs .*spacing"):
        load_case(Case("ct_1", "ct", image, label))


def test_mmwhs_empty_folder_says_what_was_expected(tmp_path):
    (tmp_path / "ct_train").mkdir()
    (tmp_path / "ct_train" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="no MM-WHS images found; expected files like ct_train_1001_image"):
        open_dataset(tmp_path, "mmwhs")


def test_mmwhs_label_without_image_is_an_error(tmp_path):
    _write(tmp_path / "ct_train_1001_image.nii.gz", _image(1))
    _write(tmp_path / "mr_train_1004_label.nii.gz", _heart_label())
    with pytest.raises(DatasetError, match=r"label without an image .*mr_1004"):
        open_dataset(tmp_path, "mmwhs")


# ---------------------------------------------------------------- plain folder


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    root = tmp_path / "plain"
    labels = {"0": "background", "1": "liver", "2": "right kidney", "3": "left kidney", "4": "spleen"}
    root.mkdir()
    (root / "labels.json").write_text(json.dumps(labels))
    organ = np.zeros(SHAPE, dtype=np.uint8)
    organ[1:4, 1:5, 1:3] = 1
    organ[2, 2, 4:6] = 4
    for case in ("ct_10", "ct_2"):
        _write(root / "ct" / f"{case}_image.nii.gz", _image(len(case)))
        _write(root / "ct" / f"{case}_label.nii.gz", organ)
    _write(root / "mr" / "mr_01_image.nii.gz", _image(7))
    _write(root / "mr" / "mr_01_label.nii.gz", (organ > 0).astype(np.uint8) * 3)
    _write(root / "mr" / "mr_05_image.nii.gz", _image(8))  # unlabelled target
    return root


def test_folder_layout_cases_and_label_table(folder_root):
    data = open_dataset(folder_root, "folder")
    assert data.labels == {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"}
    assert [c.id for c in data.of("ct")] == ["ct_2", "ct_10"]  # natural order
    assert [c.id for c in data.of("mr")] == ["mr_01", "mr_05"]
    image, label = load_case(data.case("mr_01"), data.labels)
    assert set(np.unique(label.array).tolist()) == {0, 3}
    assert label.geometry.matches(image.geometry)
    image, label = load_case(data.case("mr_05"), data.labels)
    assert label is None and image.shape == SHAPE
    with pytest.raises(DatasetError, match="no label map"):
        load_case(data.case("mr_05"), data.labels, component=1)
    with pytest.raises(DatasetError, match="no case 'ct_3'"):
        data.case("ct_3")


def test_folder_layout_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"labels\.json: label table not found"):
        open_dataset(tmp_path, "folder")
    (tmp_path / "labels.json").write_text('{"0": "background", "one": "liver"}')
    with pytest.raises(DatasetError, match="codes must be integers"):
        open_dataset(tmp_path, "folder")
    (tmp_path / "labels.json").write_text('{"0": "background", "1": "liver"}')
    with pytest.raises(DatasetError, match=r"no images found; expected \{ct,mr\}/<case>_image"):
        open_dataset(tmp_path, "folder")
    _write(tmp_path / "ct" / "ct_00_label.nii.gz", np.zeros(SHAPE, np.uint8))
    with pytest.raises(DatasetError, match=r"ct_00_label\.nii\.gz: label without an image"):
        open_dataset(tmp_path, "folder")


def test_open_dataset_rejects_unknown_layout_and_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="unknown data-set layout 'nifti'"):
        open_dataset(tmp_path, "nifti")
    with pytest.raises(DatasetError, match="data-set folder not found"):
        open_dataset(tmp_path / "absent", "folder")


def test_importing_datasets_stays_light():
    code = (
        "import sys, cmmas.datasets; "
        "print(sorted(m for m in ('SimpleITK', 'skimage', 'tensorflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- CHAOS (DICOM + PNG)


def _write_dicom_volume(folder: Path, volume: np.ndarray, names: list[str], modality: str) -> list[Path]:
    """Write one DICOM file per slice; ``names[k]`` holds slice ``z = len - 1 - k`` (reverse z order)."""
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    dz, dy, dx = SPACING
    paths = []
    for k, name in enumerate(names):
        z = len(names) - 1 - k
        piece = sitk.GetImageFromArray(volume[z].astype(np.int16))
        piece.SetSpacing((dx, dy))
        tags = {
            "0008|0060": modality.upper(),
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": "1.2.826.0.1.3680043.2.1125.1.1",
            "0008|0018": f"1.2.826.0.1.3680043.2.1125.1.1.{k + 1}",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(str(v) for v in (ORIGIN[0], ORIGIN[1], ORIGIN[2] + z * dz)),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|0030": f"{dy}\\{dx}",
            "0018|0050": str(dz),
        }
        for tag, value in tags.items():
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / name))
        writer.Execute(piece)
        paths.append(folder / name)
    return paths


def _write_pngs(folder: Path, masks: list[np.ndarray], names: list[str]) -> None:
    folder.mkdir(parents=True)
    for mask, name in zip(masks, names):
        skio.imsave(folder / name, mask.astype(np.uint8), check_contrast=False)


def _volume() -> np.ndarray:
    """Slice z holds 100 z + (a pattern that differs along y and x)."""
    z, y, x = np.meshgrid(*(np.arange(s) for s in SHAPE), indexing="ij")
    return (100 * z + 10 * y + x).astype(np.int16)


def _ct_mask(z: int) -> np.ndarray:
    """Liver mask of slice z: the first z + 1 pixels of row 2 (255, as CHAOS CT masks)."""
    mask = np.zeros(SHAPE[1:], dtype=np.uint8)
    mask[2, : z + 1] = 255
    return mask


def _mr_mask(z: int) -> np.ndarray:
    """Grey mask: z + 1 liver pixels (63) in row 1, and the three other organs with in-range greys."""
    mask = np.zeros(SHAPE[1:], dtype=np.uint8)
    mask[1, : z + 1] = 63
    mask[3, 0] = 130  # right kidney, off-centre grey
    mask[4, 1] = 189  # left kidney
    mask[5, 2:4] = (252, 241)  # spleen
    mask[0, 6] = 60  # liver, off-centre grey
    return mask


@pytest.fixture
def chaos_root(tmp_path: Path) -> Path:
    root = tmp_path / "CHAOS_Train_Sets" / "Train_Sets"
    n = SHAPE[0]
    volume = _volume()
    # CT: DICOM and PNG names differ; both lists are in instance order, which is reverse z order.
    dcm = [f"i{k:04d},0000b.dcm" for k in range(n)]
    _write_dicom_volume(root / "CT" / "2" / "DICOM_anon", volume, dcm, "ct")
    ct_masks = [_ct_mask(n - 1 - k) for k in range(n)]
    _write_pngs(root / "CT" / "2" / "Ground", ct_masks, [f"liver_GT_{k:03d}.png" for k in range(n)])
    # MR: PNG stems equal the DICOM stems; numbers unpadded so that only natural sorting orders them.
    stems = [f"IMG-0004-{k + 8}" for k in range(n)]
    _write_dicom_volume(root / "MR" / "10" / "T2SPIR" / "DICOM_anon", volume + 7, [s + ".dcm" for s in stems], "mr")
    mr_masks = [_mr_mask(n - 1 - k) for k in range(n)]
    _write_pngs(root / "MR" / "10" / "T2SPIR" / "Ground", mr_masks, [s + ".png" for s in stems])
    _write_dicom_volume(root / "MR" / "3" / "T2SPIR" / "DICOM_anon", volume, [f"{k}.dcm" for k in range(n)], "mr")
    return tmp_path / "CHAOS_Train_Sets"


def test_chaos_lists_cases(chaos_root):
    data = open_dataset(chaos_root, "chaos")
    assert data.labels == CHAOS_LABELS == {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"}
    assert [c.id for c in data.of("ct")] == ["ct_2"]
    assert [c.id for c in data.of("mr")] == ["mr_3", "mr_10"]
    assert data.case("mr_3").label_path is None
    assert data.case("mr_10").image_path.parts[-2:] == ("T2SPIR", "DICOM_anon")


def test_chaos_ct_stacks_slices_by_position_and_places_each_mask_on_its_slice(chaos_root):
    data = open_dataset(chaos_root, "chaos")
    image, label = load_case(data.case("ct_2"), data.labels)
    assert image.shape == SHAPE
    np.testing.assert_array_equal(image.array, _volume())
    np.testing.assert_allclose(image.spacing_zyx, SPACING, atol=1e-3)
    np.testing.assert_allclose(image.geometry.origin, ORIGIN, atol=1e-3)
    np.testing.assert_allclose(image.geometry.direction_matrix, np.eye(3), atol=1e-6)
    assert label.geometry.matches(image.geometry)
    for z in range(SHAPE[0]):
        np.testing.assert_array_equal(label.array[z], (_ct_mask(z) > 0).astype(np.int32))


def test_chaos_mr_grey_values_map_to_organ_codes(chaos_root):
    data = open_dataset(chaos_root, "chaos")
    image, label = load_case(data.case("mr_10"), data.labels)
    np.testing.assert_array_equal(image.array, _volume() + 7)
    for z in range(SHAPE[0]):
        assert int((label.array[z, 1] == 1).sum()) == z + 1  # liver run of slice z sits at z
        assert label.array[z, 0, 6] == 1
        assert label.array[z, 3, 0] == 2 and label.array[z, 4, 1] == 3
        np.testing.assert_array_equal(label.array[z, 5, 2:4], (4, 4))
    assert set(np.unique(label.array).tolist()) == {0, 1, 2, 3, 4}
    _, spleen = load_case(data.case("mr_10"), data.labels, component=4)
    assert int((spleen.array == 4).sum()) == 2 * SHAPE[0] and set(np.unique(spleen.array).tolist()) == {0, 4}
    image, none = load_case(data.case("mr_3"), data.labels)
    assert none is None and image.shape == SHAPE


def test_chaos_rejects_grey_values_outside_the_ranges(chaos_root):
    ground = chaos_root / "Train_Sets" / "MR" / "10" / "T2SPIR" / "Ground"
    mask = _mr_mask(0)
    mask[0, 0] = 100
    skio.imsave(ground / "IMG-0004-9.png", mask, check_contrast=False)
    data = open_dataset(chaos_root, "chaos")
    with pytest.raises(LabelError, match=r"IMG-0004-9\.png: grey values \[100\] are outside"):
        load_case(data.case("mr_10"), data.labels)


def test_chaos_mask_count_and_shape_must_fit_the_slices(chaos_root):
    ground = chaos_root / "Train_Sets" / "CT" / "2" / "Ground"
    data = open_dataset(chaos_root, "chaos")
    (ground / "liver_GT_004.png").unlink()
    with pytest.raises(DatasetError, match="4 PNG masks for 5 DICOM slices"):
        load_case(data.case("ct_2"), data.labels)
    skio.imsave(ground / "liver_GT_004.png", np.zeros((7, 6), np.uint8), check_contrast=False)  # transposed
    with pytest.raises(GeometryError, match=r"liver_GT_004\.png: mask is \(7, 6\) \(rows, cols\)"):
        load_case(data.case("ct_2"), data.labels)


def test_chaos_uneven_slice_positions_are_rejected(tmp_path):
    folder = tmp_path / "Train_Sets" / "CT" / "1" / "DICOM_anon"
    paths = _write_dicom_volume(folder, _volume(), [f"{k}.dcm" for k in range(SHAPE[0])], "ct")
    piece = sitk.ReadImage(str(paths[0]))
    piece.SetMetaData("0020|0032", f"{ORIGIN[0]}\\{ORIGIN[1]}\\{ORIGIN[2] + 4 * SPACING[0] + 1.0}")
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(paths[0]))
    writer.Execute(piece)
    data = open_dataset(tmp_path, "chaos")
    with pytest.raises(DatasetError, match="not evenly spaced"):
        load_case(data.case("ct_1"), data.labels)


def test_chaos_empty_folder_says_what_was_expected(tmp_path):
    (tmp_path / "CT").mkdir()
    with pytest.raises(DatasetError, match=r"no CHAOS cases found; expected CT/<n>/DICOM_anon"):
        open_dataset(tmp_path, "chaos")


# ---------------------------------------------------------------- splits


def _cases(ids):
    return [Case(i, "ct", Path(f"{i}.nii.gz"), None) for i in ids]


def test_fold_split_matches_the_paper_with_20_cases():
    ids = [f"ct_{1001 + i}" for i in range(20)]
    shuffled = _cases(np.random.default_rng(1).permutation(ids).tolist())
    seen = []
    for fold in range(1, 5):
        targets, atlases = fold_split(shuffled, fold)
        assert [c.id for c in targets] == ids[5 * (fold - 1) : 5 * (fold - 1) + 5]
        assert [c.id for c in atlases] == [i for i in ids if i not in ids[5 * (fold - 1) : 5 * fold]]
        seen += [c.id for c in targets]
    assert sorted(seen) == ids


def test_fold_split_general_chunks_and_errors():
    cases = _cases([f"c{i}" for i in range(10)])
    sizes = [len(fold_split(cases, k, n_folds=4)[0]) for k in range(1, 5)]
    assert sizes == [3, 3, 2, 2]
    assert [c.id for c in fold_split(cases, 3, n_folds=4)[0]] == ["c6", "c7"]
    assert [c.id for c in fold_split(cases, 1, n_folds=4)[0]] == ["c0", "c1", "c2"]  # c10 would follow c9
    with pytest.raises(DatasetError, match=r"fold must be in 1\.\.4 \(or 0: none held out\), got 5"):
        fold_split(cases, 5)
    targets, atlases = fold_split(list(reversed(cases)), 0)  # fold 0: every case trains (a bundle's)
    assert targets == () and [c.id for c in atlases] == [f"c{i}" for i in range(10)]
    with pytest.raises(DatasetError, match="cannot be split into 12 folds"):
        fold_split(cases, 1, n_folds=12)
    with pytest.raises(DatasetError, match="more than once"):
        fold_split(cases + cases[:1], 1)


def test_explicit_split_by_ids():
    cases = _cases(["mr_01", "mr_02", "mr_03", "mr_05"])
    targets, atlases = explicit_split(cases, ["mr_05"], ["mr_03", "mr_01"])
    assert [c.id for c in targets] == ["mr_05"] and [c.id for c in atlases] == ["mr_03", "mr_01"]
    with pytest.raises(DatasetError, match=r"unknown case id\(s\) \['mr_04'\]"):
        explicit_split(cases, ["mr_04"], ["mr_01"])
    with pytest.raises(DatasetError, match="both target and atlas"):
        explicit_split(cases, ["mr_01"], ["mr_01", "mr_02"])
    with pytest.raises(DatasetError, match="no atlases"):
        explicit_split(cases, ["mr_01"], [])


# ---------------------------------------------------------------- the real data beside the checkout


def test_real_abdomen_folder(abdomen_data):
    data = open_dataset(abdomen_data, "folder")
    assert len(data.of("ct")) == 22 and len(data.of("mr")) == 14
    assert set(data.labels) == {1, 2, 3, 4}
    assert all(c.label_path is not None for cs in data.cases.values() for c in cs)
    image, label = load_case(data.of("mr")[0], data.labels)
    assert label.geometry.matches(image.geometry)
    assert set(np.unique(label.array).tolist()) <= {0, 1, 2, 3, 4} and (label.array == 1).any()
