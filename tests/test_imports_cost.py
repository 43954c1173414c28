"""Start-up cost: the CLI path and mtlrun-compare leave slow imports to the runs that need them."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loaded_after(steps: list[str], watched: list[str]) -> list[list[str]]:
    """The modules of `watched` that one fresh interpreter has imported after each of `steps`, run in turn."""
    report = f"print(' '.join(m for m in {watched!r} if m in sys.modules), flush=True)"
    probe = "import sys\n" + "".join(f"{step}\n{report}\n" for step in steps)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    return [line.split() for line in out.stdout.splitlines()]


def test_a_convnet_run_imports_no_torchvision() -> None:
    build = "build_model(OmegaConf.create({{'name': '{}'}}), [])"
    steps = [
        # what the CLI imports for a run, then the default model built
        "import mtlrun.run.cli, mtlrun.train.loop, mtlrun.data, mtlrun.diagnostics, mtlrun.tasks, mtlrun.models",
        f"from omegaconf import OmegaConf\nfrom mtlrun.models import build_model\n{build.format('convnet')}",
        "from mtlrun.train.build import seed_everything\nseed_everything(0, False)",
    ]
    watched = ["torchvision", "matplotlib", "torchjd", "cvxpy", "torch._dynamo"]
    assert loaded_after(steps, watched) == [[], [], []]


def test_compare_imports_neither_torch_nor_scipy_nor_matplotlib() -> None:
    # scipy.stats comes with intervals over seeds, matplotlib with --plot/--report
    watched = ["torch", "scipy.stats", "matplotlib"]
    assert loaded_after(["import mtlrun.report.cli"], watched) == [[]]
