"""SimNet without a labelled scan of the target modality (train_fusion --pairs atlas_only): its
targets are atlas-modality scans given random contrasts, and its model card says so."""

import json

import numpy as np
import pytest

from scripts import run_experiment

tf = pytest.importorskip("tensorflow")

from cmmas.fuse import simnet_train  # noqa: E402
from cmmas.nn.networks import build_simnet  # noqa: E402


def test_train_fusion_atlas_only_pairs_atlas_modality_targets_and_records_it(phantom, tmp_path):
    out = tmp_path / "fusion"
    done = run_experiment("train_fusion", f"--atlas_set={phantom.aset.root}", f"--reg_model={phantom.reg}",
                          "--pairs=atlas_only", "--atlas_modality=ct", "--target_modality=mr", "--c0=4", "--levels=2",
                          "--steps=2", "--steps_per_epoch=2", "--progress=false", f"--out={out}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.stem for p in (out / "pairs").glob("*.npz")) == ["ct_00", "ct_01", "ct_02"]
    card = json.loads((out / "simnet.keras.json").read_text())
    assert (card["training_pairs"], card["target_modality"]) == ("atlas_only", "mr")
    assert json.loads((out / "config.json").read_text())["labelmix"] == 1.0


def test_labelmix_changes_the_target_image_the_network_reads():
    """Same weights, same batch: one step's loss differs only when the target image is randomised."""
    import keras

    shape, codes = (16, 16, 16), 2
    label = np.zeros((2, *shape, codes), np.float32)
    label[..., 0] = 1.0
    label[:, 4:12, 4:12, 4:12] = (0.0, 1.0)
    batch = {"target": (0.3 + 0.5 * label[..., 1:]).astype(np.float32), "target_label": label, "atlas_label": label}
    losses = []
    for labelmix in (0.0, 0.0, 1.0):
        keras.utils.set_random_seed(0)
        config = simnet_train.SimConfig(shape_zyx=shape, c0=4, levels=2, augment=False, labelmix=labelmix)
        net = build_simnet(shape, codes, c0=4, levels=2)  # zero heads answer 0.5 whatever the image: perturb
        rng = np.random.default_rng(1)
        net.set_weights([w + 0.1 * rng.standard_normal(w.shape).astype(w.dtype) for w in net.get_weights()])
        trainer = simnet_train.SimNetTrainer(net, config)
        trainer.compile(optimizer=keras.optimizers.SGD(0.0))
        losses.append(float(trainer.train_on_batch(batch, return_dict=True)["loss"]))
    assert losses[0] == losses[1] != losses[2]
