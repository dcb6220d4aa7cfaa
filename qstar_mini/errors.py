"""The package's own errors.

Every error a user can cause (a bad config, a missing model, a broken data file) is raised as
a subclass of :class:`QStarError` whose message is one line naming the problem and the fix.
They also subclass ``ValueError`` (or ``TypeError``) so generic handlers keep working.
The command line turns any ``QStarError`` into that one line on stderr and exit status 2.
"""


class QStarError(Exception):
    """Base class of every error qstar_mini raises on bad input."""


class ConfigError(QStarError, ValueError):
    """An impossible or inconsistent configuration."""


class DataError(QStarError, ValueError):
    """A data file or batch that cannot be used (missing, empty, malformed, all padding)."""


class ModelError(QStarError, ValueError):
    """A model or tokenizer that cannot be loaded or used (missing path, unsupported attention)."""


class CheckpointError(QStarError, ValueError):
    """A checkpoint that is missing, half-written or from an incompatible config."""


class NumericalError(QStarError, FloatingPointError):
    """A NaN or inf in a loss, reward or mixing weight."""
