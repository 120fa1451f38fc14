"""The one command-line convention of the project's tools (train.py, predict.py, evaluate.py, ...).

    parser = cli.parser(__doc__)          # argparse, with --tf-logs
    ...
    def main(argv=None) -> int:
        return cli.run(parser(), work, argv)   # work(args): the job; errors become one line

- Every expected failure (a bad input or setting: ValueError, which includes
  files.DataError; a file or network problem: OSError) is printed as one
  `error: ...` line on stderr with exit code 1, never a traceback.
- Ctrl-C (or SIGTERM in training) ends with exit code 130.
- Warnings (the project warns with UserWarning) are printed as one `warning: ...` line.
- TensorFlow's C++ log lines ("oneDNN custom operations are on ...", "This
  TensorFlow binary is optimized ...") are dropped from stderr unless the user
  asks for them with --tf-logs or UNET_ISBI_VERBOSE=1. TensorFlow prints them
  before its own log level applies (TF_CPP_MIN_LOG_LEVEL does not stop them),
  so they are filtered where they are written: file descriptor 2, through a
  small forked process that also sees what TensorFlow logs at shutdown.
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
import signal
import sys
import time
import warnings
from collections.abc import Callable

VERBOSE_ENV = "UNET_ISBI_VERBOSE"
TF_LOGS_FLAG = "--tf-logs"
EXPECTED_ERRORS = (ValueError, OSError)
# absl/glog lines such as "I0000 00:00:1796129918.920017    3249 port.cc:153] ...", the notice absl prints before
# its first one, and the second line of TensorFlow's CPU-feature notice.
NATIVE_LOG = re.compile(r"([IWE]\d{4} [\d:.]+ +\d+ [\w./-]+:\d+\] "
                        r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
                        r"|To enable the following instructions: )")
NATIVE_STARTS = ("I0", "W0", "E0", "WARNING: All log messages", "To enable the following")
_LONGEST_LINE = 1 << 16  # characters after which a partial line is passed on whatever it starts with


class Interrupted(KeyboardInterrupt):
    """A job stopped by Ctrl-C or SIGTERM after saving what it had; its message says how to go on."""


def verbose_requested(argv: list[str] | None = None) -> bool:
    """Return whether the user asked for TensorFlow's own log lines (--tf-logs, or UNET_ISBI_VERBOSE=1)."""
    argv = sys.argv[1:] if argv is None else argv
    return TF_LOGS_FLAG in argv or os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def keep(line: str) -> bool:
    """Return whether a line written to stderr is kept (it is not one of TensorFlow's native log lines)."""
    return NATIVE_LOG.match(line) is None


def _may_become_native(partial: str) -> bool:
    """Return whether a line of which only the start has arrived could be a native log line."""
    return len(partial) < _LONGEST_LINE and any(
        partial.startswith(start) or start.startswith(partial) for start in NATIVE_STARTS)


def _forward(read_fd: int, write_fd: int) -> None:
    """Copy what arrives on `read_fd` to `write_fd` until end of file, less the native log lines.

    Partial lines that cannot be log lines (progress bars redrawn with '\\r')
    are passed on at once; the others wait for their end of line. A line that
    starts with white space right after a dropped one (its continuation) is
    dropped too.
    """
    pending, passing, dropping = "", False, False  # the line's start; passed on already; after a dropped line
    while chunk := os.read(read_fd, 65536):
        pending += chunk.decode(errors="replace")
        *lines, pending = pending.split("\n")
        for line in lines:
            dropping = not passing and (not keep(line) or (dropping and line[:1].isspace()))
            if not dropping:
                os.write(write_fd, (line + "\n").encode(errors="replace"))
            passing = False
        if pending and (passing or not _may_become_native(pending)):
            os.write(write_fd, pending.encode(errors="replace"))
            pending, passing, dropping = "", True, False
    if pending and (passing or keep(pending)):
        os.write(write_fd, pending.encode(errors="replace"))


class _StderrFilter:
    """File descriptor 2 of this process, as a pipe to a small forked process that passes on what is written
    to the real stderr, less the native log lines. The filter outlives the interpreter's shutdown (when
    TensorFlow still logs) and ends at end of file, when this process and its children have exited."""

    def __init__(self):
        read_fd, write_fd = os.pipe()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:  # the filter: Ctrl-C is for the job, not for it
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                os.close(write_fd)
                _forward(read_fd, 2)
            finally:
                os._exit(0)
        os.close(read_fd)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        atexit.register(self.close)

    def close(self, wait: float = 2.0) -> None:
        """At exit: hand the filter its last lines and wait for it (`wait` seconds at most), so that they come
        before the shell's prompt. What TensorFlow logs while the interpreter shuts down goes nowhere."""
        sys.stderr.flush()
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)  # the pipe's last write end here: the filter reads its end of file
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if os.waitpid(self.pid, os.WNOHANG) != (0, 0):
                return
            time.sleep(0.01)


_filter: _StderrFilter | None = None


def quiet_native_logs(argv: list[str] | None = None) -> None:
    """Drop TensorFlow's native log lines from this process's stderr, unless `verbose_requested(argv)`.

    Call it in a tool's main module before TensorFlow loads; calling it again does nothing.
    """
    global _filter  # one filter per process: it owns file descriptor 2
    if _filter is None and not verbose_requested(argv) and hasattr(os, "fork"):  # no fork (Windows): unfiltered
        _filter = _StderrFilter()


def parser(description: str | None) -> argparse.ArgumentParser:
    """Return an argument parser for a tool: its docstring as the help text, and --tf-logs."""
    made = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    made.add_argument(TF_LOGS_FLAG, action="store_true",
                      help=f"show TensorFlow's own C++ log lines (or set {VERBOSE_ENV}=1)")
    return made


def run(parse: argparse.ArgumentParser, work: Callable[[argparse.Namespace], int | None],
        argv: list[str] | None = None) -> int:
    """Parse `argv`, call `work(args)` and return the exit code: its own (default 0), 1 after an expected
    error (printed as one `error:` line), 130 after Ctrl-C."""
    args = parse.parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        try:
            return work(args) or 0
        except EXPECTED_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        except Interrupted as stop:
            print(f"\n{stop}", file=sys.stderr, flush=True)
            return 130
        except KeyboardInterrupt:
            return 130


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Print a UserWarning (what the project warns with) as one `warning: ...` line on stderr; others as Python does."""
    if category is UserWarning:
        print(f"warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
