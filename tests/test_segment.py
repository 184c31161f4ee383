"""pipeline.py: segment one target with an atlas set, on the target's own grid.

The session's shared phantom (conftest ``phantom``): CT atlases (40^3) form one atlas set on a 24^3
working grid at 4 mm; the target is an MR phantom of another subject, whose grid is rotated
(non-identity direction). The networks are untrained: BiRegNet returns zero fields (atlases
unchanged) and SimNet gives every atlas the same weight, so the pipeline's wiring, not the
networks, is what is tested.
"""

import csv
import dataclasses
import json
import logging
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from cmmas import preprocess
from cmmas.align import atlas_set
from cmmas.align import mapping
from cmmas.align import prepare
from cmmas.align import target as target_alignment
from cmmas.evaluate import alignment as alignment_eval
from cmmas.fuse import registry
from cmmas.fuse import weights
from cmmas import bundle as bundles
from cmmas import drawing, models, outputs, segment
from cmmas.nn import training
from cmmas.register import apply
from cmmas.fuse import simnet as simnet_fusion
from cmmas.datasets.mmwhs import MMWHS_LABELS
from cmmas.errors import AtlasSetError, CmmasError, DatasetError, LabelError, ModelError
from cmmas.io import read_image, read_label, write_image
from cmmas.nn.networks import build_biregnet
from phantom_data import CODES, GRID as SHAPE, write_folder


@pytest.fixture(scope="module")
def simnet_run(phantom, tmp_path_factory):
    """One SimNet segmentation, keeping its target -> reference transform."""
    tdir = tmp_path_factory.mktemp("transform")
    result = segment.segment(phantom.target, phantom.aset, reg_model=phantom.reg, fusion_model=phantom.sim,
                              fusion="simnet", transform_dir=tdir, progress=False)
    return result, sorted(str(p) for p in tdir.glob("*.mat"))


def _dice(a, b) -> float:
    return 2 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


# ----------------------------------------------------------------------------- atlas sets


def _whole_grid_back(array, geometry, transforms, target, kind):
    """Reference map-back: the whole working grid resampled through the inverse alignment by ANTs."""
    from cmmas.align import ants as align_ants
    from cmmas.io import Image

    return align_ants.apply(list(transforms), Image(array, geometry), target, kind=kind, invert=True)


def test_prepared_atlas_set_describes_itself(phantom):
    again = atlas_set.AtlasSet(phantom.aset.root)
    manifest = again.manifest
    assert manifest.version == atlas_set.VERSION
    assert manifest.labels == MMWHS_LABELS
    assert manifest.geometry.shape == SHAPE
    np.testing.assert_allclose(manifest.geometry.spacing, (4.0, 4.0, 4.0))
    assert [c.modality for c in manifest.cases] == ["ct"] * 3
    assert manifest.reference in again.ids()
    assert segment.atlas_ids_of(again) == ["ct_00", "ct_01", "ct_02"]


def test_validation_names_the_bad_atlas_before_aligning(tmp_path):
    data = write_folder(tmp_path / "data", n=2)
    label = data / "ct" / "ct_01_label.nii.gz"
    empty = read_label(label)
    write_image(empty.with_array(np.zeros_like(empty.array)), label)
    with pytest.raises(LabelError) as info:
        prepare.prepare_atlases(data, "ct", tmp_path / "set", shape_zyx=SHAPE, progress=False)
    assert str(info.value).startswith(str(label)) and "empty" in str(info.value)
    assert not (tmp_path / "set" / "transforms").exists()
    with pytest.raises(DatasetError, match="no 'mr' cases"):
        prepare.prepare_atlases(data, "mr", tmp_path / "set", shape_zyx=SHAPE, progress=False)


def test_atlases_of_a_two_modality_space_are_the_reference_modality(phantom_set_copy):
    root = phantom_set_copy.root
    manifest = json.loads((root / "manifest.json").read_text())
    first = dict(manifest["cases"][0], id="mr_99", modality="mr")
    manifest["cases"].append(first)
    (root / "manifest.json").write_text(json.dumps(manifest))
    space = atlas_set.AtlasSet(root)
    assert segment.atlas_ids_of(space) == ["ct_00", "ct_01", "ct_02"]
    assert segment.atlas_ids_of(space, "mr") == ["mr_99"]


