"""How the scripts end: reported errors as one `error:` line, and SIGINT/SIGTERM as a clean stop."""

import functools
import os
import signal
import sys

from annkernels import models
from annkernels.train.config import ConfigError
from annkernels.train.datasets import CorruptFileError, DatasetLayoutError

# 128 + the signal number, as a shell reports a process that a signal stopped.
EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}


class TrainingError(RuntimeError):
    """Training cannot go on (diverged loss, dead data worker, unwritable output); checkpoints are intact."""


class Interrupted(Exception):
    """SIGINT or SIGTERM before the first training step: the run stops where it is."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name} before training began; "
                         "no checkpoint was written")
        self.signum = signum


# Problems with the user's data, files or options, or a run that cannot go on: one line on stderr, exit status
# 1, no traceback.
REPORTED_ERRORS = (DatasetLayoutError, CorruptFileError, ConfigError, models.CheckpointError, TrainingError)


def short_error(error: BaseException) -> str:
    """The message of an error, without the worker traceback a DataLoader wraps around errors it re-raises."""
    lines = str(error).strip().splitlines()
    if len(lines) > 1 and lines[0].startswith("Caught "):
        prefix = f"{type(error).__name__}: "
        for line in reversed(lines):
            if prefix in line:
                return line.split(prefix, 1)[1]
    return str(error).strip()


def unwritable(error: OSError) -> str:
    """'cannot write PATH: reason' for an OSError raised while writing an output."""
    return f"cannot write {error.filename}: {error.strerror or error}"


def exit_status(main):
    """Wraps a script's main(args): returns its exit status. REPORTED_ERRORS print `error: <message>` (status 1)
    instead of a traceback, and so does an output file that cannot be written; Interrupted exits 130 or 143."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except REPORTED_ERRORS as error:
            print(f"error: {short_error(error)}", file=sys.stderr)
            return 1
        except Interrupted as error:
            print(str(error), file=sys.stderr)
            return EXIT_STATUS[error.signum]
        except OSError as error:
            if error.filename is None:
                raise
            print(f"error: {unwritable(error)}", file=sys.stderr)
            return 1

    return run


class StopSignals:
    """SIGINT and SIGTERM during a training run (a `with` block).

    During setup a signal raises Interrupted at once. Once `deferring()` has been called (training has begun), the
    first signal is only recorded: the loop checks `received` between steps, checkpoints and exits with 130 or 143.
    A second signal ends the process at once with one line on stderr; checkpoints are written to a temporary file
    and renamed, so the last one stays intact. `last_checkpoint` is a callable naming it for that line.
    """

    def __init__(self, last_checkpoint=lambda: ""):
        self.received = None
        self.deferred = False
        self.last_checkpoint = last_checkpoint
        self.previous = {}

    def __enter__(self):
        for signum in EXIT_STATUS:
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def deferring(self) -> None:
        self.deferred = True

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signum
            if not self.deferred:
                raise Interrupted(signum)
            return
        os.write(2, f"\n{signal.Signals(signum).name} again: stopped at once, without a checkpoint of this "
                    f"iteration. {self.last_checkpoint()}\n".encode())
        os._exit(EXIT_STATUS[signum])


def ignore_interrupts(worker_id: int) -> None:
    """DataLoader worker_init_fn: Ctrl-C reaches every process of the terminal's group; a worker ignores it and
    keeps serving batches while the main process finishes its step and checkpoints."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
