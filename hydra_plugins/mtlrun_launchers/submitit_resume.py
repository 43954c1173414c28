"""submitit launchers whose requeued jobs resume (hydra/launcher=slurm, hydra/launcher=local): submitit signals
a job before a timeout or preemption (SIGUSR2 by default); mtlrun checkpoints at the next iteration boundary
and stops, and the job is then requeued with resume=true, so it continues in the same job directory."""

from __future__ import annotations

import shutil
import signal
from typing import Any

from mtlrun.errors import MtlrunError

try:  # the `cluster` extra (pip install -e '.[cluster]'); without it these launchers do not exist
    from hydra_plugins.hydra_submitit_launcher import submitit_launcher
except ImportError:
    submitit_launcher = None


def resumed(overrides: list[str]) -> list[str]:
    """A job's overrides with resume=true in place of any resume= it had."""
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "resume"] + ["resume=true"]


def requeue_signal() -> int:
    """The signal submitit requeues a job on (SUBMITIT_PREEMPT_SIGNAL, USR2 by default)."""
    import submitit

    return int(getattr(signal, f"SIG{submitit.JobEnvironment.USR_SIG}"))


if submitit_launcher is not None:

    class _Resuming:
        """What both launchers add to submitit's: the requeued job resumes, and mtlrun's stop on submitit's
        signal hands the signal back to submitit, which requeues the job."""

        def __call__(self, sweep_overrides: list[str], *args: Any) -> Any:
            try:
                return super().__call__(sweep_overrides, *args)
            except SystemExit as stop:  # mtlrun exits 128 + signal after writing its checkpoint
                signum = requeue_signal()
                if stop.code == 128 + signum:
                    # mtlrun's handler held the signal while it trained; submitit's is back in place now:
                    # raised again, it calls checkpoint() below, requeues the job and exits.
                    signal.raise_signal(signum)
                raise

        def checkpoint(self, sweep_overrides: list[str], *args: Any) -> Any:
            return super().checkpoint(resumed(sweep_overrides), *args)

    class SlurmLauncher(_Resuming, submitit_launcher.SlurmLauncher):
        """submitit_slurm, whose requeued jobs resume; refused in one line where there is no SLURM, before
        the sweep starts."""

        def setup(self, **kwargs: Any) -> None:
            if shutil.which("srun") is None:  # what submitit looks for (else a RuntimeError, jobs being due)
                raise MtlrunError(
                    "hydra/launcher=slurm submits the jobs to SLURM, and SLURM's srun is not found on this "
                    "machine (not on PATH): run the sweep where SLURM is (a login node), or use "
                    "hydra/launcher=local (the same jobs as processes on this machine) or no hydra/launcher "
                    "(one job after another)"
                )
            super().setup(**kwargs)

    class LocalLauncher(_Resuming, submitit_launcher.LocalLauncher):
        """submitit_local (each job a process of its own on this machine), whose requeued jobs resume."""
