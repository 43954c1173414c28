"""Typed settings (mtlrun/settings/): every field has a YAML key and every YAML key a field, defaults stated
in Python equal the YAML's, the keys outside a run's identity are listed once."""

from dataclasses import MISSING, fields

import pytest
import torch
from omegaconf import OmegaConf

from mtlrun import CONF_DIR
from mtlrun.errors import MtlrunError
from mtlrun.precision import DTYPES, RUN_DTYPES
from mtlrun.settings import (
    IDENTITY_IGNORES,
    RUN_CONTROL_KEYS,
    DatasetSettings,
    LOGGERS,
    LoggerSettings,
    TensorBoardSettings,
    OptimizerSettings,
    RunSettings,
    SchedulerSettings,
    ShapesSettings,
    TrainerSettings,
)
from mtlrun.settings.declare import option_defaults
from mtlrun.strategies import STRATEGIES

GROUPS = {"optimizer": OptimizerSettings, "scheduler": SchedulerSettings}


def _keys(settings_class) -> set[str]:
    return {f.name for f in fields(settings_class)}


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_each_option_yaml_key_is_a_field_and_each_field_a_key_of_some_option(group):
    options = [option_defaults(group, p.stem) for p in (CONF_DIR / group).glob("*.yaml")]
    union = set().union(*options)
    assert union == _keys(GROUPS[group])


def test_top_level_trainer_and_dataset_keys_are_fields():
    root = option_defaults("", None)
    assert set(root) - {"trainer"} == _keys(RunSettings)
    assert set(root["trainer"]) == _keys(TrainerSettings)
    for path in (CONF_DIR / "dataset").glob("*.yaml"):
        keys = set(option_defaults("dataset", path.stem))
        assert keys - _keys(ShapesSettings) <= _keys(DatasetSettings), path
        assert keys >= _keys(DatasetSettings) - {"binary_maps"}, path  # celeba has no segmentation task


def test_python_defaults_equal_the_yaml_of_every_option_that_states_them():
    """A default in a dataclass (for code building settings directly) is the YAML's value wherever an
    option file states the key, except keys whose options disagree (weight_decay, momentum: there the
    default option adam's value, or none for plain SGD)."""
    disagree = {"weight_decay", "momentum"}
    for f in fields(OptimizerSettings):
        if f.default is MISSING or f.name in disagree:
            continue
        for path in (CONF_DIR / "optimizer").glob("*.yaml"):
            stated = option_defaults("optimizer", path.stem)
            if f.name in stated:
                value = tuple(stated[f.name]) if isinstance(f.default, tuple) else stated[f.name]
                assert value == f.default, (path, f.name)
    assert OptimizerSettings.__dataclass_fields__["weight_decay"].default == option_defaults("optimizer", "adam")[
        "weight_decay"]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_constructor_default_equals_its_yaml_or_it_has_none(name):
    import inspect

    path = CONF_DIR / "strategy" / f"{name}.yaml"
    stated = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    for key, parameter in inspect.signature(STRATEGIES[name].__init__).parameters.items():
        if key in stated and parameter.default is not inspect.Parameter.empty:
            assert parameter.default == stated[key], (name, key, parameter.default, stated[key])


def test_the_keys_outside_a_runs_identity_are_the_yaml_list_and_the_hashes_keep_data_dir():
    listed = OmegaConf.load(CONF_DIR / "config.yaml").hydra.job.config.override_dirname.exclude_keys
    assert RUN_CONTROL_KEYS == tuple(listed)
    assert set(RUN_CONTROL_KEYS) - set(IDENTITY_IGNORES) == {"data_dir"}


def test_precision_and_dtype_choices_are_the_ones_precision_knows():
    assert set(DTYPES) == set(TrainerSettings.__dataclass_fields__["precision"].metadata["check"].values)
    assert set(RUN_DTYPES) == set(TrainerSettings.__dataclass_fields__["dtype"].metadata["check"].values)
    assert RUN_DTYPES["float64"] is torch.float64


def test_a_missing_key_takes_its_options_yaml_value():
    sgd = OptimizerSettings.from_config(OmegaConf.create({"name": "sgd"}))
    assert (sgd.lr, sgd.momentum, sgd.weight_decay) == (1e-2, 0.9, 0.0)
    assert SchedulerSettings.from_config(OmegaConf.create({"name": "step"})).step_size == 100
    board = LoggerSettings.from_config(OmegaConf.create({"csv": {}, "tensorboard": {}})).tensorboard
    assert board is not None and board.subdir == "tensorboard"


def test_each_logger_option_holds_its_settings_under_its_name_and_is_known():
    for path in (CONF_DIR / "logger").glob("*.yaml"):
        assert list(option_defaults("logger", path.stem)) == [path.stem]
    assert sorted(LOGGERS) == sorted(p.stem for p in (CONF_DIR / "logger").glob("*.yaml"))
    assert [f.name for f in fields(TensorBoardSettings)] == list(option_defaults("logger", "tensorboard")["tensorboard"])
    with pytest.raises(MtlrunError, match="logger 'foo' is unknown"):
        LoggerSettings.from_config(OmegaConf.create({"foo": {}}))


def test_every_model_builder_default_equals_its_yaml_or_it_has_none():
    import inspect

    from mtlrun.models import MODELS

    for name, build in MODELS.items():
        stated = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml"), resolve=False)
        for key, parameter in inspect.signature(build).parameters.items():
            default = parameter.default
            if key in stated and default is not inspect.Parameter.empty:
                default = list(default) if isinstance(default, tuple) else default
                assert default == stated[key], (name, key, parameter.default, stated[key])


def test_a_constructor_parameter_takes_the_same_declarations_as_a_settings_field():
    """Strategies' settings are typed by their constructors' signatures; Annotated[type, check] declares a
    range there with the very check objects the settings dataclasses use."""
    from typing import Annotated

    from mtlrun.constraints import typed_keywords
    from mtlrun.errors import MtlrunError
    from mtlrun.settings.declare import Integer

    def build(tasks: list, every: Annotated[int, Integer(1)] = 1) -> None: ...

    typed_keywords(build, {"every": 3}, "strategy.")
    with pytest.raises(MtlrunError, match=r"^strategy.every must be an integer >= 1, got 0$"):
        typed_keywords(build, {"every": 0}, "strategy.")
    with pytest.raises(MtlrunError, match=r"^strategy.every must be an integer; got 'x'$"):
        typed_keywords(build, {"every": "x"}, "strategy.")
