"""How a run is asked to stop (SIGTERM, SIGUSR1, SIGUSR2) and the two ways it ends without results: stopped by a
signal with a checkpoint, or a resumed run found finished."""

from __future__ import annotations

import signal
import threading

from mtlrun.run.naming import resume_hint


class StopSignals:
    """SIGTERM and SIGUSR1 (what SLURM and most schedulers send before they stop or preempt a job) and SIGUSR2
    (submitit's signal before a timeout or preemption) ask the run to stop: the handler only records the
    signal; the run writes a checkpoint at the next iteration boundary and ends. Handlers are installed for
    the duration of the `with` block, from the main thread only (Python allows no other), and the previous
    ones are put back after it (submitit's, which then requeues the job: hydra_plugins/mtlrun_launchers)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class StoppedBySignal(Exception):
    """The run stopped on SIGTERM, SIGUSR1 or SIGUSR2 after writing a checkpoint at an iteration boundary."""

    def __init__(
        self, signum: int, run_dir: object, epochs_done: int, iteration: int, iterations: int
    ) -> None:
        self.signum = signum
        where = f"in epoch {epochs_done + 1} after iteration {iteration} of {iterations}" if iteration else \
            f"after epoch {epochs_done}"
        # What happened, without the hint: in a sweep the CLI names the sweep to resume, not the job's folder.
        self.stopped = f"stopped by {signal.Signals(signum).name} {where}; checkpoint written"
        super().__init__(f"{self.stopped}: continue with resume=true {resume_hint('hydra.run.dir', run_dir)}")


class RunFinished(Exception):
    """resume=true found the run finished (its last epoch's checkpoint and results.csv): nothing is done and
    no file of it changes."""
