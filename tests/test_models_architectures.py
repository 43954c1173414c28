"""The architectures over a chosen backbone (`model=hps|cross_stitch|mtan|mmoe|cgc|ple|dselect_k|ltb`): every
strategy trains on every one, the shared/task split partitions each model and is what the gradients say, a
task's step moves no other task's parameter, shapes at the real datasets' sizes, MGDA-UB's representation,
and each architecture's defining property."""

import ast
import math
import os
import re
import subprocess
import sys
from copy import deepcopy
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from mtlrun import CONF_DIR
from mtlrun.data import build_shapes
from mtlrun.errors import MtlrunError
from mtlrun.models import ARCHITECTURES, MODELS, convnet, resnet
from mtlrun.models.backbones import build_backbone, run_stages
from mtlrun.models.base import MultiTaskModel
from mtlrun.models.dselect_k import DSelectGate, smooth_step
from mtlrun.models.ltb import LTB
from mtlrun.models.mmoe import Gate
from mtlrun.optim import MultiTaskOptimizer, OptimizerSettings
from mtlrun.run.overrides import config_groups
from mtlrun.run.state import EpochProgress
from mtlrun.strategies import build_strategy
from mtlrun.strategies.base import Counts, StepContext
from mtlrun.strategies.mgda import MGDA
from mtlrun.tasks import BinaryAttributes, Depth, Normal, Segmentation
from mtlrun.train.build import build_run, seed_everything
from mtlrun.train.epoch import train_epoch
from tests.test_run_cli import mtlrun

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TASKS = [Segmentation("segmentation", 5), Depth("depth"), Normal("normal"), BinaryAttributes("attributes", ["a", "b", "c"])]
NAMES = [t.name for t in TASKS]
TINY = {"name": "convnet", "width": 4}
# A fixed LTB tree for the four tasks on the convnet's five stages (lists: the parents of levels 1-4's nodes):
# all share levels 0-1; attributes then branches off; normal at level 3; segmentation and depth share level 3.
TREE = [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 2]]
CASES = {name: {} for name in ARCHITECTURES} | {"ltb_tree": {"tree": TREE}}
# What MGDA-UB finds on the tiny convnet: a representation, or one line saying why there is none.
NO_REPRESENTATION = {"mtan", "ple", "ltb", "ltb_tree"}  # ltb: the convnet's last stage reads a skip


def build(case: str, tasks=TASKS, backbone=TINY, seed: int = 0, **settings):
    torch.manual_seed(seed)
    return MODELS[case.removesuffix("_tree")](tasks, backbone=backbone, **{**CASES[case], **settings})


def batch(size=(32, 32), n: int = 2, tasks=TASKS) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    targets = {
        "segmentation": torch.randint(0, 5, (n, *size), generator=g),
        "depth": torch.rand(n, *size, generator=g) + 0.1,
        "normal": torch.nn.functional.normalize(torch.randn(n, 3, *size, generator=g), dim=1),
        "attributes": torch.randint(0, 2, (n, 3), generator=g).float(),
    }
    return {"image": torch.randn(n, 3, *size, generator=g), **{t.name: targets[t.name] for t in tasks}}


def context(model, data: dict, moments: str = "per_task") -> StepContext:
    settings = OptimizerSettings(name="adam", lr=1e-2, moments=moments)
    optimizer = MultiTaskOptimizer(model.shared_parameters(), {t: model.task_parameters(t) for t in NAMES}, settings)
    return StepContext(model, TASKS, optimizer, iter([data] * 100), lambda b: b)


