"""Runs at the same time never corrupt data or lose results, a refused command changes nothing, every bad input
gets one line: concurrent cache builds, shared and colliding run directories, refused resumes, bad values."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

import mtlrun.run.cli
from mtlrun import CONF_DIR
from mtlrun.report import build as compare_build, cli as compare_cli
from mtlrun.data import build_shapes, open_dataset, shapes, task_names
from mtlrun.errors import MtlrunError
from mtlrun.models import check_model
from mtlrun.optim import OptimizerSettings
from mtlrun.run.locks import FileLock
from mtlrun.run.naming import forget_new_directories, new_directory
from mtlrun.run.rundir import LOCK, RunDir, check_run_flags, hold, write_csv
from mtlrun.train.epoch import _check_explosion
from mtlrun.train.loop import train

BIN = Path(sys.executable).parent
TINY = ["dataset.image_size=32", "dataset.num_train=32", "dataset.num_val=8", "dataset.num_test=16",
        "trainer.batch_size=16", "model.width=4", "trainer.epochs=1"]
SHAPES_FILE = "data/shapes-32px-32-8-16-seed0.h5"


def mtlrun(*args: str, cwd: Path, tool: str = "mtlrun", wait: bool = True):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("HYDRA_FULL_ERROR", None)
    command = [str(BIN / tool), *args]
    if not wait:
        return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def one_line_error(returncode: int, stderr: str) -> str:
    assert returncode != 0
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    build_shapes(root / SHAPES_FILE, 32, 32, 8, 16, generator_seed=0)
    return root


def shapes_config(path: Path, **sizes):
    cfg = OmegaConf.load(CONF_DIR / "dataset/shapes.yaml")
    cfg.path = str(path)
    cfg.merge_with({"image_size": 32, "num_train": 8, "num_val": 0, "num_test": 4, **sizes})
    return cfg


def compose(workdir: Path, *overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=[*TINY, f"data_dir={workdir / 'data'}", *overrides])
    return cfg


# --- 1. concurrent first builds of the benchmark's cache --------------------------------------------------

PAUSED_BUILDER = """
import sys, time
from pathlib import Path
from omegaconf import OmegaConf
from mtlrun.data import hdf5, open_dataset
create = hdf5.StreamingWriter.create
def paused_create(self, *args, **kwargs):  # holds its file open for writing until the test says go
    if not Path(sys.argv[2]).exists():
        Path(sys.argv[2]).touch()
        while not Path(sys.argv[3]).exists():
            time.sleep(0.02)
    return create(self, *args, **kwargs)
if sys.argv[4] == "pause":
    hdf5.StreamingWriter.create = paused_create
cfg = OmegaConf.load(sys.argv[1])
open_dataset(cfg).splits
print("loaded")
"""


@pytest.mark.slow
def test_two_processes_building_the_cache_at_once_leave_one_complete_file(tmp_path):
    path = tmp_path / "data/shapes.h5"
    config = tmp_path / "dataset.yaml"
    OmegaConf.save(shapes_config(path), config)
    paused, go = tmp_path / "paused", tmp_path / "go"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = [sys.executable, "-c", PAUSED_BUILDER, str(config), str(paused), str(go)]
    first = subprocess.Popen([*run, "pause"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not paused.exists():  # the first builder has its file open for writing
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.05)
    second_err = tmp_path / "second.err"
    with open(second_err, "w") as err:
        second = subprocess.Popen([*run, "plain"], stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        while "waiting for" not in second_err.read_text():  # the second found the build under way
            assert second.poll() is None and time.time() < deadline, second_err.read_text()
            time.sleep(0.05)
        assert f"pid {first.pid}" in second_err.read_text()
        go.touch()
        outputs = [p.communicate(timeout=120) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, (outputs, second_err.read_text())
    expected = shapes.generate(8, 32, seed=0)
    with h5py.File(path) as f:
        assert f.attrs["complete"]
        for key, array in expected.items():
            np.testing.assert_array_equal(f["train"][key][...], array)
        assert f["train/image"][...].any()
    assert not list(path.parent.glob("*.partial"))


def test_a_file_marked_incomplete_is_refused(tmp_path):
    path = tmp_path / "shapes.h5"
    build_shapes(path, 32, 4, 0, 4, 0)
    with h5py.File(path, "a") as f:
        f.attrs["complete"] = False
    with pytest.raises(MtlrunError, match="incomplete"):
        open_dataset(shapes_config(path, num_train=4))


# --- 2. two runs in one run directory ---------------------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from mtlrun.run.locks import FileLock
FileLock(Path(sys.argv[1])).acquire(wait=False)
print("held", flush=True)
time.sleep(600)
"""