def test_raw_atlas_folder_is_prepared_once_and_not_mixed_up(phantom, tmp_path):
    out = phantom.aset.root
    again = prepare.raw_atlas_set(phantom.data, "ct", out, SHAPE)  # the same atlases and grid: reused
    assert again.manifest == phantom.aset.manifest
    other = write_folder(tmp_path / "other", n=1, seed=7)  # CT only: the modality is found
    with pytest.raises(AtlasSetError, match="other atlases"):
        prepare.raw_atlas_set(other, None, out, SHAPE)
    with pytest.raises(AtlasSetError, match="another grid"):
        prepare.raw_atlas_set(phantom.data, "ct", out, (32, 32, 32))


# ----------------------------------------------------------------------------- segment


def test_segment_equals_the_step_by_step_pipeline(phantom, simnet_run, tmp_path):
    result, transforms = simnet_run
    aset = phantom.aset
    target = read_image(phantom.target)
    assert len(transforms) == 1

    # an independent alignment lands the target near the same place (multi-threaded ANTs MI varies
    # between runs: about 1 mm and 0.05 rad on this small phantom)
    own = target_alignment.align_to_reference(target, aset.reference_image(), tmp_path / "own",
                                              aset.manifest.align_spacing_mm)
    own_working = mapping.to_space(target, own.transforms, aset.geometry, kind="linear")
    assert np.corrcoef(own_working.array.ravel(), result.target_working.array.ravel())[0, 1] > 0.97

    working = mapping.to_space(target, transforms, aset.geometry, kind="linear")
    np.testing.assert_array_equal(working.array, result.target_working.array)
    ids = segment.atlas_ids_of(aset)
    images, labels = aset.arrays(ids)
    model = training.load_model(phantom.reg)
    _, warped, _ = apply.warp_atlases(model, images, labels, working.array, CODES)
    np.testing.assert_array_equal(warped, labels)  # an untrained BiRegNet is the identity
    fused = simnet_fusion.simnet_fuse(training.load_model(phantom.sim, "simnet"), working.array, warped, CODES)
    np.testing.assert_array_equal(result.working.array, fused.label)
    # an untrained SimNet gives every atlas the same weight: its vote is the majority vote
    np.testing.assert_array_equal(fused.label, registry.fuse("mv", warped, CODES).label)

    back = [_whole_grid_back(p, aset.geometry, transforms, target.geometry, kind="linear").array
            for p in fused.probabilities]
    foreground = np.clip(np.stack(back[1:]), 0, 1)
    stack = np.concatenate([np.clip(1 - foreground.sum(0), 0, 1)[None], foreground])
    np.testing.assert_array_equal(result.label.array, np.asarray(CODES)[np.argmax(stack, 0)])
    # the maps are uint8 (value / 255), resampled onto boxes of the target grid: rounded to the
    # nearest 1/255, plus float32 rounding of the boxes' origins; the background is 255 minus the
    # foreground maps, so it carries their roundings
    for k, code in enumerate(CODES):
        assert result.probabilities[code].array.dtype == np.uint8
        steps = 0.5 * (len(CODES) - 1) if k == 0 else 0.5
        np.testing.assert_allclose(result.probabilities[code].array / 255, stack[k], atol=steps / 255 + 1e-5)
    agreement = _whole_grid_back(fused.agreement, aset.geometry, transforms, target.geometry, kind="linear")
    np.testing.assert_allclose(result.agreement.array / 255, np.clip(agreement.array, 0, 1), atol=0.5 / 255 + 1e-5)
    assert result.atlas_ids == ids
    assert set(result.seconds) == {"load", "read", "align", "choose", "register", "fuse", "map_back", "total"}

    # mapping the hard label back (generic-label) instead gives nearly the same map
    hard = _whole_grid_back(fused.label, aset.geometry, transforms, target.geometry, kind="label").array
    assert np.mean(hard == result.label.array) > 0.98


