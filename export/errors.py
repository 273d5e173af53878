"""Export failures, each with the exit code `meta-export` returns for it."""


class ExportError(Exception):
    """The graphs could not be built, exported or written."""

    exit_code = 5


class ParityError(ExportError):
    """An exported graph disagrees with the PyTorch reference: the bundle is not written."""

    exit_code = 6


class SigningKeyError(ExportError):
    """The signing key is missing, unreadable, not Ed25519, or keygen would overwrite one."""

    exit_code = 7

