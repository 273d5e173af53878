"""The workstation side's exception hierarchy; each class maps to a process exit code."""


class MetaTrainError(Exception):
    exit_code = 1


class ConfigError(MetaTrainError):
    """Bad YAML, an unknown key (named with its path), or a value of the wrong type or range."""

    exit_code = 2


class DataError(MetaTrainError):
    """User data that cannot be used: missing column, non-numeric value, NaN, too few rows/classes."""

    exit_code = 3


class CheckpointError(MetaTrainError):
    exit_code = 4


class NonFiniteError(MetaTrainError):
    """Training produced a non-finite meta-loss, gradient or parameter; the last finite checkpoint is kept."""

    exit_code = 5