def test_segmentation_lies_on_the_target_and_overlaps_its_truth(phantom, simnet_run):
    result, _ = simnet_run
    target = read_image(phantom.target)
    assert not np.allclose(target.geometry.direction_matrix, np.eye(3))  # the MR phantom's grid is rotated
    truth = phantom.truth.array
    assert _dice(result.label.array > 0, truth > 0) > 0.6
    per_code = [_dice(result.label.array == c, truth == c) for c in CODES[1:]]
    assert np.mean(per_code) > 0.35, per_code
    total = sum(p.array / 255 for p in result.probabilities.values())
    np.testing.assert_allclose(total, 1.0, atol=len(CODES) * 0.5 / 255 + 1e-5)
    inside = result.label.array > 0
    assert result.agreement.array[inside].mean() / 255 > 0.5


def test_written_maps_carry_the_target_geometry(phantom, simnet_run, tmp_path):
    result, _ = simnet_run
    target = read_image(phantom.target)
    written = outputs.write_segmentation(result, tmp_path / "seg.nii.gz")
    assert [p.name for p in written] == (["seg.nii.gz"] + [f"seg_prob_{c}.nii.gz" for c in CODES]
                                         + ["seg_agreement.nii.gz", "seg_volumes.csv", "seg_labels.itksnap.txt",
                                            "seg_labels.ctbl", "seg_qc.json"])
    assert json.loads(written[-1].read_text())["alignment"]["starts"]
    for path in written[:-4]:
        image = read_image(path)
        assert target.geometry.differences(image.geometry) == [], path
    label = read_label(tmp_path / "seg.nii.gz", allowed=MMWHS_LABELS)
    np.testing.assert_array_equal(label.array, result.label.array)
    assert sitk.ReadImage(str(tmp_path / "seg.nii.gz")).GetPixelID() == sitk.sitkInt16  # codes up to 850
    only = outputs.write_segmentation(result, tmp_path / "only.nii.gz", extras=False)
    assert [p.name for p in only] == ["only.nii.gz", "only_volumes.csv", "only_labels.itksnap.txt",
                                      "only_labels.ctbl", "only_qc.json"]


