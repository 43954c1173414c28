"""The seed authors' training loop (lucaspascal/AITSO_MTL `celeba/models/MTL_model.py`,
`cityscapes/models/MTL_model.py`, `*/models/utils.py:create_optimizer`) under PyTorch 1.2's semantics,
step for step against mtlrun's under the `pascal_*` presets and each variant's command from docs/experiments.md, in
float64: before every optimizer step both hold the same parameters and optimizer state and see the same
batch; after it, both hold the same again."""

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.nn import functional as F

from mtlrun import CONF_DIR
from mtlrun.bench.cases import compose_config
from mtlrun.data.hdf5 import write_dataset
from mtlrun.data.loading import ToDevice
from mtlrun.models.base import MultiTaskModel
from mtlrun.optim import MultiTaskOptimizer
from mtlrun.strategies.base import StepContext
from mtlrun.train.build import build_run

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ATTRIBUTES = list(OmegaConf.load(CONF_DIR / "dataset/celeba.yaml").task_specs)
CATEGORIES = ["flat", "construction", "object", "nature", "sky", "human", "vehicle"]
# Each variant's command from docs/experiments.md (The seed paper's experiments), with its learning rate.
CELEBA_VARIANTS = {
    "MTL-SUS": "strategy=averaged strategy.reduction=sum optimizer.lr=1e-3",
    "MTL-IUS, 8 groups": "strategy=grouped strategy.group_size=5 strategy.regroup=once "
                         "strategy.reduction=sum optimizer.moments=shared optimizer.lr=5e-4",
    "MTL-IO, 4 groups": "strategy=grouped strategy.group_size=10 strategy.regroup=once "
                        "strategy.reduction=sum optimizer.moments=per_task optimizer.lr=5e-4",
    "MTL-IUS, 40 groups": "strategy=alternating strategy.order=fixed optimizer.moments=shared "
                          "optimizer.lr=1e-4",
    "MTL-IO, 40 groups": "strategy=alternating strategy.order=fixed optimizer.moments=per_task "
                         "optimizer.lr=1e-4",
}
CITYSCAPES_VARIANTS = {
    "MTL-IUS": "strategy=alternating strategy.order=fixed optimizer.moments=shared optimizer.lr=5e-4",
    "MTL-IO": "strategy=alternating strategy.order=fixed optimizer.moments=per_task optimizer.lr=1e-3",
}
OTHER_HEAD = "other head"  # their per-group Adam holds every head; mtlrun's per-task state only its own