def test_every_architecture_has_a_conf_file_over_a_backbone():
    for name in ARCHITECTURES:
        conf = OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")
        assert conf.name == name and list(conf.defaults) == [{"backbone": "convnet"}, "_self_"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=ple", "model/backbone=resnet18", "model.backbone.stem=imagenet"])
    assert cfg.model.name == "ple" and cfg.model.backbone == {**OmegaConf.load(CONF_DIR / "model/backbone/resnet18.yaml"),
                                                              "stem": "imagenet"}


# --- what is shared and what is a task's -----------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_shared_and_task_parameters_partition_the_model(case):
    model = build(case)
    groups = [model.shared_parameters()] + [model.task_parameters(t) for t in NAMES]
    ids = [id(p) for group in groups for p in group]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    assert all(groups)


@pytest.mark.parametrize("case", CASES)
def test_a_tasks_loss_reaches_only_shared_and_its_own_parameters_and_every_shared_one_reaches_two_tasks(case):
    """The split is the gradients' own: nothing of another task is reached, nothing shared serves one task."""
    model = build(case)
    data = batch()
    shared = {id(p) for p in model.shared_parameters()}
    reached_by: dict[int, int] = {}
    for task in TASKS:
        out = model(data["image"], [task.name])[task.name]
        loss = task.loss(out, data[task.name])
        params = list(model.parameters())
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        reached = {id(p) for p, g in zip(params, grads) if g is not None}
        own = {id(p) for p in model.task_parameters(task.name)}
        assert reached <= shared | own and own <= reached
        for i in reached & shared:
            reached_by[i] = reached_by.get(i, 0) + 1
    assert set(reached_by) == shared and all(count >= 2 for count in reached_by.values())


@pytest.mark.parametrize("case", CASES)
def test_a_tasks_step_moves_no_parameter_of_another_task(case):
    model = build(case)
    ctx = context(model, batch())
    ctx.step(NAMES, sum(ctx.losses(ctx.next_batch(), NAMES).values()))  # every Adam state holds moments now
    for task in NAMES:
        before = {t: [p.detach().clone() for p in model.task_parameters(t)] for t in NAMES}
        shared = [p.detach().clone() for p in model.shared_parameters()]
        ctx.step([task], ctx.losses(ctx.next_batch(), [task])[task])
        for other in NAMES:
            moved = [not torch.equal(a, p) for a, p in zip(before[other], model.task_parameters(other))]
            assert any(moved) if other == task else not any(moved)
        assert any(not torch.equal(a, p) for a, p in zip(shared, model.shared_parameters()))


@pytest.mark.parametrize("case", CASES)
def test_a_forward_pass_on_some_tasks_runs_only_their_parts_and_heads(case):
    model = build(case)
    calls = []
    hooks = [m.register_forward_hook(lambda *_, name=name: calls.append(name))
             for name, m in [*model.task_parts.items(), *(("head " + t, h) for t, h in model.heads.items())]]
    try:
        with torch.no_grad():
            out = model(batch()["image"], ["depth"])
    finally:
        for hook in hooks:
            hook.remove()
    assert list(out) == ["depth"] and set(calls) <= {"depth", "head depth"} and "head depth" in calls


def test_a_fixed_tree_runs_only_the_shared_nodes_on_the_paths_asked_for():
    model = build("ltb_tree")
    assert set(model.encoder.nodes) == {"0_0", "1_0", "2_0", "3_0"}
    ran = []
    hooks = [m.register_forward_hook(lambda *_, k=k: ran.append(k)) for k, m in model.encoder.nodes.items()]
    with torch.no_grad():
        model(batch()["image"], ["attributes"])
        first, ran[:] = list(ran), []
        model(batch()["image"], ["segmentation", "depth"])
    for hook in hooks:
        hook.remove()
    assert first == ["0_0", "1_0"] and ran == ["0_0", "1_0", "2_0", "3_0"]  # each shared node once per pass


# --- shapes --------------------------------------------------------------------------------------

REAL = {  # conf/dataset: image size and tasks of the real datasets
    "nyuv2": ((288, 384), [Segmentation("segmentation", 13), Depth("depth"), Normal("normal")]),
    "cityscapes": ((128, 256), [Segmentation("segmentation", 7), Depth("depth")]),
    "celeba": ((64, 64), [BinaryAttributes(f"attribute_{i}", ["x"]) for i in range(40)]),
}


@pytest.mark.parametrize("dataset", REAL)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_forward_shapes_at_the_real_datasets_sizes(architecture, dataset):
    size, tasks = REAL[dataset]
    model = build(architecture, tasks).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size), [t.name for t in tasks])
    for t in tasks:
        assert tuple(out[t.name].shape) == ((1, t.out_channels, *size) if t.dense else (1, t.out_channels))


