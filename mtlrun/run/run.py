"""One run in its directory: it opens (resumes or claims), saves its state, stops on a signal at an iteration
boundary, and finishes with results.csv; under torchrun rank 0 alone decides and writes."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mtlrun.budgets import Budget
from mtlrun.errors import MtlrunError
from mtlrun.run import distributed
from mtlrun.run.identity import RUN_CONTROL_KEYS, config_id, different_configuration, resume_id
from mtlrun.run.naming import resume_hint
from mtlrun.run.rundir import RunDir
from mtlrun.run.signals import RunFinished, StopSignals, StoppedBySignal
from mtlrun.run.state import EpochProgress, FirstLosses, History, RandomState, RunState, Stateful

log = logging.getLogger("mtlrun")


class Run:
    """A run of `cfg` in `directory` (held and locked by the CLI, `rundir.hold`; a path: not locked): its identity (config id,
    resume id), its state (the parts given to `open`, and its own history, epoch progress and first losses),
    and the stop signals, installed while the `with` block runs. The verbs: `open`, `should_stop` before an
    epoch, `at_iteration_boundary`, `end_of_epoch`, `finish`."""

    def __init__(self, cfg: DictConfig, directory: RunDir | Path, settings: dict) -> None:
        directory = directory if isinstance(directory, RunDir) else RunDir(directory)  # a program's own call
        self.cfg, self.directory, self.path = cfg, directory, directory.path
        self.epochs: int = settings["epochs"]
        self.checkpoint_every: int | None = settings["checkpoint_every"]
        self.stop_after_epochs: int | None = settings["stop_after_epochs"]
        self.config_id, self.resume_id = config_id(cfg), resume_id(cfg)
        self.history, self.progress, self.first_losses = History(), EpochProgress(), FirstLosses()
        self.state = RunState()
        self.signals = StopSignals()
        self.start_epoch = 0
        self.iterations_per_epoch = 0
        self.resumed = False  # from a checkpoint (set by `open`)

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files and results (rank 0 under torchrun, else always)."""
        return distributed.is_main()

    def __enter__(self) -> Run:
        self.signals.__enter__()
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: object) -> None:
        self.signals.__exit__()
        if isinstance(error, torch.cuda.OutOfMemoryError):
            raise MtlrunError(
                f"the GPU ran out of memory ({str(error).splitlines()[0][:120]}): lower trainer.batch_size or "
                f"trainer.eval_batch_size, or choose a smaller model; files of finished epochs are kept"
            ) from None

    def open(
        self, device: torch.device, iterations_per_epoch: int, budget: Budget, **parts: Stateful | None
    ) -> None:
        """Register `parts` (None: a part this run lacks) beside the run's own, then resume from the checkpoint
        or claim the directory for a new run; RunFinished when resume=true finds the run finished (no file
        is touched). Under torchrun rank 0 decides; the others load the checkpoint it resumed from (it writes
        the next one only after an iteration, which waits for them)."""
        self.iterations_per_epoch, self.budget = iterations_per_epoch, budget
        for name, part in parts.items():
            self.state.register(name, part)
        self.state.register("rng", RandomState(device))
        self.state.register("history", self.history)
        self.state.register("first_losses", self.first_losses)
        self.state.register("epoch_progress", self.progress)
        opened = distributed.from_rank0(lambda: self._resume_or_claim(device))
        if opened == "finished":
            raise RunFinished(
                f"{self.path} holds a finished run (epoch {self.epochs} of {self.epochs}, results.csv): nothing to "
                f"do, no file changed; to train it again give overwrite=true instead of resume=true"
            )
        if opened == "resumed" and not self.main:
            self.state.load_state_dict(self.directory.load_checkpoint(device), self.directory.checkpoint)
        self.start_epoch, self.resumed = self.history.epoch, opened == "resumed"

    def _resume_or_claim(self, device: torch.device) -> str:
        """"resumed", "new", or "finished" (a resume of a finished run: nothing to do)."""
        run = self.directory
        if self.cfg.resume and run.checkpoint.exists():
            checkpoint = run.load_checkpoint(device)
            if checkpoint["resume_id"] != self.resume_id:
                raise MtlrunError(different_configuration(run.checkpoint, checkpoint, self.cfg, RUN_CONTROL_KEYS))
            self.state.load_state_dict(checkpoint, run.checkpoint)
            if self.budget.finished(self.history.epoch, self.epochs) and run.finished:
                return "finished"
            where = f" at iteration {self.progress.iteration}" if self.progress.iteration else ""
            log.info("resuming %s after epoch %d%s", self.path, self.history.epoch, where)
            opened = "resumed"
        else:
            run.claim(overwrite=self.cfg.overwrite, resume=self.cfg.resume)
            opened = "new"
        run.accept()
        return opened

    def should_stop(self, epoch: int) -> bool:
        """Whether to stop before `epoch` (0-based): trainer.stop_after_epochs epochs of this invocation are
        done. The run then ends with its checkpoint and no results, to be resumed."""
        if self.stop_after_epochs is None or epoch - self.start_epoch < self.stop_after_epochs:
            return False
        log.info("stopped after %d epoch(s) as asked; continue with resume=true %s", self.stop_after_epochs,
                 resume_hint("hydra.run.dir", self.path))
        return True

    def at_iteration_boundary(self, iterations: int) -> bool:
        """After the run's `iterations`-th iteration: a checkpoint where trainer.checkpoint_every asks (an
        epoch's last iteration is saved with the epoch), and a stop where a signal asks. True: the budget is
        spent (`Budget.check`), end the epoch; its end saves, and a stop signal waits the few seconds to the
        results."""
        if self.budget.reached:
            return True
        last = self.progress.iteration == self.iterations_per_epoch
        due = self.checkpoint_every is not None and iterations % self.checkpoint_every == 0 and not last
        self._save_or_stop(save=due, last_epoch=False)
        return False

    def epoch_trained(self, row: dict) -> None:
        """The epoch's iterations are done: its train_log row is in, and no epoch is under way."""
        self.progress.iteration = 0
        self.history.train_log.append(row)

    def end_of_epoch(self, last: bool) -> None:
        """The epoch is evaluated and logged: save, then stop if a signal asked and training goes on (`last`:
        it ends here, after the last epoch or with a spent budget)."""
        self.history.epoch += 1
        self._save_or_stop(save=True, last_epoch=last)

    def _save_or_stop(self, save: bool, last_epoch: bool) -> None:
        """Every rank agrees on whether a signal came (so all stop at the same iteration); a stop writes a
        checkpoint first and ends the run with StoppedBySignal, except after its last epoch, which finishes."""
        self.signals.received = distributed.agreed_signal(self.signals.received)
        stop = self.signals.received is not None and not last_epoch
        if save or self.signals.received is not None:
            self.save()
        if stop:
            raise StoppedBySignal(
                self.signals.received, self.path, self.history.epoch, self.progress.iteration,
                self.iterations_per_epoch,
            )

    def save(self) -> None:
        """The CSVs, then the checkpoint (every rank holds the same state: rank 0 writes it)."""
        if not self.main:
            return
        diagnostics = self.state.parts.get("diagnostics")
        strategy = self.state.parts.get("strategy")
        snapshot = {
            "resume_id": self.resume_id, "config": OmegaConf.to_container(self.cfg, resolve=True),
            **self.state.state_dict(),
        }
        self.directory.save(
            self.history.train_log, self.history.metrics, diagnostics.rows if diagnostics is not None else [],
            snapshot, strategy.records() if strategy is not None else [],
        )

    def finish(self, results: dict) -> dict:
        """Write results.csv (rank 0 only calls this) and return the row."""
        self.directory.write_results(results)
        return results
