"""Test-time refinement (instance optimisation) of atlas -> target fields with MIND-SSC.

BiRegNet predicts each atlas's field in one pass, from what it learned on a few training pairs.
Refinement then fits every field to *this* target: starting from the network's field ``u0``,
Adam minimises, over a residual ``r`` on a refinement grid (the working grid scaled by
``scale``), ::

    mean_x |MIND(target)(x) - MIND(atlas)(x + u(x))|^2 / 12  +  smoothness * diffusion(u),
    u = resize(u0) + r

where MIND is the 12-channel MIND-SSC descriptor (:mod:`cmmas.nn.mind`), which compares local
structure rather than intensity (a CT atlas and an MR target can be matched voxel by voxel), and
``diffusion(u)`` is the sum over the three axes of the mean squared forward difference of ``u``
(voxels of the refinement grid). All atlases are refined together, as one batch; the field on
the working grid is ``u0 + resize(r)``. This is the instance-optimisation half of ConvexAdam
(Siebert, Hansen and Heinrich), started from the network's field instead of a discrete search.

Arrays are numpy ``(z, y, x)``: target ``[D, H, W]`` and atlases ``[N, D, H, W]`` on the working
grid, fields ``[N, D, H, W, 3]`` in working-grid voxels (``ij`` order, as
:func:`cmmas.nn.layers.warp` reads them).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from cmmas.errors import CmmasError, GeometryError
from cmmas.nn.layers import resize_displacement, resize_volume, warp
from cmmas.nn.losses import jacobian_determinant_tf
from cmmas.nn.mind import mind_distance, mind_ssc

_BETA1, _BETA2, _EPSILON = 0.9, 0.999, 1e-8  # Adam's


@dataclasses.dataclass(frozen=True)
class Refinement:
    """How fields are refined.

    Attributes:
        steps: Adam steps (0: no refinement).
        learning_rate: Adam's step size, voxels of the refinement grid.
        smoothness: weight of the diffusion penalty.
        scale: refinement grid / working grid, voxels per axis (0.5: half as many along each
            axis, so eight times fewer to compare; 1: the working grid).
        radius, dilation: MIND-SSC's box half-size and neighbour distance, voxels of the
            refinement grid.
    """

    steps: int = 0
    learning_rate: float = 0.2
    smoothness: float = 0.1
    scale: float = 0.5
    radius: int = 1
    dilation: int = 1

    def __post_init__(self) -> None:
        if int(self.steps) < 0 or not self.learning_rate > 0 or self.smoothness < 0 or not self.scale > 0:
            raise CmmasError(None, "refinement needs steps >= 0, learning_rate > 0, smoothness >= 0 and scale > 0, "
                                   f"got {self}")


class Refined(NamedTuple):
    """What :func:`refine_fields` returns.

    Attributes:
        fields: ``[N, D, H, W, 3]`` refined fields, working-grid voxels.
        distance: mean MIND-SSC distance to the target on the refinement grid, before and after.
        folding_percent: % of the fields' interior voxels with a Jacobian determinant <= 0
            (all atlases together), before and after.
    """

    fields: np.ndarray
    distance: tuple[float, float]
    folding_percent: tuple[float, float]


def refinement_grid(shape: tuple[int, ...], scale: float) -> tuple[int, int, int]:
    """The refinement grid's shape for a working grid ``shape`` (at least 8 voxels per axis)."""
    return tuple(max(8, int(round(n * float(scale)))) for n in shape[:3])


def _objective(smoothness: float):
    def objective(residual, start, target_features, atlas_features):
        field = start + residual
        warped = warp(atlas_features, field, "linear")
        distance = tf.reduce_mean(mind_distance(warped, target_features))
        diffusion = tf.add_n([tf.reduce_mean(tf.square(field[:, 1:] - field[:, :-1])),
                              tf.reduce_mean(tf.square(field[:, :, 1:] - field[:, :, :-1])),
                              tf.reduce_mean(tf.square(field[:, :, :, 1:] - field[:, :, :, :-1]))])
        return distance + smoothness * diffusion, distance

    return objective


