"""User-facing errors: the CLI prints these as one line, ``osslbench: error: ...``.

Exit status 2 for what the user gave (configs, data, checkpoints, arguments), 3 for what the machine did
(:class:`HostError`: disk full, read-only folder, no such device).
"""

from __future__ import annotations


class OsslbenchError(Exception):
    """An error caused by the user's input, reported as one line (no traceback); exit status 2."""

    exit_code = 2


class ConfigError(OsslbenchError):
    """A protocol file, a ``--set`` override or a method config is malformed."""


class DataMissingError(OsslbenchError):
    """A data source's files are absent under the data root (the message says what and how to get it)."""


class DataCorruptError(OsslbenchError):
    """A data source's file exists but is damaged (wrong checksum, truncated)."""


class CheckpointError(OsslbenchError):
    """A checkpoint (or result) file cannot be read, is refused, or does not fit the architecture it is loaded into."""


class TrainingDiverged(OsslbenchError):
    """A loss became NaN or infinite; the message names the epoch, the step and the term (exit status 2: the
    config's hyperparameters are the cause; the run resumes from its last good checkpoint)."""


class HostError(OsslbenchError):
    """The machine, not the input: disk full, read-only or unwritable folder, no such device (exit status 3)."""

    exit_code = 3
