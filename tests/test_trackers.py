"""logger=wandb and logger=mlflow, read back without network: offline wandb's run file, MLflow's file store."""

import json
import logging
import struct
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mtlrun import CONF_DIR
from mtlrun.data import build_shapes
from mtlrun.errors import MtlrunError
from mtlrun.loggers import Loggers, build_logger, logger_names
from mtlrun.scalars import flat_config
from mtlrun.run.overrides import check_group_choices, check_top_level_keys
from tests.test_run_cli import TINY, mtlrun

pytest.importorskip("wandb")
pytest.importorskip("mlflow")
from mlflow import MlflowClient
from wandb.proto import wandb_internal_pb2

TRAIN = {"epoch": 1, "lr": 0.001, "loss/depth": 0.5, "seconds": 2.0}
METRICS = [{"epoch": 1, "split": "val", "task": "depth", "metric": "abs_err", "value": 0.25}]
MID_EPOCH = [{"epoch": 1, "iteration": 3, "split": "val", "task": "depth", "metric": "abs_err", "value": 0.75}]
DIAGNOSTICS = [{"epoch": 1, "iteration": 2, "grad_norm/depth": 4.0}]
RESULTS = {"strategy": "alternating", "epochs": 2, "val/depth/abs_err": 0.125, "iterations": 8, "Δm%": -1.5}


def _config(*overrides: str, root: Path | None = None):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    if root is not None:
        cfg.output_root = str(root / "outputs")
    return cfg


def _mlflow_run(root: Path, run_id: str):
    client = MlflowClient(tracking_uri=(root / "outputs/mlruns").as_uri())
    return client, client.get_run(run_id)


def _wandb_records(run_dir: Path) -> list:
    """Every record of each offline run file, once wandb's service has written its exit record."""
    for _ in range(100):
        records = _read_wandb_records(run_dir)
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        time.sleep(0.1)  # finish() returns before the service process has flushed the file
    return records


def _read_wandb_records(run_dir: Path) -> list:
    """wandb's own protobuf messages in its LevelDB-style log (7-byte file header; 32 KiB blocks of chunks,
    each chunk: crc32c, length, type 1 full/2 first/3 middle/4 last)."""
    records = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, payload = path.read_bytes(), 7, b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if kind == 0:
                break
            payload, pos = payload + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):
                records.append(wandb_internal_pb2.Record.FromString(payload))
                payload = b""
    return records


def _wandb_history(records: list) -> list[dict]:
    return [{"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def test_a_list_of_loggers_composes_and_each_keeps_its_settings():
    cfg = _config("logger=[csv,mlflow,wandb]", "logger.mlflow.experiment=mine")
    assert logger_names(cfg) == ["csv", "mlflow", "wandb"]
    assert cfg.logger.mlflow.experiment == "mine" and cfg.logger.wandb.project == "mtlrun"
    assert logger_names(_config()) == ["csv"] and logger_names(_config("logger=[]")) == []
    flat = flat_config(_config("trainer.epochs=3"))
    assert flat["trainer.epochs"] == 3 and flat["strategy.name"] == "alternating"


def test_the_cli_takes_a_list_of_loggers_and_names_a_wrong_one():
    check_group_choices(["logger=[csv,mlflow]", "-m", "logger=[csv,wandb],tensorboard"])
    with pytest.raises(MtlrunError, match="logger=mlfow is not an option of 'logger'; valid: csv, mlflow, "):
        check_group_choices(["logger=[csv,mlfow]"])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["logger=[csv,mlflow]"], return_hydra_config=True)
    assert "logger" not in cfg.hydra.runtime.choices  # Hydra records no choice for a list
    check_top_level_keys(cfg, cfg.hydra.runtime.choices)


def test_mlflow_mirrors_config_scalars_results_and_resumes_the_same_run(tmp_path):
    run_dir = tmp_path / "runs/2026-12-07_mine"
    run_dir.mkdir(parents=True)
    cfg = _config("logger=mlflow", "trainer.epochs=2", root=tmp_path)
    logger = build_logger(cfg, run_dir)
    logger.log_epoch(1, TRAIN, METRICS + MID_EPOCH, DIAGNOSTICS)
    logger.close()  # stopped after epoch 1: the tracker run is KILLED until resumed
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]["run_id"]
    client, run = _mlflow_run(tmp_path, run_id)
    assert run.info.run_name == run_dir.name and run.info.status == "KILLED"
    assert run.data.params["trainer.epochs"] == "2" and run.data.params["logger.mlflow.experiment"] == "mtlrun"

    logger = build_logger(cfg, run_dir, resumed=True)
    logger.log_epoch(2, {**TRAIN, "epoch": 2, "loss/depth": 0.25}, [], [])
    logger.log_results(RESULTS)
    logger.close()
    _, run = _mlflow_run(tmp_path, run_id)
    assert run.info.status == "FINISHED" and len(client.search_runs([run.info.experiment_id])) == 1
    history = {(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss/depth")}
    assert history == {(1, 0.5), (2, 0.25)}
    assert {(m.step, m.value) for m in client.get_metric_history(run_id, "val/depth/abs_err")} == {(1, 0.25), (3, 0.75)}
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "diagnostics/grad_norm/depth")] == [(2, 4.0)]
    assert run.data.metrics["results/val/depth/abs_err"] == 0.125 and run.data.metrics["results/Δm_"] == -1.5
    assert run.data.tags["results.strategy"] == "alternating"


