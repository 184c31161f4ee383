"""Cases withheld from BiRegNet: the original's SimNet hold-out (4 atlases and 4 targets of each
fold) and the cross-fitting folds of DLF's training pairs."""

from pathlib import Path

import numpy as np
import pytest

from cmmas.datasets import Case, fold_split
from cmmas.datasets.splits import simnet_holdout
from cmmas.errors import DatasetError


def _cases(modality):
    ids = [f"{modality}_{1001 + i}" for i in range(20)]
    shuffled = np.random.default_rng(3).permutation(ids).tolist()
    return [Case(i, modality, Path(f"{i}.nii.gz"), Path(f"{i}_label.nii.gz")) for i in shuffled]


@pytest.mark.parametrize("fold", [1, 2, 3, 4])
def test_a_held_out_case_never_enters_biregnet_training_pairs(fold):
    _, atlases = fold_split(_cases("ct"), fold)
    _, targets = fold_split(_cases("mr"), fold)
    split = simnet_holdout([c.id for c in atlases], [c.id for c in targets], 4)
    assert len(split.reg_atlases) == len(split.reg_targets) == 11  # the original's 11 x 11
    assert len(split.held_atlases) == len(split.held_targets) == 4
    held = set(split.held_atlases) | set(split.held_targets)
    pairs = split.registration_pairs()
    assert len(pairs) == 121
    assert not held & {case for pair in pairs for case in pair}
    # the last 4 in natural order, as the original's sorted file lists (ct_1020 after ct_1019)
    kept = [c.id for c in sorted(atlases, key=lambda c: int(c.id[3:]))]
    assert list(split.held_atlases) == kept[-4:] and list(split.reg_atlases) == kept[:-4]
    simnet = split.simnet_pairs()
    assert len(simnet) == 15 * 15 and set(pairs) < set(simnet)
    assert {a for a, _ in simnet} >= set(split.held_atlases) and {t for _, t in simnet} >= set(split.held_targets)


def test_no_holdout_and_impossible_holdouts():
    split = simnet_holdout(["a2", "a10", "a1"], ["t1", "t2"], 0)
    assert split.reg_atlases == ("a1", "a2", "a10") and split.held_atlases == split.held_targets == ()
    with pytest.raises(DatasetError, match="at least one of each"):
        simnet_holdout(["a1", "a2", "a3"], ["t1", "t2"], 2)
    with pytest.raises(DatasetError, match="cannot withhold -1"):
        simnet_holdout(["a1"], ["t1"], -1)


def test_crossfit_folds_partition_the_targets_in_natural_order():
    from cmmas.datasets.splits import crossfit_folds

    folds = crossfit_folds(["t10", "t2", "t1", "t3", "t11"], 2)
    assert folds == [("t1", "t3", "t11"), ("t2", "t10")]
    assert sorted(t for fold in crossfit_folds([f"c{i}" for i in range(7)], 3) for t in fold) == \
        sorted(f"c{i}" for i in range(7))
    for k in (1, 6):
        with pytest.raises(DatasetError, match="cannot cross-fit 5 target"):
            crossfit_folds(["a", "b", "c", "d", "e"], k)
