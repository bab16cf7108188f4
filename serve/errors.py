"""Errors the pipeline reports to users as one line: "<file>: <problem>"."""


class PipelineError(Exception):
    """A problem with the user's input that the CLI reports without a traceback."""

    exit_code = 1  # the CLI's exit code; 1 is a failure, printed "Error: ..."


class StoppedError(PipelineError):
    """Not a failure: training stopped by SIGTERM or SIGUSR1 with its checkpoint written, to be continued with
    `--resume`. Exit code 75 (EX_TEMPFAIL of sysexits.h: "try again later"), which a job script can tell from a
    failure; said by rank 0 alone (the other workers' message is empty)."""

    exit_code = 75


class ImageError(PipelineError):
    """An image that cannot be read or decoded."""


class BundleError(PipelineError):
    """A model or labels file that cannot be used."""
