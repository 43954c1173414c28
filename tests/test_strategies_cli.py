"""Strategies on every model, two iterations each, from the CLI: one `mtlrun -m` sweep per model.

Every strategy runs on the default convnet. On the other models run the strategies whose code reaches into
the model (its parameters' split, its last shared layer, its encoder's layers, per-task optimizer state);
the other methods differ from those only in how they combine the same T losses or T x n gradient matrix,
which is model-independent (and every strategy runs on every architecture in tests/test_models_architectures.py)."""

import pandas as pd
import pytest

from mtlrun.data import build_shapes
from mtlrun.models import ARCHITECTURES
from mtlrun.run.overrides import config_groups
from tests.test_run_cli import mtlrun

pytestmark = pytest.mark.slow

GROUPS = config_groups()
STRATEGIES = [s for s in GROUPS["strategy"] if s != "single_task"]  # single_task needs strategy.task: test_cli
SMALL = {  # settings that keep each model small enough for two CPU iterations
    "convnet": ["model.width=4"],
    "segnet_split": ["model.filters=[4,8,8,16,16]"],
    "segnet_mtan": ["model.filters=[4,8,8,16,16]"],
    "resnet50_dilated": ["dataset.tasks=[depth,attributes]"],  # one dense and one per-image task: ASPP heads are big
    "resnet18_multihead": [],
    "unet": ["model.width=2"],
    "celeba_cnn": ["model.width=2"],
}
DATA = ["dataset.image_size=32", "dataset.num_train=8", "dataset.num_val=4", "dataset.num_test=4"]
# averaged, alternating, grouped: the steps on subsets of heads; gradnorm: the last shared layer; mgda, pcgrad:
# the Jacobian of the shared parameters; adatask: per-task states fed separately; maximum_roaming: masks on the
# encoder's layers; famo, uncertainty: parameters of the method on the model's device.
MODEL_STRATEGIES = ["averaged", "alternating", "grouped", "gradnorm", "mgda", "pcgrad", "adatask",
                    "maximum_roaming", "famo", "uncertainty"]
SECONDS_PER_RUN = 60  # the sweep's timeout grows with its number of strategies: a guard against hangs only


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    build_shapes(root / "data/shapes-32px-8-4-4-seed0.h5", 32, 8, 4, 4, generator_seed=0)
    return root


def test_every_model_is_covered():
    assert set(SMALL) == set(GROUPS["model"]) - set(ARCHITECTURES)  # those: tests/test_models_architectures.py
    assert set(MODEL_STRATEGIES) <= set(STRATEGIES)


@pytest.mark.parametrize("model", list(SMALL))
def test_strategies_train_two_iterations_on_the_model(workdir, model):
    strategies = STRATEGIES if model == "convnet" else MODEL_STRATEGIES
    sweep = workdir / model
    result = mtlrun(
        "-m", f"model={model}", *SMALL[model], *DATA, f"strategy={','.join(strategies)}",
        "trainer.epochs=1", "trainer.batch_size=4", "trainer.eval_batch_size=4", f"hydra.sweep.dir={sweep}",
        cwd=workdir, timeout=SECONDS_PER_RUN * len(strategies),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = pd.concat([pd.read_csv(f) for f in sweep.glob("*/results.csv")], ignore_index=True)
    assert sorted(rows.strategy) == sorted(strategies)
    assert (rows.iterations == 2).all()
    metrics = [c for c in rows.columns if c.count("/") == 2]
    assert rows[metrics].notna().all().all() and (rows[metrics].abs() < float("inf")).all().all()
    tasks = int(rows.num_tasks.iloc[0])
    steps = rows.set_index("strategy").optimizer_steps
    assert steps["alternating"] == 2 * tasks and steps["grouped"] == 2 * -(-tasks // 2)  # groups of 2
    assert steps["maximum_roaming"] == 2 * tasks  # one step per task, each through its own masks
    combiners = [s for s in strategies if s not in ("alternating", "grouped", "maximum_roaming")]
    assert (steps[combiners] == 2).all()  # averaged and every method: one step per iteration
