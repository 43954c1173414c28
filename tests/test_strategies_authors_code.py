"""The seed authors' GradNorm, MGDA-UB and PCGrad (lucaspascal/AITSO_MTL) as options: each step against a
hand-written loop or a hand computation, in float64, on tiny models."""

import copy
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from mtlrun import CONF_DIR
from mtlrun.data import task_names, task_specs
from mtlrun.errors import MtlrunError
from mtlrun.models import build_model
from mtlrun.models.base import MultiTaskModel
from mtlrun.models.celeba_cnn import build as build_celeba_cnn
from mtlrun.optim import flatten
from mtlrun.strategies.gradnorm import GradNorm, last_shared_layer, layer_weight
from mtlrun.strategies.mgda import MGDA
from mtlrun.strategies import build_strategy
from mtlrun.strategies.pcgrad import PCGrad
from mtlrun.tasks import build_task
from tests.helpers import Regression, batches, context

TASKS = ["a", "b", "c"]


def two_layer_model(tasks: list[str], dim: int = 3, seed: int = 0) -> MultiTaskModel:
    """Two shared linear maps (W1, then W2) and a linear head per task, all float64 and without bias."""
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False))
    heads = {t: nn.Linear(dim, 1, bias=False) for t in tasks}
    return MultiTaskModel(encoder, heads).double()


def double_batches(tasks: list[str], count: int) -> list[dict[str, torch.Tensor]]:
    return [{k: v.double() for k, v in b.items()} for b in batches(tasks, count=count)]


def _losses(model: MultiTaskModel, batch: dict, tasks: list[str]) -> torch.Tensor:
    outputs = model(batch["image"], tasks)
    return torch.stack([((outputs[t].squeeze(-1) - batch[t]) ** 2).mean() for t in tasks])


# --- GradNorm: the layer W and the weights' optimizer ------------------------------------------------------


def authors_gradnorm_step(model, task_weights, optimizer, batch, layer, alpha, initial):
    """celeba/models/GradNorm_model.py:train_step, line by line: the weights are a parameter of the network's
    Adam, W is `layer`, L(0) the first step's losses. Returns L(0)."""
    losses = _losses(model, batch, TASKS)
    loss = torch.sum(task_weights * losses)
    optimizer.zero_grad()
    loss.backward(retain_graph=True)
    task_weights.grad = 0.0 * task_weights.grad
    norms = torch.stack([
        torch.norm(w_i * torch.autograd.grad(L_i, layer, retain_graph=True)[0])
        for w_i, L_i in zip(task_weights, losses)
    ])
    initial = losses.detach() if initial is None else initial
    with torch.no_grad():
        ratios = losses / initial
        constant = norms.mean() * (ratios / ratios.mean()) ** alpha
    task_weights.grad = torch.autograd.grad((norms - constant).abs().sum(), task_weights)[0]
    optimizer.step()
    with torch.no_grad():
        task_weights.data = task_weights.data * (len(task_weights) / task_weights.sum())
    return initial


def _gradnorm_against_the_authors(**settings) -> float:
    """Four GradNorm steps of mtlrun (Adam 0.01, alpha 0.2, `settings`) beside the authors' train_step
    (one torch Adam over the network and the weights, W the first of two shared layers): the largest
    discrepancy of a parameter or weight, in units of the tolerance. The losses (StepContext) and the
    weights (as the authors' float32 parameter) are float32: each step rounds them to 6e-8 relative,
    which 4 steps and Adam's normalised updates keep well below 1e-6."""
    data = double_batches(TASKS, count=4)
    model = two_layer_model(TASKS)
    theirs = copy.deepcopy(model)
    task_weights = nn.Parameter(torch.ones(3, dtype=torch.float64))
    adam = torch.optim.Adam([*theirs.parameters(), task_weights], lr=0.01)
    ctx = context(model, TASKS, data, lr=0.01, name="adam", moments="shared")
    ours = GradNorm(TASKS, alpha=0.2, **settings)
    initial, worst = None, 0.0
    for batch in data:
        ours.iteration(ctx)
        layer = theirs.encoder[0].weight
        initial = authors_gradnorm_step(theirs, task_weights, adam, batch, layer, 0.2, initial)
        weights = torch.tensor(list(ours.task_weights().values()), dtype=torch.float64)
        pairs = [*zip(model.parameters(), theirs.parameters()), (weights, task_weights)]
        for mine, reference in pairs:
            reference = reference.detach()
            error = (mine.detach() - reference).abs() / (1e-9 + 1e-6 * reference.abs())
            worst = max(worst, float(error.max()))
    assert not torch.allclose(task_weights.detach(), torch.ones(3, dtype=torch.float64), atol=1e-3)  # moved
    return worst


