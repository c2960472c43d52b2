"""Exceptions frozenlens raises for problems the user can fix.

Every error names the file or value at fault and says what to do, so the
command-line tool can print it without a traceback.
"""

from __future__ import annotations


class FrozenlensError(Exception):
    """Base class of errors caused by input the user can correct."""


class DataError(FrozenlensError, ValueError):
    """A dataset, split file, label or class folder is malformed."""


class ImageError(DataError):
    """An image file cannot be opened or decoded."""


class BackboneError(FrozenlensError):
    """A backbone cannot be found, loaded or matched."""


class StoreError(FrozenlensError):
    """The activation store is inconsistent or incomplete."""


class AdapterError(FrozenlensError):
    """An adapter file is missing, malformed or made for another backbone."""


class ConfigError(FrozenlensError, ValueError):
    """A training or method setting, or a command-line value, is out of range."""
