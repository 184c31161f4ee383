"""The learned fusions' training data: every training atlas warped by a trained BiRegNet to every
training target, cached on disk one ``<target_id>.npz`` per target (:func:`generate_pairs`), and
read back (:func:`load_pairs`) as :class:`TrainingPairs` for SimNet
(:func:`cmmas.fuse.simnet_train.train`, warped labels) and Deep Label Fusion
(:func:`cmmas.fuse.dlf_train.train`, warped images and labels).

Arrays are numpy in array order ``(z, y, x)``. Label maps hold data-set codes; ``codes`` lists
them (the background 0 is always included).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from cmmas.errors import AtlasSetError, DatasetError, GeometryError
from cmmas.fuse.simnet import channel_codes
from cmmas.io import atomic_path, label_dtype
from cmmas.register import apply

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainingPairs:
    """Training targets with their warped atlases (the content of a pair cache).

    Attributes:
        target_images: ``[T, D, H, W]`` float32 target images.
        target_labels: ``[T, D, H, W]`` target labels (codes).
        warped_labels: one ``[N_t, D, H, W]`` array of warped atlas labels (codes) per target.
        target_ids: the T target ids.
        warped_images: one ``[N_t, D, H, W]`` float array of warped atlas images per target, in
            the order of ``warped_labels`` (float16 as read from a cache; None where only labels
            were given or read).
    """

    target_images: np.ndarray
    target_labels: np.ndarray
    warped_labels: tuple[np.ndarray, ...]
    target_ids: tuple[str, ...]
    warped_images: tuple[np.ndarray, ...] | None = None

    @classmethod
    def from_arrays(cls, target_images, target_labels, warped_labels, target_ids=None,
                    warped_images=None) -> "TrainingPairs":
        """Validate and wrap arrays (``warped_labels`` and ``warped_images``: ``[T, N, D, H, W]`` or a
        list of ``[N_t, ...]``)."""
        images = np.asarray(target_images, dtype=np.float32)
        labels = np.asarray(target_labels)
        warped = tuple(np.asarray(w) for w in warped_labels)
        ids = tuple(target_ids) if target_ids is not None else tuple(f"target{t}" for t in range(len(images)))
        if images.ndim != 4 or labels.shape != images.shape or len(warped) != len(images) or len(ids) != len(images):
            raise GeometryError("TrainingPairs", f"expected T target images and labels [T, D, H, W] and T "
                                f"warped sets, got {images.shape}, {labels.shape}, {len(warped)} sets")
        for target_id, stack in zip(ids, warped):
            if stack.ndim != 4 or stack.shape[1:] != images.shape[1:] or len(stack) < 1:
                raise GeometryError(target_id, f"warped labels must be [N, {', '.join(map(str, images.shape[1:]))}], "
                                    f"got {stack.shape}")
        moved = None
        if warped_images is not None:
            moved = tuple(np.asarray(w) if np.asarray(w).dtype == np.float16 else np.asarray(w, np.float32)
                          for w in warped_images)
            if [m.shape for m in moved] != [w.shape for w in warped]:
                raise GeometryError("TrainingPairs", "warped images must have the warped labels' shapes, got "
                                    f"{[m.shape for m in moved]} and {[w.shape for w in warped]}")
        return cls(images, labels, warped, ids, moved)

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return tuple(self.target_images.shape[1:])

    @property
    def n_pairs(self) -> int:
        return sum(len(w) for w in self.warped_labels)


def _save_npz_atomic(path: Path, **arrays) -> None:
    with atomic_path(path, ".npz") as tmp:
        np.savez_compressed(tmp, **arrays)


def _cached_source(path: Path) -> tuple[list[str], str] | None:
    """The atlas ids and the warping network's name recorded in a cache file ("" where none was
    recorded), or None when it is unreadable or from before the cache held warped images."""
    try:
        with np.load(path) as data:
            if "warped_images" not in data.files:
                return None
            return [str(a) for a in data["atlas_ids"]], str(data["made_by"]) if "made_by" in data.files else ""
    except (OSError, KeyError, ValueError):
        return None


def generate_pairs(
    reg_model: keras.Model,
    aset,
    atlas_ids: Sequence[str],
    target_ids: Sequence[str],
    cache_dir: str | os.PathLike,
    codes: Sequence[int],
    batch_size: int = 4,
    progress: bool = True,
    made_by: str = "",
) -> list[Path]:
    """Warp every atlas to every target with BiRegNet and cache the pairs, one file per target.

    ``cache_dir/<target_id>.npz`` holds ``warped_labels`` ``[N, D, H, W]`` and ``target_label``
    ``[D, H, W]`` (codes in :func:`cmmas.io.label_dtype`, the smallest integer type that holds
    them), ``warped_images`` ``[N, D, H, W]`` float16 (the atlas set's intensities), ``target_image``
    ``[D, H, W]`` float32, ``atlas_ids``, ``codes`` and ``made_by``. Files are written
    atomically; a file that exists with the same atlas ids and ``made_by`` is kept (so an
    interrupted run resumes), another is rewritten. A target is never its own atlas (when the id is in both lists).

    Args:
        reg_model: a trained BiRegNet (:func:`cmmas.nn.training.load_model`).
        aset: the prepared :class:`cmmas.align.atlas_set.AtlasSet` holding all cases.
        atlas_ids, target_ids: labelled cases of the atlas set.
        cache_dir: folder of the cache (created).
        codes: label codes with the background 0.
        batch_size: atlases per BiRegNet batch.
        progress: show a progress bar over targets.
        made_by: names the warping network in the cache (a cross-fitted one's path), so that a
            target's pairs are remade when another network is to warp them.

    Returns:
        The cache files, in the order of ``target_ids``.

    Raises:
        AtlasSetError: unknown or unlabelled cases, or no atlas for a target.
    """
    from tqdm import tqdm

    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    atlas_ids = list(atlas_ids)
    atlas_images, atlas_labels = aset.arrays(atlas_ids)
    if atlas_labels is None:
        raise AtlasSetError(aset.root, f"every atlas needs a label; unlabelled among {atlas_ids}")
    codes = channel_codes(codes)
    dtype = label_dtype(codes)
    paths = []
    for target_id in tqdm(list(target_ids), desc="warp atlases", unit="target", disable=not progress):
        path = cache / f"{target_id}.npz"
        paths.append(path)
        keep = [k for k, a in enumerate(atlas_ids) if a != target_id]
        if not keep:
            raise AtlasSetError(aset.root, f"no atlas left for target {target_id!r}")
        used = [atlas_ids[k] for k in keep]
        if path.exists() and _cached_source(path) == (used, made_by):
            logger.info("keeping cached pairs %s", path)
            continue
        images, labels = aset.arrays([target_id])
        if labels is None:
            raise AtlasSetError(aset.root, f"target {target_id!r} has no label (training targets need one)")
        moved, warped, _ = apply.warp_atlases(
            reg_model, atlas_images[keep], atlas_labels[keep], images[0], codes, batch_size=batch_size)
        _save_npz_atomic(path, warped_labels=warped.astype(dtype), warped_images=moved.astype(np.float16),
                         target_image=images[0].astype(np.float32),
                         target_label=labels[0].astype(dtype), atlas_ids=np.asarray(used),
                         codes=np.asarray(codes), made_by=np.asarray(made_by))
    return paths


def load_pairs(cache_dir: str | os.PathLike, target_ids: Sequence[str] | None = None,
               images: bool = False) -> TrainingPairs:
    """Read a pair cache written by :func:`generate_pairs` (all its targets, or ``target_ids``;
    with ``images`` the warped atlas images too, float16).

    Raises:
        DatasetError: the folder holds no pairs, a file is missing or unreadable, or the
            targets do not share one grid.
    """
    cache = Path(cache_dir)
    if target_ids is None:
        paths = sorted(cache.glob("*.npz"))
        if not paths:
            raise DatasetError(cache, "no training pairs (*.npz); run the gen step of train_fusion first")
    else:
        paths = [cache / f"{t}.npz" for t in target_ids]
    images, labels, warped, moved = [], [], [], []
    for path in paths:
        try:
            with np.load(path) as data:
                images.append(data["target_image"].astype(np.float32))
                labels.append(data["target_label"])
                warped.append(data["warped_labels"])
                if images:
                    moved.append(data["warped_images"])
        except FileNotFoundError:
            raise DatasetError(path, "no such pair file; run the gen step of train_fusion first") from None
        except (OSError, KeyError, ValueError) as err:
            raise DatasetError(path, f"unreadable pair file ({type(err).__name__}: {err}); delete it and rerun "
                               "the gen step") from None
        if images[-1].shape != images[0].shape:
            raise DatasetError(path, f"grid {images[-1].shape} differs from {paths[0].name}'s {images[0].shape}")
    return TrainingPairs.from_arrays(np.stack(images), np.stack(labels), warped,
                                     [p.name[: -len(".npz")] for p in paths], moved if images else None)