@pytest.mark.parametrize("architecture", ["cross_stitch", "mtan", "ple", "ltb"])
def test_the_staged_architectures_run_on_resnet18_and_refuse_segnet(architecture):
    """The architectures that run a backbone stage by stage, on a ResNet's strides (the expert architectures
    run whole trunks, as hps)."""
    tasks = TASKS[1:3]
    model = build(architecture, tasks, backbone={"name": "resnet18", "stem": "imagenet"})
    out = model(torch.randn(2, 3, 64, 64), [t.name for t in tasks])
    assert tuple(out["normal"].shape) == (2, 3, 64, 64)
    if architecture != "mtan":  # mtan on segnet is segnet_mtan
        with pytest.raises(MtlrunError, match="cannot .its decoder unpools"):
            build(architecture, tasks, backbone={"name": "segnet", "filters": [4, 8, 8, 16, 16]})


def test_hps_and_mtan_on_segnet_are_mtans_own_models():
    filters = {"name": "segnet", "filters": [4, 8, 8, 16, 16]}
    for architecture, own in (("hps", "segnet_split"), ("mtan", "segnet_mtan")):
        torch.manual_seed(0)
        expected = MODELS[own](TASKS, filters=filters["filters"]).state_dict()
        got = build(architecture, backbone=filters).state_dict()
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    model = build("mmoe", backbone=filters, num_experts=2)  # expert architectures take SegNet whole
    assert tuple(model(torch.randn(2, 3, 32, 32), ["depth"])["depth"].shape) == (2, 1, 32, 32)


# --- the backbones -------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [TINY, {"name": "resnet18"}, {"name": "resnet50"}], ids=lambda s: s["name"])
def test_a_backbone_run_stage_by_stage_is_its_trunk(settings):
    spec = build_backbone(settings, TASKS)
    torch.manual_seed(0)
    trunk = spec.trunk().eval()
    stages = spec.split(trunk)
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        assert torch.equal(run_stages(stages, x)[-1], trunk(x))


def test_hps_is_the_backbones_own_model():
    for settings, own in ((TINY, convnet.build), ({"name": "resnet18"}, resnet.build_resnet18_multihead)):
        kwargs = {k: v for k, v in settings.items() if k != "name"}
        torch.manual_seed(0)
        expected = own(TASKS, **kwargs).state_dict()
        got = build("hps", backbone=settings).state_dict()
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_backbone_settings_are_checked_in_one_line():
    for settings, message in (({"name": "vgg"}, "no backbone named 'vgg'"),
                              ({"name": "convnet", "depth": 3}, "model.backbone=convnet got an unexpected setting"),
                              ({"name": "convnet", "width": 0}, "width must be an integer >= 1")):
        with pytest.raises(MtlrunError, match=message):
            build("mmoe", backbone=settings)


# LibMTL's architectures (median-research-group/LibMTL at 4336804, LibMTL/architecture/*.py) built on its
# ResNet encoders (LibMTL/model/resnet.py's resnet18; resnet_dilated('resnet50'), as our backbones) for 3
# tasks with img_size [3, 32, 32], num_experts [4] (MMoE, DSelect-k with num_nonzeros 2) or [1, 1, 1, 1]
# (CGC, PLE) and identity decoders, counted in a scratch script outside this repository: (parameters outside
# the heads, of which routing: gates, and LTB's branching logits). HPS's is the trunk alone.
LIBMTL = {
    "resnet18": {
        "hps": (11_176_512, 0), "cross_stitch": (33_529_572, 0), "mtan": (19_137_216, 0),
        "mmoe": (44_742_924, 36_876), "cgc": (44_724_486, 18_438), "ple": (44_792_094, 86_046),
        "dselect_k": (44_761_362, 55_314), "ltb": (33_529_590, 54),
    },
    "resnet50": {
        "hps": (23_508_032, 0), "cross_stitch": (70_524_132, 0), "mtan": (43_967_232, 0),
        "mmoe": (94_069_004, 36_876), "cgc": (94_050_566, 18_438), "ple": (94_320_926, 288_798),
        "dselect_k": (94_087_442, 55_314), "ltb": (70_524_150, 54),
    },
}
LEVEL_INPUTS = {"resnet18": [3, 64, 64, 128, 256], "resnet50": [3, 64, 256, 512, 1024]}  # into each stage


