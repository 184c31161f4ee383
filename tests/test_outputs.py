"""outputs.py: label volumes, the ITK-SNAP and 3D Slicer label tables, the preview PNG."""

import csv
import math
import re

import numpy as np
import pytest
from matplotlib.image import imread

from cmmas import drawing, outputs
from cmmas.errors import GeometryError, LabelError
from cmmas.io import Geometry, Image

NAMES = {1: "liver", 2: "right kidney", 7: 'the "spleen"'}
SPACING_ZYX = (2.5, 0.7, 0.9)  # anisotropic, mm


def _volume() -> tuple[Image, Image]:
    """A noisy scan [12, 30, 40] and a label with codes 1 and 2 (7 absent), spacing SPACING_ZYX."""
    geometry = Geometry.identity((12, 30, 40), SPACING_ZYX)
    scan = np.random.default_rng(0).normal(100.0, 20.0, size=geometry.shape).astype(np.float32)
    label = np.zeros(geometry.shape, dtype=np.int32)
    label[2:8, 5:20, 4:18] = 1
    label[4:10, 12:25, 22:36] = 2
    scan[label > 0] += 80.0
    return Image(scan, geometry), Image(label, geometry)


def parse_itksnap(text: str) -> dict[int, tuple[tuple[int, int, int], float, str]]:
    """code -> ((R, G, B), opacity, name) of an ITK-SNAP label description file."""
    line = re.compile(r'^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([0-9.]+)\s+([01])\s+([01])\s+"([^"]*)"\s*$')
    found = {}
    for row in text.splitlines():
        if row.startswith("#"):
            continue
        match = line.match(row)
        assert match, row
        code, red, green, blue, alpha, _, _, name = match.groups()
        found[int(code)] = ((int(red), int(green), int(blue)), float(alpha), name)
    return found


def parse_slicer(text: str) -> dict[int, tuple[tuple[int, int, int], int, str]]:
    """code -> ((R, G, B), opacity 0..255, name) of a 3D Slicer colour table."""
    found = {}
    for row in text.splitlines():
        if row.startswith("#"):
            continue
        code, name, red, green, blue, alpha = row.split()
        found[int(code)] = ((int(red), int(green), int(blue)), int(alpha), name)
    return found


def test_millilitres_are_voxels_times_the_anisotropic_voxel_volume(tmp_path):
    _, label = _volume()
    agreement = label.with_array(np.where(label.array == 1, 0.75, 0.5).astype(np.float32))
    rows = outputs.label_volumes(label, NAMES, agreement)
    voxel_ml = 2.5 * 0.7 * 0.9 / 1000
    assert [r["code"] for r in rows] == [1, 2, 7] and [r["name"] for r in rows] == list(NAMES.values())
    assert [r["voxels"] for r in rows] == [6 * 15 * 14, 6 * 13 * 14, 0]
    for row in rows:
        assert row["millilitres"] == pytest.approx(row["voxels"] * voxel_ml, rel=1e-12)
    assert rows[0]["mean_agreement"] == pytest.approx(0.75) and rows[1]["mean_agreement"] == pytest.approx(0.5)
    assert math.isnan(rows[2]["mean_agreement"])  # no voxels
    assert all(math.isnan(r["mean_agreement"]) for r in outputs.label_volumes(label, NAMES, None))

    path = outputs.write_volumes_csv(rows, tmp_path / "volumes.csv")
    with open(path, newline="") as handle:
        read = list(csv.DictReader(handle))
    assert tuple(read[0]) == outputs.VOLUME_COLUMNS
    assert [int(r["voxels"]) for r in read] == [r["voxels"] for r in rows]
    assert [float(r["millilitres"]) for r in read] == pytest.approx([r["millilitres"] for r in rows], abs=1e-4)
    assert [r["mean_agreement"] for r in read] == ["0.7500", "0.5000", ""]
    assert read[2]["name"] == 'the "spleen"'
    back = outputs.read_volumes_csv(path)  # what a cohort's record reads instead of counting again
    assert [(r["code"], r["name"], r["voxels"]) for r in back] == [(r["code"], r["name"], r["voxels"]) for r in rows]
    assert [r["millilitres"] for r in back] == pytest.approx([r["millilitres"] for r in rows], abs=1e-4)
    assert back[0]["mean_agreement"] == 0.75 and math.isnan(back[2]["mean_agreement"])