def test_a_resumed_run_whose_mlflow_run_is_gone_starts_a_new_one(tmp_path):
    run_dir = tmp_path / "runs/r"
    run_dir.mkdir(parents=True)
    cfg = _config("logger=mlflow", root=tmp_path)
    first = build_logger(cfg, run_dir).loggers["mlflow"]
    first.close()
    first.client.delete_run(first.run_id)
    second = build_logger(cfg, run_dir, resumed=True).loggers["mlflow"]
    second.close()
    assert second.run_id != first.run_id
    assert json.loads((run_dir / "trackers.json").read_text())["mlflow"]["run_id"] == second.run_id


def test_wandb_offline_mirrors_config_scalars_results_under_the_run_name(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "runs/2026-12-07_mine"
    run_dir.mkdir(parents=True)
    logger = build_logger(_config("logger=wandb", "trainer.epochs=2", root=tmp_path), run_dir)
    logger.log_epoch(1, TRAIN, METRICS, DIAGNOSTICS)
    logger.log_results(RESULTS)
    logger.close()
    run_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]["id"]
    records = _wandb_records(run_dir)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.display_name == run_dir.name and run.run_id == run_id and run.project == "mtlrun"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["trainer"]["epochs"] == 2 and config["strategy"]["name"] == "alternating"
    history = _wandb_history(records)
    assert {"epoch": 1, "train/loss/depth": 0.5, "train/lr": 0.001, "train/seconds": 2.0,
            "val/depth/abs_err": 0.25}.items() <= next(h for h in history if "epoch" in h).items()
    assert {"iteration": 2, "diagnostics/grad_norm/depth": 4.0}.items() <= history[0].items()
    axes = {r.metric.name: r.metric.step_metric for r in records if r.WhichOneof("record_type") == "metric"}
    assert axes["train/loss/depth"] == "epoch" and axes["diagnostics/grad_norm/depth"] == "iteration"
    summary = {"/".join(i.nested_key) or i.key: json.loads(i.value_json)
               for r in records if r.WhichOneof("record_type") == "summary" for i in r.summary.update}
    assert summary["results/val/depth/abs_err"] == 0.125 and summary["results/strategy"] == "alternating"


class Raising:
    """A logger whose store fails (disk full) from its second call on."""

    def __init__(self) -> None:
        self.calls = 0

    def log_epoch(self, *rows) -> None:
        self.calls += 1
        if self.calls > 1:
            raise OSError(28, "No space left on device")

    def log_results(self, results: dict) -> None:
        raise AssertionError("a dropped logger is not called again")

    def close(self) -> None:
        pass


