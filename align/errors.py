"""The project's own exception types. The CLI prints their message as one line and exits non-zero."""


class AlignError(Exception):
    """A problem the user can fix; the message names the file/record and the fix."""


class ConfigError(AlignError):
    """A bad recipe or command-line override."""


class DataError(AlignError):
    """A bad input data file or record."""


class ModelError(AlignError):
    """A model that cannot be found or loaded."""


class TrainingError(AlignError):
    """Training that cannot go on as configured (a loss or gradient that stopped being finite)."""