def test_gradnorm_with_the_models_optimizer_and_a_chosen_layer_steps_as_the_authors_loop():
    """weights_optimizer=model, layer=encoder.0: every step equals the authors' train_step, in float64; with
    either setting at its default (own Adam at 1e-3, W the last shared layer) it does not."""
    assert _gradnorm_against_the_authors(layer="encoder.0", weights_optimizer="model") <= 1
    assert _gradnorm_against_the_authors(weights_optimizer="model") > 100
    assert _gradnorm_against_the_authors(layer="encoder.0") > 100


def test_gradnorm_model_optimizer_sgd_moves_the_weights_by_the_models_rate_and_resumes():
    """With SGD (lr 0.1) the weights move by -0.1 times their GradNorm gradient, then are renormalised; the
    state (SGD momentum here) round-trips through state_dict."""
    data = double_batches(TASKS, count=3)
    model = two_layer_model(TASKS)
    ctx = context(model, TASKS, data, lr=0.1, momentum=0.5)
    strategy = GradNorm(TASKS, weights_optimizer="model")
    strategy.iteration(ctx)
    state = copy.deepcopy(strategy.state_dict())
    assert set(state["weight_states"]) == set(TASKS)
    snapshot, opt_state = copy.deepcopy(model), copy.deepcopy(ctx.optimizer.state_dict())
    runs = []
    for candidate in (strategy, GradNorm(TASKS, weights_optimizer="model")):
        if candidate is not strategy:
            candidate.load_state_dict(state)
        replica = copy.deepcopy(snapshot)
        replica_ctx = context(replica, TASKS, data[1:], lr=0.1, momentum=0.5)
        replica_ctx.optimizer.load_state_dict(copy.deepcopy(opt_state))
        candidate.iteration(replica_ctx)
        runs.append(torch.tensor(list(candidate.task_weights().values())))
    torch.testing.assert_close(runs[1], runs[0], rtol=0, atol=0)


def test_gradnorm_first_sgd_step_by_hand():
    data = double_batches(TASKS, count=1)
    model = two_layer_model(TASKS)
    losses = _losses(model, data[0], TASKS)
    W = model.encoder[1].weight
    norms = torch.stack([torch.autograd.grad(L, W, retain_graph=True)[0].norm() for L in losses]).detach()
    # first step: loss ratios 1, so every target is mean(norms); d/dw_t |w_t n_t - target| = sign(.) n_t
    expected = 1 - 0.1 * torch.sign(norms - norms.mean()) * norms
    expected = 3 * expected / expected.sum()
    ctx = context(model, TASKS, data, lr=0.1)
    strategy = GradNorm(TASKS, weights_optimizer="model")
    strategy.iteration(ctx)
    weights = torch.tensor(list(strategy.task_weights().values()), dtype=torch.float64)
    torch.testing.assert_close(weights, expected)


def test_gradnorm_layer_unknown_or_not_shared_is_one_line_listing_the_shared_layers():
    model = two_layer_model(TASKS)
    for name in ("encoder.2", "heads.a"):
        message = r"strategy.layer='.*' is not a shared layer here; shared layers: encoder.0, encoder.1$"
        with pytest.raises(MtlrunError, match=message):
            GradNorm(TASKS, layer=name).attach(model)
    with pytest.raises(MtlrunError, match="strategy.weights_optimizer='adam' is invalid; valid: own, model"):
        GradNorm(TASKS, weights_optimizer="adam")
    assert layer_weight(model, None) is last_shared_layer(model) is model.encoder[1].weight


