"""Mixed-precision trunks: bfloat16 convolutions, float32 weights, heads, outputs and inference."""

import numpy as np
import pytest
import keras

from cmmas.errors import ModelError
from cmmas.nn.dlf import build_dlf, build_unet
from cmmas.nn.folding import folded_copy
from cmmas.nn.networks import build_biregnet, build_simnet
from cmmas.nn.precision import precision_of, trunk_precision
from network_weights import randomise_weights

SHAPE = (16, 16, 16)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    return {"atlas": rng.random((1, *SHAPE, 1), dtype=np.float32),
            "target": rng.random((1, *SHAPE, 1), dtype=np.float32)}


@pytest.mark.parametrize("build, outputs", [
    (lambda p: build_biregnet(SHAPE, c0=2, levels=3, precision=p), ("U", "V")),
    (lambda p: build_simnet(SHAPE, 3, c0=2, levels=3, precision=p), ("logits", "similarity")),
    (lambda p: build_dlf(SHAPE, 3, c_vote=2, c_fine=2, vote_levels=2, fine_levels=2, precision=p),
     ("probabilities", "logits", "consensus", "weights")),
    (lambda p: build_unet(SHAPE, 3, c0=2, levels=2, precision=p), ("probabilities", "logits")),
])
def test_bfloat16_trunk_keeps_weights_heads_and_outputs_in_float32(build, outputs):
    model = build("mixed_bfloat16")
    assert precision_of(model) == "mixed_bfloat16" and precision_of(build("float32")) == "float32"
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored
    convolutions = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv3D)]
    assert any(layer.compute_dtype == "bfloat16" for layer in convolutions)
    assert all(layer.compute_dtype == "float32" for layer in convolutions if "_head" in layer.name)
    assert {v.dtype for v in model.weights} == {"float32"}
    assert all(model.output[name].dtype == "float32" for name in outputs)


def test_untrained_bfloat16_biregnet_is_exactly_the_identity():
    fields = build_biregnet(SHAPE, c0=2, levels=3, precision="mixed_bfloat16")(_inputs(), training=True)
    for key in ("U", "V"):
        assert keras.ops.convert_to_numpy(fields[key]).dtype == np.float32
        assert not np.any(keras.ops.convert_to_numpy(fields[key]))


def test_bfloat16_is_the_float32_function_rounded_and_inference_is_float32():
    keras.utils.set_random_seed(0)
    mixed = build_biregnet(SHAPE, c0=2, levels=3, precision="mixed_bfloat16")
    randomise_weights(mixed, seed=1)
    plain = build_biregnet(SHAPE, c0=2, levels=3)
    plain.set_weights(mixed.get_weights())
    inputs = _inputs()
    want = keras.ops.convert_to_numpy(plain(inputs, training=False)["U"])
    rounded = keras.ops.convert_to_numpy(mixed(inputs, training=False)["U"])
    scale = np.abs(want).max()
    assert scale > 0.1
    assert np.abs(rounded - want).max() < 0.05 * scale  # bfloat16 keeps 8 bits of mantissa
    assert np.abs(rounded - want).max() > 1e-6 * scale  # ... and it did compute in bfloat16
    copy = folded_copy(mixed)
    assert precision_of(copy) == "float32"
    np.testing.assert_allclose(keras.ops.convert_to_numpy(copy(inputs)["U"]), want, rtol=1e-4, atol=1e-4 * scale)


def test_precision_survives_save_and_load(tmp_path):
    model = build_unet(SHAPE, 3, c0=2, levels=2, precision="mixed_bfloat16")
    model.save(tmp_path / "unet.keras")
    assert precision_of(keras.saving.load_model(tmp_path / "unet.keras")) == "mixed_bfloat16"


def test_unknown_precision_is_refused_and_leaves_the_policy():
    with pytest.raises(ModelError, match="unknown precision 'float16'"):
        build_biregnet(SHAPE, c0=2, levels=3, precision="float16")
    with pytest.raises(RuntimeError):
        with trunk_precision("mixed_bfloat16"):
            raise RuntimeError("in the middle of a build")
    assert keras.config.dtype_policy().name == "float32"