def test_written_side_outputs_agree_with_the_label_map(simnet_run, tmp_path):
    result, _ = simnet_run
    assert result.names == MMWHS_LABELS and result.target.geometry.matches(result.label.geometry)
    written = outputs.write_segmentation(result, tmp_path / "seg.nii.gz", extras=False, preview=True)
    paths = outputs.output_paths(tmp_path / "seg.nii.gz", CODES)
    assert written == [paths[k] for k in ("label", "volumes", "itksnap", "slicer", "preview", "qc")]
    with open(paths["volumes"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    label = read_label(paths["label"], allowed=MMWHS_LABELS)
    voxel_ml = np.prod(label.geometry.spacing) / 1000
    assert [int(r["code"]) for r in rows] == sorted(MMWHS_LABELS)
    for row in rows:
        voxels = np.count_nonzero(label.array == int(row["code"]))
        assert row["name"] == MMWHS_LABELS[int(row["code"])] and int(row["voxels"]) == voxels
        assert float(row["millilitres"]) == pytest.approx(voxels * voxel_ml, abs=1e-4)
        assert row["mean_agreement"] == "" or 0.0 <= float(row["mean_agreement"]) <= 1.0
    assert sum(int(r["voxels"]) for r in rows) == np.count_nonzero(label.array)
    itksnap, slicer = paths["itksnap"].read_text(), paths["slicer"].read_text()
    for code, name in MMWHS_LABELS.items():
        red, green, blue = drawing.palette(MMWHS_LABELS)[code]
        assert f'{code:5d} {red:5d} {green:4d} {blue:4d}' in itksnap and f'"{name}"' in itksnap
        assert f"\n{code} {name.replace(' ', '_')} {red} {green} {blue} 255\n" in slicer
    assert paths["preview"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_label_only_map_back_gives_the_same_label(phantom, simnet_run, tmp_path):
    result, transforms = simnet_run
    aset, target = phantom.aset, read_image(phantom.target)
    working = mapping.to_space(target, transforms, aset.geometry, kind="linear")
    _, labels = aset.arrays(segment.atlas_ids_of(aset))
    fused = registry.fuse("mv", labels, CODES)
    label, probabilities, agreement = mapping.map_back(fused, working, transforms, target, maps=True)
    only, no_probabilities, no_agreement = mapping.map_back(fused, working, transforms, target, maps=False)
    np.testing.assert_array_equal(only.array, label.array)
    assert no_probabilities is None and no_agreement is None and len(probabilities) == len(CODES)
    assert target.geometry.differences(only.geometry) == []

    lean = dataclasses.replace(result, probabilities=None, agreement=None)
    with pytest.raises(CmmasError, match="no probability or agreement maps") as err:
        outputs.write_segmentation(lean, tmp_path / "lean.nii.gz")
    assert "\n" not in str(err.value) and "lean.nii.gz" in str(err.value)
    path, *_, qc = outputs.write_segmentation(lean, tmp_path / "lean.nii.gz", extras=False)
    assert qc.name == "lean_qc.json"
    np.testing.assert_array_equal(read_label(path, allowed=MMWHS_LABELS).array, result.label.array)


def test_k_most_similar_atlases_are_chosen(phantom, simnet_run):
    result, _ = simnet_run
    aset = phantom.aset
    ids = segment.atlas_ids_of(aset)
    images, _ = aset.arrays(ids)
    scores = weights.global_similarity(result.target_working.array, images, similarity="mi")
    expected = [ids[i] for i in np.argsort(-scores)[:2]]
    assert segment.select_atlases(images, result.target_working.array, ids, 2) == expected
    assert segment.select_atlases(images, result.target_working.array, ids, None) == ids
    with pytest.raises(CmmasError, match="at least 1"):
        segment.select_atlases(images, result.target_working.array, ids, 0)


def test_without_prealign_the_target_is_taken_as_in_the_reference_space(phantom):
    aset = phantom.aset
    reference = aset.reference_image()  # the reference atlas at the alignment spacing: in its own space
    result = segment.segment(reference, aset, fusion="mv", prealign=False, progress=False)
    assert reference.geometry.differences(result.label.geometry) == []
    lean = segment.segment(reference, aset, fusion="mv", prealign=False, progress=False, maps=False)
    np.testing.assert_array_equal(lean.label.array, result.label.array)
    assert lean.probabilities is None and lean.agreement is None
    truth = preprocess.resample(aset.label(aset.manifest.reference), geometry=reference.geometry, kind="label")
    assert _dice(result.label.array > 0, truth.array > 0) > 0.7


def test_models_that_do_not_fit_are_refused_before_aligning(phantom, tmp_path):
    small = training.save_model(build_biregnet((16, 16, 16), c0=2, levels=2), tmp_path / "small.keras")
    with pytest.raises(ModelError, match=r"\(16, 16, 16\) grid") as info:
        segment.segment(phantom.target, phantom.aset, reg_model=small, fusion="mv", progress=False)
    assert str(info.value).startswith(str(small)) and "--shape 16,16,16" in str(info.value)
    with pytest.raises(ModelError, match="needs a SimNet"):
        segment.segment(phantom.target, phantom.aset, fusion="simnet", progress=False)
    with pytest.raises(CmmasError, match="unknown fusion 'vote'"):
        segment.segment(phantom.target, phantom.aset, fusion="vote", progress=False)
    with pytest.raises(ModelError, match="BiRegNet model file not found"):
        segment.segment(phantom.target, phantom.aset, fusion="mv", reg_model=tmp_path / "none.keras")


# ----------------------------------------------------------------------------- bundles


def test_bundle_parts_and_explicit_paths(phantom, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(phantom.aset.root, bundle / "atlas_set")
    shutil.copy(phantom.reg, bundle / "reg_model.keras")
    found = bundles.resolve_bundle(bundle)
    assert found == bundles.Bundle(bundle / "atlas_set", bundle / "reg_model.keras", {})
    shutil.copy(phantom.sim, bundle / "simnet.keras")
    assert bundles.resolve_bundle(bundle).bundled == {"simnet": bundle / "simnet.keras"}
    other = bundles.resolve_bundle(bundle, reg_model=phantom.reg, fusion_model=phantom.sim)
    assert other.reg_model == phantom.reg and other.fusion_model == phantom.sim
    assert bundles.resolve_bundle(phantom.aset.root).atlas_set == phantom.aset.root  # a set is its own bundle
    with pytest.raises(AtlasSetError, match="bundle folder not found"):
        bundles.resolve_bundle(tmp_path / "missing")
    with pytest.raises(AtlasSetError, match="no atlas set given"):
        bundles.resolve_bundle(tmp_path, reg_model=phantom.reg)


def test_first_argmax_matches_numpy_with_ties():
    scores = np.random.default_rng(0).integers(0, 3, (5, 7, 6, 4)).astype(np.float32)  # many ties
    np.testing.assert_array_equal(mapping._first_argmax(scores), np.argmax(scores, axis=0))


# ----------------------------------------------------------------------------- alignment QC and determinism


@pytest.mark.parametrize("atlas_affine", [False, True])
def test_two_calls_give_the_same_label_map(phantom, atlas_affine):
    first, second = (segment.segment(phantom.target, phantom.aset, fusion="mv", progress=False,
                                     atlas_affine=atlas_affine) for _ in range(2))
    np.testing.assert_array_equal(first.label.array, second.label.array)
    assert first.qc()["alignment"] == {**second.qc()["alignment"], "seconds": first.qc()["alignment"]["seconds"]}
    assert first.qc()["alignment"]["deterministic"]


def test_an_atlas_given_its_own_affine_stage_still_segments_the_target(phantom):
    result = segment.segment(phantom.target, phantom.aset, fusion="mv", progress=False, atlas_affine=True)
    truth = phantom.truth.array
    assert _dice(result.label.array > 0, truth > 0) > 0.5


def test_refined_warps_are_recorded_and_repeatable(phantom):
    first, second = (segment.segment(phantom.target, phantom.aset, reg_model=phantom.reg, fusion="mv",
                                     progress=False, refine_steps=5) for _ in range(2))
    np.testing.assert_array_equal(first.label.array, second.label.array)
    record = first.qc()["refinement"]
    assert record["mind_distance"][1] < record["mind_distance"][0]
    assert record["folding_percent"][1] <= 1.0
    assert "refine" in first.seconds
    assert _dice(first.label.array > 0, phantom.truth.array > 0) > 0.5


def test_a_broken_alignment_warns_and_is_flagged_in_the_qc_record(phantom, tmp_path, caplog):
    image = read_image(phantom.target)
    # no anatomy, nothing to align across: a ramp along z (white noise is no longer a reliable
    # stand-in: the alignment input averages it away, and random optima then agree by chance)
    ramp = np.broadcast_to(np.linspace(0.0, 1.0, image.shape[0])[:, None, None], image.shape)
    broken = image.with_array(np.ascontiguousarray(ramp, dtype=np.float32))
    with caplog.at_level(logging.WARNING, logger="cmmas.segment"):
        result = segment.segment(broken, phantom.aset, fusion="mv", progress=False)
    [warning] = [r.getMessage() for r in caplog.records if "uncertain" in r.getMessage()]
    assert "\n" not in warning and "starts agree" in warning
    assert result.flagged
    *_, qc = outputs.write_segmentation(result, tmp_path / "broken.nii.gz", extras=False)
    record = json.loads(qc.read_text())
    assert record["alignment"]["flagged"] and len(record["alignment"]["starts"]) == len(target_alignment.ROBUST.shifts)


@pytest.mark.parametrize("side", ["top", "bottom"])
def test_a_shorter_field_of_view_gives_the_same_segmentation_inside_it(phantom, side, tmp_path):
    """7 mm of the 144 mm field of view blanked (air): the alignment moves by millimetres and the
    label map inside the common region stays (the phantom's structures are a few voxels wide
    on the 4 mm working grid, so a millimetre costs more Dice than on real organs: the smallest
    loses ~0.35 at 3 mm)."""
    image = read_image(phantom.target)
    full = segment.segment(image, phantom.aset, fusion="mv", progress=False, transform_dir=tmp_path / "full")
    blanked, kept = alignment_eval.blank_z(image, 7.2, side)  # two slices
    cropped = segment.segment(blanked, phantom.aset, fusion="mv", progress=False, transform_dir=tmp_path / "cut")
    points = target_alignment.box_points(phantom.aset.reference_image())
    moved = target_alignment.distance_mm([str(tmp_path / "full" / "affine.mat")],
                                         [str(tmp_path / "cut" / "affine.mat")], points)
    foreground = _dice(cropped.label.array[kept] > 0, full.label.array[kept] > 0)
    dice = alignment_eval.organ_dice(cropped.label.array, full.label.array, CODES, kept)
    assert moved < 6.0 and foreground > 0.8 and min(dice.values()) > 0.6


@pytest.mark.parametrize("ending", [".nii", ".mha"])
def test_uncompressed_outputs_take_the_label_map_s_format(phantom, simnet_run, tmp_path, ending):
    result, _ = simnet_run
    target = read_image(phantom.target)
    written = outputs.write_segmentation(result, tmp_path / f"seg{ending}")
    images = [p for p in written if p.suffix in (".nii", ".mha")]
    assert [p.name for p in images] == ([f"seg{ending}"] + [f"seg_prob_{c}{ending}" for c in CODES]
                                        + [f"seg_agreement{ending}"])
    for path in images:
        assert target.geometry.differences(read_image(path).geometry) == [], path
    agreement = read_image(images[-1], dtype=None)
    assert agreement.array.dtype == np.uint8
    np.testing.assert_array_equal(agreement.array, result.agreement.array)


def test_learned_models_name_each_network_by_its_kind(phantom, tmp_path):
    from cmmas.nn import training
    from cmmas.nn.dlf import build_unet

    unet = training.save_model(build_unet(phantom.aset.geometry.shape, 4, c0=2, levels=2), tmp_path / "u.keras")
    found = models.learned_models([phantom.sim, unet])  # the U-Net has no card: its network says what it is
    assert found == {"simnet": phantom.sim, "unet": unet}
    assert models.learned_models({"dlf": None}) == {} and models.learned_models(None) == {}
    with pytest.raises(ModelError, match="two networks for the fusion 'simnet'"):
        models.learned_models([phantom.sim, phantom.sim])
    with pytest.raises(ModelError, match="a BiRegNet is not a fusion network"):
        models.learned_models(phantom.reg)
    with pytest.raises(ModelError, match="no learned fusion named"):
        models.learned_models({"jlf": phantom.sim})


def test_an_organ_finder_adds_its_agreement_per_structure_to_the_qc_record(phantom, tmp_path):
    import datetime

    from cmmas.nn.finder import build_finder
    from cmmas.nn.model_card import ModelCard

    aset = phantom.aset
    card = ModelCard(kind="finder", shape_zyx=(16, 16, 16), spacing_zyx=(4.0, 4.0, 4.0), labels=dict(aset.labels),
                     atlas_modality="ct", target_modality=None, normalisation="minmax", align_spacing_mm=4.0,
                     training_set=str(tmp_path), created=datetime.datetime.now().isoformat())
    net = build_finder(len(aset.labels) + 1, c0=2, levels=3)
    path = training.save_model(net, tmp_path / "finder.keras", card=card)
    single = segment.SegmentConfig(fusion="mv", starts="single", maps=False)  # the finder's wiring, quickly
    segmenter = segment.Segmenter(aset, config=single, finder_model=path)
    result = segmenter.segment(phantom.target)
    organs = result.qc()["organs"]
    assert set(organs) == set(aset.labels.values())
    assert all(v is None or 0.0 <= v <= 1.0 for v in organs.values())
    assert result.qc()["models"]["finder_model"] == str(path)
    assert result.warped.placement.organs.probabilities.shape[0] == len(aset.labels) + 1
    plain = segment.Segmenter(aset, config=single).segment(phantom.target)
    assert plain.qc()["organs"] is None
    np.testing.assert_array_equal(plain.label.array, result.label.array)  # the finder does not change the label
    guided = segment.Segmenter(aset, config=segment.SegmentConfig(fusion="mv", organ_alignment=True, maps=False),
                               finder_model=path).segment(phantom.target)
    assert 0.0 <= guided.qc()["alignment"]["organ_overlap"] <= 1.0
    with pytest.raises(CmmasError, match="needs an organ finder"):
        segment.Segmenter(aset, config=segment.SegmentConfig(organ_alignment=True))
    other = dataclasses.replace(card, labels={1: "liver"})
    training.save_model(net, tmp_path / "other.keras", card=other)
    with pytest.raises(ModelError, match="differ from the atlas set's"):
        segment.Segmenter(aset, finder_model=tmp_path / "other.keras")
