"""User-facing errors: the CLI prints these as one line and exits with status 2."""

from __future__ import annotations


class OsslbenchError(Exception):
    """An error caused by the user's input or environment, reported as one line (no traceback)."""


class ConfigError(OsslbenchError):
    """A protocol file, a ``--set`` override or a method config is malformed."""


class DataMissingError(OsslbenchError):
    """A data source's files are absent under the data root (the message says what and how to get it)."""


class DataCorruptError(OsslbenchError):
    """A data source's file exists but is damaged (wrong checksum, truncated)."""


class CheckpointError(OsslbenchError):
    """A checkpoint file cannot be read or does not fit the architecture it is loaded into."""
