"""Which cases are atlases and which are targets: cross-validation folds as the paper made them,
explicit lists, the split rules of a cross-modality run (:func:`split_cases`), and the original's
hold-out of training cases from BiRegNet for SimNet (:func:`simnet_holdout`)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from cmmas.datasets.base import Case, Dataset, check_unique_ids, natural_key
from cmmas.errors import DatasetError

log = logging.getLogger(__name__)


def fold_split(cases: Sequence[Case], fold: int, n_folds: int = 4) -> tuple[tuple[Case, ...], tuple[Case, ...]]:
    """Cross-validation split: fold ``k`` holds the k-th contiguous chunk of the cases as targets.

    Cases are put in natural order of their ids and cut into ``n_folds`` contiguous chunks whose
    sizes differ by at most one (the first ones larger). With 20 cases and 4 folds, as in the
    paper, fold k (1..4) holds cases ``5(k-1) .. 5(k-1)+4`` as targets and the other 15 as atlases.

    Args:
        cases: cases of one modality (unique ids).
        fold: 1-based fold number, ``1 <= fold <= n_folds``; 0: no fold held out, every case an
            atlas (what a bundle for new scans trains on).
        n_folds: number of folds, at most ``len(cases)``.

    Returns:
        ``(targets, atlases)``, each in natural id order.
    """
    check_unique_ids(cases)
    if n_folds < 2:
        raise DatasetError(None, f"n_folds must be at least 2, got {n_folds}")
    if not 0 <= fold <= n_folds:
        raise DatasetError(None, f"fold must be in 1..{n_folds} (or 0: none held out), got {fold}")
    if len(cases) < n_folds:
        raise DatasetError(None, f"{len(cases)} case(s) cannot be split into {n_folds} folds")
    ordered = sorted(cases, key=lambda c: natural_key(c.id))
    if fold == 0:
        return (), tuple(ordered)
    size, extra = divmod(len(ordered), n_folds)
    start = (fold - 1) * size + min(fold - 1, extra)
    stop = start + size + (1 if fold - 1 < extra else 0)
    return tuple(ordered[start:stop]), tuple(ordered[:start] + ordered[stop:])


def explicit_split(
    cases: Sequence[Case], targets: Iterable[str], atlases: Iterable[str]
) -> tuple[tuple[Case, ...], tuple[Case, ...]]:
    """Split by case ids.

    Args:
        cases: the cases to choose from (unique ids).
        targets: ids of the target cases (non-empty).
        atlases: ids of the atlas cases (non-empty, disjoint from ``targets``).

    Returns:
        ``(targets, atlases)`` as cases, in the order the ids were given.

    Raises:
        DatasetError: unknown, repeated or overlapping ids, or an empty side.
    """
    check_unique_ids(cases)
    by_id = {c.id: c for c in cases}
    targets, atlases = list(targets), list(atlases)
    unknown = [i for i in targets + atlases if i not in by_id]
    if unknown:
        known = sorted(by_id, key=natural_key)
        shown = ", ".join(known[:8]) + (", ..." if len(known) > 8 else "")
        raise DatasetError(None, f"unknown case id(s) {unknown}; known ids: {shown}")
    for side, ids in (("targets", targets), ("atlases", atlases)):
        if not ids:
            raise DatasetError(None, f"no {side} given")
        if len(set(ids)) != len(ids):
            raise DatasetError(None, f"{side} list a case more than once: {ids}")
    both = sorted(set(targets) & set(atlases), key=natural_key)
    if both:
        raise DatasetError(None, f"case(s) {both} are both target and atlas")
    return tuple(by_id[i] for i in targets), tuple(by_id[i] for i in atlases)


class Split(NamedTuple):
    """A run's cases: the targets, the atlases, and the other training cases (the target
    modality's cases outside the targets' fold, which the networks train on as targets)."""

    targets: tuple[Case, ...]
    atlases: tuple[Case, ...]
    others: tuple[Case, ...]


def split_cases(
    dataset: Dataset,
    atlas_modality: str,
    target_modality: str,
    fold: int | None = None,
    n_folds: int = 4,
    targets: Sequence[str] | None = None,
    atlases: Sequence[str] | None = None,
    max_atlases: int | None = None,
    max_targets: int | None = None,
) -> Split:
    """The split of a run: either ``fold`` k (the k-th contiguous chunk of the target modality's
    cases as targets, the atlas modality's cases outside its own fold k as atlases, as the paper),
    or explicit ``targets`` and ``atlases`` case ids. At most ``max_atlases`` / ``max_targets``
    (the first, in natural order) are kept.

    Raises:
        DatasetError: neither or both ways given, unknown ids, or atlases without a label.
    """
    if atlas_modality == target_modality:
        log.warning("atlases and targets share the modality %s: a mono-modal run", atlas_modality)
    explicit = targets is not None or atlases is not None
    if explicit == (fold is not None):
        raise DatasetError(None, "give either --fold, or --targets and --atlases")
    others: tuple = ()
    if explicit:
        if not targets or not atlases:
            raise DatasetError(None, "--targets and --atlases go together")
        cases = tuple(dataset.of(target_modality))
        if atlas_modality != target_modality:
            cases += tuple(dataset.of(atlas_modality))
        chosen_targets, chosen_atlases = explicit_split(cases, targets, atlases)
    else:
        chosen_targets, target_train = fold_split(dataset.of(target_modality), fold, n_folds)
        _, chosen_atlases = fold_split(dataset.of(atlas_modality), fold, n_folds)
        if atlas_modality != target_modality:
            others = target_train
    unlabelled = [a.id for a in chosen_atlases if a.label_path is None]
    if unlabelled:
        raise DatasetError(dataset.root, f"atlases without a label: {unlabelled}")
    chosen_atlases = chosen_atlases[:max_atlases] if max_atlases else chosen_atlases
    chosen_targets = chosen_targets[:max_targets] if max_targets else chosen_targets
    return Split(tuple(chosen_targets), tuple(chosen_atlases), tuple(others))


class SimNetHoldout(NamedTuple):
    """A fold's training cases split between BiRegNet and SimNet, as the original cmmas
    (``proj/learn2reg/sampler.py``: of each fold's 15 atlases and 15 training targets, the last 4
    of each are withheld from BiRegNet).

    Attributes:
        reg_atlases, reg_targets: case ids BiRegNet trains on (every atlas x every target).
        held_atlases, held_targets: case ids withheld from BiRegNet.
    """

    reg_atlases: tuple[str, ...]
    reg_targets: tuple[str, ...]
    held_atlases: tuple[str, ...]
    held_targets: tuple[str, ...]

    def registration_pairs(self) -> list[tuple[str, str]]:
        """BiRegNet's ``(atlas, target)`` training pairs: no held-out case is in any of them."""
        return [(a, t) for a in self.reg_atlases for t in self.reg_targets]

    def simnet_pairs(self) -> list[tuple[str, str]]:
        """SimNet's ``(atlas, target)`` training pairs, as the original's: every atlas x every
        target (its 'gen_fusion_train' sampler), so the pairs with a held-out case are warps
        BiRegNet never saw."""
        atlases, targets = self.reg_atlases + self.held_atlases, self.reg_targets + self.held_targets
        return [(a, t) for a in atlases for t in targets]


def simnet_holdout(atlases: Sequence[str], targets: Sequence[str], k: int) -> SimNetHoldout:
    """Withhold the last ``k`` atlases and the last ``k`` targets (natural id order) from BiRegNet.

    At test time the original fuses the remaining atlases (11 of 15 with ``k = 4``).

    Args:
        atlases: ids of a fold's training atlases.
        targets: ids of its training targets (the target modality's cases outside the fold).
        k: cases withheld from each side; 0 withholds nothing.

    Raises:
        DatasetError: ``k`` negative, or not leaving BiRegNet at least one atlas and one target.
    """
    atlases = sorted(atlases, key=natural_key)
    targets = sorted(targets, key=natural_key)
    if k < 0 or k >= min(len(atlases), len(targets)):
        raise DatasetError(None, f"cannot withhold {k} of {len(atlases)} atlas(es) and {len(targets)} "
                                 "target(s) from BiRegNet: it needs at least one of each")
    cut_a, cut_t = len(atlases) - k, len(targets) - k
    return SimNetHoldout(tuple(atlases[:cut_a]), tuple(targets[:cut_t]), tuple(atlases[cut_a:]), tuple(targets[cut_t:]))


def crossfit_folds(targets: Sequence[str], k: int) -> list[tuple[str, ...]]:
    """The ``k`` cross-fitting folds of a fold's training targets: fold ``i`` holds every ``k``-th
    target (natural id order) from the ``i``-th. A network trained without fold ``i`` makes the
    training data of fold ``i`` for the next stage, as a network trained on all of them meets
    scans it has not seen (stacking: Wolpert 1992).

    Raises:
        DatasetError: ``k`` below 2 or above the number of targets.
    """
    ordered = sorted(targets, key=natural_key)
    if not 2 <= k <= len(ordered):
        raise DatasetError(None, f"cannot cross-fit {len(ordered)} target(s) in {k} folds: need 2 <= folds <= targets")
    return [tuple(ordered[i::k]) for i in range(k)]