def test_gradnorm_layer_of_the_celeba_cnn_is_the_authors_conv_7():
    """AITSO_MTL's W on CelebA is CONV_7 (`get_weights()[-1]`: the last Conv2d), not the last FC."""
    model = build_celeba_cnn([Regression(t) for t in TASKS], width=2)
    convs = [m for m in model.encoder.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 7
    assert layer_weight(model, "encoder.convs.21") is convs[-1].weight
    assert last_shared_layer(model) is not convs[-1].weight


# --- heads under MGDA-UB and PCGrad -----------------------------------------------------------------------


def _flat_grads(loss: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return flatten(grads, params)


def _sgd(params: list[nn.Parameter], update: torch.Tensor, lr: float) -> None:
    with torch.no_grad():
        for p, u in zip(params, update.split([p.numel() for p in params])):
            p -= lr * u.view_as(p)


def authors_mgda_ub_step(model: MultiTaskModel, batch: dict, tasks: list[str], lr: float) -> None:
    """celeba/models/MGDA_model.py:train_step with SGD, line by line: each task's gradient at the shared
    representation (computed without the encoder's graph), the min-norm weights (two tasks: the exact
    solution, which their MinNormSolver starts from and keeps), then one backward pass of sum_t w_t L_t."""
    with torch.no_grad():
        features = model.encoder(batch["image"])
    rep = features.clone().requires_grad_()
    rows = []
    for t in tasks:
        out = model.heads[t](rep)
        loss = ((out.squeeze(-1) - batch[t]) ** 2).mean()
        rows.append(torch.autograd.grad(loss, rep)[0].flatten())
    g1, g2 = rows
    w1 = float(((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2))).clamp(0, 1))
    scale = [w1, 1 - w1]
    losses = _losses(model, batch, tasks)
    params = list(model.parameters())
    _sgd(params, _flat_grads(sum(s * loss for s, loss in zip(scale, losses)), params), lr)


def _same(model: MultiTaskModel, theirs: MultiTaskModel) -> bool:
    """Every parameter equal to float32 rounding: StepContext computes the losses in float32."""
    pairs = zip(model.parameters(), theirs.parameters())
    return all(torch.allclose(p, q, rtol=1e-6, atol=1e-9) for p, q in pairs)


def _conflicting_batches(count: int) -> list[dict[str, torch.Tensor]]:
    """Two tasks whose targets are opposite: their gradients conflict."""
    data = double_batches(["a"], count=count)
    return [{**b, "a": 5 * b["a"], "b": -5 * b["a"] + 0.1} for b in data]


def _two_heads_alike(model: MultiTaskModel) -> MultiTaskModel:
    with torch.no_grad():
        model.heads["b"].weight.copy_(model.heads["a"].weight + 0.05)
    return model


@pytest.mark.parametrize("heads", ["weighted", "own"])
def test_mgda_ub_with_weighted_heads_steps_as_the_authors_loop(heads):
    """heads=weighted: every parameter, heads included, moves as in their train_step (each head by its task's
    weight times its gradient); with heads=own the heads do not."""
    tasks = ["a", "b"]
    data = _conflicting_batches(2)
    model = _two_heads_alike(two_layer_model(tasks))
    theirs = copy.deepcopy(model)
    ctx = context(model, tasks, data, lr=0.1)
    method = MGDA(tasks, rep_grad=True, heads=heads)
    for batch in data:
        method.iteration(ctx)
        authors_mgda_ub_step(theirs, batch, tasks, lr=0.1)
        assert 0.01 < method.weights["a"] < 0.99  # both tasks weigh in
    assert _same(model, theirs) == (heads == "weighted")


def authors_pcgrad_gradient(losses: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
    """*/models/pcgrad.py:_project_conflicting after its first step (PyTorch 1.2's zero_grad leaves zero
    tensors, so every parameter counts as reached by every task): each task's flattened gradient of every
    parameter, projected off every other conflicting one (two tasks: order-free), then averaged."""
    grads = [_flat_grads(loss, params) for loss in losses]
    projected = []
    for g_i in grads:
        g_i = g_i.clone()
        for g_j in grads:
            inner = g_i @ g_j
            if inner < 0:
                g_i -= inner * g_j / g_j.norm() ** 2
        projected.append(g_i)
    return torch.stack(projected).mean(dim=0)


@pytest.mark.parametrize("settings,authors", [
    ({"scope": "all", "reduction": "mean", "heads": "weighted"}, True),
    ({"scope": "shared", "reduction": "mean", "heads": "weighted"}, False),
    ({"scope": "all", "reduction": "sum", "heads": "weighted"}, False),
    ({}, False),
])
def test_pcgrad_scope_all_mean_projects_the_whole_gradient_as_the_authors(settings, authors):
    """scope=all, reduction=mean: each step equals projecting the full flattened gradients (heads included)
    by hand and averaging them; dropping either option gives another step."""
    tasks = ["a", "b"]
    data = _conflicting_batches(2)
    model = _two_heads_alike(two_layer_model(tasks))
    theirs = copy.deepcopy(model)
    ctx = context(model, tasks, data, lr=0.1)
    method = PCGrad(tasks, seed=0, **settings)
    for batch in data:
        params = list(theirs.parameters())
        losses = _losses(theirs, batch, tasks)
        full = [_flat_grads(loss, params) for loss in losses]
        assert float(full[0] @ full[1]) < 0  # the case projects
        method.iteration(ctx)
        _sgd(params, authors_pcgrad_gradient(losses, params), lr=0.1)
    assert _same(model, theirs) == authors


def test_pcgrad_scope_all_needs_weighted_heads_and_options_are_checked():
    with pytest.raises(MtlrunError, match="strategy.scope=all projects the heads' gradients.*heads=weighted"):
        PCGrad(TASKS, seed=0, scope="all")
    with pytest.raises(MtlrunError, match="strategy.scope='heads' is invalid; valid: shared, all"):
        PCGrad(TASKS, seed=0, scope="heads")
    with pytest.raises(MtlrunError, match="strategy.reduction='avg' is invalid"):
        PCGrad(TASKS, seed=0, reduction="avg")
    with pytest.raises(MtlrunError, match="strategy.heads='all' is invalid; valid: own, weighted"):
        PCGrad(TASKS, seed=0, heads="all")


# --- the presets' commands --------------------------------------------------------------------------------

EXPERIMENTS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "experiments.md"
AUTHORS_METHODS = {"pascal_celeba": ["GradNorm", "PCGrad", "MGDA-UB"],
                   "pascal_cityscapes": ["GradNorm", "PCGrad"], "pascal_nyuv2": ["GradNorm", "PCGrad"]}


def _documented_command(variant: str, preset: str) -> str:
    """The strategy settings of `variant` in docs/experiments.md's table of the seed paper's experiments for
    `preset`."""
    section = EXPERIMENTS_PAGE.read_text().split("## The seed paper's experiments")[1].split("\n## ")[0]
    tables = section.split("| variant |")[1:]  # CelebA's, then Cityscapes' and NYUv2's
    table = tables[0] if preset == "pascal_celeba" else tables[1]
    (row,) = [line for line in table.splitlines() if line.startswith(f"| {variant} |")]
    return re.search(r"`([^`]+)`", row).group(1)


@pytest.mark.parametrize("preset,variant", [(p, v) for p, vs in AUTHORS_METHODS.items() for v in vs])
def test_the_presets_commands_run_the_authors_gradnorm_pcgrad_and_mgda_ub(preset, variant):
    """The documented command for the variant is in the preset's comment, composes with the preset, and builds the
    authors' method: GradNorm's W is the model's last shared conv (their `get_weights()[-1]`)."""
    command = _documented_command(variant, preset)
    assert f"#   {command}\n" in (CONF_DIR / "experiment" / f"{preset}.yaml").read_text()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        overrides = [f"experiment={preset}", *command.split(), "model.width=2"]
        cfg = compose(config_name="config", overrides=overrides)
    names = task_names(cfg.dataset)
    specs = task_specs(cfg.dataset)
    model = build_model(cfg.model, [build_task(n, specs[n], list(specs)) for n in names])
    strategy = build_strategy(cfg.strategy, names, 0)
    strategy.attach(model)
    if variant == "GradNorm":
        convs = [m for m in model.encoder.modules() if isinstance(m, nn.Conv2d)]
        assert layer_weight(model, strategy.layer) is convs[-1].weight
        assert strategy.weights_optimizer == "model"
        assert strategy.alpha == (0.2 if preset == "pascal_celeba" else 1.5)
    elif variant == "PCGrad":
        assert (strategy.scope, strategy.reduction, strategy.heads) == ("all", "mean", "weighted")
    else:
        assert strategy.rep_grad and strategy.heads == "weighted"
