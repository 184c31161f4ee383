"""Training on more than one worker, run for real: two TensorFlow workers on localhost (TF_CONFIG,
train_reg --strategy multiworker, one shared --out) take the same synchronous steps and end with the
same trainable weights, the chief's in the run folder and the other's in its own folder inside it;
MirroredStrategy with the CPU as its one device trains as the default strategy does."""

import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from scripts import ENV, REPO

ARGS = ["--shape=24", "--levels=2", "--c0=4", "--steps=2", "--steps_per_epoch=2", "--batch=2",
        "--atlas_modality=ct", "--target_modality=ct", "--pairs=atlas_only", "--progress=false"]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _train_reg(atlas_set, out, strategy: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "experiments" / "train_reg.py"), f"--atlas_set={atlas_set}",
                             *ARGS, f"--strategy={strategy}", f"--out={out}"], env={**ENV, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8")


def _weights(path, trainable: bool = False) -> list[np.ndarray]:
    from cmmas.nn import training

    model = training.load_model(path, "biregnet")
    return [w.numpy() for w in (model.trainable_weights if trainable else model.weights)]


@pytest.mark.slow
def test_two_workers_train_in_step_and_mirrored_matches_default(phantom, tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    workers = [_train_reg(phantom.aset.root, tmp_path / "multi", "multiworker",  # one shared run folder
                          {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": k}})})
               for k in range(2)]
    single = [_train_reg(phantom.aset.root, tmp_path / name, name) for name in ("default", "mirrored")]
    for process in workers + single:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-2000:]
    # every trainable weight in step (the gradients are all-reduced); BatchNormalization's moving
    # statistics are each worker's own (Keras does not synchronise them by default)
    # the chief writes the run folder, the other worker its own folder inside it
    first, second = (_weights(path / "model.keras", trainable=True)
                     for path in (tmp_path / "multi", tmp_path / "multi" / "workers" / "worker1"))
    assert len(first) > 10 and all(np.array_equal(a, b) for a, b in zip(first, second))
    default, mirrored = _weights(tmp_path / "default" / "model.keras"), _weights(tmp_path / "mirrored" / "model.keras")
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(default, mirrored))
    for path in (tmp_path / "multi", tmp_path / "multi" / "workers" / "worker1"):
        head, row = (path / "history.csv").read_text().splitlines()  # one epoch each: nobody appended twice
        assert np.isfinite(float(dict(zip(head.split(","), row.split(",")))["loss"]))
    assert sorted(p.name for p in (tmp_path / "multi" / "workers").iterdir()) == ["worker1"]
