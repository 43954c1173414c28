"""The exceptions whose message is shown to the user as a single line."""

import signal


class MtlrunError(Exception):
    """A problem the user can fix: the message says what is wrong and how to fix it."""

    def __str__(self) -> str:
        text = super().__str__()
        # A DataLoader worker's error comes back re-raised with the worker's traceback as its message;
        # the user's line is the traceback's last one.
        prefix = f"{MtlrunError.__module__}.{MtlrunError.__name__}: "
        if text.startswith("Caught MtlrunError") and prefix in text:
            return text.rsplit(prefix, 1)[1].strip()
        return text


class StoppedBySignal(Exception):
    """The run stopped on SIGTERM, SIGUSR1 or SIGUSR2 after writing a checkpoint at an iteration boundary."""

    def __init__(
        self, signum: int, run_dir: object, epochs_done: int, iteration: int, iterations: int
    ) -> None:
        from mtlrun.rundirs import resume_hint  # rundirs raises MtlrunError: imported here, not at the top

        self.signum = signum
        where = f"in epoch {epochs_done + 1} after iteration {iteration} of {iterations}" if iteration else \
            f"after epoch {epochs_done}"
        # What happened, without the hint: in a sweep the CLI names the sweep to resume, not the job's folder.
        self.stopped = f"stopped by {signal.Signals(signum).name} {where}; checkpoint written"
        super().__init__(f"{self.stopped}: continue with resume=true {resume_hint('hydra.run.dir', run_dir)}")


class RunFinished(Exception):
    """resume=true found the run finished (its last epoch's checkpoint and results.csv): nothing is done and
    no file of it changes."""
