"""The `pipeline` command's entry point: runs a command line, and turns user errors into one line on stderr.

The options, help and usage errors are click's, in pipeline/commands.py. A plain `pipeline label ...` is read
without click, from the same table of options (pipeline/label.py's LABEL_OPTIONS): its cold start is held within
1.1x of a bare LiteRT script (benchmarks/label_bench.py), and importing click would spend much of that. Anything
that reader does not know, help included, goes to click. Heavy modules (TensorFlow) are imported inside the
commands that need them, and pathlib waits too.
"""

from __future__ import annotations

import os
import sys

from pipeline.output import printable
from serve.errors import PipelineError


def main() -> None:
    """Entry point: user errors become one line on stderr and a non-zero exit, never a traceback."""
    # Progress lines show up at once, even in a pipe or a log. What the output's encoding cannot hold (a label in
    # Greek under PYTHONIOENCODING=ascii) is printed escaped rather than stopping the output.
    sys.stdout.reconfigure(line_buffering=True, errors="backslashreplace")
    sys.stderr.reconfigure(errors="backslashreplace")
    try:
        if sys.argv[1:2] == ["label"]:
            from pipeline.label import label_images, parse_label_args

            options = parse_label_args(sys.argv[2:])
            if options is not None:
                sys.exit(label_images(**options))
        from pipeline.commands import run

        run()
    except PipelineError as err:
        if err.exit_code == 1:
            _error_line(printable(str(err)))
        elif str(err):  # not a failure: a run stopped by a signal, saved, to be continued (exit code 75)
            sys.stdout.flush()
            sys.stderr.write(f"{printable(str(err))}\n")
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("Interrupted.\n")
        sys.exit(130)
    except BrokenPipeError:  # the reader went away (`pipeline label DIR | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        sys.exit(1)
    except Exception as err:  # anything unforeseen still gets one line; PIPELINE_DEBUG=1 shows the traceback
        if os.environ.get("PIPELINE_DEBUG"):
            raise
        first_line = (str(err).strip().splitlines() or [""])[0]  # TensorFlow's messages run to pages
        _error_line(f"{type(err).__name__}: {printable(first_line)} (set PIPELINE_DEBUG=1 for a traceback)")
        sys.exit(1)


def _error_line(text: str) -> None:
    sys.stdout.flush()  # what came before the error is printed before it
    sys.stderr.write(f"Error: {text}\n")
    sys.stderr.flush()
