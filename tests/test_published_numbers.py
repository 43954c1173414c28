"""The published numbers the README quotes are consistent: the averaged-loss rows, against the single-task
values, give the papers' Δm% through mtlrun-compare's own Δm% (with the directions mtlrun's tasks declare)."""

from pathlib import Path

import pytest

from mtlrun.compare import DELTA_M, build
from mtlrun.tasks import Depth, Normal, Segmentation
from tests.test_compare import write_run

README = Path(__file__).resolve().parents[1] / "README.md"
DIRECTIONS = {
    f"{task}/{metric.name}": metric.higher_is_better
    for task, kind in (("segmentation", Segmentation), ("depth", Depth), ("normal", Normal))
    for metric in kind.metrics
}
NYUV2_METRICS = [
    "segmentation/miou", "segmentation/pixel_acc", "depth/abs_err", "depth/rel_err", "normal/mean_angle",
    "normal/median_angle", "normal/within_11.25", "normal/within_22.5", "normal/within_30",
]
# (single-task values from the CAGrad / Nash-MTL / FAMO code, Nash-MTL's "LS" row, its Δm%)
PUBLISHED = {
    "nyuv2": (
        dict(zip(NYUV2_METRICS, [38.30, 63.76, 0.6754, 0.2780, 25.01, 19.21, 30.14, 57.20, 69.15])),
        dict(zip(NYUV2_METRICS, [39.29, 65.33, 0.5493, 0.2263, 28.15, 23.96, 22.09, 47.50, 61.08])),
        5.59,
    ),
    "cityscapes": (
        dict(zip(NYUV2_METRICS[:4], [74.01, 93.16, 0.0125, 27.77])),
        dict(zip(NYUV2_METRICS[:4], [75.18, 93.49, 0.0155, 46.77])),
        22.60,
    ),
}


@pytest.mark.parametrize("dataset", PUBLISHED)
def test_the_averaged_rows_give_the_papers_delta_m(tmp_path, dataset):
    single, averaged, published = PUBLISHED[dataset]
    directions = {name: DIRECTIONS[name] for name in single}
    for task in dict.fromkeys(name.split("/")[0] for name in single):
        values = {name: value for name, value in single.items() if name.startswith(f"{task}/")}
        write_run(tmp_path / f"stl_{task}", 0, values, "single_task", 1, directions, task=task)
    write_run(tmp_path / "averaged", 0, averaged, "averaged", len(directions), directions)
    table = build([tmp_path], None, "test").table
    # Nash-MTL's sign: Δm% > 0 is worse than single-task; mtlrun's is the opposite (positive = better).
    # The inputs carry 4 significant digits, so the recomputed value agrees to a few hundredths.
    assert -table.loc[table["strategy"] == "averaged", f"{DELTA_M} mean"].item() == pytest.approx(published, abs=0.05)


def test_the_readme_quotes_these_numbers():
    text = README.read_text()
    for single, averaged, delta_m in PUBLISHED.values():
        for value in [*single.values(), *averaged.values(), delta_m]:
            assert f"{value:.2f}" in text or f"{value:.4f}" in text, value