@functools.lru_cache(maxsize=4)
def _optimiser(smoothness: float, learning_rate: float):
    """A compiled loop ``(start, target_features, atlas_features, steps) -> (residual, distances)``:
    Adam on the residual, starting at zero."""
    objective = _objective(smoothness)

    @tf.function(reduce_retracing=True, autograph=False)
    def run(start, target_features, atlas_features, steps):
        zeros = tf.zeros_like(start)

        def body(k, residual, m, v, first):
            with tf.GradientTape() as tape:
                tape.watch(residual)
                loss, distance = objective(residual, start, target_features, atlas_features)
            gradient = tape.gradient(loss, residual)
            m = _BETA1 * m + (1.0 - _BETA1) * gradient
            v = _BETA2 * v + (1.0 - _BETA2) * tf.square(gradient)
            t = tf.cast(k + 1, tf.float32)
            step = learning_rate * (m / (1.0 - _BETA1**t)) / (tf.sqrt(v / (1.0 - _BETA2**t)) + _EPSILON)
            first = tf.where(tf.equal(k, 0), distance, first)
            return k + 1, residual - step, m, v, first

        _, residual, _, _, first = tf.while_loop(
            lambda k, *_: k < steps, body, (tf.constant(0), zeros, zeros, zeros, tf.constant(0.0)))
        last = objective(residual, start, target_features, atlas_features)[1]
        return residual, first, last

    return run


def _folding_percent(fields: tf.Tensor) -> float:
    return 100.0 * float(tf.reduce_mean(tf.cast(jacobian_determinant_tf(fields) <= 0.0, tf.float32)))


def refine_fields(target: np.ndarray, atlas_images: np.ndarray, fields: np.ndarray | None,
                  refinement: Refinement) -> Refined:
    """Refine every atlas's field onto ``target`` (the module docstring says how).

    Args:
        target: ``[D, H, W]`` target image on the working grid.
        atlas_images: ``[N, D, H, W]`` atlas images on the working grid, *before* any warp.
        fields: ``[N, D, H, W, 3]`` atlas -> target fields to start from (the network's), working-grid
            voxels; None starts from zero (instance optimisation alone).
        refinement: the settings (``steps`` >= 1 to refine; 0 returns the fields as they are).

    Returns:
        :class:`Refined`. The same inputs give the same fields on every call.
    """
    target = np.asarray(target, dtype=np.float32)
    atlas_images = np.asarray(atlas_images, dtype=np.float32)
    if atlas_images.ndim != 4 or atlas_images.shape[1:] != target.shape:
        raise GeometryError("refinement", f"atlases {atlas_images.shape} do not fit the target {target.shape}")
    shape = target.shape
    if fields is None:
        fields = np.zeros((*atlas_images.shape, 3), np.float32)
    fields = tf.constant(np.asarray(fields, dtype=np.float32))
    if tuple(fields.shape) != (*atlas_images.shape, 3):
        raise GeometryError("refinement", f"fields {tuple(fields.shape)} do not fit the atlases {atlas_images.shape}")
    before = _folding_percent(fields)
    if int(refinement.steps) == 0:
        return Refined(fields.numpy(), (float("nan"), float("nan")), (before, before))
    grid = refinement_grid(shape, refinement.scale)
    target_features = mind_ssc(resize_volume(target[None, ..., None], grid), refinement.radius, refinement.dilation)
    atlas_features = mind_ssc(resize_volume(atlas_images[..., None], grid), refinement.radius, refinement.dilation)
    start = resize_displacement(fields, grid) if grid != shape else fields
    run = _optimiser(float(refinement.smoothness), float(refinement.learning_rate))
    residual, first, last = run(start, target_features, atlas_features, tf.constant(int(refinement.steps)))
    refined = fields + (resize_displacement(residual, shape) if grid != shape else residual)
    return Refined(refined.numpy(), (float(first), float(last)), (before, _folding_percent(refined)))
