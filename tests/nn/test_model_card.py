"""Model cards (cmmas.nn.model_card): the grid a network was trained on, beside its .keras file, and
how an atlas set fits one (cmmas.align.cards).

One atlas set of two 32^3 phantom CT atlases is prepared ``like`` a tiny BiRegNet whose card says
16x24x24 voxels at 5 mm aligned at 4 mm (not the 64^3 at 4 mm defaults); the other tests use it.
"""

import dataclasses
import json

import numpy as np
import pytest

from cmmas.align import prepare
from cmmas.align.cards import NORMALISATION, card_from_atlas_set, mismatch
from cmmas.datasets.mmwhs import MMWHS_LABELS
from cmmas.errors import ModelError
from cmmas.nn import training
from cmmas.nn.model_card import ModelCard, card_path, read_card, write_card
from cmmas.nn.networks import build_biregnet, build_simnet
from phantom_data import numbered, write_phantom_folder

SHAPE = (16, 24, 24)
SPACING = (5.0, 5.0, 5.0)
ALIGN_MM = 4.0


def _card(**changes) -> ModelCard:
    card = ModelCard(kind="biregnet", shape_zyx=SHAPE, spacing_zyx=SPACING, labels=dict(MMWHS_LABELS),
                     atlas_modality="ct", target_modality="mr", normalisation=NORMALISATION,
                     align_spacing_mm=ALIGN_MM, training_set="/elsewhere/set", created="2024-01-01T00:00:00+00:00")
    return dataclasses.replace(card, **changes)


