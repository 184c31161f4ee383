"""A catalogue of bad or odd inputs (issue 31): each is refused in one line naming the file, or
read with a named warning that is kept with the image. One small test per case."""

from __future__ import annotations

import itertools
import logging
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cmmas import cli, outputs, request
from cmmas.align import target
from cmmas.errors import CmmasError, GeometryError
from cmmas.headers import read_nifti_header
from cmmas.io import Image, Geometry, read_image


def _nifti(path: Path, shape=(8, 9, 10), spacing=(1.5, 2.0, 2.5)) -> Path:
    array = np.zeros(shape, np.int16)
    array[2:5, 3:6, 2:7] = 7
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((10.0, 20.0, 30.0))
    sitk.WriteImage(image, str(path))
    return path


def _edit(path: Path, offset: int, fmt: str, *values) -> Path:
    raw = bytearray(path.read_bytes())
    struct.pack_into("<" + fmt, raw, offset, *values)
    path.write_bytes(bytes(raw))
    return path


PIXDIM, QFORM_CODE, SROW_X, SROW_Y = 76, 252, 280, 296


# Header sanity (NIfTI) -------------------------------------------------------------------------


@pytest.mark.parametrize("value, shown", [(0.0, "is 0"), (float("nan"), "is nan"), (-2.5, "negative (-2.5)")])
def test_bad_pixdim_is_refused_naming_the_axis(tmp_path, value, shown):
    path = _edit(_nifti(tmp_path / "scan.nii"), PIXDIM + 12, "f", value)
    with pytest.raises(GeometryError) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "pixdim[3] (z spacing)" in message and shown in message
    assert "\n" not in message


def test_qform_sform_disagreement_is_a_named_warning_kept_with_the_image(tmp_path, caplog):
    path = _edit(_nifti(tmp_path / "scan.nii"), SROW_X + 12, "f", 50.0)  # the sform moves x by 60 mm
    with caplog.at_level(logging.WARNING):
        image = read_image(path)
        read_image(path)
    assert len(image.warnings) == 1
    warning = image.warnings[0]
    assert warning.startswith(str(path)) and "qform" in warning and "the sform was used" in warning
    assert image.with_array(image.array * 2).warnings == image.warnings
    assert [r.getMessage() for r in caplog.records].count(warning) == 1  # logged once
    with pytest.raises(GeometryError, match="strict"):
        read_image(path, strict=True)


def test_clean_header_has_no_warning(tmp_path):
    path = _nifti(tmp_path / "scan.nii.gz")
    assert read_image(path).warnings == ()
    header = read_nifti_header(path)
    assert header.version == 1 and header.pixdim[1:4] == (1.5, 2.0, 2.5)


def test_degenerate_direction_has_its_own_message(tmp_path):
    path = _nifti(tmp_path / "scan.nii")
    _edit(path, SROW_Y, "4f", 1.5, 0.0, 0.0, 20.0)  # the y axis parallel to x
    _edit(path, QFORM_CODE, "h", 0)
    with pytest.raises(GeometryError) as info:
        read_image(path)
    assert str(info.value).startswith(str(path)) and "orthonormal" in str(info.value)
    assert "truncated" not in str(info.value)


# DICOM slice spacing ---------------------------------------------------------------------------


def _dicom_series(folder: Path, n: int = 8, gap: float = 2.5) -> Path:
    folder.mkdir()
    array = np.arange(n * 6 * 7, dtype=np.int16).reshape(n, 6, 7)
    for k in range(n):
        image = sitk.GetImageFromArray(array[k : k + 1])
        for tag, value in {"0008|0060": "CT", "0020|000d": "1.2.3", "0020|000e": "1.2.3.4", "0020|0013": str(k + 1),
                           "0020|0032": f"0\\0\\{k * gap}", "0020|0037": "1\\0\\0\\0\\1\\0",
                           "0028|0030": "1\\1"}.items():
            image.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"IM{k:04d}.dcm"))
        writer.Execute(image)
    return folder


def test_dicom_series_evenly_spaced_has_no_warning(tmp_path):
    image = read_image(_dicom_series(tmp_path / "series"))
    assert image.shape == (8, 6, 7) and image.warnings == ()


