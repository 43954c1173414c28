"""wandb and MLflow as loggers: config, epoch scalars and results, one tracker run per run directory."""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import time
import uuid
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mtlrun.errors import MtlrunError
from mtlrun.scalars import Logger, epoch_scalars, flat_config

log = logging.getLogger("mtlrun")

IDS_FILE = "trackers.json"  # in the run directory: each tracker's run id, so a resumed run continues it
WANDB_MODES = ("online", "offline", "disabled")
MLFLOW_BATCH = 100  # params per log_batch call (MLflow's limit); metrics allow 1000


def saved_ids(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / IDS_FILE).read_text())
    except (OSError, ValueError):  # none yet, or unreadable: a new tracker run
        return {}


def save_id(run_dir: Path, name: str, ids: dict) -> None:
    everything = {**saved_ids(run_dir), name: ids}
    tmp = run_dir / f".{IDS_FILE}.tmp"
    tmp.write_text(json.dumps(everything, indent=1) + "\n")
    tmp.replace(run_dir / IDS_FILE)


def _import(name: str):
    try:
        return __import__(name)
    except ImportError:
        raise MtlrunError(
            f"logger={name} needs the {name} package: pip install 'mtlrun[trackers]' (or pip install {name}), "
            f"or choose another logger"
        ) from None


class Wandb:
    """Weights & Biases: config as the run's (nested) config, scalars against their own x axis (`epoch` or
    `iteration`, declared with define_metric), results in the run's summary under `results/`. Offline by default:
    `wandb sync <dir>/wandb/offline-run-*` uploads later."""

    def __init__(self, settings: DictConfig, cfg: DictConfig, run_dir: Path, resumed: bool) -> None:
        mode = settings.mode or os.environ.get("WANDB_MODE") or "offline"
        if mode not in WANDB_MODES:
            given = f"logger.wandb.mode={mode}" if settings.mode else f"WANDB_MODE={mode} (environment)"
            raise MtlrunError(f"{given} is not a wandb mode; valid: {', '.join(WANDB_MODES)}")
        wandb = _import("wandb")
        saved = saved_ids(run_dir).get("wandb", {}) if resumed else {}
        run_id = saved.get("id") or uuid.uuid4().hex[:12]
        directory = Path(settings.dir) if settings.dir else run_dir
        directory.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}
        self.run = wandb.init(
            project=settings.project, entity=settings.entity, group=settings.group, tags=list(settings.tags),
            name=run_dir.name, id=run_id, resume="allow", dir=str(directory), mode=mode, config=config,
            settings=wandb.Settings(console="off"),  # the run directory keeps the log; no second copy of stdout
        )
        save_id(run_dir, "wandb", {"id": run_id})
        self.axes: set[str] = set()

    def log_epoch(self, epoch: int, train_row: dict, metric_rows: list[dict], diagnostic_rows: list[dict]) -> None:
        by_step: dict[tuple[str, int], dict[str, float]] = {}
        for name, value, axis, step in epoch_scalars(epoch, train_row, metric_rows, diagnostic_rows):
            if name not in self.axes:
                self.run.define_metric(name, step_metric=axis)
                self.axes.add(name)
            by_step.setdefault((axis, step), {})[name] = value
        # What happened within the epoch (at its iterations) first, then the epoch's own row
        for (axis, step), values in sorted(by_step.items(), key=lambda item: (item[0][0] == "epoch", item[0][1])):
            self.run.log({axis: step, **values})

    def log_results(self, results: dict) -> None:
        self.run.summary.update({f"results/{key}": value for key, value in results.items()})

    def close(self) -> None:
        self.run.finish()


class Mlflow:
    """MLflow: config as params (flattened keys), scalars as metrics at their step, numeric results as
    `results/<column>` metrics and the others as tags. The run ends FINISHED after its results, KILLED when
    the invocation stops before (stop_after_epochs, a signal, an error); resume=true sets it RUNNING again."""

    def __init__(self, settings: DictConfig, cfg: DictConfig, run_dir: Path, resumed: bool) -> None:
        _import("mlflow")
        from mlflow import MlflowClient
        from mlflow.entities import Param

        uri = settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # MLflow 3 refuses its file store unless told: it is the store that needs no server
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (Path(cfg.output_root).resolve() / "mlruns").as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        saved = saved_ids(run_dir).get("mlflow", {}) if resumed else {}
        if saved.get("tracking_uri") == uri and self._exists(saved["run_id"]):
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = self._experiment(settings.experiment)
            tags = {"mtlrun.run_dir": str(run_dir.resolve())}
            self.run_id = self.client.create_run(experiment, run_name=run_dir.name, tags=tags).info.run_id
            save_id(run_dir, "mlflow", {"run_id": self.run_id, "tracking_uri": uri})
            params = [Param(_key(k), str(v)) for k, v in flat_config(cfg).items()]
            for i in range(0, len(params), MLFLOW_BATCH):
                self.client.log_batch(self.run_id, params=params[i:i + MLFLOW_BATCH])
        self.status = "KILLED"
        atexit.register(self._at_exit)  # an invocation that ends by an exception still ends its tracker run

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:  # deleted from the store since (or only marked deleted): the resumed run starts a new tracker run
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException:
            return False

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # another job of the sweep created it first
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _metrics(self, values: list[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_key(name), value, now, step) for name, value, step in values]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def log_epoch(self, epoch: int, train_row: dict, metric_rows: list[dict], diagnostic_rows: list[dict]) -> None:
        scalars = epoch_scalars(epoch, train_row, metric_rows, diagnostic_rows)
        self._metrics([(name, value, step) for name, value, _, step in scalars])

    def log_results(self, results: dict) -> None:
        numbers = {k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._metrics([(f"results/{k}", float(v), int(results.get("epochs", 0) or 0)) for k, v in numbers.items()])
        for key, value in results.items():
            if key not in numbers:
                self.client.set_tag(self.run_id, _key(f"results.{key}"), str(value))
        self.status = "FINISHED"

    def close(self) -> None:
        atexit.unregister(self._at_exit)
        self.client.set_terminated(self.run_id, status=self.status)

    def _at_exit(self) -> None:
        try:
            self.close()
        except Exception:  # the process is ending anyway; its CSVs are written
            pass


def _key(name: str) -> str:
    """A name MLflow takes: letters, digits and `_-. :/` (a metric such as Δm% becomes Δm_)."""
    return re.sub(r"[^/\w.\- :]", "_", name)


TRACKERS = {"wandb": Wandb, "mlflow": Mlflow}


def start(name: str, settings: DictConfig, cfg: DictConfig, run_dir: Path, resumed: bool) -> Logger | None:
    """The tracker, or None with one warning when it cannot start (server down): the run goes on without it.
    A setting that is wrong, or a package that is missing, is an error to fix first."""
    try:
        return TRACKERS[name](settings, cfg, run_dir, resumed)
    except MtlrunError:
        raise
    except Exception as e:  # a mirror that cannot start must not cost the run
        log.warning("logger=%s could not start (%s: %s); the run goes on without it", name, type(e).__name__,
                    str(e).splitlines()[0][:200] if str(e) else "")
        return None
