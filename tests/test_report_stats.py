"""mtlrun/report/stats.py: intervals, paired and Welch tests, Holm, markers and wins/ties/losses, by hand."""

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from mtlrun.errors import MtlrunError
from mtlrun.report.build import build
from mtlrun.report.cli import main
from mtlrun.report.stats import add_intervals, add_reference, difference, find_reference, holm
from tests.test_report_cli import write_run

# Student t quantiles t(0.975, df), from a printed table (df 1, 2, 4).
T975 = {1: 12.7062, 2: 4.30265, 4: 2.77645}


def t_cdf(t: float, df: int) -> float:
    """Student t CDF in closed form for df 2 and 4 (Abramowitz & Stegun 26.7.3)."""
    x = t / np.sqrt(t * t + df)
    return 0.5 + x / 2 if df == 2 else 0.5 + 0.75 * x * (1 - x * x / 3)


def write_config(root: Path, strategy: str, k: int, miou: list[float], abs_err: list[float],
                 seeds: list[int] | None = None) -> None:
    for seed, m, a in zip(seeds or range(len(miou)), miou, abs_err):
        write_run(root / f"{strategy}{k}_s{seed}", seed, {"seg/miou": m, "depth/abs_err": a}, strategy, k)


def row(comparison, strategy: str, k: int) -> pd.Series:
    table = comparison.table
    return table[(table["strategy"] == strategy) & (table["group_size"] == k)].iloc[0]


def test_mean_interval_is_student_t_over_seeds(tmp_path):
    write_config(tmp_path, "grouped", 1, [3.0, 4.0, 8.0], [0.3, 0.4, 0.8])
    comparison = build([tmp_path], None, "test")
    assert add_intervals(comparison) == []
    r = comparison.table.iloc[0]
    half = T975[2] * np.sqrt(7.0) / np.sqrt(3)  # mean 5, sample variance (4 + 1 + 9) / 2 = 7
    assert r["test/seg/miou ci_low"] == pytest.approx(5 - half, rel=1e-5)
    assert r["test/seg/miou ci_high"] == pytest.approx(5 + half, rel=1e-5)


def test_paired_difference_over_the_same_seeds(tmp_path):
    write_config(tmp_path, "grouped", 1, [50.0, 54.0, 52.0], [0.5, 0.5, 0.5])
    write_config(tmp_path, "averaged", 2, [48.0, 51.0, 50.0], [0.5, 0.5, 0.5])
    comparison = build([tmp_path], None, "test")
    add_reference(comparison, find_reference(comparison, "strategy=averaged"))
    r = row(comparison, "grouped", 1)
    # per seed d = 2, 3, 2: mean 7/3, sd sqrt(1/3), standard error 1/3, t = 7 with 2 degrees of freedom
    assert r["test"] == "paired" and r["test/seg/miou diff"] == pytest.approx(7 / 3)
    assert r["test/seg/miou diff_low"] == pytest.approx(7 / 3 - T975[2] / 3, rel=1e-5)
    assert r["test/seg/miou diff_high"] == pytest.approx(7 / 3 + T975[2] / 3, rel=1e-5)
    assert r["test/seg/miou p"] == pytest.approx(2 * (1 - t_cdf(7.0, 2)), rel=1e-9)
    assert r["test/seg/miou p"] == pytest.approx(stats.ttest_rel([50, 54, 52], [48, 51, 50]).pvalue, rel=1e-9)
    # abs_err equal on every seed: no difference, p = 1; Holm over the 2 tested metrics doubles miou's p
    assert r["test/depth/abs_err diff"] == 0 and r["test/depth/abs_err p"] == 1.0
    assert r["test/seg/miou p_holm"] == pytest.approx(2 * r["test/seg/miou p"])
    assert r["test/seg/miou verdict"] == "better" and r["test/depth/abs_err verdict"] == "tie"  # p_holm 0.0396
    assert (r["wins"], r["ties"], r["losses"]) == (1, 1, 0)


def test_welch_where_the_seeds_differ(tmp_path):
    write_config(tmp_path, "grouped", 1, [1.0, 2.0, 3.0], [0.1, 0.2, 0.3], seeds=[0, 1, 2])
    write_config(tmp_path, "averaged", 2, [4.0, 5.0, 6.0], [0.1, 0.2, 0.3], seeds=[3, 4, 5])
    comparison = build([tmp_path], None, "test")
    add_reference(comparison, find_reference(comparison, "strategy=averaged"))
    r = row(comparison, "grouped", 1)
    # variances 1 and 1 over 3 seeds: se = sqrt(2/3), Welch-Satterthwaite df = (2/3)^2 / (2 (1/3)^2 / 2) = 4
    se, t = np.sqrt(2 / 3), -3 / np.sqrt(2 / 3)
    assert r["test"] == "Welch" and r["test/seg/miou diff"] == pytest.approx(-3.0)
    assert r["test/seg/miou diff_low"] == pytest.approx(-3 - T975[4] * se, rel=1e-5)
    assert r["test/seg/miou p"] == pytest.approx(2 * t_cdf(t, 4), rel=1e-9)
    assert r["test/seg/miou p"] == pytest.approx(stats.ttest_ind([1, 2, 3], [4, 5, 6], equal_var=False).pvalue)
    assert r["test/seg/miou verdict"] == "worse"  # p 0.0213, Holm over 2 (abs_err's p is 1): 0.0426 < 0.05
    assert r["test/seg/miou p_holm"] == pytest.approx(2 * 2 * t_cdf(t, 4), rel=1e-9)


