"""sweep: hyperparameter search over any stage (or the pipeline) with Optuna, on a real study store.

Each trial is an ordinary run of `stage` in `<output_dir>/trial-<n>/`: the base recipe, then the fixed
`overrides`, then the trial's values of the `space` keys. Its objective is a number from that run's manifest
(`objective.metric`). The study lives in a database: SQLite `<output_dir>/study.db` by default, or any SQLAlchemy
URL (`storage=postgresql://...`) so workers on several machines share one study — start every worker with the same
recipe and resume=true. A killed sweep continues with resume=true: a trial whose worker stopped sending heartbeats
is failed and retried with the same values, in its own folder (the stage resumes from its last checkpoint).
Trials are fingerprinted like pipeline steps: a trial whose config and inputs equal a completed trial's takes that
trial's result instead of training again. With a pruner, the trial's TensorBoard scalar `pruning.metric` is read
while it runs and reported to Optuna; a trial the pruner gives up on is stopped and marked pruned.
Results: trials.csv, report.md / report.html (table, parameter importances, plots) and best.yaml, the best
trial's resolved config as a ready recipe.
"""

from __future__ import annotations

import _thread
import dataclasses
import importlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from align.config import load_config, opt, to_dict
from align.errors import AlignError, ConfigError
from align.runs import (
    Run,
    atomic_write_text,
    check_replaceable,
    check_resumable,
    fail_active_runs,
    fingerprint,
    now,
    read_manifest,
)

log = logging.getLogger(__name__)

KINDS = ("log_uniform", "uniform", "int", "choice")


@dataclass(frozen=True)
class Objective:
    metric: str = opt("metrics.eval_loss_after", "dotted path to a number in the trial run's manifest.json "
                                                 "(e.g. metrics.eval_loss_after, metrics.eval_accuracy)")
    direction: Literal["minimize", "maximize"] = opt("minimize", "minimize | maximize")
    run: str = opt("", "subfolder of the trial whose manifest holds the metric, and whose tb/ pruning reads "
                       "('' = the trial folder; e.g. eval for a pipeline sweep)")


@dataclass(frozen=True)
class Pruning:
    pruner: Literal["none", "median", "hyperband"] = opt("none", "none | median (stop a trial worse than the "
                                                                 "median of earlier trials at the same step) | "
                                                                 "hyperband")
    metric: str = opt("eval/loss", "TensorBoard tag the trial logs while it runs (in <trial>/<objective.run>/tb), "
                                   "in the objective's direction")
    startup_trials: int = opt(2, "median: trials that run to the end before any is pruned", ge=0)
    warmup_steps: int = opt(0, "median: a trial is not pruned before this step", ge=0)
    min_resource: int = opt(1, "hyperband: the step at which the first trials are compared", ge=1)
    reduction_factor: int = opt(3, "hyperband: keep 1 in this many trials at each rung", ge=2)
    poll_s: float = opt(2.0, "seconds between reads of the running trial's TensorBoard logs", gt=0.0)


@dataclass(frozen=True)
class Config:
    stage: str = opt("sft", "the stage each trial runs (any stage name, or pipeline)")
    recipe: str = opt("", "the trials' base recipe ('' = stages/<stage>.yaml)")
    overrides: dict[str, Any] = opt({}, "keys every trial sets on top of the recipe (nested), e.g. {train: "
                                        "{max_steps: 40}}")
    space: dict[str, Any] = opt({}, "dotted key -> {log_uniform: [lo, hi]} | {uniform: [lo, hi]} | {int: [lo, hi]} "
                                    "| {choice: [a, b, ...]}, e.g. train.lr: {log_uniform: [1.0e-5, 5.0e-3]}")
    objective: Objective = opt(Objective(), "what the sweep optimises")
    trials: int = opt(8, "finished (completed or pruned) trials the study ends with, all workers together", ge=1)
    sampler: Literal["tpe", "random", "grid"] = opt("tpe", "tpe (Bayesian) | random | grid (every combination)")
    startup_trials: int = opt(4, "tpe: random trials before TPE models the results", ge=1)
    grid_points: int = opt(3, "grid: values per numeric range (log-spaced for log_uniform)", ge=2)
    pruning: Pruning = opt(Pruning(), "stopping hopeless trials early")
    storage: str = opt("", "study database: '' = sqlite:///<output_dir>/study.db; any SQLAlchemy URL "
                           "(postgresql://user@host/db) lets workers on many machines share the study")
    study_name: str = opt("", "'' = the output_dir's folder name")
    heartbeat_s: int = opt(30, "trials send a heartbeat this often; one silent for 2x as long belongs to a dead "
                               "worker and is retried", ge=1)
    output_dir: str = opt("runs/sweep", "the sweep folder: study.db, trial-<n>/, report, best.yaml")
    overwrite: bool = opt(False, "start over: delete the sweep folder (an align sweep folder only) and the study")
    resume: bool = opt(False, "continue the study (after a kill, with more trials, or as one more worker)")
    seed: int = opt(42, "sampler seed (each trial draws from seed + its number) and every trial's seed", ge=0)

    RESUME_IGNORES = ("trials", "pruning.poll_s", "heartbeat_s")  # continuing with more trials is fine

    def __post_init__(self) -> None:
        from align.stages import STAGES

        if self.stage not in STAGES or self.stage == "sweep":
            raise ConfigError(f"stage={self.stage!r}: choose one of {', '.join(s for s in STAGES if s != 'sweep')}")
        params = parse_space(self.space)
        if not params:
            raise ConfigError("space: give at least one key to search, e.g. train.lr: {log_uniform: [1.0e-5, 5.0e-3]}")


