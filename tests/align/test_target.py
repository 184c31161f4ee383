"""The scan's alignment to the reference: several starts, one answer, a QC record."""

import dataclasses
import filecmp

import numpy as np
import pytest

from cmmas import preprocess
from cmmas.align import ants, target
from cmmas.datasets.phantom import make_subject
from cmmas.io import Geometry, Image


@pytest.fixture(scope="module")
def pair():
    """A CT phantom as the reference (at 4 mm) and an MR phantom of another subject as the scan."""
    ref, _ = make_subject("ct", 1, 48)
    scan, _ = make_subject("mr", 2, 48)
    return preprocess.resample(ref, spacing_zyx=(4.0,) * 3), scan


def test_a_written_translation_moves_points_by_its_offset(tmp_path):
    path = target.write_translation([5.0, -2.0, 12.5], tmp_path / "t.mat")
    points = np.array([[0.0, 0.0, 0.0], [10.0, 20.0, -30.0]])
    np.testing.assert_allclose(ants.transform_points([path], points), points + [5.0, -2.0, 12.5], atol=1e-9)


def test_centre_of_mass_of_a_single_bright_voxel_is_that_voxel():
    geometry = Geometry(size=(8, 6, 4), spacing=(2.0, 1.0, 3.0), origin=(10.0, 0.0, -5.0),
                        direction=tuple(np.eye(3).ravel()))
    array = np.zeros((4, 6, 8), np.float32)
    array[1, 2, 3] = 7.0
    np.testing.assert_allclose(target.centre_of_mass(Image(array, geometry)), [10 + 3 * 2.0, 2 * 1.0, -5 + 1 * 3.0])


def test_mutual_information_prefers_the_aligned_image_and_ignores_an_inverted_contrast(pair):
    ref, _ = pair
    same = target.mutual_information(ref, ref)
    inverted = target.mutual_information(ref, ref.with_array(5.0 - 2.0 * ref.array))
    shifted = target.mutual_information(ref, ref.with_array(np.roll(ref.array, 5, axis=0)))
    assert same > shifted
    assert inverted == pytest.approx(same, rel=1e-6)


def test_the_distance_between_two_translations_is_their_difference(tmp_path, pair):
    ref, _ = pair
    a = target.write_translation([0.0, 0.0, 0.0], tmp_path / "a.mat")
    b = target.write_translation([3.0, 4.0, 0.0], tmp_path / "b.mat")
    assert target.distance_mm([a], [b], target.box_points(ref)) == pytest.approx(5.0)


def test_two_calls_give_byte_identical_transforms(tmp_path, pair):
    ref, scan = pair
    assert ants.single_threaded()  # tests/conftest.py: one ITK thread
    first = target.align_to_reference(scan, ref, tmp_path / "a", 4.0)
    second = target.align_to_reference(scan, ref, tmp_path / "b", 4.0)
    assert filecmp.cmp(first.transforms[0], second.transforms[0], shallow=False)
    assert first.qc()["starts"] == second.qc()["starts"]
    assert first.deterministic


def test_the_qc_record_lists_every_start_and_the_chosen_one(tmp_path, pair):
    ref, scan = pair
    found = target.align_to_reference(scan, ref, tmp_path, 4.0)
    record = found.qc()
    assert len(record["starts"]) == len(target.ROBUST.shifts)
    chosen = [s for s in record["starts"] if s["distance_mm"] == 0.0]
    assert chosen and record["chosen_start_shift_mm"] in [s["shift_mm"] for s in chosen]
    assert 0.0 < record["agreement"] <= 1.0
    assert record["flagged"] == (record["agreement"] < target.ROBUST.min_agreement)
    single = target.align_to_reference(scan, ref, tmp_path / "single", 4.0, starts=target.SINGLE)
    assert len(single.candidates) == 1 and not single.flagged


def _with_bright_structure_below(image: Image, slices: int, radius: float) -> Image:
    """``image`` extended by ``slices`` slices of air below its first slice, holding a bright
    ellipsoid (semi-axes ``radius`` times the block's size): a fluid-filled structure outside the
    anatomy that pulls the centre of mass away from the organs."""
    a = image.array
    block = np.full((slices, *a.shape[1:]), a.min(), a.dtype)
    zz, yy, xx = np.mgrid[:slices, : a.shape[1], : a.shape[2]]
    size = np.array([slices, a.shape[1], a.shape[2]])
    inside = sum(((g - n / 2) / (n * radius)) ** 2 for g, n in zip((zz, yy, xx), size)) <= 1
    block[inside] = a.max()
    g = image.geometry
    origin = np.asarray(g.origin) - slices * g.spacing[2] * g.direction_matrix[:, 2]
    return Image(np.concatenate([block, a]), Geometry(size=(g.size[0], g.size[1], a.shape[0] + slices),
                                                      spacing=g.spacing, origin=tuple(origin), direction=g.direction))