def test_dicom_missing_slice_is_named_and_strict_refuses(tmp_path):
    folder = _dicom_series(tmp_path / "series")
    (folder / "IM0004.dcm").unlink()
    image = read_image(folder)
    assert len(image.warnings) == 1
    warning = image.warnings[0]
    assert warning.startswith(str(folder)) and "5 mm" in warning and "IM0003.dcm, IM0005.dcm" in warning
    with pytest.raises(GeometryError, match="not evenly spaced"):
        read_image(folder, strict=True)


# The constant-image check looks at what it names -----------------------------------------------


def test_uniform_box_in_an_empty_scan_is_not_called_constant():
    array = np.zeros((48, 40, 40), np.float32)
    array[16:32, 16:32, 16:32] = 300.0  # on the 2-voxel blocks of a 2 mm alignment of a 1 mm scan
    moving = target.alignment_image(Image(array, Geometry.identity(array.shape)), 2.0)
    assert moving.array.min() < moving.array.max()


# The request checker ---------------------------------------------------------------------------


def test_output_equal_to_input_is_refused_however_spelt(tmp_path, monkeypatch):
    scan = _nifti(tmp_path / "scan.nii.gz")
    (tmp_path / "link.nii.gz").symlink_to(scan)
    monkeypatch.chdir(tmp_path)
    for spelling in [scan, Path("./scan.nii.gz"), Path("sub/../scan.nii.gz"), tmp_path / "link.nii.gz"]:
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(CmmasError, match="would overwrite the input --target") as info:
            request.check_outputs([("--target", scan)], [("--out", spelling)])
        assert str(info.value).startswith(str(spelling)) and "\n" not in str(info.value)


def test_output_in_a_dicom_folder_input_is_refused(tmp_path):
    folder = _dicom_series(tmp_path / "series", n=3)
    for out in [folder, folder / "IM0001.dcm", folder / "seg.nii.gz"]:
        with pytest.raises(CmmasError, match="--target"):
            request.check_outputs([("--target", folder)], [("--out", out)])


def test_two_outputs_of_one_call_must_differ(tmp_path):
    with pytest.raises(CmmasError, match="also the output --out"):
        request.check_outputs([], [("--out", tmp_path / "a.nii.gz"), ("--out (qc)", tmp_path / "./a.nii.gz")])


@pytest.mark.parametrize("case", ["folder", "slash", "ending"])
def test_bad_out_paths_are_refused(tmp_path, case):
    (tmp_path / "existing").mkdir()
    out = {"folder": str(tmp_path / "existing"), "slash": str(tmp_path / "new") + "/",
           "ending": str(tmp_path / "seg.png")}[case]
    with pytest.raises(CmmasError) as info:
        request.check_image_output("--out", out)
        request.check_writable("--out", out)
    assert str(info.value).startswith(out) and "--out" in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_parent_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(CmmasError, match="not writable"):
        request.check_writable("--out", locked / "deeper" / "seg.nii.gz")


# The CLI: parse-time ranges and the request checked before any work ------------------------------


@pytest.mark.parametrize("flags, shown", [(["--atlases", "-3"], "the number of atlases must be at least 1"),
                                          (["--refine-steps", "-1"], "must be at least 0"),
                                          (["--batch-size", "0"], "must be at least 1")])
def test_out_of_range_options_fail_at_parse_time(capsys, flags, shown):
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["segment", "--target", "a.nii.gz", "--out", "b.nii.gz", *flags])
    assert shown in capsys.readouterr().err


def test_strict_and_no_registration_are_explicit_flags():
    args = cli._parser().parse_args(["segment", "--target", "a.nii.gz", "--out", "b.nii.gz", "--strict",
                                     "--no-registration"])
    assert args.strict and args.no_registration


def _segment_args(*argv):
    return cli._parser().parse_args(["segment", *map(str, argv)])


def test_segment_request_refuses_out_onto_the_target(tmp_path):
    scan = _nifti(tmp_path / "X.nii.gz")
    with pytest.raises(CmmasError, match="would overwrite the input --target"):
        cli._check_segment_request(_segment_args("--target", scan, "--out", scan))
    assert read_image(scan).array.max() == 7  # untouched


