"""Config values are checked before any work: each wrong one is one line naming its key, the type or range
it needs and the right syntax; composed in-process (Hydra's compose), given to the function checking it."""

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, OmegaConf

from mtlrun import CONF_DIR
from mtlrun.data import build_shapes, check_dataset, open_dataset, task_names
from mtlrun.errors import MtlrunError
from mtlrun.run.overrides import check_sweep_choices, check_top_level_keys, one_line
from mtlrun.strategies import build_strategy
from mtlrun.strategies.cagrad import CAGrad
from mtlrun.strategies.grouped import Grouped
from mtlrun.settings import Settings
from mtlrun.train.build import trainer_settings
from tests.test_run_rundir import mtlrun, one_line_error

TASKS = ["segmentation", "depth", "normal", "attributes"]


def config(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def refused(check, *args, match: str) -> str:
    with pytest.raises(MtlrunError) as info:
        check(*args)
    message = str(info.value)
    assert "\n" not in message and match in message, message
    return message


@pytest.mark.parametrize("override,expected", [
    ("dataset.mean=[0.5]", "dataset.mean must be a list of 3 finite numbers, one per input channel (R, G, "
                           "B), e.g. dataset.mean=[0.5,0.5,0.5]; got [0.5]"),
    ("dataset.std=[0.25]", "dataset.std must be a list of 3 finite numbers > 0, one per input channel"),
    ("dataset.mean=abc", "dataset.mean must be a list of 3 finite numbers, one per input channel (R, G, B), "
                         "e.g. dataset.mean=[0.5,0.5,0.5]; got 'abc'"),
    ("dataset.mean=[a,b,c]", "got ['a', 'b', 'c']"),
    ("dataset.mean=[0.5,0.5,.nan]", "dataset.mean must be a list of 3 finite numbers"),
    ("dataset.std=[0,0,0]", "dataset.std must be a list of 3 finite numbers > 0"),  # was "lower optimizer.lr"
    ("dataset.std=[0.25,0.25,-0.25]", "dataset.std must be a list of 3 finite numbers > 0"),
    ("dataset.augment.flip=maybe", "dataset.augment.flip must be true or false, got 'maybe'"),  # read as true
    ("dataset.augment.scales=abc", "dataset.augment.scales must be a list of one or more finite numbers"),
])
def test_dataset_values_are_checked_before_the_file_is_opened(override, expected):
    refused(check_dataset, config(override).dataset, match=expected)


def test_the_default_datasets_normalization_and_augmentation_pass():
    for name in ("shapes", "nyuv2", "cityscapes", "celeba"):
        check_dataset(config(f"dataset={name}").dataset)
    check_dataset(config("dataset.augment.flip=true", "dataset.augment.scales=[1,1.5]").dataset)


@pytest.mark.parametrize("override,expected", [
    ("dataset.tasks=[depth,depth]", "dataset.tasks=[depth,depth] names depth more than once: name each task "
                                    "once, e.g. dataset.tasks=[depth]"),  # was quietly one task
    ("dataset.tasks=[depth,normal,depth]", "e.g. dataset.tasks=[depth,normal]"),
    ("dataset.tasks=[]", "dataset.tasks=[] selects no task: name at least one, e.g. "
                         "dataset.tasks=[segmentation], or null for all"),  # was "names unknown tasks []"
])
def test_task_selection_names_each_task_once_and_at_least_one(override, expected):
    refused(task_names, config(override).dataset, match=expected)


def test_class_names_that_differ_from_the_files_are_refused_with_both_lists(tmp_path):
    path = tmp_path / "shapes.h5"
    build_shapes(path, 16, 8, 0, 4, generator_seed=0)
    sizes = ("dataset.image_size=16", "dataset.num_train=8", "dataset.num_val=0", "dataset.num_test=4")
    cfg = config(*sizes).dataset
    cfg.path = str(path)
    assert [t.name for t in open_dataset(cfg).tasks] == TASKS
    cfg.task_specs.segmentation.class_names = ["floor", "ball", "box", "cylinder"]
    refused(open_dataset, cfg, match=f"task 'segmentation' names its classes [floor, ball, box, cylinder] "
                                     f"but {path} stores [floor, sphere, box, cylinder] in 'segmentation': set "
                                     f"dataset.task_specs.segmentation.class_names to the file's names")
    cfg.task_specs.segmentation.class_names = None  # no names to compare: the file's are taken as they are
    assert [t.name for t in open_dataset(cfg).tasks] == TASKS


@pytest.mark.parametrize("key", ["deterministic", "diagnostics"])
def test_flags_are_true_or_false(key):
    refused(Settings.from_config, config(f"{key}=maybe"), match=f"{key} must be true or false, got 'maybe'")
    assert trainer_settings(Settings.from_config(config(f"{key}=true")))[key] is True


@pytest.mark.parametrize("overrides,expected", [
    (["strategy=famo", "strategy.gamma=abc"], "strategy.gamma must be a number; got 'abc'"),
    (["strategy=famo", "strategy.lr=true"], "strategy.lr must be a number; got True"),
    (["strategy=grouped", "strategy.group_size=1.5"], "strategy.group_size must be an integer; got 1.5"),
    (["strategy=mgda", "strategy.rep_grad=maybe"], "strategy.rep_grad must be true or false; got 'maybe'"),
    (["strategy=grouped", "strategy.combine=cagrad", "+strategy.combine_settings.c=abc"],
     "strategy.combine_settings.c must be a number; got 'abc'"),
    (["strategy=grouped", "strategy.combine=cagrad", "strategy.combine_settings.c=-1"],
     "strategy.combine_settings.c must be >= 0, got -1"),  # the method's own check, named by the key given
    (["strategy=averaged", "strategy.weights=attributes:1"],  # was iterated per character
     "strategy.weights must be a mapping {name: number} or null, e.g. "
     "'strategy.weights={segmentation:1,depth:1,normal:1,attributes:1}' (quoted: a shell splits unquoted "
     "braces); got 'attributes:1'"),
])
def test_strategy_settings_have_the_types_their_constructor_declares(overrides, expected):
    cfg = config(*overrides)
    refused(build_strategy, cfg.strategy, TASKS, 0, match=expected)


def test_the_documented_combine_settings_form_works_with_and_without_plus():
    for plus in ("", "+", "++"):
        cfg = config("strategy=grouped", "strategy.combine=cagrad", f"{plus}strategy.combine_settings.c=0.2")
        strategy = build_strategy(cfg.strategy, TASKS, 0)
        assert isinstance(strategy, Grouped) and isinstance(strategy.combiner, CAGrad)
        assert strategy.combiner.c == 0.2
    weights = "{segmentation:1,depth:2,normal:1,attributes:1}"
    cfg = config(
        "strategy=grouped", "strategy.combine=averaged", f"strategy.combine_settings.weights={weights}")
    assert build_strategy(cfg.strategy, TASKS, 0).combiner.weights["depth"] == 2
    with pytest.raises(Exception, match="Could not override 'strategy.foo'"):  # other keys stay closed
        config("strategy=grouped", "strategy.foo=1")


def test_an_unknown_top_level_key_is_refused_with_the_known_ones():
    cfg = config("+foo=1")
    message = refused(check_top_level_keys, cfg, cfg.hydra.runtime.choices,
                      match="foo is not a config key; top-level keys: dataset, model, strategy, optimizer, "
                            "scheduler, logger, seed, deterministic")
    assert "trainer" in message
    for overrides in ([], ["++resume=true"], ["++seed=3"], ["experiment=pascal_celeba"]):
        cfg = config(*overrides)
        check_top_level_keys(cfg, cfg.hydra.runtime.choices)


@pytest.mark.parametrize("choice",
                         ["hydra/launcher=slurm", "hydra/launcher=local", "hydra/sweeper=lr_search"])
def test_a_sweep_launcher_or_sweeper_without_m_is_refused(choice):
    refused(check_sweep_choices, config(choice).hydra.runtime.choices,
            match=f"{choice} applies only to sweeps: add -m (mtlrun -m {choice} ...)")
    check_sweep_choices(config().hydra.runtime.choices)


@pytest.mark.parametrize("override,expected", [
    ("trainer.device=cpü", "the override 'trainer.device=cpü' has a character 'ü' that a value may hold only "
                           "inside quotes: quote the value, e.g. 'trainer.device=\"cpü\"'"),
    ("seed=1\n2", "the override 'seed=1\\n2' has a character '\\n' that a value may hold only inside quotes"),
    ("traîner.epochs=1", "the override 'traîner.epochs=1' has a character 'î' that a key cannot hold"),
])
def test_an_override_hydra_cannot_read_says_how_to_quote_it(override, expected):
    with pytest.raises(OverrideParseException) as info:
        config(override)
    line = one_line(info.value)
    assert expected in line and "\n" not in line and "LexerNoViableAltException" not in line
    if "î" not in override:  # the advice works: the quoted value composes
        key, value = override.split("=", 1)
        assert config(f'{key}="{value}"')[key.split(".")[0]] is not None


@pytest.mark.slow
@pytest.mark.parametrize("args,expected", [
    (["+foo=1"], "foo is not a config key; top-level keys:"),
    (["dataset.mean=abc"], "dataset.mean must be a list of 3 finite numbers"),
])
def test_cli_refuses_in_one_line_and_leaves_no_run_directory(tmp_path, args, expected):
    result = mtlrun(*args, "trainer.epochs=1", cwd=tmp_path)
    line = one_line_error(result.returncode, result.stderr)
    assert line.startswith("mtlrun: error: ") and expected in line
    assert not (tmp_path / "outputs/runs").exists() or not any((tmp_path / "outputs/runs").iterdir())
