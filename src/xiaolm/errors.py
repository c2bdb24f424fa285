"""Expected failures: bad input, a missing file, a checkpoint that does not fit.

Library code raises these and never exits or prints; ``xiaolm.cli`` turns one into a single
``xiaolm: error: ...`` line on stderr and returns its ``code``. This module imports nothing from xiaolm, so
every layer may use it.
"""
from __future__ import annotations


class XiaolmError(Exception):
    """An error a user can fix; ``code`` is the exit status the CLI returns for it."""

    code = 2

    def __init__(self, message: str = "", code: int | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code

    def __reduce__(self):  # keeps ``code`` across a process pool
        return type(self), (str(self), self.code)


class ConfigError(XiaolmError, ValueError):
    """A recipe or flag that does not fit the config's schema."""


class DataError(XiaolmError, ValueError):
    """Input data that is missing, unreadable or malformed."""


class CheckpointError(XiaolmError, RuntimeError):
    """A checkpoint or run directory that cannot be read, written or resumed."""


class ExportError(XiaolmError, ValueError):
    """A model that cannot be exported to, or imported from, another format."""
