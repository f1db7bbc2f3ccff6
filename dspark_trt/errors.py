"""Errors the user can act on. The CLI prints their message without a traceback and exits non-zero."""


class DSparkError(Exception):
    """Base class for errors caused by user input, configuration or missing files."""


class InvalidRequestError(DSparkError):
    """A request parameter is out of range; the message names the field."""


class ModelNotFoundError(DSparkError):
    """A model path or alias does not resolve to a loadable model."""


class UnsupportedModelError(DSparkError):
    """The model exists but its architecture or format is not supported."""


class NotBuiltError(DSparkError):
    """A feature of the design that is not implemented yet; names the issue that builds it."""