def routing_here(architecture: str, backbone: str, tasks: int) -> int:
    """Our routing parameters, by the documented choices (docs/models.md): gates read their input pooled to 8 x 8
    cells (LibMTL's the whole flattened input); PLE has shared gates below its last level (LibMTL none);
    LTB holds one T x T matrix of logits per branch point (LibMTL 6, of which its forward reads 4)."""
    def gate(channels: int, outputs: int) -> int:
        return (channels * 64 + 1) * outputs

    inputs = LEVEL_INPUTS[backbone]
    return {
        "mmoe": tasks * gate(3, 4), "cgc": tasks * gate(3, 2), "dselect_k": tasks * gate(3, 2 * 2 + 2),
        "ple": tasks * sum(gate(c, 2) for c in inputs) + sum(gate(c, 1 + tasks) for c in inputs[:-1]),
        "ltb": 4 * tasks * tasks,
    }.get(architecture, 0)


@pytest.mark.parametrize("backbone", LIBMTL)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_parameters_outside_the_heads_are_libmtls_on_its_resnets(architecture, backbone):
    """Built on the meta device (shapes without values): everything but the routing is LibMTL's count, and the
    routing differs from LibMTL's only by the choices `routing_here` states. PLE has LibMTL's 5 levels and
    LTB its 4 branch points (stem, layer1..layer4)."""
    tasks = TASKS[1:]
    settings = {"name": backbone, **({"stem": "imagenet"} if backbone == "resnet18" else {})}
    with torch.device("meta"):
        model = MODELS[architecture](tasks, backbone=settings)
    total = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.heads.parameters())
    gates = [m for m in model.modules() if isinstance(m, (Gate, DSelectGate))]
    routing = sum(p.numel() for m in gates for p in m.parameters())
    if isinstance(model, LTB):
        routing = sum(p.numel() for name, p in model.named_parameters() if "logits" in name.split("."))
    libmtl_total, libmtl_routing = LIBMTL[backbone][architecture]
    expected = (libmtl_total - libmtl_routing, routing_here(architecture, backbone, 3))
    assert (total - routing, routing) == expected
    if architecture == "ple":
        assert len(model.encoder.levels) == 5
    if architecture == "ltb":
        assert len(model.encoder.levels) + 1 == 5 and len(model.encoder.logits) == 3  # and the leaves' logits


@pytest.mark.parametrize("architecture", ["mmoe", "cgc", "ple", "dselect_k"])
def test_gates_read_as_many_image_channels_as_the_trunk(architecture, monkeypatch):
    """A trunk reading one-channel images: the gates reading the image take one channel too."""
    colour = convnet.UNetEncoder

    def grey(width: int) -> convnet.UNetEncoder:
        trunk = colour(width)
        trunk.stem = convnet._conv(1, width, stride=2)
        return trunk

    monkeypatch.setattr(convnet, "UNetEncoder", grey)
    model = build(architecture)
    assert model(torch.randn(2, 1, 32, 32), NAMES)["depth"].shape == (2, 1, 32, 32)


# --- each architecture's defining property ------------------------------------------------------


def test_cross_stitch_with_identity_units_equals_independent_columns():
    model = build("cross_stitch", self_weight=1.0)
    assert torch.equal(model.encoder.units, torch.eye(4).repeat(4, 1, 1))
    x = batch()["image"]
    out = model(x, NAMES)
    heads_alone = MultiTaskModel(torch.nn.Identity(), dict(model.heads))
    for i, t in enumerate(TASKS):  # column i alone, run as a plain trunk, then task i's head
        column = run_stages(model.encoder.columns[i], x)[-1]
        assert torch.equal(out[t.name], heads_alone.heads_on(column, [t.name], x.shape[-2:])[t.name])
    assert torch.allclose(build("cross_stitch").encoder.units[0].sum(dim=1), torch.ones(4))  # 0.9 and 0.1/3


def test_mmoe_with_one_expert_equals_hps():
    mmoe = build("mmoe", num_experts=1)
    hps = build("hps")
    hps.encoder.load_state_dict(mmoe.encoder.experts[0].state_dict())
    hps.heads.load_state_dict(mmoe.heads.state_dict())
    x = batch()["image"]
    for mode in (True, False):  # batch statistics and running statistics alike
        mmoe.train(mode), hps.train(mode)
        a, b = mmoe(x, NAMES), hps(x, NAMES)
        assert all(torch.equal(a[t], b[t]) for t in NAMES)