def test_volumes_read_a_uint8_agreement_and_count_in_chunks(monkeypatch):
    _, label = _volume()
    rng = np.random.default_rng(0)
    fractions = rng.integers(0, 256, label.shape).astype(np.uint8)  # map_back's maps: value / 255
    monkeypatch.setattr(outputs, "_CHUNK", 1000)  # several chunks, one cut inside a structure
    rows = outputs.label_volumes(label, NAMES, label.with_array(fractions))
    for row in rows[:2]:
        inside = label.array == row["code"]
        assert row["voxels"] == np.count_nonzero(inside)
        assert row["mean_agreement"] == pytest.approx(fractions[inside].mean() / 255, rel=1e-12)
    with pytest.raises(LabelError, match="negative"):
        outputs.label_volumes(label.with_array(label.array.astype(np.int16) - 1), NAMES)


def test_volumes_reject_an_unnamed_code_and_an_agreement_on_another_grid():
    _, label = _volume()
    with pytest.raises(LabelError, match=r"label codes \[2\] have no name") as err:
        outputs.label_volumes(label, {1: "liver"})
    assert "\n" not in str(err.value)
    other = Image(np.ones((12, 30, 41), np.float32), Geometry.identity((12, 30, 41), SPACING_ZYX))
    with pytest.raises(GeometryError, match="agreement grid differs"):
        outputs.label_volumes(label, NAMES, other)


def test_itksnap_labels_parse_back_to_the_codes_names_and_palette(tmp_path):
    path = outputs.write_itksnap_labels(NAMES, tmp_path / "labels.itksnap.txt")
    text = path.read_text()
    assert text.splitlines()[1] == "# ITK-SnAP Label Description File"
    found = parse_itksnap(text)
    assert found[0] == ((0, 0, 0), 0.0, "Clear Label")
    colours = drawing.palette(NAMES)
    expected = {code: (colours[code], 1.0, name.replace('"', "'")) for code, name in NAMES.items()}
    assert {code: found[code] for code in NAMES} == expected and len(found) == len(NAMES) + 1


def test_slicer_color_table_parses_back_to_the_codes_names_and_palette(tmp_path):
    path = outputs.write_slicer_color_table(NAMES, tmp_path / "labels.ctbl")
    lines = path.read_text().splitlines()
    assert lines[0] == "# Color table file labels.ctbl" and lines[1] == f"# {len(NAMES) + 1} values"
    found = parse_slicer(path.read_text())
    assert found[0] == ((0, 0, 0), 0, "Background")
    colours = drawing.palette(NAMES)
    expected = {code: (colours[code], 255, name.replace(" ", "_")) for code, name in NAMES.items()}
    assert {code: found[code] for code in NAMES} == expected and len(found) == len(NAMES) + 1


def test_preview_is_a_png_of_three_views_with_the_palette_legend(tmp_path):
    image, label = _volume()
    path = outputs.write_preview(image, label, NAMES, tmp_path / "preview.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(path)
    height, width = pixels.shape[:2]
    assert 300 <= height <= 800 and 800 <= width <= 1600, pixels.shape
    rgb = np.round(pixels[..., :3] * 255).astype(int).reshape(-1, 3)
    colours = drawing.palette(NAMES)
    for code in (1, 2):  # the legend's swatches, in the palette colours
        assert np.any(np.all(rgb == colours[code], axis=1)), code
    assert not np.any(np.all(rgb == colours[7], axis=1))  # absent: not in the legend
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preview.png"]  # no temporary file left


def _panel_extent(pixels: np.ndarray, third: int) -> tuple[int, int]:
    """(height, width) in pixels of the image drawn in one third of the figure (rows and columns
    mostly not white: the titles and the legend are sparse)."""
    width = pixels.shape[1] // 3
    panel = pixels[:, third * width: (third + 1) * width, :3].min(axis=2) < 0.98
    rows = panel.mean(axis=1) > 0.3
    return int(np.count_nonzero(rows)), int(np.count_nonzero(panel[rows].mean(axis=0) > 0.5))


def test_preview_takes_its_aspect_ratio_from_the_spacing(tmp_path):
    image, label = _volume()
    (depth, rows, columns), (sz, sy, sx) = image.shape, image.spacing_zyx
    flat = Geometry.identity(image.shape, (0.5, 0.7, 0.9))
    thick = imread(outputs.write_preview(image, label, NAMES, tmp_path / "thick.png"))
    thin = imread(outputs.write_preview(Image(image.array, flat), Image(label.array, flat), NAMES,
                                        tmp_path / "thin.png"))
    for pixels, slab in ((thick, sz), (thin, 0.5)):
        height, width = _panel_extent(pixels, 1)  # coronal: z up, x across
        assert height / width == pytest.approx(depth * slab / (columns * sx), rel=0.1)
        height, width = _panel_extent(pixels, 0)  # axial: y down, x across
        assert height / width == pytest.approx(rows * sy / (columns * sx), rel=0.1)
    with pytest.raises(GeometryError, match="label grid differs"):
        outputs.write_preview(image, Image(label.array, flat), NAMES, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
