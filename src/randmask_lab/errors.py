"""The lab's errors, one type per layer. The ``randmask`` CLI prints any ``LabError`` (and the
library's ``MaskingError``) as one line with exit code 2; anything else is an internal error and
keeps its traceback."""

from __future__ import annotations


class LabError(Exception):
    """Bad user input to the lab; the message names the problem and the fix."""


class RunError(LabError, ValueError):
    """A run cannot start or go on as configured (unknown name, impossible option, damaged run folder)."""


class DataError(LabError):
    """Task data is missing, empty or not in the expected format."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A task's data files were not found; the message lists every place that was searched."""


class DataFormatError(DataError, ValueError):
    """A data file is not in the expected original format."""


class ModelError(LabError):
    """A model cannot be found or loaded (unknown name, missing weight package, bad folder)."""


class StoreError(LabError):
    """A results store is missing, corrupt or not a randmask store."""


class MissingPackageError(LabError):
    """An optional package a verb needs is not installed."""


__all__ = ["DataError", "DataFormatError", "DataNotFoundError", "LabError", "MissingPackageError", "ModelError",
           "RunError", "StoreError"]