def test_a_start_pulled_off_by_a_bright_structure_is_recovered_by_the_other_starts(tmp_path, pair):
    ref, _ = pair
    scan, _ = make_subject("mr", 1, 48)  # the reference's individual: the unpadded alignment is the truth
    truth = target.align_to_reference(scan, ref, tmp_path / "truth", 4.0).transforms
    padded = _with_bright_structure_below(scan, 24, 0.3)
    assert target.centre_of_mass(padded)[2] < target.centre_of_mass(scan)[2] - 15.0
    points = target.box_points(ref)
    single = target.align_to_reference(padded, ref, tmp_path / "single", 4.0, starts=target.SINGLE)
    robust = target.align_to_reference(padded, ref, tmp_path / "robust", 4.0)
    assert target.distance_mm(single.transforms, truth, points) > 15.0
    assert target.distance_mm(robust.transforms, truth, points) < 5.0


def test_a_scan_of_noise_is_flagged(tmp_path, pair):
    ref, scan = pair
    noise = np.random.default_rng(0).random(scan.shape).astype(np.float32)
    found = target.align_to_reference(scan.with_array(noise), ref, tmp_path, 4.0)
    assert found.flagged and found.qc()["flagged"]
    assert "starts agree" in target.describe(found)


def test_organs_place_a_scan_whose_mutual_information_starts_are_pulled_off(tmp_path, pair):
    from cmmas.align import finder, organs

    ref, _ = pair
    _, ref_label = make_subject("ct", 1, 48)
    scan, scan_label = make_subject("mr", 1, 48)  # the reference's individual: the unpadded alignment is the truth
    truth = target.align_to_reference(scan, ref, tmp_path / "truth", 4.0).transforms
    padded = _with_bright_structure_below(scan, 48, 0.45)
    padded_label = Image(np.concatenate([np.zeros((48, *scan_label.shape[1:]), scan_label.array.dtype),
                                         scan_label.array]), padded.geometry)
    codes = [0, *sorted(int(c) for c in np.unique(ref_label.array) if c)]
    grid = finder.finder_image(padded, 4.0).geometry  # a perfect finder: the scan's own labels on its grid
    found = preprocess.resample(padded_label, geometry=grid, kind="label").array
    guide = organs.OrganGuide.of(np.stack([found == c for c in codes]).astype(np.float32), grid,
                                 preprocess.resample(ref_label, geometry=ref.geometry, kind="label"), codes)
    both_pulled = target.Starts(shifts=(0.0, -0.4))  # two MI starts, both pulled off by the bright structure
    points = target.box_points(ref)
    unguided = target.align_to_reference(padded, ref, tmp_path / "mi", 4.0, starts=both_pulled)
    guided = target.align_to_reference(padded, ref, tmp_path / "organs", 4.0, starts=both_pulled, guide=guide)
    assert target.distance_mm(unguided.transforms, truth, points) > 15.0
    assert target.distance_mm(guided.transforms, truth, points) < 8.0  # 2 voxels; "truth" is itself an MI alignment
    [organ] = [c for c in guided.candidates if c.from_organs]
    assert organ.distance_mm == 0.0 and organ.organ_overlap == guided.qc()["organ_overlap"] > 0.5
    [by_mi] = [c for c in guided.candidates if not c.from_organs and c.organ_overlap is not None]
    assert by_mi.organ_overlap < organ.organ_overlap  # the alignment by mutual information lost on the organs
    assert unguided.qc()["organ_overlap"] is None
    registered = target.align_to_reference(padded, ref, tmp_path / "registered", 4.0, guide=guide,
                                           starts=dataclasses.replace(both_pulled, organ_registration=True))
    assert target.distance_mm(registered.transforms, guided.transforms, points) < 0.01  # the organs won above
    [only] = registered.candidates  # the organs alone: no start by mutual information
    assert only.from_organs and only.organ_overlap == registered.qc()["organ_overlap"] > 0.5


def test_an_alignment_chosen_by_organs_is_flagged_by_their_overlap_not_by_the_starts_agreement():
    candidates = (target.Candidate(0.0, 0.5, 0.6, 0.0), target.Candidate(-40.0, 0.4, 0.5, 40.0),
                  target.Candidate(0.0, 0.4, 0.5, 30.0, from_organs=True))
    found = target._found(["a.mat"], 0.0, 0.6, candidates, target.ROBUST, 0.0, organ_overlap=0.55)
    assert found.agreement < target.ROBUST.min_agreement and not found.flagged  # the organs decide, not the starts
    low = target._found(["a.mat"], 0.0, 0.6, candidates, target.ROBUST, 0.0, organ_overlap=0.2)
    assert low.flagged and "organs overlap the reference's by 0.20" in target.describe(low)
    unguided = target._found(["a.mat"], 0.0, 0.6, candidates, target.ROBUST, 0.0)
    assert unguided.flagged and unguided.organ_overlap is None
