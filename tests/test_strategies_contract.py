"""The contract every strategy in the registry keeps (mtlrun/strategies/__init__.py): built from its conf file, a
finite update; its forward/backward passes and optimizer steps, every backward pass through StepContext; an exact
checkpoint round trip; degenerate inputs; and, for the methods that combine losses, use inside `grouped`.
Each strategy's own maths is tested in the file of its family (test_strategies_gradient.py, ...)."""

from __future__ import annotations

import copy
import inspect
import io
import math
import re

import pytest
import torch
from omegaconf import OmegaConf

from mtlrun import CONF_DIR
from mtlrun.strategies import STRATEGIES, LossCombiner, build_strategy
from tests.helpers import batches, context, linear_model

TASKS = ["a", "b", "c"]
# Settings the tiny linear model needs (its encoder has no convolution), or that single_task cannot go without.
NEEDED = {"single_task": {"task": "a"}, "maximum_roaming": {"masked_layers": "conv_linear"}}
# Every strategy with its conf defaults, plus the settings with a code path of their own.
VARIANTS = [(name, {}) for name in STRATEGIES] + [
    ("mgda", {"rep_grad": True}),
    ("nash_mtl", {"update_weights_every": 2}),
    ("grouped", {"grouping": "affinity", "warmup": 1}),
]
# (forward passes, backward passes, optimizer steps) of two iterations on the three tasks.
COSTS = {
    "averaged": (2, 2, 2), "alternating": (6, 6, 6), "grouped": (4, 4, 4), "single_task": (2, 2, 2),
    "maximum_roaming": (6, 6, 6),
    "uncertainty": (2, 2, 2), "dwa": (2, 2, 2), "rlw": (2, 2, 2), "gradnorm": (2, 8, 2), "famo": (4, 2, 2),
    "db_mtl": (2, 6, 2), "gls": (2, 2, 2), "stch": (2, 2, 2), "excess_mtl": (2, 6, 2),
    "mgda": (2, 6, 2), "pcgrad": (2, 6, 2), "gradvac": (2, 6, 2), "cagrad": (2, 6, 2), "nash_mtl": (2, 6, 2),
    "imtl": (2, 6, 2), "aligned_mtl": (2, 6, 2), "graddrop": (2, 6, 2), "upgrad": (2, 6, 2),
    "fairgrad": (2, 6, 2), "moco": (2, 6, 2), "modo": (6, 18, 2), "sdmgrad": (6, 18, 2), "adatask": (2, 6, 2),
    "mgda/rep_grad": (2, 8, 2),  # T passes through the heads and one through the encoder
    "nash_mtl/update_weights_every": (2, 5, 2),  # the second step reuses the weights: 2 passes, no Jacobian
    "grouped/grouping": (8, 6, 6),  # warm-up: each task alone, G + 1 forward passes for G groups
}
# With this setting STCH's state (its nadir) matters within a few iterations.
STATEFUL = [*VARIANTS, ("stch", {"warmup_epochs": 0})]
# No state, or none that changes the next iterations under the conf defaults (weights solved afresh each
# step, a warm-up not yet over, an inner problem solved to convergence, masks or orders that happen to agree).
STATELESS = {
    "averaged", "single_task", "maximum_roaming", "gls", "stch", "mgda", "pcgrad", "cagrad", "nash_mtl", "imtl",
    "aligned_mtl", "graddrop", "upgrad", "fairgrad", "sdmgrad", "adatask", "mgda/rep_grad",
}
BASELINES = {"averaged", "alternating", "grouped", "single_task"}  # mtlrun's own; every other strategy has a paper
COMBINERS = sorted(name for name, cls in STRATEGIES.items() if issubclass(cls, LossCombiner))


def _key(name: str, settings: dict) -> str:
    return "/".join([name, *settings][:2])


