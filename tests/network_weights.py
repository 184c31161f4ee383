"""Random weights for the network tests: every layer's, BatchNormalization statistics included."""

import keras
import numpy as np


def randomise_weights(model: keras.Model, seed: int) -> None:
    """Random weights everywhere, BatchNormalization statistics included (variance > 0)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = weights
            layer.set_weights([rng.uniform(0.5, 2.0, gamma.shape), rng.normal(0, 0.3, beta.shape),
                               rng.normal(0, 0.3, mean.shape), rng.uniform(0.2, 3.0, variance.shape)])
        elif weights:
            layer.set_weights([0.2 * rng.standard_normal(w.shape).astype(np.float32) for w in weights])
