"""Applying a trained BiRegNet: warp a stack of atlases onto a target on the working grid,
and register one image pair given as files or images (the ``cmmas register`` command)."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from cmmas import preprocess
from cmmas.align.mapping import normalize
from cmmas.errors import GeometryError, ModelError
from cmmas.io import Geometry, Image, atomic_write_text, check_same_grid, read_image, read_label, write_image
from cmmas.metrics import jacobian_stats
from cmmas.nn.folding import inference_copy
from cmmas.nn.layers import warp
from cmmas.nn.training import input_grid, load_model
from cmmas.register.biregnet import label_table, one_hot




@functools.lru_cache(maxsize=2)
def _compiled_warp(model: keras.Model):
    """A graph-compiled forward pass and warp for ``model`` (1.7x faster than eager calls on CPU).

    Cached for the last two models, which the cache keeps alive.
    """

    @tf.function(reduce_retracing=True, autograph=False)  # no Python control flow to convert
    def run(atlases, targets, onehot):
        ddf = model({"atlas": atlases[..., None], "target": targets[..., None]}, training=False)["U"]
        warped = warp(tf.concat([atlases[..., None], onehot], axis=-1), ddf, "linear")  # one gather for both
        return warped[..., 0], tf.argmax(warped[..., 1:], axis=-1), ddf

    return run


@functools.lru_cache(maxsize=1)
def _compiled_fields():
    """A graph-compiled warp of atlases and their one-hot labels by given fields."""

    @tf.function(reduce_retracing=True, autograph=False)
    def run(atlases, onehot, ddf):
        warped = warp(tf.concat([atlases[..., None], onehot], axis=-1), ddf, "linear")
        return warped[..., 0], tf.argmax(warped[..., 1:], axis=-1)

    return run


def warp_by_fields(
    atlas_images: np.ndarray, atlas_labels: np.ndarray, fields: np.ndarray, codes: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Atlases ``[N, D, H, W]`` (images, integer-code labels) warped by ``fields`` ``[N, D, H, W, 3]``
    (voxels): ``(images float32, labels int32 codes)``, as :func:`warp_atlases` warps them (images
    linearly; labels one-hot linearly, then argmax)."""
    table = np.asarray(label_table(codes), dtype=np.int32)
    onehot = one_hot(np.asarray(atlas_labels), table)
    images, index = _compiled_fields()(tf.constant(np.asarray(atlas_images, np.float32)), tf.constant(onehot),
                                       tf.constant(np.asarray(fields, np.float32)))
    return images.numpy(), table[index.numpy()].astype(np.int32)


def pad_batch(array: np.ndarray, size: int) -> np.ndarray:
    """``array`` ``[n, ...]`` with its last item repeated up to ``size`` items (unchanged if n >= size).

    Inference loops pad their last, shorter batch so that every call has one shape: a
    graph-compiled model is then traced once, not again for the remainder (a retrace costs
    seconds on a CPU, more than the pass itself).
    """
    missing = int(size) - len(array)
    if missing <= 0:
        return array
    return np.concatenate([array, np.repeat(array[-1:], missing, axis=0)])


def _warp_batch(run, atlases: np.ndarray, onehot: np.ndarray, target: np.ndarray, size: int):
    """Fields and warped images / label indices of one batch through ``run`` (of
    :func:`_compiled_warp`), run padded to ``size`` atlases (see :func:`pad_batch`)."""
    n = len(atlases)
    atlases, onehot = pad_batch(atlases, size), pad_batch(onehot, size)
    targets = np.repeat(target[None], len(atlases), 0)
    images, index, ddf = run(tf.constant(atlases), tf.constant(targets), tf.constant(onehot))
    return images.numpy()[:n], index.numpy()[:n], ddf.numpy()[:n]


