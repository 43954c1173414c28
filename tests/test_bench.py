"""`make bench` runs every case it lists, briefly, and refuses unknown methods in one line."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _bench(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mtlrun.bench", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, check=False)


def test_bench_prints_a_row_per_case(tmp_path):
    result = _bench("--device", "cpu", "--iterations", "1", "--methods", "pcgrad", "dataset.num_train=64",
                    "dataset.num_val=8", "dataset.num_test=8", "model.width=4", "trainer.batch_size=8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[2:]]
    labels = [(row[0], row[-5]) for row in rows]  # name, moments, then four numbers
    assert labels == [("averaged", "per_task"), ("averaged", "shared"), ("alternating", "per_task"),
                      ("alternating", "shared"), ("grouped", "per_task"), ("grouped", "shared"),
                      ("pcgrad", "per_task")]
    steps = {row[0]: float(row[-3]) for row in rows}
    assert steps["alternating"] == 4 and steps["averaged"] == 1 and steps["pcgrad"] == 1


def test_bench_refuses_an_unknown_method(tmp_path):
    result = _bench("--methods", "nope", cwd=tmp_path)
    assert result.returncode != 0 and "unknown --methods ['nope']" in result.stderr
