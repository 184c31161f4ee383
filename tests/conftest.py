"""Test configuration: fast TensorFlow on CPU, deterministic seeds, the shared real data, and the
one phantom atlas set with untrained carded networks that the front-door tests share."""

import os
import random
import shutil
from pathlib import Path

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MPLBACKEND", "Agg")
# One ITK thread makes ANTs registrations bit-reproducible (with two, the same seed drifts);
# ITK reads this once per process, at its first registration.
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")

import numpy as np
import pytest

from cmmas.align.atlas_set import AtlasSet
from phantom_data import PhantomWorld, make_phantom_world

#: Real unpaired CT/MR abdomen scans, read-only, beside the checkout (absent on a bare clone).
ABDOMEN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "abdomen-ctmr"


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    yield


@pytest.fixture
def abdomen_data() -> Path:
    """Path to ../shared/data/abdomen-ctmr, or skip with the reason."""
    if not (ABDOMEN / "labels.json").exists():
        pytest.skip(f"real abdomen data not found at {ABDOMEN} (it sits beside the checkout in CI)")
    return ABDOMEN


@pytest.fixture(scope="session")
def phantom(tmp_path_factory) -> PhantomWorld:
    """The phantom data set, its CT atlas set on the 24^3 grid and untrained carded networks, built
    once per session (phantom_data.make_phantom_world). Read-only: a test that changes the atlas
    set takes ``phantom_set_copy``."""
    return make_phantom_world(tmp_path_factory.mktemp("phantom"))


@pytest.fixture
def phantom_set_copy(phantom, tmp_path) -> AtlasSet:
    """A copy of the shared phantom atlas set in ``tmp_path / "atlas_set"``, free to change."""
    return AtlasSet(shutil.copytree(phantom.aset.root, tmp_path / "atlas_set"))
