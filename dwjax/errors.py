"""User-facing errors: the CLI prints them as one line on stderr and exits non-zero, never a traceback."""


class UserError(Exception):
    """Bad input from the user (a path, a file, a config value). The message says what to change."""


class AudioError(UserError):
    """Audio that cannot be used: missing, unreadable, empty, silent where that matters, or non-finite."""


class WeightsError(UserError):
    """A model name or directory that cannot be loaded."""


class ConfigError(UserError):
    """A config that is malformed or does not fit the devices."""


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete or corrupt."""