def build(name: str, tasks=TASKS, seed: int = 0, **settings):
    """The strategy from its conf file with `settings` on top, as `strategy=<name>` builds it."""
    cfg = OmegaConf.load(CONF_DIR / "strategy" / f"{name}.yaml")
    cfg.pop("defaults", None)
    return build_strategy(OmegaConf.merge(cfg, NEEDED.get(name, {}), settings), tasks, seed)


def _context(model, tasks=TASKS, data=None, **optimizer):
    """A step context on `model` whose loss-scaling door counts the backward passes it is handed."""
    ctx = context(model, tasks, batches(tasks, count=60) if data is None else data, **{"name": "adam", "lr": 0.01, **optimizer})
    door = ctx.precision.grad

    def counted(*args, **kwargs):
        ctx.door_passes += 1
        return door(*args, **kwargs)

    ctx.door_passes = 0
    ctx.precision.grad = counted
    return ctx


def _train(strategy, ctx, iterations: int) -> None:
    strategy.attach(ctx.model)
    for _ in range(iterations):
        logged = strategy.iteration(ctx)
        assert all(not v.requires_grad and v.isfinite() for v in logged.values())
        strategy.epoch_end()


def _finite(value) -> bool:
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    if isinstance(value, torch.Tensor):
        return bool(value.float().isfinite().all()) if value.is_floating_point() else True
    return math.isfinite(value) if isinstance(value, float) else True


def test_every_strategy_and_variant_states_its_costs():
    assert {_key(n, s) for n, s in VARIANTS} == set(COSTS)


@pytest.mark.parametrize("name", STRATEGIES)
def test_conf_file_gives_every_constructor_default(name):
    """What `strategy=<name>` composes is what the class builds by default (`grouped` names its method instead
    of passing it); the conf file of a published method starts with its paper."""
    path = CONF_DIR / "strategy" / f"{name}.yaml"
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ")
    cls = STRATEGIES[name]
    if name not in BASELINES:
        assert re.search(r"(19|20)\d\d|arXiv", first), f"{path.name} should cite its paper on its first line"
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    assert cfg.pop("name") == cls.name == name
    cfg.pop("defaults", None)
    if "combine" in cfg:
        cfg["combiner"] = cfg.pop("combine")
        cfg.pop("combine_settings")
    params = {k: p.default for k, p in inspect.signature(cls).parameters.items() if k not in ("tasks", "seed")}
    assert set(params) - set(cfg) <= {"task"}, "every setting is in the conf file (single_task's task: required)"
    assert {k: v for k, v in params.items() if v is not inspect.Parameter.empty} == {
        k: v for k, v in cfg.items() if params.get(k, None) is not inspect.Parameter.empty
    }


@pytest.mark.parametrize("name,settings", VARIANTS, ids=[_key(n, s) for n, s in VARIANTS])
def test_two_iterations_update_finitely_and_count_their_work(name, settings):
    model = linear_model(TASKS)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ctx = _context(model)
    strategy = build(name, **settings)
    _train(strategy, ctx, 2)
    counts = ctx.counts
    assert (counts.forward_passes, counts.backward_passes, counts.optimizer_steps) == COSTS[_key(name, settings)]
    assert ctx.door_passes == counts.backward_passes  # every backward pass went through StepContext.grad's door
    trained = strategy.trains(TASKS)
    if strategy.group_size is not None:  # the steps each iteration takes, as the strategy declares them
        assert counts.optimizer_steps == 2 * math.ceil(len(trained) / strategy.group_size)
    for n, p in model.named_parameters():
        assert p.isfinite().all()
        moved = not torch.equal(p, before[n])
        assert moved == (n.startswith("encoder") or n.split(".")[1] in trained), n
    weights = strategy.task_weights()
    assert weights is None or (set(weights) <= set(TASKS) and _finite(weights))


