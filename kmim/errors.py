"""Errors that reach the user as one clear line: which file or key, and why."""


class KmimError(Exception):
    """Base class: the CLI prints these without a traceback and exits with status 2."""


class InputError(KmimError):
    """Bad input found before or while reading: names the file/key and the reason."""

    def __init__(self, where: str, reason: str):
        self.where = where
        self.reason = reason
        super().__init__(f"{where}: {reason}")


class ShardReadError(InputError):
    """A whole shard cannot be read (truncated tar, empty file, size mismatch)."""


class ConfigError(KmimError):
    """A config value that cannot work, raised when the config is constructed."""
