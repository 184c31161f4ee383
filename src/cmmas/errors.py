"""One family of exceptions for everything that can be wrong with user input.

Every message names the offending file (or object) first and then the problem, on one
line, so that scripts can print ``str(err)`` and exit non-zero without a traceback.
"""

from __future__ import annotations

import os


class CmmasError(Exception):
    """Base class of every error cmmas raises on bad input."""

    def __init__(self, source: str | os.PathLike | None, problem: str):
        self.source = None if source is None else os.fspath(source)
        self.problem = problem
        super().__init__(problem if self.source is None else f"{self.source}: {problem}")

    def __reduce__(self):
        """Pickle with both constructor arguments (errors cross process pools)."""
        return (type(self), (self.source, self.problem))


class ImageReadError(CmmasError):
    """A file is missing, unreadable, truncated, not 3D or holds NaN/inf voxels."""


class LabelError(CmmasError):
    """A label map has non-integer or unknown values, or a required structure is empty."""


class GeometryError(CmmasError):
    """Two images that must share a grid do not (shape, spacing, origin, direction)."""


class DatasetError(CmmasError):
    """A data-set folder does not have the expected layout."""


class AtlasSetError(CmmasError):
    """An atlas set is inconsistent or its manifest is invalid."""


class ModelError(CmmasError):
    """A trained model file is missing, corrupt or does not fit the data."""
