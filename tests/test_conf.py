"""Every option of every conf group composes and builds, so a new conf file is tested the day it is added."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mtlrun import CONF_DIR
from mtlrun.data import DATASETS, task_names, task_specs
from mtlrun.data.shapes import ATTRIBUTE_NAMES
from mtlrun.models import MODELS, build_model
from mtlrun.optim import MultiTaskOptimizer, OptimizerSettings, lr_factor
from mtlrun.settings import SchedulerSettings
from mtlrun.run.overrides import config_groups
from mtlrun.strategies import STRATEGIES, build_strategy
from mtlrun.tasks import build_task

GROUPS = config_groups()
OPTIONS = [(group, option) for group, options in GROUPS.items() for option in options]
# Options with a setting that has no default, or that needs a file the tests do not have (ImageNet weights).
REQUIRED = {("strategy", "single_task"): ["strategy.task=depth"], ("experiment", "nyuv2_resnet50"): ["model.pretrained=false"]}


def _attribute_names(specs: dict) -> list[str]:
    """The attribute names a dataset file would hold: the built-in benchmark's, or the columns the conf names."""
    columns = [c for spec in specs.values() for c in (spec.get("columns") or [])]
    return columns or list(ATTRIBUTE_NAMES)


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_groups_mirror_the_tables():
    assert GROUPS["strategy"] == sorted(STRATEGIES)
    assert GROUPS["model"] == sorted(MODELS)
    assert set(GROUPS["dataset"]) <= set(DATASETS)
    assert {"dataset", "model", "strategy", "optimizer", "scheduler", "logger", "experiment"} == set(GROUPS)


@pytest.mark.parametrize("group,option", OPTIONS)
def test_every_option_composes_and_builds(group, option):
    cfg = _compose(f"{group}={option}", *REQUIRED.get((group, option), []))
    if group == "logger":  # loggers combine (logger=[csv,mlflow]): each one's settings lie under its name
        assert list(cfg.logger) == [option]
    elif group != "experiment":  # an experiment is a set of overrides of other groups, not a node of its own
        assert cfg[group].name == option  # each file's name matches its option
    names = task_names(cfg.dataset)
    specs = task_specs(cfg.dataset)  # after dataset.binary_maps has cut segmentation into binary maps
    tasks = [build_task(n, specs[n], _attribute_names(specs)) for n in names]
    model = build_model(cfg.model, tasks)
    settings = OptimizerSettings.from_config(cfg.optimizer)
    optimizer = MultiTaskOptimizer(model.shared_parameters(), {t: model.task_parameters(t) for t in names}, settings)
    strategy = build_strategy(cfg.strategy, names, cfg.seed)
    assert set(strategy.trains(names)) <= set(names)
    assert 0 < lr_factor(SchedulerSettings.from_config(cfg.scheduler), 0, cfg.trainer.epochs) <= 1
    x = torch.zeros(2, 3, 32, 32)
    out = model(x, names[:1])
    assert list(out) == names[:1]  # only the heads asked for run
    assert strategy.group_size >= 1 and optimizer.lr == settings.lr


@pytest.mark.parametrize("option", GROUPS["model"])
def test_every_model_runs_forward_and_backward_for_every_task_kind(option):
    cfg = _compose(f"model={option}")
    specs = OmegaConf.to_container(cfg.dataset.task_specs)
    tasks = [build_task(n, s, list(ATTRIBUTE_NAMES)) for n, s in specs.items()]
    model = build_model(cfg.model, tasks)
    x = torch.randn(2, 3, 64, 48)
    outputs = model(x, [t.name for t in tasks])
    for task in tasks:
        out = outputs[task.name]
        expected = (2, task.out_channels, 64, 48) if task.dense else (2, task.out_channels)
        assert tuple(out.shape) == expected
    sum(o.float().mean() for o in outputs.values()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_an_experiment_sets_its_published_settings_and_the_command_line_still_wins():
    cfg = _compose("experiment=nyuv2_segnet_mtan", "trainer.epochs=3")
    assert (cfg.dataset.name, cfg.model.name, cfg.optimizer.name, cfg.scheduler.name) == (
        "nyuv2", "segnet_mtan", "adam", "step")
    assert cfg.optimizer.lr == 1e-4 and cfg.scheduler.step_size == 100 and cfg.scheduler.gamma == 0.5
    assert cfg.trainer.batch_size == 2 and list(cfg.dataset.augment.scales) == [1.0, 1.2, 1.5]
    assert cfg.trainer.epochs == 3  # overrides after the experiment apply on top of it
    assert _compose("experiment=nyuv2_resnet50").dataset.augment.flip is False  # LibMTL's --aug is off


def test_pascal_nyuv2_trains_their_runnable_default_of_three_tasks_and_15_one_override_away():
    joint = task_specs(_compose("experiment=pascal_nyuv2").dataset)
    assert list(joint) == ["segmentation", "depth", "normal"]  # their default: the 13 maps as one task, T = 3
    assert joint["segmentation"]["kind"] == "binary_map" and len(joint["segmentation"]["classes"]) == 13
    per_class = task_names(_compose("experiment=pascal_nyuv2", "dataset.binary_maps=per_class").dataset)
    assert len(per_class) == 15 and per_class[-2:] == ["depth", "normal"]


@pytest.mark.parametrize(("preset", "every"), [("pascal_celeba", 636), ("pascal_cityscapes", 1000),
                                               ("pascal_nyuv2", 500)])
def test_pascal_presets_evaluate_at_the_authors_iterations_and_not_off_their_cadence(preset, every):
    trainer = _compose(f"experiment={preset}").trainer
    assert (trainer.eval_every_iterations, trainer.eval_at_end, trainer.eval_every) == (every, False, 1)