def test_mtan_masks_lie_in_0_1_and_multiply_the_shared_stage_outputs():
    model = build("mtan").eval()
    features = model.encoder(batch()["image"])
    masks = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: masks.append(out)) for m in model.task_parts["depth"].masks]
    with torch.no_grad():
        attended = model.task_parts["depth"](features)
    for hook in hooks:
        hook.remove()
    assert len(masks) == 5 and all(((m > 0) & (m < 1)).all() for m in masks)
    torch.testing.assert_close(attended, masks[-1] * features[-1])


def test_cgc_and_ple_gates_weigh_the_shared_and_the_tasks_own_experts():
    model = build("cgc", num_shared=2, num_specific=3)
    assert len(model.task_parts["depth"].experts) == 3 and len(model.encoder.experts) == 2
    weights = model.task_parts["depth"].gate(batch()["image"])
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2))
    assert weights.shape == (2, 5) and (weights > 0).all()
    ple = build("ple")
    second, last = ple.encoder.levels[-2], ple.encoder.levels[-1]
    assert set(second.gates) == {"shared"} and set(last.gates) == set() and set(last.experts) == {"shared"}


def test_dselect_k_smooth_step_and_gates_as_the_paper():
    t = torch.tensor([-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0])
    expected = [0, 0, -2 * (-0.25) ** 3 + 1.5 * (-0.25) + 0.5, 0.5, -2 * 0.25**3 + 1.5 * 0.25 + 0.5, 1, 1]
    torch.testing.assert_close(smooth_step(t, 1.0), torch.tensor(expected))
    model = build("dselect_k", num_experts=4, num_nonzeros=2)
    gate = model.task_parts["depth"]
    x = torch.nn.functional.adaptive_avg_pool2d(batch()["image"], 8).flatten(1)
    selectors = gate.selectors(x)
    torch.testing.assert_close(selectors.sum(dim=-1), torch.ones(2, 2))  # 4 experts: every code names one
    with torch.no_grad():  # saturated codes select single experts: 1 -> expert 3 (binary 11), 0 -> expert 0
        gate.z.weight.zero_(), gate.z.bias.copy_(torch.tensor([1.0, 1.0, -1.0, -1.0]))
    torch.testing.assert_close(gate.selectors(x)[0], torch.tensor([[0.0, 0, 0, 1], [1, 0, 0, 0]]))


def dselect_k_penalty(model, image: torch.Tensor, task: str, experts: int) -> torch.Tensor:
    """Task `task`'s gate penalty by hand: 1e-6 x the selectors' entropy, and for 3 experts 1 / (each
    selector's mass on the codes naming an expert), summed over the batch and selectors."""
    r = model.task_parts[task].selectors(torch.nn.functional.adaptive_avg_pool2d(image, 8).flatten(1))
    return -1e-6 * (r * torch.log(r + 1e-6)).sum() + (0 if experts == 4 else (1 / r.sum(-1)).sum())


def test_dselect_k_penalty_stays_out_of_the_task_loss_and_joins_the_step_on_its_task_once():
    data = batch()
    for experts in (4, 3):  # 3 is no power of 2: the selectors' mass on the code that names no expert costs
        model = build("dselect_k", num_experts=experts)
        ctx = context(model, data)
        taken = []
        ctx.optimizer.step = lambda tasks, shared, heads: taken.append((shared, heads))
        losses = ctx.losses(data, ["depth"])
        plain = TASKS[1].loss(model(data["image"], ["depth"])["depth"], data["depth"])
        penalty = dselect_k_penalty(model, data["image"], "depth", experts)
        torch.testing.assert_close(losses["depth"], plain)
        ctx.step(["depth"], 3 * losses["depth"])  # a strategy's weight on the loss: the penalty's is 1
        own = model.task_parameters("depth")
        expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(3 * plain + penalty, own)])
        scale = float(expected.abs().max())  # float32 sums in another order: relative to the largest entry
        torch.testing.assert_close(taken[0][1]["depth"], expected, rtol=1e-5, atol=1e-5 * scale)
        torch.testing.assert_close(ctx.take_penalty(), penalty.detach())
        assert experts == 4 or penalty >= 2 * 2  # at least 1 per image and selector: far above the loss
        ctx.apply(["depth"], torch.zeros_like(taken[0][0]), {"depth": torch.zeros_like(expected)})
        assert not taken[1][1]["depth"].any() and ctx.take_penalty() is None  # added once
        model.eval()
        ctx.losses(data, ["depth"])
        ctx.apply(["depth"], torch.zeros_like(taken[0][0]), {"depth": torch.zeros_like(expected)})
        assert not taken[2][1]["depth"].any() and model.penalties() == {}  # none in evaluation


