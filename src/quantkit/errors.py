"""Errors a user can act on. The CLI prints their message on one line and exits with code 2."""


class QuantkitError(Exception):
    """Base class: bad input or an unsupported request, with a message that says what to do."""


class SchemeError(QuantkitError, ValueError):
    """An unknown or invalid scheme string, or a scheme that cannot hold a given weight shape."""


class SourceError(QuantkitError):
    """A model source that is missing, corrupt, truncated or of an unsupported architecture."""


class DataError(QuantkitError):
    """A text source that is missing, empty or too short for what was asked."""


class OutputError(QuantkitError):
    """An output path quantkit must not write (someone else's file or folder, the source model)
    or cannot write (full or read-only disk)."""
