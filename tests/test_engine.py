"""segment.py's engine: the Segmenter and its SegmentConfig.

The decisive test here runs a stand-in registration network that returns a fixed, known, non-zero
field (an untrained BiRegNet returns zeros, under which a swapped warp direction or axis order
goes unseen) through the whole path, map-back included, onto a scan whose array axes are
permuted and flipped against the working grid's.
"""

import json

import keras
import numpy as np
import pytest
import SimpleITK as sitk
import tensorflow as tf

from cmmas import outputs
from cmmas.errors import CmmasError, ModelError
from cmmas.io import from_sitk, to_sitk
from cmmas.segment import SegmentConfig, Segmenter
from phantom_data import GRID as SHAPE

#: The stand-in network's field, working-grid voxels in array (z, y, x) order: one value per axis.
SHIFT = (2.0, -1.0, 3.0)


class ConstantField(keras.layers.Layer):
    """``[B, D, H, W, C]`` -> ``[B, D, H, W, 3]`` holding ``shift`` at every voxel."""

    def __init__(self, shift, **kwargs):
        super().__init__(**kwargs)
        self.shift = tuple(float(s) for s in shift)

    def call(self, x):
        return tf.zeros_like(tf.concat([x[..., :1]] * 3, axis=-1)) + tf.constant(self.shift, tf.float32)

    def get_config(self):
        return {**super().get_config(), "shift": self.shift}


def stand_in_biregnet(shift) -> keras.Model:
    """A model with BiRegNet's interface whose atlas -> target field ``U`` is ``shift`` everywhere."""
    atlas = keras.Input((*SHAPE, 1), name="atlas")
    target = keras.Input((*SHAPE, 1), name="target")
    field = ConstantField(shift)(atlas)
    return keras.Model({"atlas": atlas, "target": target}, {"U": field, "V": ConstantField([-s for s in shift])(target)})


@pytest.fixture(scope="module")
def engine_set(phantom):
    """The shared phantom's CT atlas set (3 atlases, 24^3 at 4 mm)."""
    return phantom.aset


def _scan_with_other_axes(aset):
    """The reference atlas on the working grid, stored with its array axes permuted (x, z, y) and
    the first one flipped: the same physical content on the same voxel centres, other axes."""
    working = to_sitk(aset.image(aset.manifest.reference))
    permuted = sitk.Flip(sitk.PermuteAxes(working, [2, 0, 1]), [True, False, False])
    return working, from_sitk(permuted)


def test_a_known_field_moves_the_label_by_exactly_that_field_on_the_scan_s_own_grid(engine_set):
    aset = engine_set
    working, scan = _scan_with_other_axes(aset)
    back = sitk.Resample(to_sitk(scan), working, sitk.Transform(), sitk.sitkNearestNeighbor)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(working))  # same content
    config = SegmentConfig(fusion="mv", prealign=False)
    still = Segmenter(aset, None, None, config).segment(scan).label
    moved = Segmenter(aset, stand_in_biregnet(SHIFT), None, config).segment(scan).label
    assert moved.geometry.matches(scan.geometry) and still.geometry.matches(scan.geometry)
    assert moved.array.shape == tuple(scan.array.shape)

    # warp(v, U)(x) = v(x + U(x)): the label at physical p is the unmoved label at p + d, where d
    # is the shift along the working grid's own axes, in mm
    index = np.array([5.0, 5.0, 5.0])
    step = (np.array(working.TransformContinuousIndexToPhysicalPoint(tuple(index + np.array(SHIFT[::-1]))))
            - np.array(working.TransformContinuousIndexToPhysicalPoint(tuple(index))))

    def shifted(by) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.Resample(to_sitk(still), to_sitk(still), sitk.TranslationTransform(3, tuple(by)),
                                                    sitk.sitkNearestNeighbor, 0))

    inner = np.zeros(SHAPE, np.uint8)
    inner[4:-4, 4:-4, 4:-4] = 1  # the shift is at most 3 voxels: no border effects inside
    on_working = to_sitk(aset.image(aset.manifest.reference).with_array(inner.astype(np.float32)))
    inside = sitk.GetArrayFromImage(sitk.Resample(on_working, to_sitk(scan), sitk.Transform(),
                                                  sitk.sitkNearestNeighbor, 0)) > 0
    expected = shifted(step)
    assert np.count_nonzero(moved.array[inside] != still.array[inside]) > 100  # the field did move the label
    np.testing.assert_array_equal(moved.array[inside], expected[inside])
    for wrong in (-step, step[[1, 0, 2]], step[[2, 1, 0]]):  # the opposite direction, swapped axes
        assert np.count_nonzero(moved.array[inside] != shifted(wrong)[inside]) > 50