@dataclass(frozen=True)
class Param:
    """One searched key: its kind and range (low, high) or choices."""

    key: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple[Any, ...] = ()


# ---------------------------------------------------------------- the search space

def plain(value: Any) -> Any:
    """Free-form recipe data (`overrides`, `space`) as YAML reads it: a command-line value inside such a mapping
    can arrive as its raw text (a str subclass), e.g. `space.train.lr.log_uniform=[1e-5,1e-3]`."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, str) and type(value) is not str:
        try:
            return yaml.safe_load(str(value))
        except yaml.YAMLError:
            return str(value)
    return value


def parse_space(space: dict[str, Any], prefix: str = "") -> list[Param]:
    """`space` (dotted keys, or nested groups as written by `space.train.lr.uniform=[...]`) -> Params."""
    out: list[Param] = []
    for key, spec in plain(space).items():
        name = f"{prefix}{key}"
        if not isinstance(spec, dict) or not spec:
            raise ConfigError(f"space.{name}: expected one of {{{', '.join(k + ': ...' for k in KINDS)}}}, "
                              f"got {spec!r}")
        kinds = [k for k in spec if k in KINDS]
        if not kinds:
            out += parse_space(spec, f"{name}.")
            continue
        if len(spec) != 1:
            raise ConfigError(f"space.{name}: give exactly one of {', '.join(KINDS)}, got {', '.join(spec)}")
        out.append(make_param(name, kinds[0], spec[kinds[0]]))
    return out


def make_param(key: str, kind: str, values: Any) -> Param:
    where = f"space.{key}.{kind}"
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: expected a list, got {values!r}")
    if kind == "choice":
        if any(isinstance(v, (dict, list)) for v in values) or len(set(map(repr, values))) != len(values):
            raise ConfigError(f"{where}: choices must be distinct plain values (numbers, strings, true/false)")
        return Param(key, kind, choices=tuple(values))
    try:
        low, high = (float(v) for v in values) if len(values) == 2 else (math.nan, math.nan)
    except (TypeError, ValueError):
        low = high = math.nan
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ConfigError(f"{where}: expected [low, high] with low < high, got {values!r}")
    if kind == "log_uniform" and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, got {values!r}")
    if kind == "int" and not (low.is_integer() and high.is_integer()):
        raise ConfigError(f"{where}: expected two integers, got {values!r}")
    return Param(key, kind, low, high)


def suggest(trial: Any, p: Param) -> Any:
    """The trial's value for `p` (Optuna records it under the dotted key)."""
    if p.kind == "choice":
        return trial.suggest_categorical(p.key, list(p.choices))
    if p.kind == "int":
        return trial.suggest_int(p.key, int(p.low), int(p.high))
    return trial.suggest_float(p.key, p.low, p.high, log=p.kind == "log_uniform")


def grid_values(p: Param, points: int) -> list[Any]:
    """The values a grid sweep tries for `p`: its choices, or `points` values spread over its range."""
    if p.kind == "choice":
        return list(p.choices)
    if p.kind == "int":
        return sorted({round(p.low + (p.high - p.low) * i / (points - 1)) for i in range(points)})
    if p.kind == "log_uniform":
        ratio = p.high / p.low
        return [float(p.low * ratio ** (i / (points - 1))) for i in range(points)]
    return [float(p.low + (p.high - p.low) * i / (points - 1)) for i in range(points)]