def warp_atlases(
    model: keras.Model,
    atlas_images: np.ndarray,
    atlas_labels: np.ndarray,
    target_image: np.ndarray,
    codes: Sequence[int],
    batch_size: int = 4,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Register every atlas onto one target with BiRegNet and warp it there.

    Args:
        model: a BiRegNet (:func:`load_model`) for the working-grid shape ``(D, H, W)``.
        atlas_images: ``[N, D, H, W]`` images in ``[0, 1]``.
        atlas_labels: ``[N, D, H, W]`` integer codes.
        target_image: ``[D, H, W]`` image in ``[0, 1]``.
        codes: the label codes (see :func:`label_table`).
        batch_size: atlases per forward pass (a shorter last batch runs padded: one traced graph).

    Returns:
        ``(warped_images [N, D, H, W] float32, warped_labels [N, D, H, W] int32 codes,
        ddfs [N, D, H, W, 3] float32)``: images warped linearly, labels one-hot warped linearly
        then argmax, ``ddfs`` the atlas -> target fields ``U`` in voxels. An untrained network
        returns the atlases unchanged and zero fields.
    """
    shape = input_grid(model, "biregnet")
    atlas_images = np.asarray(atlas_images, dtype=np.float32)
    atlas_labels = np.asarray(atlas_labels)
    target_image = np.asarray(target_image, dtype=np.float32)
    if atlas_images.ndim != 4 or tuple(atlas_images.shape[1:]) != shape:
        raise GeometryError("atlas images", f"expected [N, {', '.join(map(str, shape))}], got {atlas_images.shape}")
    if atlas_labels.shape != atlas_images.shape:
        raise GeometryError("atlas labels", f"shape {atlas_labels.shape} differs from the images' {atlas_images.shape}")
    if tuple(target_image.shape) != shape:
        raise GeometryError("target image", f"shape {target_image.shape} differs from the model's {shape}")
    if int(batch_size) < 1:
        raise ModelError("warp_atlases", f"batch_size must be at least 1, got {batch_size}")
    table = np.asarray(label_table(codes), dtype=np.int32)
    size = min(int(batch_size), len(atlas_images))
    run = _compiled_warp(inference_copy(model))
    images, labels, ddfs = [], [], []
    for first in range(0, len(atlas_images), size):
        chunk = slice(first, first + size)
        onehot = one_hot(atlas_labels[chunk], table)
        warped, index, ddf = _warp_batch(run, atlas_images[chunk], onehot, target_image, size)
        images.append(warped.astype(np.float32))
        labels.append(table[index])
        ddfs.append(ddf.astype(np.float32))
    return np.concatenate(images), np.concatenate(labels).astype(np.int32), np.concatenate(ddfs)


def fit_spacing(geometry: Geometry, shape_zyx: Sequence[int]) -> tuple[float, float, float]:
    """The isotropic spacing (mm, z y x) at which a ``shape_zyx`` LPS grid covers ``geometry``'s box."""
    points = geometry.corners()
    extent_xyz = points.max(axis=0) - points.min(axis=0)
    spacing = float(np.max(extent_xyz / np.asarray(shape_zyx, dtype=np.float64)[::-1]))
    return (spacing, spacing, spacing)


def register_images(
    model: keras.Model,
    moving: Image,
    fixed: Image,
    moving_label: Image | None = None,
    codes: Sequence[int] | None = None,
    spacing_zyx: float | Sequence[float] | None = None,
) -> dict:
    """Register ``moving`` onto ``fixed`` with BiRegNet and map the results onto ``fixed``'s grid.

    Both images are resampled onto one working grid of the model's shape, LPS-oriented and
    centred at the fixed image's centre, of spacing ``spacing_zyx`` (default: isotropic, the
    smallest that holds the whole fixed image, :func:`fit_spacing`), and normalised to
    ``[0, 1]``. BiRegNet is deformable only: the images must already share physical space
    (be affinely pre-aligned, e.g. with :func:`cmmas.align.ants.register`).

    Args:
        model: a BiRegNet.
        moving, fixed: the images (any grids, same physical space).
        moving_label: integer labels on ``moving``'s grid, or None.
        codes: label codes of ``moving_label`` (default: the values it holds).
        spacing_zyx: working spacing in millimetres (one value or ``(z, y, x)``).

    Returns:
        A dict: ``warped_image`` (moving intensities, linear) and ``warped_label`` (or None) on
        the fixed grid; ``ddf_mm``: three images ``(x, y, z)`` on the fixed grid holding the
        displacement in millimetres along the physical LPS axes: fixed point ``p`` corresponds to
        moving point ``p + d(p)`` (an ITK displacement field, split per component; zero outside
        the working grid); ``ddf_voxels`` ``[D, H, W, 3]`` the field on ``working_geometry`` in
        voxels (z, y, x); ``jacobian``: :func:`cmmas.metrics.jacobian_stats` of that field.
    """
    shape = input_grid(model, "biregnet")
    if moving_label is not None:
        check_same_grid(moving, moving_label, what="label")
    spacing = fit_spacing(fixed.geometry, shape) if spacing_zyx is None else spacing_zyx
    fixed_work = preprocess.to_working_grid(
        fixed, spacing, shape, center_mm=preprocess.physical_center(fixed.geometry), kind="linear"
    )
    grid = fixed_work.geometry
    moving_work = preprocess.resample(moving, geometry=grid, kind="linear", default=float(moving.array.min()))
    if moving_label is not None:
        label_work = preprocess.resample(moving_label, geometry=grid, kind="label").array
        table = label_table(np.unique(moving_label.array).tolist() if codes is None else codes)
    else:
        label_work, table = np.zeros(shape, np.int32), (0,)
    _, warped_labels, ddfs = warp_atlases(
        model, normalize(moving_work).array[None], label_work[None], normalize(fixed_work).array, table, batch_size=1
    )
    ddf = ddfs[0]
    raw = warp(moving_work.array[None, ..., None].astype(np.float32), ddf[None], "linear").numpy()[0, ..., 0]
    outside = float(moving.array.min())
    warped_image = preprocess.back_to_grid(Image(raw, grid), fixed.geometry, kind="linear", default=outside)
    warped_label = None
    if moving_label is not None:
        warped_label = preprocess.back_to_grid(Image(warped_labels[0], grid), fixed.geometry, kind="label")
    spacing_zyx_mm = grid.spacing_zyx
    components = []
    for axis in (2, 1, 0):  # physical x, y, z are array axes 2, 1, 0 of the LPS working grid
        mm = (ddf[..., axis] * spacing_zyx_mm[axis]).astype(np.float32)
        components.append(preprocess.back_to_grid(Image(mm, grid), fixed.geometry, kind="linear"))
    return {
        "warped_image": warped_image.with_array(warped_image.array.astype(np.float32)),
        "warped_label": warped_label,
        "ddf_mm": tuple(components),
        "ddf_voxels": ddf,
        "working_geometry": grid,
        "jacobian": jacobian_stats(ddf),
    }


def register_files(
    moving: str | os.PathLike,
    fixed: str | os.PathLike,
    model: str | os.PathLike | keras.Model,
    out_dir: str | os.PathLike,
    moving_label: str | os.PathLike | None = None,
    spacing_zyx: float | Sequence[float] | None = None,
) -> tuple[list[Path], dict[str, float]]:
    """:func:`register_images` from and to files (``cmmas register``).

    Writes into ``out_dir``: ``warped_image.nii.gz``, ``warped_label.nii.gz`` (with a moving
    label), ``ddf_x.nii.gz``, ``ddf_y.nii.gz``, ``ddf_z.nii.gz`` (the displacement in mm along
    the physical LPS axes on the fixed grid, one component per file: see
    :func:`register_images`) and ``jacobian.json``; every file atomically.

    Returns:
        ``(paths written, Jacobian statistics of the working-grid field)``.
    """

    net = model if isinstance(model, keras.Model) else load_model(model, "biregnet")
    moving_image, fixed_image = read_image(moving), read_image(fixed)
    label = None if moving_label is None else read_label(moving_label, like=moving_image)
    result = register_images(net, moving_image, fixed_image, label, spacing_zyx=spacing_zyx)
    out = Path(out_dir)
    written = [write_image(result["warped_image"], out / "warped_image.nii.gz")]
    if result["warped_label"] is not None:
        written.append(write_image(result["warped_label"], out / "warped_label.nii.gz"))
    for axis, component in zip("xyz", result["ddf_mm"]):
        written.append(write_image(component, out / f"ddf_{axis}.nii.gz"))
    written.append(atomic_write_text(out / "jacobian.json", json.dumps(result["jacobian"], indent=1)))
    return written, result["jacobian"]
