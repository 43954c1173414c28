"""STCH: one step on the smooth Tchebycheff scalarization of the log-losses, normalised by a nadir."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlrun.errors import MtlrunError
from mtlrun.strategies.base import LossCombiner, StepContext

EPS = 1e-20  # added inside every log, as the reference code (a zero loss gives a finite log)
TINY = 1e-8  # floor of the nadir: the gradient 1 / (L_t + EPS z_t) of a zero loss stays finite in float32


def smooth_tchebycheff(values: Tensor, mu: float) -> Tensor:
    """mu log sum_t exp(f_t / mu): between max_t f_t and max_t f_t + mu log T, tending to the max as
    mu -> 0; its gradient is sum_t softmax(f / mu)_t grad f_t, tending to the mean of the gradients as mu
    grows. Computed with the max taken out, so no exp overflows."""
    top = values.detach().max()
    return top + mu * torch.logsumexp((values - top) / mu, dim=0)


class STCH(LossCombiner):
    """Smooth Tchebycheff scalarization (Lin, Zhang, Yang, Liu, Wang & Zhang, "Smooth Tchebycheff
    Scalarization for Multi-Objective Optimization", ICML 2024), as its multi-task reference code
    (Xi-L/STCH, STCH_MTL, ported unchanged to LibMTL):

    - warm-up: for the first `warmup_epochs` epochs, one step on the mean of the log-losses log(L_t + eps);
    - in the next epoch, the same steps, and each task's mean training loss is recorded: the nadir z_t;
    - from then on, one step on mu log sum_t exp(f_t / mu) with f_t = log(L_t / z_t + eps), the smooth
      Tchebycheff function of the normalised log-losses with equal preferences (`smooth_tchebycheff`),
      i.e. weights softmax(f / mu) on the f_t.
    Defaults (mu = 1, 4 warm-up epochs) are the reference code's and LibMTL's. Scale: the reference code
    multiplies both objectives by T (sums); here they are means, our baseline being the mean loss. The
    nadir is per task; on a group of tasks (`grouped`) the softmax is over the group, and a task's nadir
    is the mean over the steps it took part in. A nadir below 1e-8 is taken as 1e-8.
    State: epochs seen, the nadir epoch's running sums and the nadir, checkpointed.
    Guarantees: the step's loss lies in [max_t f_t, max_t f_t + mu log K] (K tasks in the step), its
    weights are non-negative and sum to 1, tending to the Tchebycheff max as mu -> 0 and to equal weights
    (the mean of the f_t) as mu grows. The paper's result, that every Pareto solution is reached by some
    preference for a small enough mu, needs preferences other than the equal ones used here.
    """

    name = "stch"

    def __init__(self, tasks: Sequence[str], mu: float = 1.0, warmup_epochs: int = 4) -> None:
        if not mu > 0:
            raise MtlrunError(f"strategy.mu must be > 0, got {mu!r}")
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise MtlrunError(f"strategy.warmup_epochs must be an integer >= 0, got {warmup_epochs!r}")
        self.mu, self.warmup_epochs, self.group_size = float(mu), warmup_epochs, len(tasks)
        self.tasks = list(tasks)
        self.epochs = 0  # finished epochs
        self.sums: dict[str, Tensor] = {}  # the nadir epoch's loss sums and step counts
        self.counts = {t: 0 for t in tasks}
        self.nadir: dict[str, Tensor] = {}
        self._last: tuple[list[str], Tensor] | None = None  # the last step's tasks and weights

    def task_weights(self) -> dict[str, float] | None:
        return dict(zip(self._last[0], self._last[1].tolist())) if self._last else None

    def combine(self, ctx: StepContext, losses: dict[str, Tensor]) -> None:
        names = list(losses)
        stacked = torch.stack([losses[t] for t in names])
        if self.epochs <= self.warmup_epochs:
            if self.epochs == self.warmup_epochs:
                for t in names:
                    self.sums[t] = self.sums.get(t, 0) + losses[t].detach()
                    self.counts[t] += 1
            self._last = names, torch.full((len(names),), 1 / len(names))
            ctx.step(names, (stacked + EPS).log().mean())
            return
        nadir = torch.stack([self.nadir[t] for t in names]).to(stacked)
        values = (stacked / nadir + EPS).log()
        self._last = names, torch.softmax(values.detach() / self.mu, dim=0)
        ctx.step(names, smooth_tchebycheff(values, self.mu))

    def epoch_end(self) -> None:
        if self.epochs == self.warmup_epochs:  # every task steps at least once an epoch, alone or grouped
            self.nadir = {t: (self.sums[t] / self.counts[t]).clamp_min(TINY) for t in self.tasks}
        self.epochs += 1

    def state_dict(self) -> dict:
        return {
            "epochs": self.epochs, "sums": dict(self.sums), "counts": dict(self.counts),
            "nadir": dict(self.nadir),
        }

    def load_state_dict(self, state: dict) -> None:
        self.epochs = int(state["epochs"])
        self.sums, self.counts, self.nadir = dict(state["sums"]), dict(state["counts"]), dict(state["nadir"])
