"""Experiment trackers: TensorBoard in <run>/tb, plus MLflow and Weights & Biases when `train.report_to` names
them (optional extras: pip install -e '.[trackers]'). Every stage logs through one `Tracker.log(metrics, step)`,
so a metric has the same name in every tracker and every stage (`metric_name`). Main process only.

Where they write is the user's tracker setup, as for any HF tool: MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME
(default experiment 'align'); WANDB_PROJECT (default 'align'), WANDB_MODE=offline, the W&B files under <run>/wandb.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml
from typing_extensions import Self

from align.errors import ConfigError

TrackerName = Literal["tensorboard", "mlflow", "wandb"]
TRACKERS_HELP = ("experiment trackers besides TensorBoard, which always writes <run>/tb: mlflow, wandb "
                 "(pip install -e '.[trackers]'), e.g. train.report_to=[mlflow]")
PACKAGES = {"mlflow": "mlflow", "wandb": "wandb"}
MAX_PARAM = 500  # MLflow refuses longer parameter values


def metric_name(key: str) -> str:
    """One name per metric everywhere, as transformers' TensorBoard callback writes Trainer logs: eval_loss ->
    eval/loss, loss -> train/loss; names that already have a group (PPO's reward/mean) stay as they are."""
    if "/" in key:
        return key
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_"):]
    return "train/" + key


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a log entry, under their tracker names."""
    return {metric_name(k): float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def check_trackers(names: list[str]) -> None:
    """A tracker whose package is missing is a ConfigError before anything runs."""
    for name in names:
        package = PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(f"train.report_to: {name} needs the {package} package: pip install -e '.[trackers]' "
                              f"(or pip install {package})")


def flat_params(config: Any, prefix: str = "") -> dict[str, str]:
    """A nested config as dotted key -> short string, for trackers' parameter tables."""
    if isinstance(config, dict):
        out: dict[str, str] = {}
        for k, v in config.items():
            out |= flat_params(v, f"{prefix}{k}.")
        return out
    return {prefix.rstrip("."): str(config)[:MAX_PARAM]}


class Backend(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self, failed: bool = False) -> None: ...


class TensorBoardBackend:
    def __init__(self, run_dir: Path, stage: str, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tb"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class MLflowBackend:
    """Through MlflowClient, not mlflow's global active run, so runs inside runs (online's rounds) do not clash."""

    def __init__(self, run_dir: Path, stage: str, config: dict[str, Any]) -> None:
        import os

        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient()
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "align")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run = self.client.create_run(experiment_id, run_name=f"{stage}-{run_dir.name}",
                                     tags={"align.stage": stage, "align.run_dir": str(run_dir.resolve())})
        self.run_id = run.info.run_id
        params = [Param(k, v) for k, v in flat_params(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class WandbBackend:
    def __init__(self, run_dir: Path, stage: str, config: dict[str, Any]) -> None:
        import os

        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "align"), name=f"{stage}-{run_dir.name}",
                              config=config, dir=str(run_dir), job_type=stage, reinit="create_new",
                              settings=wandb.Settings(silent=True))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


BACKENDS: dict[str, type] = {"tensorboard": TensorBoardBackend, "mlflow": MLflowBackend, "wandb": WandbBackend}


def run_identity(run_dir: Path) -> tuple[str, dict[str, Any]]:
    """(stage, resolved config) of a run folder, from the manifest and config.yaml `start_run` wrote."""
    manifest, config = run_dir / "manifest.json", run_dir / "config.yaml"
    stage = json.loads(manifest.read_text()).get("stage", "") if manifest.is_file() else ""
    return stage or run_dir.name, (yaml.safe_load(config.read_text()) or {}) if config.is_file() else {}


_OPEN: list[Tracker] = []  # this process's trackers not closed yet: a failed run closes them (close_open_trackers)


def close_open_trackers(failed: bool = True) -> None:
    """End every tracker run this process still has open, marked failed (where the tracker has the notion): what
    `runs.fail_active_runs` does for a run that ended in an error or a signal, so no MLflow / W&B run stays
    `RUNNING` after a crash inside a Trainer (which has no callback for that)."""
    for tracker in _OPEN.copy():
        tracker.close(failed)


class Tracker:
    """The trackers of one run. `Tracker.open(run_dir, report_to)`; then `log(metrics, step)`; `close()` at the
    end (or use it as a context manager). On processes other than the main one it logs nothing."""

    def __init__(self, backends: list[Backend]) -> None:
        self.backends = backends
        self.step = 0

    @classmethod
    def open(cls, run_dir: Path, report_to: list[str] | tuple[str, ...] = (), *, tensorboard: bool = True) -> Tracker:
        """TensorBoard (unless `tensorboard=False`: a Trainer's own callback writes it) and each of `report_to`."""
        from align.runs import process_rank

        if process_rank() != 0:
            return cls([])
        check_trackers(list(report_to))
        names = dict.fromkeys((["tensorboard"] if tensorboard else []) + [n for n in report_to if n != "tensorboard"])
        stage, config = run_identity(Path(run_dir))
        tracker = cls([BACKENDS[n](Path(run_dir), stage, config) for n in names])
        _OPEN.append(tracker)
        return tracker

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Finite numbers of `metrics` under their tracker names (`metric_name`) at `step` (default: one past
        the last)."""
        self.step = self.step + 1 if step is None else step
        values = numeric(metrics)
        if values:
            for backend in self.backends:
                backend.log(values, self.step)

    def close(self, failed: bool = False) -> None:
        """End every tracker run (`failed`: marked so, where the tracker has the notion: MLflow, W&B)."""
        for backend in self.backends:
            backend.close(failed)
        self.backends = []
        if self in _OPEN:
            _OPEN.remove(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(failed=exc_type is not None)  # an error or an interrupt inside the block


def trainer_callback(run_dir: Path, report_to: list[str]) -> Any:
    """A transformers TrainerCallback sending the Trainer's logs to `report_to` (TensorBoard stays with the
    Trainer's own TensorBoardCallback): opened by the first log (an evaluation before training counts), closed when
    training ends."""
    from transformers import TrainerCallback

    class TrackerCallback(TrainerCallback):
        def __init__(self) -> None:
            self.tracker: Tracker | None = None
            self.closed = False

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if self.tracker is None and not self.closed and state.is_world_process_zero:
                self.tracker = Tracker.open(run_dir, report_to, tensorboard=False)  # opened by the first log
            if self.tracker is not None and logs:
                self.tracker.log(logs, state.global_step)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.tracker is not None:
                self.tracker.close()
            self.tracker, self.closed = None, True

    return TrackerCallback()