def test_a_strategy_reading_loss_values_never_sees_the_dselect_k_penalty():
    """FAMO weighs the log of each loss: it is handed the task losses alone; the penalty is logged apart."""
    data = batch()
    model = build("dselect_k", num_experts=3)
    strategy = build_strategy(OmegaConf.load(CONF_DIR / "strategy" / "famo.yaml"), NAMES, 0)
    ctx = context(model, data)
    seen = []
    combine = strategy.combine
    strategy.combine = lambda c, losses: (seen.append({t: v.detach() for t, v in losses.items()}),
                                          combine(c, losses))
    outputs = model(data["image"], NAMES)
    penalty = sum(dselect_k_penalty(model, data["image"], t.name, 3) for t in TASKS)
    logged = strategy.iteration(ctx)
    for t in TASKS:
        torch.testing.assert_close(seen[0][t.name], t.loss(outputs[t.name], data[t.name]).detach())
        torch.testing.assert_close(logged[t.name], seen[0][t.name])
    torch.testing.assert_close(ctx.take_penalty(), penalty.detach())


def test_dselect_k_with_3_experts_logs_task_losses_free_of_its_penalty_and_it_apart(workdir, monkeypatch):
    """train_log.csv's row: each loss/<task> without the penalty (which is at least batch x k per task:
    1 / a selector's mass on real codes is >= 1), and the penalty summed over the gates in its own column."""
    monkeypatch.chdir(workdir)
    rows = {}
    for model in ("dselect_k", "hps"):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            overrides = [f"model={model}", *SIZES, "strategy=dwa"]
            experts = ["model.num_experts=3"] if model == "dselect_k" else []
            cfg = compose(config_name="config", overrides=overrides + experts)
        seed_everything(0, deterministic=False)
        run = build_run(cfg, torch.device("cpu"), epochs=1, batch_size=4)
        rows[model] = train_epoch(run.ctx, run.strategy, EpochProgress(), 2, 0, 1, False, torch.device("cpu"))
    least = 4 * 2  # batch 4, k = 2
    assert rows["dselect_k"]["penalty"] >= least * len(NAMES)
    assert all(rows["dselect_k"][f"loss/{t}"] < least for t in NAMES)
    assert "penalty" not in rows["hps"]


def test_an_epochs_penalty_sum_is_saved_with_its_progress():
    progress = EpochProgress()
    progress.begin(Counts(), tuple(NAMES), torch.device("cpu"))
    progress.penalty_sum = torch.tensor(3.0)
    resumed = EpochProgress()
    resumed.load_state_dict(progress.state_dict())
    assert resumed.penalty_sum == 3.0
    older = {k: v for k, v in progress.state_dict().items() if k != "penalty_sum"}  # a checkpoint from before
    resumed.load_state_dict(older)
    assert resumed.penalty_sum is None


def test_ltb_schedule_temperature_warmup_and_evaluation():
    model = build("ltb")
    model.schedule(0, 200)
    assert model.branching.warmup and model.branching.temperature == 10.0  # LibMTL: epochs / 20
    model.schedule(2, 200)
    assert not model.branching.warmup and model.branching.temperature == pytest.approx(10 / 3**0.5)
    logits = torch.randn(3, 4)
    draws = model.branching.weights(logits, training=True)
    assert ((draws == 0) | (draws == 1)).all() and torch.equal(draws.sum(1), torch.ones(3))  # hard: one-hot
    assert torch.equal(model.branching.weights(logits, training=False).argmax(1), logits.argmax(1))
    model.branching.warmup = True
    assert torch.equal(model.branching.weights(logits, True), torch.full((3, 4), 0.25))
    fixed = build("ltb", temperature=2.0, warmup_epochs=0)
    fixed.schedule(3, 6)
    assert fixed.branching.temperature == 1.0 and not fixed.branching.warmup


