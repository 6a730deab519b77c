"""The one exception family of megalm: user mistakes, not bugs.

Messages say what was expected and how to fix it; entry points print them
without a traceback.
"""


class MegalmError(Exception):
    """Base class: a problem the user can act on."""


class ConfigError(MegalmError):
    """A config file, key, value or combination is invalid."""


class DataError(MegalmError):
    """A dataset, tokenizer or input file is missing, malformed or corrupt."""


class CheckpointError(MegalmError):
    """A checkpoint is missing, incomplete, tampered or incompatible."""
