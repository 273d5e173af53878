"""One small exception hierarchy; each class knows the process exit code it maps to."""


class EdgeError(Exception):
    exit_code = 1


class ConfigError(EdgeError):
    """The configuration file is missing, malformed, or has unknown/invalid keys."""

    exit_code = 2


class BundleError(EdgeError):
    """The bundle is missing a file, fails a hash or signature check, or does not load."""

    exit_code = 3


class PayloadError(EdgeError):
    """An MQTT payload was rejected; `reason` is a short machine-readable code for the errors topic."""

    exit_code = 4

    def __init__(self, reason: str, message: str, sample_id: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.sample_id = sample_id


class BrokerError(EdgeError):
    """The broker could not be reached at start-up within the configured time."""

    exit_code = 5


class StateError(EdgeError):
    """The state directory cannot be used (unwritable, or locked by another running agent)."""

    exit_code = 6