def test_a_run_directory_in_use_is_refused_and_a_killed_holder_blocks_nothing(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(MtlrunError, match=f"in use by another mtlrun run \\(pid {holder.pid} on "):
            with hold(tmp_path, {}):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with hold(tmp_path, {}) as run:  # the kernel dropped the dead holder's lock
        assert run.path == tmp_path


@pytest.mark.slow
def test_a_second_run_into_a_directory_in_use_is_refused_in_one_line(workdir):
    run_dir = workdir / "runs/shared"
    run_dir.mkdir(parents=True)
    (run_dir / "mtlrun.log").write_text("the first run's log\n")
    lock = FileLock(run_dir / LOCK)
    assert lock.acquire(wait=False)  # this test process is the first run
    try:
        result = mtlrun(*TINY, f"hydra.run.dir={run_dir}", cwd=workdir)
    finally:
        lock.release()
    line = one_line_error(result.returncode, result.stderr)
    assert f"{run_dir} is in use by another mtlrun run (pid {os.getpid()} on " in line
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK, "mtlrun.log"]
    assert (run_dir / "mtlrun.log").read_text() == "the first run's log\n"


# --- 3. default run directories never collide ---------------------------------------------------------------

def test_long_overrides_that_differ_past_the_cut_get_different_names():
    from mtlrun.run.cli import _dirname

    a, b = ("x" * 200 + ",seed=0"), ("x" * 200 + ",seed=1")
    assert _dirname(a) != _dirname(b) and len(_dirname(a)) == 120
    assert _dirname("optimizer.lr=0.1,seed=0") == "optimizer.lr=0.1,seed=0"


def test_a_new_directory_is_never_one_another_run_made(tmp_path):
    base = str(tmp_path / "runs/2020-01-01_00-00-00_seed=0")
    first = new_directory(base)
    assert new_directory(base) == first  # the same invocation resolving its directory again
    forget_new_directories()  # as another process would: it sees the name taken
    second = new_directory(base)
    assert first == base and second == base + "_2" and Path(second).is_dir()
    forget_new_directories()


def test_an_output_root_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(MtlrunError, match="cannot create the run directory .*a_file/runs .*is a file"):
        new_directory(str(tmp_path / "a_file/runs/x"))

    def refused(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refused)  # as for a non-root user in a read-only folder
    with pytest.raises(MtlrunError, match="cannot create the run directory .* \\(Permission denied\\)"):
        new_directory(str(tmp_path / "read_only/runs/x"))


def test_temporary_files_are_unique_per_writer(tmp_path):
    path = tmp_path / "results.csv"
    other_writers_tmp = tmp_path / "results.csv.tmp"  # the one fixed name every writer used to share
    other_writers_tmp.write_text("another writer's rows")
    inner_done = []

    def outer(tmp: Path) -> None:  # a second writer of the same file runs while the first is writing
        write_csv([{"seed": 1}], path)
        inner_done.append(True)
        pd.DataFrame([{"seed": 0}]).to_csv(tmp, index=False)

    from mtlrun.run.rundir import _replace

    _replace(path, outer)
    assert inner_done and pd.read_csv(path).seed.tolist() == [0]
    assert other_writers_tmp.read_text() == "another writer's rows"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.csv.tmp"]