def test_a_failing_logger_warns_once_and_is_dropped_while_the_others_go_on(tmp_path, caplog):
    run_dir = tmp_path / "runs/r"
    run_dir.mkdir(parents=True)
    logger = build_logger(_config("logger=mlflow", root=tmp_path), run_dir)
    mlflow, failing = logger.loggers["mlflow"], Raising()
    logger = Loggers({"wandb": failing, "mlflow": mlflow})
    with caplog.at_level(logging.WARNING, logger="mtlrun"):
        for epoch in (1, 2, 3):
            logger.log_epoch(epoch, {**TRAIN, "epoch": epoch}, [], [])
        logger.log_results(RESULTS)
        logger.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "logger=wandb failed (OSError" in warnings[0] and "dropped" in warnings[0]
    assert failing.calls == 2 and list(logger.loggers) == ["mlflow"]
    client, _ = _mlflow_run(tmp_path, mlflow.run_id)
    assert [m.step for m in client.get_metric_history(mlflow.run_id, "train/lr")] == [1, 2, 3]


def test_a_tracker_store_that_fails_mid_run_is_dropped(tmp_path, caplog):
    run_dir = tmp_path / "runs/r"
    run_dir.mkdir(parents=True)
    logger = build_logger(_config("logger=[csv,mlflow]", root=tmp_path), run_dir)

    def server_down(*args, **kwargs):
        raise ConnectionError("tracking server unreachable")

    logger.loggers["mlflow"].client.log_batch = server_down
    with caplog.at_level(logging.WARNING, logger="mtlrun"):
        logger.log_epoch(1, TRAIN, METRICS, [])
        logger.log_epoch(2, TRAIN, METRICS, [])
    assert [r.getMessage()[:28] for r in caplog.records] == ["logger=mlflow failed (Connec"]
    assert logger.loggers == {}


def test_a_missing_package_is_one_line_naming_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(MtlrunError, match=r"logger=wandb needs the wandb package: pip install 'mtlrun\[trackers\]'"):
        build_logger(_config("logger=wandb", root=tmp_path), tmp_path)
    with pytest.raises(MtlrunError, match="logger.wandb.mode=cloud is not a wandb mode"):
        build_logger(_config("logger=wandb", "logger.wandb.mode=cloud", root=tmp_path), tmp_path)
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    with pytest.raises(MtlrunError, match=r"WANDB_MODE=dryrun \(environment\) is not a wandb mode"):
        build_logger(_config("logger=wandb", root=tmp_path), tmp_path)


@pytest.mark.slow
def test_cli_list_of_loggers_mirrors_a_stopped_and_resumed_run_into_one_tracker_run(tmp_path):
    build_shapes(tmp_path / "data/shapes-64px-64-16-32-seed0.h5", 64, 64, 16, 32, generator_seed=0)
    args = [*TINY, "trainer.epochs=2", "logger=[csv,mlflow,wandb]", "hydra.run.dir=runs/r"]
    first = mtlrun(*args, "trainer.stop_after_epochs=1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = mtlrun(*args, "resume=true", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "WARNING" not in first.stderr + second.stderr
    run_dir = tmp_path / "runs/r"
    ids = json.loads((run_dir / "trackers.json").read_text())
    client, run = _mlflow_run(tmp_path, ids["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "r"
    results = pd.read_csv(run_dir / "results.csv").iloc[0]
    assert run.data.metrics["results/test/depth/abs_err"] == pytest.approx(results["test/depth/abs_err"])
    train_log = pd.read_csv(run_dir / "train_log.csv")
    history = client.get_metric_history(run.info.run_id, "train/loss/depth")
    assert [(m.step, m.value) for m in history] == list(zip(train_log.epoch, train_log["loss/depth"]))
    parts = sorted(run_dir.glob("wandb/offline-run-*"))
    assert len(parts) == 2 and all(p.name.endswith(ids["wandb"]["id"]) for p in parts)  # one id, two invocations
    epochs = [h["epoch"] for h in _wandb_history(_wandb_records(run_dir)) if "epoch" in h]
    assert epochs == [1, 2]
    assert OmegaConf.load(run_dir / ".hydra/config.yaml").logger.keys() == {"csv", "mlflow", "wandb"}