def _continue(strategy, model_state: dict, optimizer_state: dict, data: list) -> list[torch.Tensor]:
    model = linear_model(TASKS)
    model.load_state_dict(model_state)
    ctx = context(model, TASKS, data, name="adam", lr=0.01)
    ctx.optimizer.load_state_dict(copy.deepcopy(optimizer_state))
    _train(strategy, ctx, 2)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name,settings", STATEFUL, ids=[_key(n, s) for n, s in STATEFUL])
def test_checkpoint_round_trip_reproduces_the_next_iterations(name, settings):
    """Saved in a checkpoint (torch.save, read back with weights_only=True as a resume does) after three
    iterations, the state loaded into a strategy built with another seed continues bit for bit."""
    data = batches(TASKS, count=60)
    model = linear_model(TASKS)
    ctx = context(model, TASKS, data, name="adam", lr=0.01)
    original = build(name, **settings)
    _train(original, ctx, 3)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    resumed = build(name, seed=99, **settings)
    resumed.attach(linear_model(TASKS))  # as a run does: attach, then load the state
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    model_state, optimizer_state = copy.deepcopy(model.state_dict()), copy.deepcopy(ctx.optimizer.state_dict())
    rest = data[ctx.counts.forward_passes :]
    expected = _continue(original, model_state, optimizer_state, rest)
    got = _continue(resumed, model_state, optimizer_state, rest)
    assert all(torch.equal(p, q) for p, q in zip(expected, got))
    if _key(name, settings) not in STATELESS:  # the state matters: a fresh strategy continues differently
        fresh = _continue(build(name, seed=99, **settings), model_state, optimizer_state, rest)
        assert not all(torch.equal(p, q) for p, q in zip(expected, fresh))


def _zero_losses():
    model = linear_model(TASKS)
    with torch.no_grad():
        model.encoder.weight.zero_()
    return model, TASKS, [{"image": torch.randn(8, 3), **{t: torch.zeros(8) for t in TASKS}} for _ in range(40)]


def _one_task():
    return linear_model(["a"]), ["a"], batches(["a"], count=40)


@pytest.mark.parametrize("setup", [_zero_losses, _one_task], ids=["zero_losses", "one_task"])
@pytest.mark.parametrize("name", [n for n in STRATEGIES if n != "single_task"])
def test_degenerate_inputs_give_no_nan(name, setup):
    model, tasks, data = setup()
    ctx = context(model, tasks, data, name="adam", lr=0.01)
    # STCH from its first step; Maximum Roaming's units all shared (sigma >= 1/T with one task)
    strategy = build(name, tasks, **{"stch": {"warmup_epochs": 0}, "maximum_roaming": {"sigma": 1.0}}.get(name, {}))
    _train(strategy, ctx, 3)  # DWA's ratios and STCH's nadir are read from the third epoch on
    assert all(p.isfinite().all() for p in model.parameters())
    assert _finite(strategy.state_dict()) and _finite(strategy.task_weights() or {})


@pytest.mark.parametrize("method", COMBINERS)
def test_every_method_combines_a_subset_of_the_tasks_inside_grouped(method):
    """strategy=grouped strategy.combine=<method>: each group's step is the method's on the group alone."""
    grouped = build("grouped", seed=3, combine=method)
    assert isinstance(grouped.combiner, STRATEGIES[method])
    model = linear_model(TASKS)
    ctx = _context(model, moments="per_task")
    head_b = model.heads["b"].weight.detach().clone()
    grouped.combiner.combine(ctx, ctx.losses(ctx.next_batch(), ["a", "c"]))  # one group's step
    assert ctx.counts.optimizer_steps == 1 and torch.equal(model.heads["b"].weight, head_b)
    _train(grouped, ctx, 2)
    assert ctx.counts.optimizer_steps == 1 + 2 * 2 and ctx.door_passes == ctx.counts.backward_passes
    assert all(p.isfinite().all() for p in model.parameters())
    weights = grouped.combiner.task_weights()
    assert weights is None or (set(weights) <= set(TASKS) and _finite(weights))