def test_segment_request_refuses_a_derived_name_onto_an_input(tmp_path):
    scan = _nifti(tmp_path / "seg_prob_205.nii.gz")
    with pytest.raises(CmmasError, match=r"--out \(prob_205\)"):
        cli._check_segment_request(_segment_args("--target", scan, "--out", tmp_path / "seg.nii.gz"))
    model = tmp_path / "seg_qc.json"
    model.write_text("{}")
    with pytest.raises(CmmasError, match=r"--out \(qc\).*--reg-model"):
        cli._check_segment_request(_segment_args("--target", tmp_path / "a.nii.gz", "--reg-model", model,
                                                 "--out", tmp_path / "seg.nii.gz"))


def test_segment_request_returns_the_label_paths(tmp_path):
    outs = cli._check_segment_request(_segment_args("--target", tmp_path / "a.nii.gz", tmp_path / "b.nii",
                                                    "--out", tmp_path / "segs", "--format", "mha"))
    assert outs == [tmp_path / "segs" / "a.mha", tmp_path / "segs" / "b.mha"]


# Property: no output name derived from --out can equal an input --------------------------------

_STEMS = ["X", "seg", "seg_prob_1", "X_qc", "case.01", "seg_agreement"]
_ENDINGS = [".nii.gz", ".nii", ".mha"]
_KINDS = ["label", "prob_1", "prob_205", "agreement", "volumes", "itksnap", "slicer", "preview", "qc"]


def _derived(out: Path) -> dict[str, Path]:
    return outputs.output_paths(out, [1, 205])


@pytest.mark.parametrize("n_targets", [1, 3])
def test_no_derived_output_can_equal_an_input(tmp_path, n_targets):
    checked = 0
    for stem, ending, kind, victim in itertools.product(_STEMS, _ENDINGS, _KINDS, range(n_targets)):
        folder = tmp_path if n_targets == 1 else tmp_path / "segs"
        targets = [tmp_path / f"t{i}.nii.gz" for i in range(n_targets)]
        out = tmp_path / f"{stem}{ending}" if n_targets == 1 else folder
        labels = outputs.label_paths(targets, out)
        # the input is placed exactly where one derived output of one target goes
        targets[victim] = _derived(labels[victim])[kind]
        try:
            labels = outputs.label_paths(targets, out)
        except CmmasError:  # two targets of one name: refused by the naming itself
            continue
        written = [named for label in labels for named in request.output_names(label, _derived(label))]
        inputs = request.image_inputs("--target", targets)
        collides = {request.resolved(p) for _, p in written} & {request.resolved(t) for t in targets}
        if collides:
            with pytest.raises(CmmasError, match="would overwrite the input --target"):
                request.check_outputs(inputs, written)
            checked += 1
        else:
            request.check_outputs(inputs, written)
    assert checked > 0


# ----------------------------------------------------------------------------- bundles and the registration network


@pytest.fixture(scope="module")
def small_set(phantom):
    """The shared phantom's CT atlas set and its MR scan."""
    return phantom.aset, phantom.target


def test_a_bundle_without_its_registration_network_is_named_unless_asked_for(small_set, tmp_path, capsys):
    import json
    import shutil

    aset, scan = small_set
    bundle = tmp_path / "bundle"
    shutil.copytree(aset.root, bundle / "atlas_set")
    argv = ["segment", "--bundle", str(bundle), "--target", str(scan), "--fusion", "mv", "--out", str(tmp_path / "s.nii.gz")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bundle / 'reg_model.keras'}: no registration network" in err
    assert not (tmp_path / "s.nii.gz").exists()
    assert cli.main([*argv, "--no-registration", "--no-extras"]) == 0
    captured = capsys.readouterr()
    assert "without the registration network" in captured.err and "(no registration network)" in captured.out
    qc = json.loads((tmp_path / "s_qc.json").read_text())
    assert qc["registration"] is False and qc["models"]["reg_model"] is None


def test_a_bundle_folder_is_readable_by_others(small_set, tmp_path):
    from cmmas.bundle import write_bundle

    aset, _ = small_set
    model = tmp_path / "model.keras"
    model.write_bytes(b"a model file")
    mask = os.umask(0o022)
    try:
        out = write_bundle(aset.root, model, tmp_path / "bundle")
    finally:
        os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o755


def test_more_atlases_than_the_set_holds_is_said(small_set, caplog):
    from cmmas.segment import segment

    aset, scan = small_set
    with caplog.at_level(logging.WARNING):
        result = segment(scan, aset, fusion="mv", atlases=7, maps=False)
    assert len(result.atlas_ids) == 3
    assert "7 atlases asked for, the atlas set has 3: using all of them" in caplog.text
