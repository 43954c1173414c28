"""mtlrun/report/page.py: `mtlrun-compare --report DIR` writes DIR/report.md, read back here."""

import re

import yaml

import mtlrun
from tests.test_report_cli import compare_cli, write_multi_task, write_single_task


def test_report_page_holds_table_figures_statistics_and_configurations(tmp_path, capsys):
    runs = write_multi_task(tmp_path / "sweep")
    write_single_task(runs)
    for run in runs.iterdir():
        (run / ".hydra").mkdir()
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["strategy=x", f"seed={run.name[-1]}"]))
    args = [runs, "--out", tmp_path / "c.csv", "--reference", "strategy=averaged"]
    markdown, _ = compare_cli(capsys, *args, "--format", "markdown")
    _, err = compare_cli(capsys, *args, "--report", tmp_path / "report", "--plot", tmp_path / "figs")
    page = (tmp_path / "report" / "report.md").read_text()
    assert f"wrote {tmp_path / 'report' / 'report.md'}" in err
    assert page.startswith("# mtlrun comparison\n") and f"mtlrun {mtlrun.__version__}" in page
    assert "--reference strategy=averaged" in page  # the command that made it
    sections = dict(re.findall(r"^## (\w+)\n(.*?)(?=^## |\Z)", page, flags=re.S | re.M))
    assert list(sections) == ["Table", "Statistics", "Notes", "Figures", "Configurations"]
    assert markdown.strip() in sections["Table"]  # the same table as --format markdown
    assert "reference: averaged k=2" in sections["Notes"]
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", sections["Figures"])
    assert "../figs/tradeoff.png" in links and "../figs/budget_curves.png" in links
    assert all((tmp_path / "report" / link).is_file() for link in links)
    assert "diagnostics.png not written" in sections["Figures"]
    statistics = sections["Statistics"].strip().splitlines()
    assert statistics[0].startswith("| configuration | number | difference | 95% interval | p | p (Holm) |")
    # grouped k=2 against averaged, miou per seed: 45 - 48, 47 - 48: difference -2, paired
    assert "| grouped k=2 | test/seg/miou | -2 | [-14.71, 10.71] |" in sections["Statistics"]
    assert "grouping keys (the settings that differ): `strategy`, `group_size`" in page
    configurations = sections["Configurations"]
    assert configurations.count("### ") == 5 and "### grouped k=2" in configurations
    assert "- config id: `toy-convnet-grouped-2-2-adam-0.001-2`; seeds: 0 1" in configurations
    assert "`lr=0.001`" in configurations and "overrides: `strategy=x seed=0`" in configurations


def test_report_without_reference_gives_each_mean_its_interval(tmp_path, capsys):
    runs = write_multi_task(tmp_path / "sweep")
    compare_cli(capsys, runs, "--out", tmp_path / "c.csv", "--report", tmp_path / "report")
    page = (tmp_path / "report" / "report.md").read_text()
    assert "| configuration | number | mean | 95% interval | seeds |" in page
    assert "| grouped k=1 | test/seg/miou | 52 | [26.59, 77.41] | 2 |" in page
    assert "![tradeoff](tradeoff.png)" not in page  # no Δm% without single-task runs: said instead
    assert "tradeoff.png not written" in page and "![training_curves](training_curves.png)" in page
    assert "overrides: `(no .hydra/overrides.yaml beside its results)`" in page
