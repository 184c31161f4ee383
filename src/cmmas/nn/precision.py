"""The training precision of the networks' convolutional trunks.

``"mixed_bfloat16"`` (Keras mixed precision): the trunk's layers compute in bfloat16 while their
weights, the optimizer state and the gradients stay float32; every head (the zero-initialised
output convolutions and what follows them: displacement fields, logits, voting weights), every
warp and every loss stays float32. bfloat16 has float32's exponent range, so no loss scaling is
needed. Inference runs the BatchNorm-folded float32 copy of :mod:`cmmas.nn.folding` whatever the
training precision, so a network trained in bfloat16 segments in float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras

from cmmas.errors import ModelError

#: Training precisions of a trunk: the Keras dtype policies allowed.
PRECISIONS = ("float32", "mixed_bfloat16")


def check_precision(name: str, precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`; else ModelError naming ``name``."""
    if precision not in PRECISIONS:
        raise ModelError(name, f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    return precision


@contextlib.contextmanager
def trunk_precision(precision: str, name: str = "network") -> Iterator[None]:
    """Layers created inside take the dtype policy ``precision``; the previous global policy is
    restored on exit (also on error)."""
    check_precision(name, precision)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def precision_of(model: keras.Model) -> str:
    """``"mixed_bfloat16"`` when some layer of ``model`` computes in bfloat16, else ``"float32"``."""
    computes = {getattr(layer, "compute_dtype", "float32") for layer in model.layers}
    return "mixed_bfloat16" if "bfloat16" in computes else "float32"