def extremes(params: list[Param]) -> list[dict[str, Any]]:
    """Value sets that touch every end of every range and every choice (checked against the stage's config)."""
    sets = []
    for p in params:
        for value in grid_values(p, 2) if p.kind != "choice" else p.choices:
            sets.append({p.key: value})
    return sets


# ---------------------------------------------------------------- trials as stage runs

@dataclass
class Plan:
    """What every trial runs: the stage's Config class and run function, its recipe and the fixed overrides."""

    stage: str
    config_cls: type
    run: Any
    recipe: Path | None
    fixed: list[str]
    params: list[Param]

    @property
    def keys(self) -> set[str]:
        return {f.name for f in dataclasses.fields(self.config_cls)}


def make_plan(cfg: Config) -> Plan:
    """The trial plan, with every value the space can take checked against the stage's config up front."""
    from align.cli import default_recipe
    from align.stages import STAGES
    from align.stages.pipeline import flatten

    module = importlib.import_module(STAGES[cfg.stage])
    recipe = Path(cfg.recipe) if cfg.recipe else default_recipe(cfg.stage)
    plan = Plan(cfg.stage, module.Config, module.run, recipe, flatten(plain(cfg.overrides)), parse_space(cfg.space))
    for values in [{}] + extremes(plan.params):
        try:
            trial_config(plan, values, Path(cfg.output_dir) / "trial-check", cfg.seed)
        except ConfigError as e:
            raise ConfigError(f"space/overrides ({', '.join(f'{k}={v}' for k, v in values.items()) or 'recipe'}): "
                              f"{e}") from None
    return plan


def trial_config(plan: Plan, values: dict[str, Any], folder: Path, seed: int, extra: tuple[str, ...] = ()) -> Any:
    """The stage config of one trial: recipe, then seed and folder, the fixed overrides, the trial's values."""
    base = [f"output_dir={folder}"] + ([f"seed={seed}"] if "seed" in plan.keys else [])
    values_ = [f"{k}={json.dumps(v)}" for k, v in values.items()]
    return load_config(plan.config_cls, plan.recipe, base + plan.fixed + values_ + list(extra))


def dig(data: Any, path: str) -> Any:
    """The value at a dotted `path` in nested dicts; keys may contain dots themselves (the longest match wins)."""
    if path == "":
        return data
    if not isinstance(data, dict):
        return None
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        key = ".".join(parts[:i])
        if key in data:
            return dig(data[key], ".".join(parts[i:]))
    return None


def objective_value(trial_dir: Path, objective: Objective) -> float:
    """The objective from a finished trial's manifest; a missing metric is a config error naming the ones there."""
    folder = trial_dir / objective.run if objective.run else trial_dir
    manifest = read_manifest(folder) or {}
    value = dig(manifest, objective.metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        have = ", ".join(f"metrics.{k}" for k in sorted(manifest.get("metrics") or {}))
        raise ConfigError(f"objective.metric={objective.metric}: {folder}/manifest.json has no number there; "
                          f"it has {have or 'no metrics'}")
    return float(value)


class TrialStopped(KeyboardInterrupt):
    """Raised in the main thread (where the stage trains) when the pruner gives up on the trial. A
    KeyboardInterrupt, so no stage's `except Exception` swallows it."""


class PruneWatcher:
    """Reads a running trial's TensorBoard scalar `tag` every `poll_s`, reports new points to Optuna, and stops
    the trial when the pruner says so: it schedules SIGUSR2's handler in the main thread (no signal is sent), which
    raises TrialStopped there. SIGINT/SIGTERM/SIGUSR1 stay the user's and the scheduler's (a run's own stop
    handling: SIGUSR1 is SLURM's preemption notice)."""

    def __init__(self, trial: Any, tb_dir: Path, tag: str, poll_s: float) -> None:
        self.trial, self.tb_dir, self.tag, self.poll_s = trial, tb_dir, tag, poll_s
        self.reported: dict[int, float] = {}
        self.pruned_at: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="sweep-prune-watcher")

    def __enter__(self) -> PruneWatcher:  # noqa: PYI034
        self._previous = signal.signal(signal.SIGUSR2, self._stop_trial)
        self._thread.start()
        return self

    def _stop_trial(self, signum: int, frame: Any) -> None:
        raise TrialStopped(f"pruned at step {self.pruned_at}")

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if exc_type is None and self.pruned_at is None:
            # the points logged after the last poll: a finished trial's curve is whole, so later trials are
            # compared with its values at every step (a median over whichever trials a poll happened to catch
            # at that step is not the pruner's median)
            self.report_new()
        try:
            if self.pruned_at is not None and exc_type is None:
                # the stage returned as the watcher stopped it: let the scheduled handler run here, inside the
                # trial, rather than later in the sweep's own code
                for _ in range(100):
                    time.sleep(0.001)
                raise TrialStopped(f"pruned at step {self.pruned_at}")
        finally:
            signal.signal(signal.SIGUSR2, self._previous)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            if self.check():
                _thread.interrupt_main(signal.SIGUSR2)
                return

    def report_new(self) -> bool:
        """Report the points logged since the last call to Optuna; True if there were any."""
        from align.report.plots import read_scalars

        new = [(s, v) for s, v in read_scalars(self.tb_dir).get(self.tag, []) if s not in self.reported]
        for step, value in new:
            self.trial.report(value, step)
            self.reported[step] = value
        return bool(new)

    def check(self) -> bool:
        """Report the new points; True when the trial should stop."""
        if self.report_new() and self.trial.should_prune():
            self.pruned_at = max(self.reported)
            return True
        return False