def test_holm_by_hand():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adjusted = holm([0.5, np.nan, 0.01])
    assert adjusted[0] == pytest.approx(0.5) and np.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.02)
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # capped at 1, never decreasing in rank


@pytest.mark.parametrize("seeds", [[0, 1, 2], [3, 4, 5]])  # paired, then Welch
def test_identical_configurations_are_never_marked_different(tmp_path, seeds):
    rng = np.random.default_rng(0)
    for trial in range(5):
        miou, abs_err = list(rng.normal(50, 5, 3)), list(rng.normal(0.5, 0.1, 3))
        root = tmp_path / str(trial)
        write_config(root, "grouped", 1, miou, abs_err)
        write_config(root, "averaged", 2, miou, abs_err, seeds=seeds)
        comparison = build([root], None, "test")
        add_reference(comparison, find_reference(comparison, "strategy=averaged"))
        r = row(comparison, "grouped", 1)
        for metric in ("test/seg/miou", "test/depth/abs_err"):
            assert r[f"{metric} verdict"] == "tie" and r[f"{metric} p_holm"] == pytest.approx(1.0)
            assert r[f"{metric} diff_low"] <= 0 <= r[f"{metric} diff_high"]
        assert (r["wins"], r["ties"], r["losses"]) == (0, 2, 0)


def test_difference_needs_two_seeds_a_side():
    one = difference(pd.Series([1.0], index=[0]), pd.Series([2.0, 3.0], index=[0, 1]))
    assert one.test == "" and one.diff == pytest.approx(-1.5) and np.isnan(one.p)


def significant(tmp_path: Path) -> Path:
    """grouped k=1 beats averaged on miou (higher, d = 2, 2.5, 2) and loses on abs_err (lower, +0.2 each seed)."""
    write_config(tmp_path / "runs", "grouped", 1, [52.0, 53.5, 54.0], [0.7, 0.8, 0.9])
    write_config(tmp_path / "runs", "averaged", 2, [50.0, 51.0, 52.0], [0.5, 0.6, 0.7])
    return tmp_path / "runs"


def test_markers_and_wins_in_every_format(tmp_path, capsys):
    runs, out = significant(tmp_path), tmp_path / "c.csv"
    outputs = {}
    for fmt in ("table", "markdown", "latex", "csv"):
        main([str(runs), "--reference", "strategy=averaged", "--format", fmt, "--out", str(out)])
        outputs[fmt] = capsys.readouterr().out
    for fmt in ("table", "markdown"):
        assert "▲" in outputs[fmt] and "▼" in outputs[fmt] and "1/0/1" in outputs[fmt] and "reference" in outputs[fmt]
    assert r"$^\blacktriangle$" in outputs["latex"] and r"$^\blacktriangledown$" in outputs["latex"]
    table = pd.read_csv(io.StringIO(outputs["csv"]))
    r = table[table["strategy"] == "grouped"].iloc[0]
    assert r["test/seg/miou verdict"] == "better" and r["test/depth/abs_err verdict"] == "worse"
    assert (r["wins"], r["ties"], r["losses"]) == (1, 0, 1) and r["test"] == "paired"
    assert table[table["strategy"] == "averaged"].iloc[0]["reference"]
    pd.testing.assert_frame_equal(table, pd.read_csv(out))


def test_reference_by_row_number_and_errors(tmp_path, capsys):
    runs = significant(tmp_path)
    comparison = build([runs], None, "test")
    averaged = int(np.flatnonzero(comparison.table["strategy"] == "averaged")[0])
    assert find_reference(comparison, str(averaged + 1)) == averaged  # rows as shown, 1 = first
    assert find_reference(comparison, "strategy=averaged group_size=2") == averaged
    assert find_reference(comparison, "group_size=2.0") == averaged
    for text, expected in (("9", "the table has rows 1 to 2"), ("nope", r"give a row number \(1 to 2\) or key=value"),
                           ("colour=red", "no setting 'colour'"), ("lr=0.001", "matches 2 configurations"),
                           ("strategy=nashmtl", "matches no configuration")):
        with pytest.raises(MtlrunError, match=expected):
            find_reference(comparison, text)
    with pytest.raises(SystemExit) as exit_:
        main([str(runs), "--reference", "strategy=nashmtl", "--out", str(tmp_path / "c.csv")])
    assert str(exit_.value.code).startswith("mtlrun-compare: error: --reference") and "\n" not in str(exit_.value.code)


def test_one_seed_says_intervals_need_two_and_does_not_crash(tmp_path, capsys):
    write_config(tmp_path, "grouped", 1, [52.0], [0.7])
    write_config(tmp_path, "averaged", 2, [50.0], [0.5])
    main([str(tmp_path), "--reference", "strategy=averaged", "--out", str(tmp_path / "c.csv")])
    out, err = capsys.readouterr()
    assert "95% intervals need >= 2 seeds: 2 of 2 configuration(s) have one" in err
    assert "differences need >= 2 seeds on both sides; not tested: grouped k=1" in err
    assert "Δ +2.00 (untested: < 2 seeds)" in out
    table = pd.read_csv(tmp_path / "c.csv")
    assert table["test/seg/miou p"].isna().all() and table["test/seg/miou ci_low"].isna().all()
