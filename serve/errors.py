"""Errors the pipeline reports to users as one line: "<file>: <problem>"."""


class PipelineError(Exception):
    """A problem with the user's input that the CLI reports without a traceback."""

    exit_code = 1  # the CLI's exit code; 1 is a failure, printed "Error: ..."


class ImageError(PipelineError):
    """An image that cannot be read or decoded."""


class BundleError(PipelineError):
    """A model or labels file that cannot be used."""