def find_previous(study: Any, fp: str, number: int) -> tuple[str, Any] | None:
    """('done', trial) for a completed trial with fingerprint `fp` whose run folder is complete;
    ('resume', trial) for a failed (killed) one whose folder can be continued; else None."""
    import optuna

    for t in study.get_trials(deepcopy=False):
        if t.number == number or t.user_attrs.get("fingerprint") != fp:
            continue
        if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs.get("dir"):
            return "done", t
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
        if (t.user_attrs.get("fingerprint") == fp and t.user_attrs.get("dir") and t.number != number
                and "error" not in t.user_attrs):  # killed, not failed by an error of its own
            return "resume", t
    return None


def make_objective(cfg: Config, plan: Plan, root: Path, cache: dict[Any, str]) -> Any:
    """The function Optuna calls per trial: sample, run the stage in trial-<n>/ (or reuse), return the metric."""
    import optuna

    from align.stages.pipeline import release_memory

    params = {p.key: p for p in plan.params}

    def objective(trial: Any) -> float:
        if cfg.sampler != "grid":  # a stream per trial: parallel workers do not draw the same values
            trial.study.sampler = make_sampler(cfg, plan.params, seed=cfg.seed + trial.number)
        values = {key: suggest(trial, p) for key, p in params.items()}
        folder = root / f"trial-{trial.number}"
        fp = fingerprint(plan.stage, to_dict(trial_config(plan, values, folder, cfg.seed)), cache)
        trial.set_user_attr("fingerprint", fp)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        previous = find_previous(trial.study, fp, trial.number)
        extra: tuple[str, ...] = ()
        if previous and previous[0] == "done" and (read_manifest(root / previous[1].user_attrs["dir"]) or {}).get(
                "status") == "completed":
            trial.set_user_attr("dir", previous[1].user_attrs["dir"])
            trial.set_user_attr("reused_from", previous[1].number)
            log.info(f"sweep: trial {trial.number}: same config as trial {previous[1].number}; its result is reused")
            return objective_value(root / previous[1].user_attrs["dir"], cfg.objective)
        if previous and (root / previous[1].user_attrs["dir"]).is_dir():
            folder = root / previous[1].user_attrs["dir"]  # a killed trial: continue its run in its folder
            extra = ("resume=true",) if "resume" in plan.keys else ("overwrite=true",) if "overwrite" in plan.keys else ()
            trial.set_user_attr("resumed_from", previous[1].number)
        trial.set_user_attr("dir", folder.name)
        config = trial_config(plan, values, folder, cfg.seed, extra)
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        log.info(f"sweep: trial {trial.number} -> {folder} ({shown})")
        t0 = time.perf_counter()
        watcher = (PruneWatcher(trial, (folder / cfg.objective.run if cfg.objective.run else folder) / "tb",
                                cfg.pruning.metric, cfg.pruning.poll_s) if cfg.pruning.pruner != "none" else None)
        try:
            try:
                if watcher is None:
                    plan.run(config)
                else:
                    with watcher:
                        plan.run(config)
            except TrialStopped:
                fail_active_runs(f"pruned by the sweep at step {watcher.pruned_at if watcher else '?'}")
                raise optuna.TrialPruned(f"pruned at step {watcher.pruned_at if watcher else '?'}") from None
            except KeyboardInterrupt:  # Ctrl-C: resume=true retries the trial in its folder
                trial.study.enqueue_trial(values, user_attrs=dict(trial.user_attrs))
                raise
            except AlignError as e:
                fail_active_runs(str(e))
                trial.set_user_attr("error", str(e)[:500])
                raise
        finally:
            trial.set_user_attr("seconds", time.perf_counter() - t0)
            release_memory()
        try:
            return objective_value(folder, cfg.objective)
        except ConfigError as e:  # the metric is not there: every trial would fail the same way
            fatal.append(e)
            trial.study.stop()
            raise

    fatal: list[ConfigError] = []
    objective.fatal = fatal  # type: ignore[attr-defined]
    return objective