def _tiny_biregnet(shape=SHAPE):
    return build_biregnet(shape, c0=2, levels=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Atlas folder, a BiRegNet with a card, and the atlas set prepared like it."""
    root = tmp_path_factory.mktemp("card")
    data = write_phantom_folder(root / "data", numbered("ct", range(2)), shape=32)
    model = training.save_model(_tiny_biregnet(), root / "reg.keras", card=_card())
    aset = prepare.prepare_atlases(data, "ct", root / "set", like=model, progress=False)
    return {"root": root, "data": data, "model": model, "set": aset}


def test_a_saved_model_s_card_round_trips(world, tmp_path):
    card = card_from_atlas_set(world["set"], "biregnet", "ct", "mr")
    assert (card.shape_zyx, card.spacing_zyx, card.align_spacing_mm) == (SHAPE, SPACING, ALIGN_MM)
    assert card.labels == MMWHS_LABELS and card.normalisation == NORMALISATION
    assert card.training_set == str(world["set"].root.resolve())
    path = training.save_model(_tiny_biregnet(), tmp_path / "model.keras", card=card)
    assert card_path(path) == tmp_path / "model.keras.json"
    assert read_card(path) == card
    assert json.loads(card_path(path).read_text())["labels"]["205"] == MMWHS_LABELS[205]
    assert training.input_grid(training.load_model(path, "biregnet"), "biregnet") == SHAPE


def test_a_model_without_a_card_reads_as_none_and_resaving_drops_a_stale_card(tmp_path):
    path = training.save_model(_tiny_biregnet(), tmp_path / "old.keras")
    assert read_card(path) is None
    write_card(_card(), path)
    training.save_model(_tiny_biregnet(), path)
    assert read_card(path) is None and not card_path(path).exists()


def test_a_card_must_fit_the_network_it_is_saved_with(tmp_path):
    with pytest.raises(ModelError, match="not its model card"):
        training.save_model(_tiny_biregnet((16, 16, 16)), tmp_path / "m.keras", card=_card())
    with pytest.raises(ModelError, match="not a SimNet"):
        training.save_model(_tiny_biregnet(), tmp_path / "m.keras", card=_card(kind="simnet"))
    assert not list(tmp_path.iterdir())
    simnet = build_simnet(SHAPE, len(MMWHS_LABELS) + 1, c0=2, levels=2)
    assert read_card(training.save_model(simnet, tmp_path / "s.keras", card=_card(kind="simnet"))).kind == "simnet"


def test_an_invalid_card_is_an_error_naming_it(tmp_path):
    model = tmp_path / "m.keras"
    card_path(model).write_text("{not json")
    with pytest.raises(ModelError, match="invalid model card") as info:
        read_card(model)
    assert str(info.value).startswith(str(card_path(model)))
    card_path(model).write_text(_card().to_json().replace('"biregnet"', '"vnet"'))
    with pytest.raises(ModelError, match="unknown kind"):
        read_card(model)


def test_mismatch_is_none_for_the_set_the_card_describes(world):
    assert mismatch(_card(), world["set"]) is None
    assert mismatch(_card(labels={k: v.upper() for k, v in MMWHS_LABELS.items()}), world["set"]) is None


def test_mismatch_is_one_line_naming_what_differs_and_the_remedy(world):
    card = _card(shape_zyx=(56, 48, 64), spacing_zyx=(4.0, 4.0, 3.0), align_spacing_mm=3.0, labels={6: "liver"})
    message = mismatch(card, world["set"], "runs/reg/model.keras")
    assert "\n" not in message
    assert "grid 16x24x24 voxels, not 56x48x64" in message
    assert "spacing 5 mm, not 4,4,3" in message
    assert f"label codes {sorted(MMWHS_LABELS)}, not [6]" in message
    assert message.endswith("prepare the atlas set with --shape 56,48,64 --spacing 4,4,3 --align-spacing 3 "
                            "--component 6, or with --like runs/reg/model.keras")
    only_spacing = mismatch(_card(spacing_zyx=(4.0, 4.0, 4.0)), world["set"])
    assert "spacing" in only_spacing and "grid 16x24x24" not in only_spacing and "--like MODEL" in only_spacing


def test_prepare_like_a_model_takes_its_grid(world):
    geometry = world["set"].geometry
    assert geometry.shape == SHAPE
    np.testing.assert_allclose(geometry.spacing_zyx, SPACING)
    assert world["set"].manifest.align_spacing_mm == ALIGN_MM
    assert world["set"].labels == MMWHS_LABELS
    assert mismatch(read_card(world["model"]), world["set"]) is None
    again = prepare.raw_atlas_set(world["data"], "ct", world["set"].root, like=world["model"])  # reused
    assert again.manifest == world["set"].manifest


def test_given_values_must_agree_with_the_model(world, tmp_path):
    model = world["model"]
    agreed = prepare.resolve_settings(model, shape_zyx=SHAPE, spacing_zyx=(5, 5, 5), align_spacing_mm=4)
    assert agreed == prepare.Settings(SHAPE, SPACING, ALIGN_MM, None, tuple(sorted(MMWHS_LABELS)))
    for given, flag in (({"shape_zyx": (64, 64, 64)}, "--shape 16,24,24"), ({"spacing_zyx": (4.0,) * 3}, "--spacing 5"),
                        ({"align_spacing_mm": 3.0}, "--align-spacing 4")):
        with pytest.raises(ModelError, match=f"was trained with {flag}, but") as info:
            prepare.prepare_atlases(world["data"], "ct", tmp_path / "set", like=model, progress=False, **given)
        assert str(info.value).startswith(str(model)) and "\n" not in str(info.value)
    assert not (tmp_path / "set").exists()


def test_prepare_like_checks_labels_and_needs_a_card(world, tmp_path):
    liver = training.save_model(_tiny_biregnet(), tmp_path / "liver.keras", card=_card(labels={205: "LV"}))
    assert prepare.resolve_settings(liver).component == 205  # a one-structure model's component
    other = training.save_model(_tiny_biregnet(), tmp_path / "other.keras", card=_card(labels={1: "liver"}))
    with pytest.raises(ModelError, match=r"label codes \[1\], but the ct atlases .* keeps \[\]"):
        prepare.prepare_atlases(world["data"], "ct", tmp_path / "set", like=other, progress=False)
    bare = training.save_model(_tiny_biregnet(), tmp_path / "bare.keras")
    with pytest.raises(ModelError, match="has no model card"):
        prepare.prepare_atlases(world["data"], "ct", tmp_path / "set", like=bare, progress=False)
    assert not (tmp_path / "set").exists()
    assert prepare.resolve_settings() == prepare.Settings((64, 64, 64), (4.0, 4.0, 4.0), 3.0, None, None)


def test_training_writes_the_card_and_checks_it_first(world, tmp_path):
    from cmmas.register import biregnet

    aset = world["set"]
    card = card_from_atlas_set(aset, "biregnet", "ct", "ct")
    images, labels = aset.arrays(aset.ids())
    config = biregnet.RegConfig(shape_zyx=SHAPE, c0=2, levels=2, steps=1, batch=2, steps_per_epoch=1, augment=False)
    args = (images, labels, images, labels, sorted(aset.labels))
    with pytest.raises(ModelError, match="not its model card"):
        biregnet.train(dataclasses.replace(config, shape_zyx=(16, 16, 16)), *args, tmp_path / "wrong",
                       progress=False, card=card)
    path = biregnet.train(config, *args, tmp_path / "run", progress=False, card=card)
    assert read_card(path) == card


def test_a_set_on_the_default_grid_is_refused_with_the_remedy_and_like_fits(world, tmp_path):
    from cmmas import cli, models
    from cmmas.align.atlas_set import AtlasSet

    assert cli.main(["prepare-atlases", "--atlases", str(world["data"]), "--modality", "ct",
                     "--out", str(tmp_path / "default"), "--shape", "24"]) == 0
    with pytest.raises(ModelError) as err:
        models.load_models(world["model"], None, AtlasSet(tmp_path / "default"))
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(world["model"]))
    assert "--shape 16,24,24 --spacing 5 --align-spacing 4" in message and "--like" in message
    assert cli.main(["prepare-atlases", "--atlases", str(world["data"]), "--modality", "ct",
                     "--out", str(tmp_path / "like"), "--like", str(world["model"])]) == 0
    fitted = AtlasSet(tmp_path / "like")
    assert fitted.geometry.shape == SHAPE and fitted.manifest.align_spacing_mm == ALIGN_MM
    reg, _ = models.load_models(world["model"], None, fitted)
    assert reg is not None
