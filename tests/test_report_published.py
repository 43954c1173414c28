"""The published numbers docs/experiments.md quotes (copied from ../shared/reference/published.md) are
consistent: each method's row, against the single-task row, gives back the paper's Δm% through mtlrun-compare's
own Δm% (with the directions mtlrun's tasks declare), or the paper's Δp (DB-MTL: a mean per task first, then
over tasks), within what the rounding of the printed inputs allows; FAMO's CelebA reference is its author's
list."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from mtlrun import CONF_DIR
from mtlrun.report.build import build
from mtlrun.report.delta import relative_change
from mtlrun.report.runs import DELTA_M
from mtlrun.tasks import Depth, Normal, Segmentation
from tests.test_report_cli import write_run

EXPERIMENTS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "experiments.md"
FAMO_REFERENCE = Path(__file__).resolve().parents[1] / "mtlrun" / "references" / "famo_celeba_single_task.csv"
DIRECTIONS = {
    f"{task}/{metric.name}": metric.higher_is_better
    for task, kind in (("segmentation", Segmentation), ("depth", Depth), ("normal", Normal))
    for metric in kind.metrics
}
NYUV2 = [
    "segmentation/miou", "segmentation/pixel_acc", "depth/abs_err", "depth/rel_err", "normal/mean_angle",
    "normal/median_angle", "normal/within_11.25", "normal/within_22.5", "normal/within_30",
]
CITYSCAPES = NYUV2[:4]


def row(metrics: list[str], printed: str) -> dict[str, str]:
    """A table row as printed (strings: their decimals say how they were rounded)."""
    values = printed.split()
    assert len(values) == len(metrics)
    return dict(zip(metrics, values))


# Nash-MTL (Navon et al., ICML 2022), Tables 2 and 3, SegNet-MTAN; the single-task rows are also in the
# CAGrad / Nash-MTL / FAMO code. Nash-MTL's sign: Δm% > 0 is worse than single-task.
NASH_STL = {
    "nyuv2": row(NYUV2, "38.30 63.76 0.6754 0.2780 25.01 19.21 30.14 57.20 69.15"),
    "cityscapes": row(CITYSCAPES, "74.01 93.16 0.0125 27.77"),
}
DELTA_M_ROWS = {  # (dataset, method): (its row, the published Δm%)
    ("nyuv2", "LS"): (row(NYUV2, "39.29 65.33 0.5493 0.2263 28.15 23.96 22.09 47.50 61.08"), 5.59),
    ("nyuv2", "Nash-MTL"): (row(NYUV2, "40.13 65.93 0.5261 0.2171 25.26 20.08 28.40 55.47 68.15"), -4.04),
    ("nyuv2", "FAMO"): (row(NYUV2, "38.88 64.90 0.5474 0.2194 25.06 19.57 29.21 56.61 68.98"), -4.10),
    ("cityscapes", "LS"): (row(CITYSCAPES, "75.18 93.49 0.0155 46.77"), 22.60),
    ("cityscapes", "Nash-MTL"): (row(CITYSCAPES, "75.41 93.66 0.0129 35.02"), 6.82),
}
# DB-MTL (Lin et al., arXiv 2308.12029), Table 1 and its Cityscapes table: LibMTL's dilated ResNet-50 with
# DeepLab heads. Its Δp > 0 is better than single-task.
DB_MTL_STL = {
    "nyuv2": row(NYUV2, "53.50 75.39 0.3926 0.1605 21.99 15.16 39.04 65.00 75.16"),
    "cityscapes": row(CITYSCAPES, "69.06 91.54 0.01282 43.53"),
}
DELTA_P_ROWS = {
    ("nyuv2", "EW"): (row(NYUV2, "53.93 75.53 0.3825 0.1577 23.57 17.01 35.04 60.99 72.05"), -1.78),
    ("nyuv2", "Nash-MTL"): (row(NYUV2, "53.41 74.95 0.3867 0.1612 22.57 15.94 37.30 63.40 74.09"), -1.01),
    ("cityscapes", "EW"): (row(CITYSCAPES, "68.93 91.58 0.01315 45.90"), -2.05),
}
# Numbers docs/experiments.md quotes that no row above recomputes: LibMTL's own runs (no Δ printed), FAMO's CelebA
# Δm% (no per-attribute F1 of any method is published) and MGDA-UB's CelebA errors (second-hand).
QUOTED_ONLY = [
    "40.89", "66.14", "0.5524", "0.2347", "27.27", "22.41", "24.38", "50.18", "63.36",
    "40.66", "66.25", "0.5339", "0.2266", "25.11", "19.59", "28.70", "55.97", "68.52",
    "54.10", "75.78", "0.3771", "0.1596", "23.53", "17.20", "34.55", "60.75", "72.06",
    "4.15", "7.20", "1.46", "3.20", "3.23", "14.85", "3.17", "3.29", "2.48", "0.84", "2.84", "1.21",
    "8.77", "9.62", "9.53", "8.44", "8.25",
]


def bounds(printed: str) -> tuple[float, float]:
    """The interval a printed number was rounded from."""
    half = 0.5 * 10.0 ** -len(printed.partition(".")[2])
    return float(printed) - half, float(printed) + half


def change_bounds(method: str, single: str, higher_is_better: bool) -> tuple[float, float]:
    """Least and greatest relative change (positive = better) over the rounding intervals: it is monotone in
    each of the two numbers, so the corners hold the extremes."""
    corners = [relative_change(m, s, higher_is_better) for m in bounds(method) for s in bounds(single)]
    return min(corners), max(corners)


def mean_bounds(parts: list[tuple[float, float]]) -> tuple[float, float]:
    return float(np.mean([lo for lo, _ in parts])), float(np.mean([hi for _, hi in parts]))


@pytest.mark.parametrize("dataset,method", list(DELTA_M_ROWS))
def test_the_segnet_rows_give_nash_mtls_delta_m_through_mtlrun_compare(tmp_path, dataset, method):
    single, (values, published) = NASH_STL[dataset], DELTA_M_ROWS[dataset, method]
    directions = {name: DIRECTIONS[name] for name in single}
    for task in dict.fromkeys(name.split("/")[0] for name in single):
        own = {name: float(v) for name, v in single.items() if name.startswith(f"{task}/")}
        write_run(tmp_path / f"stl_{task}", 0, own, "single_task", 1, directions, task=task)
    method_values = {name: float(v) for name, v in values.items()}
    write_run(tmp_path / "mtl", 0, method_values, "averaged", len(directions), directions)
    table = build([tmp_path], None, "test").table
    recomputed = -table.loc[table["strategy"] == "averaged", f"{DELTA_M} mean"].item()  # Nash-MTL's sign
    lo, hi = mean_bounds([change_bounds(values[n], single[n], directions[n]) for n in single])
    assert -hi - 0.005 <= published <= -lo + 0.005, (recomputed, -hi, -lo)
    assert recomputed == pytest.approx(published, abs=max(hi - lo, 0.01))


@pytest.mark.parametrize("dataset,method", list(DELTA_P_ROWS))
def test_the_db_mtl_rows_give_its_delta_p_averaged_per_task_first(dataset, method):
    single, (values, published) = DB_MTL_STL[dataset], DELTA_P_ROWS[dataset, method]
    tasks = dict.fromkeys(name.split("/")[0] for name in single)
    per_task = [
        mean_bounds([change_bounds(values[n], single[n], DIRECTIONS[n]) for n in single if n.startswith(f"{t}/")])
        for t in tasks
    ]
    lo, hi = mean_bounds(per_task)
    assert lo - 0.005 <= published <= hi + 0.005, (lo, hi)
    flat = mean_bounds([change_bounds(values[n], single[n], DIRECTIONS[n]) for n in single])
    if dataset == "nyuv2":  # averaged over the 9 metrics at once instead, the published Δp does not come back
        assert not flat[0] - 0.005 <= published <= flat[1] + 0.005


def test_the_famo_celeba_reference_is_its_authors_list_in_celebas_attribute_order():
    published = """0.6736886 0.68121034 0.81524944 0.5760289 0.7205613 0.8555076 0.38203922 0.58225113 0.787647
    0.8321292 0.5029583 0.68694085 0.6781237 0.5240381 0.5161666 0.95694304 0.6968786 0.67976356 0.8808315
    0.8582131 0.97034 0.93267566 0.5057539 0.40307626 0.9703734 0.48644206 0.60786104 0.5261031 0.56907415
    0.59815097 0.6858371 0.924108 0.5424991 0.7406311 0.71019936 0.87365365 0.9305602 0.33704284 0.7647628
    0.91907"""  # Cranial-XIX/FAMO issue 2, in list_attr_celeba.txt's order (conf/dataset/celeba.yaml's)
    attributes = list(OmegaConf.load(CONF_DIR / "dataset/celeba.yaml").task_specs)
    reference = pd.read_csv(FAMO_REFERENCE)
    assert len(reference) == 1
    assert (reference.strategy.item(), reference.dataset.item()) == ("single_task", "celeba")
    assert [c for c in reference.columns if c.count("/") == 2] == [f"test/{a}/f1" for a in attributes]
    values = reference[[f"test/{a}/f1" for a in attributes]].iloc[0].to_numpy(dtype=float)
    np.testing.assert_allclose(values, 100 * np.array(published.split(), dtype=float), rtol=1e-12)


def test_the_experiments_page_quotes_these_numbers():
    text = EXPERIMENTS_PAGE.read_text()
    quoted = [*QUOTED_ONLY]
    for single in (*NASH_STL.values(), *DB_MTL_STL.values()):
        quoted += single.values()
    for values, published in (*DELTA_M_ROWS.values(), *DELTA_P_ROWS.values()):
        quoted += [*values.values(), f"{published:.2f}"]
    missing = [number for number in quoted if number not in text]
    assert not missing