@pytest.mark.slow
def test_two_runs_started_in_the_same_second_with_long_overrides_get_their_own_directories(workdir):
    # The default run directory with its time stamp frozen: every run here is "started in the same second".
    default = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml").hydra.run)["dir"]
    frozen = default.replace("${now:%Y-%m-%d_%H-%M-%S}", "2020-01-01_00-00-00")
    assert frozen != default
    from mtlrun.run.cli import _dirname

    long = [*TINY, "optimizer.lr=0.001", "optimizer.weight_decay=0.0", "optimizer.eps=1.0e-08",
            "trainer.eval_batch_size=64"]
    runs = workdir / "same_second/runs"

    def made_by_another_run(seed: int) -> Path:
        name = _dirname(",".join(sorted([*long, f"seed={seed}"])))
        made = Path(new_directory(str(runs / f"2020-01-01_00-00-00_{name}")))
        forget_new_directories()
        return made

    other_seed, same_command = made_by_another_run(0), made_by_another_run(1)
    assert other_seed != same_command and other_seed.name[:100] == same_command.name[:100]  # differ past the cut
    result = mtlrun(*long, "seed=1", "output_root=same_second", f"hydra.run.dir='{frozen}'", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert not list(other_seed.iterdir()) and not list(same_command.iterdir())  # left alone
    own = same_command.with_name(same_command.name + "_2")
    assert sorted(runs.iterdir()) == sorted([other_seed, same_command, own])
    assert pd.read_csv(own / "results.csv").seed.iloc[0] == 1
    assert "seed=1" in OmegaConf.load(own / ".hydra/overrides.yaml")
    assert not list(own.glob("*.tmp")) and not list(own.glob(".*.tmp"))


# --- 4. a refused command changes no file of the run --------------------------------------------------------

@pytest.mark.slow
def test_a_refused_resume_leaves_the_run_byte_identical_and_names_the_keys(workdir):
    run_dir = workdir / "runs/refused"
    common = [*TINY, f"data_dir={workdir / 'data'}", "trainer.epochs=2", f"hydra.run.dir={run_dir}"]
    record = {"config.yaml": "the run's config\n", "hydra.yaml": "its hydra settings\n", "overrides.yaml": "[]\n"}
    with hold(run_dir, record) as run:  # the first run, stopped after one epoch (in this process)
        assert train(compose(workdir, "trainer.epochs=2", "trainer.stop_after_epochs=1"), run) is None
    (run_dir / "mtlrun.log").write_text("its log (Hydra's, from the command line)\n")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert run_dir / ".hydra/config.yaml" in before and run_dir / LOCK in before
    refused = mtlrun(*common, "optimizer.lr=0.002", "resume=true", cwd=workdir)
    assert (run_dir / ".hydra/config.yaml").read_text() == "the run's config\n"
    line = one_line_error(refused.returncode, refused.stderr)
    assert "different configuration (optimizer.lr: 0.001 in the run, 0.002 now)" in line
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before  # the lock file too


def test_resume_and_overwrite_flags_are_checked(tmp_path, caplog):
    RunDir(tmp_path / "empty").claim(overwrite=False, resume=True)
    assert "resume=true: " in caplog.text and "holds no checkpoint.pt, so the run starts from the beginning" in caplog.text
    with pytest.raises(MtlrunError, match="contradict each other"):
        check_run_flags(True, True)
    with pytest.raises(MtlrunError, match="resume must be true or false"):
        check_run_flags("yes", False)
    run = RunDir(tmp_path)
    (tmp_path / "results.csv").write_text("a\n1\n")
    with pytest.raises(MtlrunError, match="finished run .* but no checkpoint.pt to resume from") as info:
        run.claim(overwrite=False, resume=True)
    assert "add resume=true" not in str(info.value)


# --- 5, 7, 8. bad input: one line each, checked before work starts ----------------------------------------

@pytest.mark.parametrize("settings,expected", [
    ({"lr": "abc"}, "optimizer.lr must be a finite number > 0, got 'abc'"),
    ({"lr": float("inf")}, "optimizer.lr must be a finite number > 0, got inf"),
    ({"lr": float("nan")}, "optimizer.lr must be a finite number > 0"),
    ({"weight_decay": -0.1}, "optimizer.weight_decay must be a finite number >= 0, got -0.1"),
    ({"weight_decay": "x"}, "optimizer.weight_decay must be a finite number >= 0"),
    ({"eps": "x"}, "optimizer.eps must be a finite number > 0"),
    ({"betas": 0.9}, "optimizer.betas must be two numbers in [0, 1)"),
    ({"betas": ["a", 0.9]}, "optimizer.betas[0] must be a finite number in [0, 1)"),
    ({"name": "sgd", "momentum": "m"}, "optimizer.momentum must be a finite number in [0, 1)"),
    ({"name": "sgd", "momentum": 1.5}, "optimizer.momentum must be a finite number in [0, 1)"),
])
def test_bad_optimizer_values_are_one_line(settings, expected):
    cfg = OmegaConf.create({**OmegaConf.to_container(OmegaConf.load(CONF_DIR / "optimizer/adam.yaml")), **settings})
    with pytest.raises(MtlrunError) as info:
        OptimizerSettings.from_config(cfg)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_bad_model_and_dataset_values_are_one_line(tmp_path):
    for model, expected in [({"name": "convnet", "width": 0}, "model.width must be an integer >= 1, got 0"),
                            ({"name": "convnet", "width": "a"}, "model.width must be an integer >= 1"),
                            ({"name": "convnet", "depth": 3}, "model.depth is not a setting of model convnet")]:
        with pytest.raises(MtlrunError, match=expected):
            check_model(OmegaConf.create(model))
    path = tmp_path / "shapes.h5"
    with pytest.raises(MtlrunError, match="dataset.num_train must be an integer >= 1, got 0"):
        open_dataset(shapes_config(path, num_train=0))
    assert not path.exists()  # nothing was cached
    with pytest.raises(MtlrunError, match=r"dataset.tasks=segmentation must be a list .* dataset.tasks=\[segmentation\]"):
        task_names(OmegaConf.merge(shapes_config(path), {"tasks": "segmentation"}))
    with pytest.raises(MtlrunError, match="is a folder: point dataset.path at the shapes HDF5 file") as info:
        open_dataset(shapes_config(tmp_path))
    assert "delete it" not in str(info.value)


def test_an_exploding_loss_is_judged_against_the_first_loss():
    _check_explosion({"depth": 0.9e6 * 2.0}, {"depth": 2.0}, epoch=0, iteration=3)  # under a million-fold
    with pytest.raises(MtlrunError, match="the loss of task 'depth' grew from 2 to 2.2e\\+06"):
        _check_explosion({"depth": 1.1e6 * 2.0}, {"depth": 2.0}, epoch=0, iteration=3)


def test_a_run_whose_loss_explodes_stops_like_a_nan(workdir, tmp_path):
    cfg = compose(workdir, "optimizer.lr=1e6")
    with pytest.raises(MtlrunError, match="grew from .* training diverged; lower optimizer.lr"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run/results.csv").exists()


@pytest.mark.slow
def test_bad_output_places_are_one_line_and_leave_nothing(workdir):
    (workdir / "a_file").write_text("")
    for arg in ("output_root=a_file", "hydra.run.dir=a_file"):
        result = mtlrun(*TINY, arg, cwd=workdir)
        line = one_line_error(result.returncode, result.stderr)
        assert line.startswith("mtlrun: error: cannot create the run directory a_file") and "is a file" in line


@pytest.mark.slow
def test_a_sweep_reports_each_bad_job_in_one_line_and_still_ends_with_its_summary(workdir):
    result = mtlrun("-m", *TINY, "model.width=0,4", "optimizer.lr=abc,inf", "hydra.sweep.dir=bad_sweep", cwd=workdir)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("mtlrun: error in job")]
    assert len(errors) == 4 and all("model.width" in e or "optimizer.lr" in e for e in errors)
    assert result.stderr.strip().splitlines()[-1] == \
        "mtlrun: 4 job(s) of the sweep failed (see above): job 0, job 1, job 2, job 3"
    assert [p.name for p in (workdir / "bad_sweep").iterdir()] == ["multirun.yaml"]  # no empty job folders


def test_ctrl_c_names_the_run_directory_to_resume_as_it_must_be_typed(tmp_path, monkeypatch):
    import mtlrun.train.loop

    def interrupted(cfg, run):  # after a first checkpoint
        (run.path / "checkpoint.pt").write_bytes(b"a checkpoint")
        raise KeyboardInterrupt

    run_dir = tmp_path / "lr=0.1,seed=0"
    monkeypatch.setattr(mtlrun.train.loop, "train", interrupted)
    monkeypatch.setattr(sys, "argv", ["mtlrun", f"hydra.run.dir='{run_dir}'"])
    with pytest.raises(SystemExit) as info:
        mtlrun.run.cli.main()
    assert str(info.value.code).endswith(f"re-run the same command with resume=true 'hydra.run.dir=\"{run_dir}\"' "
                                         f"to continue")


def test_a_sweep_job_failing_from_a_bug_is_reported_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    import mtlrun.train.loop

    def bug(cfg, run):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(mtlrun.train.loop, "train", bug)
    monkeypatch.setattr(sys, "argv", ["mtlrun", "-m", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    with pytest.raises(SystemExit) as info:
        mtlrun.run.cli.main()
    assert info.value.code == "mtlrun: 2 job(s) of the sweep failed (see above): job 0, job 1"
    assert capsys.readouterr().err.count("unexpected ZeroDivisionError: a bug") == 2


# --- 6. output_root is not part of a run's identity ---------------------------------------------------------

def test_where_a_run_writes_is_not_part_of_its_identity(workdir):
    from mtlrun.run.identity import RUN_CONTROL_KEYS, config_hash

    ids = {config_hash(compose(workdir, *o), ("seed", *RUN_CONTROL_KEYS))
           for o in [(), ("output_root=elsewhere",), ("logger=tensorboard",), ("logger=[csv,mlflow,wandb]",),
                     ("trainer.progress=false",)]}
    assert len(ids) == 1
    assert config_hash(compose(workdir, "optimizer.lr=0.5"), RUN_CONTROL_KEYS) not in ids


# --- compare: truncated files, missing metrics.csv, folders of failed jobs ----------------------------------

def test_compare_says_what_it_skips_and_refuses_a_truncated_results_file(workdir, tmp_path, capsys):
    from tests.test_report_cli import write_run

    write_run(tmp_path / "a", 0, {"seg/miou": 50, "depth/abs_err": 0.5}, "averaged", 2)
    write_run(tmp_path / "b", 1, {"seg/miou": 52, "depth/abs_err": 0.4}, "averaged", 2)
    (tmp_path / "b/metrics.csv").unlink()
    (tmp_path / "failed/.hydra").mkdir(parents=True)
    notes = compare_build.build([tmp_path], None, "test").notes
    assert any("skipping 1 run director(ies) without results.csv or checkpoint.pt" in n and
               str(tmp_path / "failed") in n for n in notes)
    assert any("1 run(s) have no metrics.csv beside their results" in n and str(tmp_path / "b") in n for n in notes)
    text = (tmp_path / "a/results.csv").read_bytes()
    for cut in (text[: len(text) // 2], text[: text.index(b"\n") + 1]):
        (tmp_path / "a/results.csv").write_bytes(cut)
        with pytest.raises(SystemExit) as info:
            compare_cli.main([str(tmp_path / "a"), "--out", str(tmp_path / "c.csv")])
        message = str(info.value.code)
        assert message.startswith(f"mtlrun-compare: error: {tmp_path / 'a/results.csv'} is ") and "\n" not in message


def test_shapes_script_refuses_to_overwrite_without_force(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "data_scripts"))
    import shapes as script  # data_scripts/shapes.py

    out = tmp_path / "shapes.h5"
    out.write_bytes(b"keep me")
    args = ["--out", str(out), "--num-train", "4", "--num-val", "0", "--num-test", "4", "--image-size", "16"]
    with pytest.raises(SystemExit) as refused:
        script.main(args)
    assert refused.value.code == f"shapes: error: --out {out} exists: pass --force to replace it, or choose another name"
    assert out.read_bytes() == b"keep me"
    with pytest.raises(SystemExit) as bad:
        script.main([*args[:-2], "--image-size", "4", "--force"])
    assert bad.value.code == "shapes: error: --image-size must be an integer >= 8, got 4"
    script.main([*args, "--force"])
    assert h5py.is_hdf5(out)


# --- 9. the run machinery under a hostile user: full disks, foreign files, unwritable folders, leftovers --

def cli(monkeypatch, *args: str) -> object:
    """`mtlrun ARGS` in this process: its exit code (0, or the one line it exits with)."""
    from mtlrun.run import cli as command  # `mtlrun` here is the subprocess helper above

    monkeypatch.setattr(sys, "argv", ["mtlrun", *args])
    try:
        command.main()
    except SystemExit as e:
        return e.code
    return 0


def snapshot(folder: Path) -> dict:
    """Every file's bytes and modification time."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


@contextmanager
def unwritable(*paths: Path):
    """`paths` made unwritable for this process: chmod for a user; for root, whom permission bits do not stop,
    the immutable attribute (chattr +i); skipped where neither is possible."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in paths}
        for p in paths:
            p.chmod(modes[p] & ~0o222)
        try:
            yield
        finally:
            for p in paths:
                p.chmod(modes[p])
        return
    done = []
    try:
        for p in paths:
            try:
                made = subprocess.run(["chattr", "+i", str(p)], capture_output=True).returncode == 0
            except FileNotFoundError:
                made = False
            if not made:
                pytest.skip("root, and no immutable attribute (chattr +i) here: nothing is unwritable")
            done.append(p)
        yield
    finally:
        for p in done:
            subprocess.run(["chattr", "-i", str(p)], check=True)


@contextmanager
def small_filesystem(path: Path, size: str):
    """A tmpfs of `size` mounted at `path` (a real full disk); skipped where mounting is impossible (not root,
    or a container without the right)."""
    path.mkdir()
    try:
        mounted = os.geteuid() == 0 and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode == 0
    except FileNotFoundError:
        mounted = False
    if not mounted:
        pytest.skip("cannot mount a small tmpfs here (needs root and the right to mount)")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)  # lazy: the run's log handler may hold a file


def full_disk_save(obj, f, **kwargs):
    """torch.save on a full disk: the write of torch's archive fails and torch raises a RuntimeError, with the
    file's OSError beneath it (as torch 2 does)."""
    f.write(b"PK\x03\x04 half an archive")
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None


def test_a_full_disk_while_saving_is_one_line_for_a_fresh_run_and_mid_run(workdir, tmp_path, monkeypatch,
                                                                           capsys):
    import torch

    from mtlrun.run.rundir import WriteFailed

    fresh, mid = tmp_path / "fresh", tmp_path / "mid"
    monkeypatch.setattr(torch, "save", full_disk_save)
    line = cli(monkeypatch, *TINY, f"data_dir={workdir / 'data'}", f"hydra.run.dir={fresh}",
               "trainer.checkpoint_every=1")
    assert line == (f"mtlrun: error: cannot write {fresh / 'checkpoint.pt'} (No space left on device); no "
                    f"checkpoint was written yet: once it can be written, run the command again")
    assert "mtlrun: error: cannot write" in (fresh / "mtlrun.log").read_text()  # its log says why

    # Mid-run: a checkpoint in the second epoch fails; the first epoch's stays as it was.
    monkeypatch.undo()
    common = [*TINY, f"data_dir={workdir / 'data'}", "trainer.epochs=2", f"hydra.run.dir={mid}"]
    assert cli(monkeypatch, *common, "trainer.stop_after_epochs=1") == 0
    first = (mid / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(torch, "save", full_disk_save)
    line = cli(monkeypatch, *common, "resume=true", "trainer.checkpoint_every=1")
    assert line == (f"mtlrun: error: cannot write {mid / 'checkpoint.pt'} (No space left on device); the "
                    f"files of finished epochs and the last checkpoint are kept: once it can be written, "
                    f"re-run the same command with resume=true hydra.run.dir={mid} to continue")
    assert (mid / "checkpoint.pt").read_bytes() == first and not list(mid.glob(".*.tmp"))
    assert "Traceback" not in capsys.readouterr().err

    def torch_failing_alone(obj, f, **kwargs):  # no OSError beneath: torch's own words are the reason
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", torch_failing_alone)
    with pytest.raises(WriteFailed) as info:
        RunDir(tmp_path / "alone").save([], [], [], {"resume_id": "x"})
    assert info.value.filename == str(tmp_path / "alone/checkpoint.pt")
    assert info.value.strerror == ("torch.save failed: [enforce fail at inline_container.cc:672] . "
                                   "unexpected pos 704 vs 598")


def test_a_real_full_disk_is_one_line_and_the_last_checkpoint_resumes(workdir, tmp_path, monkeypatch, capsys):
    disk = tmp_path / "disk"
    with small_filesystem(disk, "64k"):  # a fresh run: no room for its first checkpoint
        line = cli(monkeypatch, *TINY, f"data_dir={workdir / 'data'}", f"hydra.run.dir={disk / 'fresh'}",
                   "trainer.checkpoint_every=1")
        assert line.startswith(f"mtlrun: error: cannot write {disk / 'fresh/checkpoint.pt'} (No space left "
                               f"on device); no checkpoint was written yet")
    disk = tmp_path / "disk2"
    common = [*TINY, f"data_dir={workdir / 'data'}", "trainer.epochs=2", f"hydra.run.dir={disk / 'mid'}"]
    with small_filesystem(disk, "4m"):
        assert cli(monkeypatch, *common, "trainer.stop_after_epochs=1") == 0
        first = (disk / "mid/checkpoint.pt").read_bytes()
        # Room for the CSVs, not for a second checkpoint beside the first.
        room = shutil.disk_usage(disk).used + 32 * 1024
        subprocess.run(["mount", "-o", f"remount,size={room}", str(disk)], check=True)
        line = cli(monkeypatch, *common, "resume=true", "trainer.checkpoint_every=1")
        assert line.startswith(f"mtlrun: error: cannot write {disk / 'mid/checkpoint.pt'} (No space left on "
                               f"device); the files of finished epochs and the last checkpoint are kept")
        assert (disk / "mid/checkpoint.pt").read_bytes() == first and not list((disk / "mid").glob(".*.tmp"))
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        assert cli(monkeypatch, *common, "resume=true") == 0 and (disk / "mid/results.csv").exists()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err


def test_resume_of_a_finished_run_does_nothing_and_changes_no_file(workdir, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "finished"
    common = [*TINY, f"data_dir={workdir / 'data'}", f"hydra.run.dir={run_dir}"]
    assert cli(monkeypatch, *common) == 0
    before = snapshot(run_dir)
    assert run_dir / LOCK in before and run_dir / "results.csv" in before
    capsys.readouterr()
    assert cli(monkeypatch, *common, "resume=true") == 0
    assert capsys.readouterr().err.strip() == (
        f"mtlrun: {run_dir} holds a finished run (epoch 1 of 1, results.csv): nothing to do, no file "
        f"changed; to train it again give overwrite=true instead of resume=true"
    )
    assert snapshot(run_dir) == before  # results.csv, .hydra/, mtlrun.log and the lock: bytes and times


def test_resume_of_a_torch_file_mtlrun_did_not_write_is_one_line_and_changes_nothing(workdir, tmp_path,
                                                                                    monkeypatch):
    import torch

    run_dir = tmp_path / "foreign"
    run_dir.mkdir()
    torch.save({"model": {"weight": torch.zeros(2)}}, run_dir / "checkpoint.pt")
    (run_dir / LOCK).write_text("pid 1 on another-host\n")
    (run_dir / "mtlrun.log").write_text("a log\n")
    os.utime(run_dir / LOCK, ns=(1_000_000_000, 2_000_000_000))
    before = snapshot(run_dir)
    line = cli(monkeypatch, *TINY, f"data_dir={workdir / 'data'}", f"hydra.run.dir={run_dir}", "resume=true")
    assert line == (f"mtlrun: error: {run_dir / 'checkpoint.pt'} is a torch file but not an mtlrun "
                    f"checkpoint (it holds no run state): move it out of the run directory, or restart the "
                    f"run with overwrite=true")
    assert snapshot(run_dir) == before


def test_resume_in_a_run_directory_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "mtlrun.log").write_text("its log\n")
    (run_dir / "checkpoint.pt").write_bytes(b"a checkpoint")
    with unwritable(run_dir):  # the folder: nothing can be made in it, its log can still be written
        line = cli(monkeypatch, f"hydra.run.dir={run_dir}", "resume=true")
    assert line == (f"mtlrun: error: cannot write in the run directory {run_dir}: make it writable, or "
                    f"choose another hydra.run.dir")
    with unwritable(run_dir / "mtlrun.log", run_dir):  # its log too: Hydra cannot open it
        line = cli(monkeypatch, f"hydra.run.dir={run_dir}", "resume=true")
    assert line.startswith(f"mtlrun: error: cannot write the log file {run_dir / 'mtlrun.log'} (")
    assert line.endswith("): make its run directory writable, or choose another hydra.run.dir")
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "mtlrun.log"]


def test_a_log_file_that_cannot_be_opened_is_one_line(tmp_path, monkeypatch):
    """The same, simulated where the operating system refuses: it runs where nothing is unwritable."""
    import logging

    def refused(self):
        raise PermissionError(errno.EACCES, "Permission denied", self.baseFilename)

    monkeypatch.setattr(logging.FileHandler, "_open", refused)
    line = cli(monkeypatch, f"hydra.run.dir={tmp_path / 'run'}", "resume=true")
    assert line == (f"mtlrun: error: cannot write the log file {tmp_path / 'run/mtlrun.log'} (Permission "
                    f"denied): make its run directory writable, or choose another hydra.run.dir")


def test_a_symbolic_link_leading_nowhere_is_named_as_such(tmp_path, monkeypatch):
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    for run_dir, why in [
        ("dangling", f"dangling is a symbolic link to {tmp_path / 'nowhere'}, which does not exist"),
        ("dangling/run", f"dangling is a symbolic link to {tmp_path / 'nowhere'}, which does not exist"),
        ("loop_a", f"loop_a is a symbolic link to {tmp_path / 'loop_b'} that loops back on itself"),
    ]:
        monkeypatch.chdir(tmp_path)
        line = cli(monkeypatch, f"hydra.run.dir={run_dir}")
        named = run_dir.split("/")[0]
        assert line.startswith(f"mtlrun: error: cannot create the run directory {named} ({why}): ")
    line = cli(monkeypatch, "output_root=dangling")
    assert "(dangling is a symbolic link to" in line and "is a file" not in line


def test_a_sweep_into_an_output_root_that_cannot_be_made_is_one_line_without_a_warning(tmp_path, monkeypatch,
                                                                                      recwarn):
    (tmp_path / "a_file").write_text("")
    line = cli(monkeypatch, "-m", f"output_root={tmp_path / 'a_file'}", "seed=0,1")
    assert line.startswith(f"mtlrun: error: cannot create the run directory {tmp_path / 'a_file/sweeps'} (")
    assert not [w for w in recwarn if "Callback" in str(w.message)]  # Hydra's 5-line warning about a callback


def test_ctrl_c_before_any_checkpoint_says_there_is_nothing_to_resume(tmp_path, monkeypatch):
    import mtlrun.train.loop

    def interrupted(cfg, run):
        run.claim(overwrite=False)
        run.accept()
        raise KeyboardInterrupt

    monkeypatch.setattr(mtlrun.train.loop, "train", interrupted)
    line = cli(monkeypatch, f"hydra.run.dir={tmp_path / 'run'}")
    assert line == ("mtlrun: interrupted before any checkpoint was written: nothing to resume; run the "
                    "command again to start over")
    line = cli(monkeypatch, "-m", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert line.startswith("mtlrun: interrupted before any checkpoint was written")


def test_a_failed_run_records_its_error_in_its_log(tmp_path, monkeypatch):
    import mtlrun.train.loop

    def fails(error):
        def train(cfg, run):
            run.claim(overwrite=False)
            run.accept()
            raise error
        return train

    monkeypatch.setattr(mtlrun.train.loop, "train", fails(MtlrunError("the loss of task 'depth' became nan")))
    line = cli(monkeypatch, f"hydra.run.dir={tmp_path / 'run'}")
    assert line == "mtlrun: error: the loss of task 'depth' became nan"
    log = (tmp_path / "run/mtlrun.log").read_text()
    assert "[ERROR] - mtlrun: error: the loss of task 'depth' became nan" in log
    monkeypatch.setattr(mtlrun.train.loop, "train", fails(ZeroDivisionError("a bug")))
    with pytest.raises(ZeroDivisionError):
        cli(monkeypatch, f"hydra.run.dir={tmp_path / 'bug'}")
    log = (tmp_path / "bug/mtlrun.log").read_text()
    assert "mtlrun: unexpected ZeroDivisionError: a bug" in log and "Traceback" in log


def dead_pid() -> int:
    """The pid of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_temporaries_of_dead_writers_are_removed_by_the_next_run_and_live_ones_kept(tmp_path, monkeypatch):
    import mtlrun.train.loop

    def accepted(cfg, run):
        run.claim(overwrite=False, resume=True)
        run.accept()

    run_dir, dead = tmp_path / "run", dead_pid()
    (run_dir / ".hydra").mkdir(parents=True)
    leftovers = [run_dir / f".checkpoint.pt.{dead}-0a1b2c3d.tmp", run_dir / f".results.csv.{dead}-0ff0.tmp",
                 run_dir / f".hydra/.config.yaml.{dead}-12345678.tmp"]
    live = [run_dir / f".metrics.csv.{os.getpid()}-0a1b2c3d.tmp", run_dir / "notes.tmp"]
    for path in leftovers + live:
        path.write_bytes(b"half a file")
    refused = cli(monkeypatch, f"hydra.run.dir={run_dir}", "overwrite=true", "resume=true")
    assert "contradict" in refused and all(p.exists() for p in leftovers)  # a refused command changes nothing
    monkeypatch.setattr(mtlrun.train.loop, "train", accepted)
    assert cli(monkeypatch, f"hydra.run.dir={run_dir}", "resume=true") == 0
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in live)


def test_partial_dataset_files_of_dead_builders_are_removed_by_the_next_run(tmp_path):
    path, dead = tmp_path / "shapes.h5", dead_pid()
    killed = tmp_path / f"shapes.h5.{dead}-0a1b2c3d.partial"
    building = tmp_path / f"shapes.h5.{os.getpid()}-0a1b2c3d.partial"  # a live builder's (that took no lock)
    other = tmp_path / f"other.h5.{dead}-0a1b2c3d.partial"
    for p in (killed, building, other):
        p.write_bytes(b"53 MB, once")
    open_dataset(shapes_config(path, num_train=4))  # builds the file
    assert path.exists() and not killed.exists() and building.exists() and other.exists()
    killed.write_bytes(b"left by an earlier version")
    open_dataset(shapes_config(path, num_train=4))  # the file exists: its leftovers still go
    assert not killed.exists() and building.exists()