# ---------------------------------------------------------------- the study

def make_sampler(cfg: Config, params: list[Param], seed: int) -> Any:
    import optuna

    if cfg.sampler == "grid":
        return optuna.samplers.GridSampler({p.key: grid_values(p, cfg.grid_points) for p in params}, seed=seed)
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.startup_trials)


def make_pruner(p: Pruning) -> Any:
    import optuna

    if p.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_steps)
    if p.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource, reduction_factor=p.reduction_factor)
    return optuna.pruners.NopPruner()


def storage_url(cfg: Config) -> str:
    return cfg.storage or f"sqlite:///{(Path(cfg.output_dir) / 'study.db').resolve()}"


def open_study(cfg: Config, plan: Plan) -> Any:
    """Create or load the study in its database, with heartbeats so a dead worker's trial is retried."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    url = storage_url(cfg)
    # SQLite: wait for another worker's write instead of failing with "database is locked"
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeats are marked experimental in Optuna
        storage = RDBStorage(url, engine_kwargs=engine, heartbeat_interval=cfg.heartbeat_s,
                             grace_period=2 * cfg.heartbeat_s,
                             heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))
    name = cfg.study_name or Path(cfg.output_dir).name
    if cfg.overwrite and cfg.storage and name in optuna.study.get_all_study_names(storage):
        optuna.delete_study(study_name=name, storage=storage)
    return optuna.create_study(storage=storage, study_name=name, load_if_exists=True,
                               direction=cfg.objective.direction, sampler=make_sampler(cfg, plan.params, cfg.seed),
                               pruner=make_pruner(cfg.pruning))


def finished(study: Any) -> int:
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def prepare_folder(cfg: Config, config: dict[str, Any]) -> None:
    """Like a stage's run folder: a new or empty folder, overwrite=true (an align sweep folder only), or
    resume=true with the same settings."""
    root = Path(cfg.output_dir)
    if root.exists() and not root.is_dir():
        raise AlignError(f"output_dir {root} exists and is not a folder; choose another output_dir")
    if root.is_dir() and any(root.iterdir()):
        if cfg.resume:
            check_resumable(root, "sweep", config, Config.RESUME_IGNORES)
        elif cfg.overwrite:
            check_replaceable(root, "sweep", config)
            shutil.rmtree(root)
        else:
            raise AlignError(f"output_dir {root} already has a sweep; resume=true continues its study (or joins "
                             f"it as another worker), overwrite=true starts over")
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "config.yaml", yaml.safe_dump(config, sort_keys=False))


def run(cfg: Config) -> Path:
    import optuna

    from align.report.sweep import write_results

    plan = make_plan(cfg)  # every value of the space checked against the stage's config before anything runs
    root = Path(cfg.output_dir)
    config = plain(to_dict(cfg))
    prepare_folder(cfg, config)
    previous = read_manifest(root) or {}
    top = Run(dir=root, stage="sweep", config=config, started_at=previous.get("started_at") or now())
    top.write_manifest("running")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = open_study(cfg, plan)
        remaining = cfg.trials - finished(study)
        if remaining > 0:
            log.info(f"sweep: {finished(study)} of {cfg.trials} trials finished; running up to {remaining} more "
                     f"({cfg.sampler} sampler, study {study.study_name} in {storage_url(cfg)})")
            stop = optuna.study.MaxTrialsCallback(cfg.trials, states=(optuna.trial.TrialState.COMPLETE,
                                                                       optuna.trial.TrialState.PRUNED))
            objective = make_objective(cfg, plan, root, {})
            study.optimize(objective, n_trials=remaining, catch=(AlignError,), callbacks=[stop],
                           gc_after_trial=True)
            if objective.fatal:
                raise objective.fatal[0]
        summary = write_results(study, cfg, root, plan)
    except BaseException as e:
        top.extra["error"] = f"{type(e).__name__}: {e}"[:500]
        top.write_manifest("failed")
        raise
    top.metrics.update(summary.metrics)
    top.extra["best"] = summary.best
    for name, path in summary.outputs.items():
        top.add_output(name, path)
    if not cfg.storage:
        top.add_output("study", root / "study.db")
    top.write_manifest("completed")
    print(summary.text, flush=True)
    return root