def test_ltb_search_logs_a_tree_that_builds_the_fixed_model():
    model = build("ltb")
    with torch.no_grad():
        for logits in model.encoder.logits:
            logits.copy_(torch.randn(logits.shape))
        for part in model.task_parts.values():
            part.logits.copy_(torch.randn(part.logits.shape))
    line = model.describe()
    tree = ast.literal_eval(re.search(r"model\.tree=(\S+)", line).group(1))
    assert tree == model.tree() and len(tree) == 4 and len(tree[-1]) == 4
    with torch.no_grad():  # evaluation reads the most probable tree: exactly one parent per node
        model.eval()
        weights = model.branching.weights(model.encoder.logits[0], model.training)
    assert torch.equal(weights.argmax(1), torch.tensor(tree[0]))
    try:
        built = build("ltb", tree=tree)
    except MtlrunError as error:  # a random tree may share nothing
        assert "shares no node" in str(error)
    else:
        assert isinstance(built, LTB) and not built.searching and built.describe() is None


def test_ltb_refuses_bad_trees_in_one_line():
    for tree, message in (([[0]], "must hold 4 lists"), ([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 2, 9]],
                                                          "names parent 9, but level 3 has 4 nodes"),
                          ([[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]], "shares no node"),
                          ("abc", "list of lists")):
        with pytest.raises(MtlrunError, match=message):
            build("ltb", tree=tree)
    with pytest.raises(MtlrunError, match="model.branches gives the node counts of the 4 levels"):
        build("ltb", branches=[2, 2])


# --- MGDA-UB's representation --------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_mgda_ub_representation_carries_every_shared_gradient_or_is_refused(case):
    """Where a model gives MGDA-UB a representation z, sum_t w_t dL_t/dz pulled back through the encoder is
    the shared gradient of sum_t w_t L_t itself: no shared parameter acts after z."""
    model = build(case)
    data = batch()
    ctx = context(model, data)
    losses = ctx.losses(data, NAMES)
    if case in NO_REPRESENTATION:
        with pytest.raises(MtlrunError) as error:
            MGDA(NAMES, rep_grad=True).combine(ctx, losses)
        assert "\n" not in str(error.value) and ctx.counts.optimizer_steps == 0
        return
    z = model.representation(ctx.features)
    shared = model.shared_parameters()
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4])
    total = sum(w * losses[t] for w, t in zip(weights, NAMES))
    direct = torch.autograd.grad(total, shared, retain_graph=True, allow_unused=True)
    dz = torch.autograd.grad(total, z, retain_graph=True)
    pulled = torch.autograd.grad(z, shared, grad_outputs=dz, retain_graph=True, allow_unused=True)
    for a, b, p in zip(direct, pulled, shared):
        torch.testing.assert_close(a if a is not None else torch.zeros_like(p), b if b is not None else torch.zeros_like(p))
    MGDA(NAMES, rep_grad=True).combine(ctx, losses)
    assert ctx.counts.optimizer_steps == 1


def test_mgda_ub_on_ltb_needs_one_branch_point_and_no_skip_across_it():
    tasks, x = TASKS[1:3], torch.randn(2, 3, 32, 32)
    resnet18 = {"name": "resnet18"}
    model = build("ltb", tasks, backbone=resnet18, tree=[[0, 0], [0, 0], [0, 0], [0, 0]], branches=[2, 2, 2, 2])
    features = model.encoder(x)
    model.heads_on(features, ["depth", "normal"], (32, 32))
    assert model.representation(features)[0] is features.history((3, 0))[-1]
    search = build("ltb", tasks, backbone=resnet18, branches=[2, 2, 2, 2])
    assert len(search.representation(search.encoder(x))) == 1  # the stack of the fourth level's outputs
    unet = build("ltb", tasks, tree=[[0, 0], [0, 0], [0, 0], [0, 0]], branches=[2, 2, 2, 2])
    features = unet.encoder(x)
    unet.heads_on(features, ["depth", "normal"], (32, 32))
    with pytest.raises(MtlrunError, match="one node where every task branches off .and no skip"):
        unet.representation(features)  # the convnet's last stage reads the stem's output, above the branch


# --- every strategy on every architecture ----------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("architectures")
    build_shapes(root / "data/shapes-32px-8-4-4-seed0.h5", 32, 8, 4, 4, generator_seed=0)
    return root