class Adam12:
    """torch.optim.Adam as PyTorch 1.2 defined it, written out: a parameter whose .grad is None is skipped (it
    gets no state); its state is made at its first step, whatever its gradient (a zero one gives step 1, m = v
    = 0 and no move); eps is added to the raw sqrt(v) and both bias corrections go into the step size,
    p -= lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps). zero_grad zeros the gradients that exist."""

    def __init__(self, params: list[nn.Parameter], lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        self.params, self.lr, self.betas, self.eps = list(params), lr, betas, eps
        self.state: dict[nn.Parameter, dict] = {}

    def zero_grad(self) -> None:
        for p in self.params:
            if p.grad is not None:
                p.grad.detach_()
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        for p in self.params:
            if p.grad is None:
                continue
            state = self.state.setdefault(p, {})
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1
            exp_avg, exp_avg_sq, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
            exp_avg.mul_(beta1).add_(p.grad, alpha=1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = exp_avg_sq.sqrt().add_(self.eps)
            step_size = self.lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
            p.addcdiv_(exp_avg, denom, value=-step_size)


class AuthorsNet(nn.Module):
    """Their network's layout: the shared trunk (here a copy of mtlrun's encoder, whose layers
    tests/test_models_published.py checks against theirs) and one output layer per task group holding the group's
    outputs together (`nn.Linear(512, len(group))` on CelebA, a 1x1 conv per category on Cityscapes), then a
    sigmoid (`cnn.py:forward_task`, `unet.py:forward_task`)."""

    def __init__(self, model: MultiTaskModel, groups: list[list[str]]) -> None:
        super().__init__()
        self.trunk = copy.deepcopy(model.encoder)
        layers = []
        for group in groups:
            (head,) = [m for m in model.heads[group[0]].modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
            if isinstance(head, nn.Linear):
                layers.append(nn.Linear(head.in_features, len(group)))
            else:
                layers.append(nn.Conv2d(head.in_channels, len(group), 1))
        self.out_layer = nn.ModuleList(layers).double()

    def forward(self, image: Tensor, group: int) -> Tensor:
        return torch.sigmoid(self.out_layer[group](self.trunk(image)))


def authors_loss(out: Tensor, batch: dict, group: list[str], tasks: dict) -> Tensor:
    """`celeba/losses.py`: BCE per output, mean over the batch, summed over the group's attributes;
    `cityscapes/losses.py`: BCE averaged over the map's pixels (no void pixel in these batches)."""
    if out.dim() == 2:
        gt = torch.cat([batch[t].reshape(len(out), -1) for t in group], 1).to(out.dtype)
        return F.binary_cross_entropy(out, gt, reduction="none").mean(0).sum()
    (task,) = group
    gt = (batch[task].long() == tasks[task].classes[0]).unsqueeze(1).to(out.dtype)
    return F.binary_cross_entropy(out, gt, reduction="mean")


def _rows(flats: list[Tensor], like: list[Tensor]) -> list[Tensor]:
    """Per-task flat head vectors (weight, bias) stacked into the group layer's weight and bias."""
    parts = [f.split([p.numel() for p in like]) for f in flats]
    return [torch.cat([part[i].view_as(p) for part in parts]) for i, p in enumerate(like)]


class Follower:
    """Wraps mtlrun's optimizer step: after each of mtlrun's steps the authors' loop takes its step from the
    point mtlrun started from, the two results are compared, and the authors' side is reset to mtlrun's."""

    def __init__(self, ctx: StepContext, strategy, names: list[str], per_task: bool) -> None:
        self.ctx, self.strategy, self.names, self.per_task = ctx, strategy, names, per_task
        self.opt: MultiTaskOptimizer = ctx.optimizer
        self.model = ctx.model
        self.original = self.opt.step
        self.opt.step = self.step
        self.steps = 0
        self.reference: AuthorsNet | None = None

    def groups(self) -> list[list[str]]:
        name = self.strategy.name
        if name == "grouped":
            return self.strategy.partition  # drawn once, at the first iteration: their create_task_groups
        return [[t] for t in self.names] if name == "alternating" else [self.names]

    def start(self) -> None:
        self.group_list = self.groups()
        self.reference = AuthorsNet(self.model, self.group_list)
        self.theirs = list(self.reference.parameters())
        count = len(self.group_list) if self.per_task else 1
        self.adams = [Adam12(self.theirs, self.opt.lr) for _ in range(count)]  # one_optim_per_task, or one
        for o in range(count):
            self.reset(o)

    def step(self, tasks, shared_grad, head_grads) -> None:
        if self.reference is None:
            self.start()
        index = self.steps % len(self.group_list)
        group = self.group_list[index]
        assert sorted(tasks) == sorted(group)  # mtlrun steps the authors' group, in their order
        self.original(tasks, shared_grad, head_grads)
        o = index if self.per_task else 0
        self.adams[o].zero_grad()  # MTL_model.train_step: forward, loss, zero_grad, backward, step
        out = self.reference(self.ctx.batch["image"], index)
        authors_loss(out, self.ctx.batch, group, self.ctx.tasks).backward()
        self.adams[o].step()
        self.check(o)  # the other optimizers saw no step, on either side
        self.reset(o)
        self.steps += 1

    def params(self) -> list[Tensor]:
        """mtlrun's parameters in the authors' layout."""
        params = [p.detach() for p in self.model.shared_parameters()]
        for group in self.group_list:
            heads = [self.model.task_parameters(t) for t in group]
            params += [torch.cat([h[i].detach() for h in heads]) for i in range(len(heads[0]))]
        return params

    def states(self, o: int) -> list[dict | str | None]:
        """mtlrun's optimizer state in the layout of the authors' optimizer `o`: per parameter a state, None
        (none yet) or OTHER_HEAD (another group's head, under one Adam per group)."""
        shared = self.model.shared_parameters()
        slot = self.opt.shared.slots.get(self.group_list[o][0] if self.per_task else "shared")
        sizes = self.opt.shared.sizes
        layout: list[dict | str | None] = [None] * len(shared) if slot is None else [
            {"step": slot["step"], "exp_avg": m.view_as(p), "exp_avg_sq": v.view_as(p)}
            for p, m, v in zip(shared, slot["exp_avg"].split(sizes), slot["exp_avg_sq"].split(sizes))
        ]
        for g, group in enumerate(self.group_list):
            like = self.model.task_parameters(group[0])
            slots = [self.opt.heads[t].slots.get(t) for t in group]
            if self.per_task and g != o:
                layout += [OTHER_HEAD] * len(like)
            elif all(s is None for s in slots):
                layout += [None] * len(like)
            else:
                assert len({s["step"] for s in slots}) == 1  # a group's tasks always step together
                moments = [_rows([s[k] for s in slots], like) for k in ("exp_avg", "exp_avg_sq")]
                layout += [{"step": slots[0]["step"], "exp_avg": m, "exp_avg_sq": v}
                           for m, v in zip(*moments)]
        return layout

    def check(self, o: int) -> None:
        """Equal up to float64 rounding: the two sides' gradients differ by rounding (their sigmoid and BCE, a
        layer per group), about 1e-16 of the gradients' scale (~1) and, on an entry whose gradient is below
        eps, Adam turns that into a move of up to lr * 1e-16 / eps = lr * 1e-8: hence atol = lr * 1e-6. Either
        option set otherwise parts by about lr * 1e-1 (eps entering 30 times larger at step 1, an idle head
        moving by ~lr, or not)."""
        for mine, p in zip(self.params(), self.theirs, strict=True):
            torch.testing.assert_close(p.detach(), mine, rtol=1e-10, atol=self.opt.lr * 1e-6)
        adam = self.adams[o]
        for p, mine in zip(self.theirs, self.states(o), strict=True):
            state = adam.state.get(p)
            if mine is OTHER_HEAD:  # their Adam of another group holds that head on zero gradients only
                assert state is None or not (state["exp_avg"].any() or state["exp_avg_sq"].any())
            elif mine is None:
                assert state is None
            else:
                assert state is not None and state["step"] == mine["step"]
                torch.testing.assert_close(state["exp_avg"], mine["exp_avg"], rtol=1e-9, atol=1e-15)
                torch.testing.assert_close(state["exp_avg_sq"], mine["exp_avg_sq"], rtol=1e-9, atol=1e-18)

    def reset(self, o: int) -> None:
        """The authors' side set to mtlrun's parameters and optimizer `o`'s state. A gradient exists where
        their loop has run a backward pass through the parameter: the shared ones after the first step, a
        head after its group's first step, when mtlrun makes its state."""
        with torch.no_grad():
            for p, mine in zip(self.theirs, self.params()):
                p.copy_(mine)
        for p, mine in zip(self.theirs, self.states(o)):
            if mine is None:
                self.adams[o].state.pop(p, None)
            elif mine is not OTHER_HEAD:
                self.adams[o].state[p] = {k: v.clone() if isinstance(v, Tensor) else v
                                          for k, v in mine.items()}
        touched = [bool(self.opt.shared.slots)] * len(self.model.shared_parameters())
        for group in self.group_list:
            first = group[0]
            touched += [first in self.opt.heads[first].slots] * len(self.model.task_parameters(first))
        for p, seen in zip(self.theirs, touched, strict=True):
            p.grad = torch.zeros_like(p) if seen else None


def _dataset(folder: Path, name: str) -> None:
    rng = np.random.default_rng(0)
    if name == "celeba":
        arrays = {s: {"image": rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8),
                      "attributes": rng.integers(0, 2, (n, 40)).astype(np.uint8)}
                  for s, n in (("train", 8), ("val", 2), ("test", 2))}
        write_dataset(folder / "celeba.h5", "celeba", arrays, source="fixture", options={},
                      attribute_names=ATTRIBUTES)
        return
    arrays = {s: {"image": rng.integers(0, 256, (n, 16, 32, 3), dtype=np.uint8),
                  "segmentation": rng.integers(0, 7, (n, 16, 32)).astype(np.int16),  # no void pixel
                  "depth": rng.uniform(0.1, 10, (n, 16, 32)).astype(np.float32)}
              for s, n in (("train", 4), ("test", 2))}
    write_dataset(folder / "cityscapes.h5", "cityscapes", arrays, source="fixture", options={},
                  class_names={"segmentation": CATEGORIES})


def _double(batch: dict) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


def follow(folder: Path, experiment: str, command: str, iterations: int, *extra: str) -> Follower:
    """mtlrun's run objects for `experiment` and `command`, built by the training loop's own build_run and
    turned to float64, trained `iterations` iterations with the authors' loop following every step."""
    cfg = compose_config([f"experiment={experiment}", *command.split(), f"data_dir={folder}", "model.width=2",
                          "trainer.device=cpu", *extra])
    batch_size = 4 if experiment == "pascal_celeba" else 2
    torch.manual_seed(0)
    run = build_run(cfg, torch.device("cpu"), 1, batch_size)
    model = run.model.double()
    to_device = ToDevice(torch.device("cpu"), run.data.mean, run.data.std)
    ctx = StepContext(model, run.data.tasks, run.optimizer, run.batches, lambda b: _double(to_device(b)))
    names = [t.name for t in run.data.tasks]
    follower = Follower(ctx, run.strategy, names, run.optimizer.settings.moments == "per_task")
    try:
        for _ in range(iterations):
            run.strategy.iteration(ctx)
            ctx.counts.iterations += 1
    finally:
        run.batches.close()
    return follower


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("seed_data")
    _dataset(folder, "celeba")
    _dataset(folder, "cityscapes")
    return folder


@pytest.mark.parametrize("variant", CELEBA_VARIANTS)
def test_every_celeba_step_is_the_authors_step_under_pytorch_1_2(folders, variant):
    groups = {"MTL-SUS": 1, "MTL-IUS, 8 groups": 8, "MTL-IO, 4 groups": 4}.get(variant, 40)
    iterations = 1 if groups == 40 else 2  # 40 steps already take every head through its idle steps
    follower = follow(folders, "pascal_celeba", CELEBA_VARIANTS[variant], iterations)
    assert len(follower.group_list) == groups and follower.steps == iterations * groups


@pytest.mark.parametrize("variant", CITYSCAPES_VARIANTS)
def test_every_cityscapes_unet_step_is_the_authors_step_under_pytorch_1_2(folders, variant):
    follower = follow(folders, "pascal_cityscapes", CITYSCAPES_VARIANTS[variant], 2)
    assert follower.steps == 2 * 7


@pytest.mark.parametrize("variant,setting", [
    ("MTL-SUS", "optimizer.eps_placement=modern"),
    ("MTL-IO, 4 groups", "optimizer.eps_placement=modern"),
    ("MTL-IUS, 40 groups", "optimizer.idle_params=skip"),
])
def test_without_the_presets_choice_the_steps_part(folders, variant, setting):
    """Each of the two options is needed: today's defaults part from the authors' steps."""
    with pytest.raises(AssertionError):
        follow(folders, "pascal_celeba", CELEBA_VARIANTS[variant], 1, setting)
