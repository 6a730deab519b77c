"""The one exception family of megalm: user mistakes, not bugs.

Messages say what was expected and how to fix it; entry points print them
without a traceback and exit with the error's ``exit_code``.
"""


class MegalmError(Exception):
    """Base class: a problem the user can act on."""

    exit_code = 2  # what megalm/pretrain.py (and the other entry points) exit with


class ConfigError(MegalmError):
    """A config file, key, value or combination is invalid."""


class DataError(MegalmError):
    """A dataset, tokenizer or input file is missing, malformed or corrupt."""


class CheckpointError(MegalmError):
    """A checkpoint is missing, incomplete, tampered or incompatible."""


class NonFiniteError(MegalmError):
    """Too many consecutive steps had a non-finite loss or gradient norm (a diagnostic checkpoint was saved)."""

    exit_code = 3  # apart from 2: a job script can tell a sick run from a wrong config