STRATEGIES = [s for s in config_groups()["strategy"] if s != "single_task"]  # single_task: test_cli
SIZES = ["dataset.image_size=32", "dataset.num_train=8", "dataset.num_val=4", "dataset.num_test=4",
         "trainer.epochs=1", "trainer.batch_size=4", "trainer.eval_batch_size=4", "model.backbone.width=4"]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_every_strategy_trains_two_iterations_on_the_architecture(workdir, case, monkeypatch):
    """The training loop's epoch (`train_epoch`) on the run `build_run` makes of the composed config, with
    every strategy's conf file: a CLI job per pair would spend most of its time composing its config, and
    evaluation and run files do not depend on the strategy (the CLI sweep below covers them)."""
    monkeypatch.chdir(workdir)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        base = compose(config_name="config", overrides=[f"model={case.removesuffix('_tree')}", *SIZES])
        settings = {s: compose(config_name="config", overrides=[f"strategy={s}"]).strategy for s in STRATEGIES}
    steps = {}
    for strategy in STRATEGIES:
        cfg = deepcopy(base)
        with open_dict(cfg):
            cfg.strategy = settings[strategy]
            cfg.model.update(CASES[case])
        seed_everything(0, deterministic=False)
        run = build_run(cfg, torch.device("cpu"), epochs=1, batch_size=4)
        row = train_epoch(run.ctx, run.strategy, EpochProgress(), run.batches.batches_per_pass, 0, 1, False,
                          torch.device("cpu"))
        losses = [row[f"loss/{t}"] for t in NAMES]
        assert row["iterations"] == 2 and all(math.isfinite(v) for v in losses), strategy
        steps[strategy] = row["optimizer_steps"]
    assert steps.pop("alternating") == 8 and steps.pop("grouped") == 4  # 4 tasks: one step each, groups of 2
    assert steps.pop("maximum_roaming") == 8  # one step per task, each through its own masks
    assert set(steps.values()) == {2}


@pytest.mark.slow
def test_every_architecture_trains_from_the_cli(workdir, monkeypatch):
    """One sweep over the architectures (backbone settings with ++, since the sweep's first config is the
    default model), then LTB's two runs: the search logs its tree, which trains as `model.tree`."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    sweep = workdir / "cli"
    result = mtlrun("-m", f"model={','.join(ARCHITECTURES)}", *SIZES[:-1], "++model.backbone.width=4",
                    "strategy=alternating", f"hydra.sweep.dir={sweep}", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = pd.concat([pd.read_csv(f) for f in sweep.glob("*/results.csv")])
    assert sorted(rows.model) == sorted(ARCHITECTURES) and (rows.backbone == "convnet").all()
    assert (rows.iterations == 2).all()
    for model, run_dir in rows.set_index("model").run_dir.items():  # the penalty apart from the task losses
        assert ("penalty" in pd.read_csv(Path(run_dir) / "train_log.csv")) == (model == "dselect_k"), model
    log = (Path(rows.set_index("model").run_dir["ltb"]) / "mtlrun.log").read_text()
    tree = re.findall(r"most probable tree model\.tree=(\S+)", log)[-1]
    fixed = workdir / "fixed"
    result = mtlrun("model=ltb", f"model.tree={tree}", *SIZES, f"hydra.run.dir={fixed}", cwd=workdir)
    if "shares no node" in result.stderr:  # the search may end on a tree of separate networks
        return
    assert result.returncode == 0, result.stderr[-3000:]
    assert pd.read_csv(fixed / "results.csv").iterations.item() == 2


@pytest.mark.slow
def test_bench_compares_architectures_with_hps(workdir):
    """`make bench ARGS=--architectures ...`: a row per architecture, parameters as built, ratios to hps."""
    result = subprocess.run(
        [sys.executable, "-m", "mtlrun.bench", "--architectures", "hps,mmoe", "--iterations", "1", "--device", "cpu",
         *SIZES[:3], "++model.backbone.width=4", "trainer.batch_size=4"],
        cwd=workdir, capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[2:]}
    assert list(rows) == ["hps", "mmoe"] and rows["hps"][1] == rows["hps"][3] == rows["hps"][5] == "1.00"
    hps, mmoe = (int(rows[name][0].replace(",", "")) for name in rows)
    assert float(rows["mmoe"][1]) == round(mmoe / hps, 2) and mmoe / hps > 3  # four experts and their gates
    assert all(float(value) > 0 for value in rows["mmoe"][2:])