def test_segment_config_round_trips_and_refuses_bad_settings():
    config = SegmentConfig(fusion="jlf", fusion_options={"jlf": {"rad": 2}}, atlases=3, refine_steps=4)
    values = json.loads(json.dumps(config.to_dict()))
    assert SegmentConfig.from_dict(values) == config
    assert config.options("jlf") == {"rad": 2} and config.options("mv") == {}
    for bad in ({"atlases": 0}, {"batch_size": 0}, {"refine_steps": -1}, {"starts": "many"}, {"fusion": "vote"},
                {"align_seed": -1},
                {"fusion": "simnet", "fusion_options": {"simnet": {"radius_typo": 1}}}):
        with pytest.raises(CmmasError):
            SegmentConfig(**bad)
    with pytest.raises(CmmasError, match="unknown segmentation settings"):
        SegmentConfig.from_dict({"fusion": "mv", "atlas": 3})


def test_cmmas_segment_aligns_by_organs_wherever_it_has_a_finder_unless_told_not_to():
    from cmmas import cli

    def organs(*flags: str, finder: bool) -> bool:
        args = cli._parser().parse_args(["segment", "--target", "t.nii.gz", "--out", "s.nii.gz", *flags])
        return cli.segment_config(args, finder=finder).organ_alignment

    assert organs(finder=True) and not organs(finder=False)
    assert not organs("--no-organ-alignment", finder=True) and not organs("--single-start", finder=True)
    assert organs("--organ-alignment", finder=False)  # asked for: the engine refuses it without a finder
    args = cli._parser().parse_args(["segment", "--target", "t.nii.gz", "--out", "s.nii.gz", "--organs-only"])
    assert cli.segment_config(args, finder=True).organ_registration
    with pytest.raises(CmmasError, match="needs the alignment by organs"):
        cli.segment_config(args, finder=False)


def test_one_warp_fused_several_ways_equals_one_engine_per_fusion(engine_set, tmp_path):
    aset = engine_set
    _, scan = _scan_with_other_axes(aset)
    config = SegmentConfig(fusion="mv", prealign=False, atlases=2)
    several = Segmenter(aset, None, None, config).segment_all(scan, ["mv", "staple", "jlf_tf"])
    for fusion, result in several.items():
        alone = Segmenter(aset, None, None, SegmentConfig(fusion=fusion, prealign=False, atlases=2)).segment(scan)
        np.testing.assert_array_equal(result.label.array, alone.label.array)
        assert result.atlas_ids == alone.atlas_ids and len(result.atlas_ids) == 2
    qc = json.loads(outputs.write_segmentation(several["staple"], tmp_path / "seg.nii.gz")[-1].read_text())
    assert qc["fusion"] == "staple" and qc["registration"] is False
    assert qc["config"] == config.to_dict() and qc["models"] == {"reg_model": None}


def test_simnet_without_a_model_is_refused_before_any_work(engine_set):
    with pytest.raises(ModelError, match="needs a SimNet"):
        Segmenter(engine_set, None, None, SegmentConfig(fusion="simnet"))
