"""`align sweep`: an Optuna study over a stage, on a tiny model. A random sweep finishes and its best recipe
reproduces the best trial; a finished trial is never redone; a killed sweep resumes; two workers share one SQLite
study; a pruner stops a hopeless trial (a fake stage whose eval loss we choose)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from align.config import load_config, opt
from align.errors import ConfigError
from align.stages import STAGES, sft, sweep

REPO = Path(__file__).resolve().parent.parent


def sweep_args(model: Path, data: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    return [f"overrides.model={model}", f"overrides.data.train={data[0]}", f"overrides.data.validation={data[1]}",
            f"output_dir={out}", *extra]


def study_of(out: Path, name: str | None = None):
    import optuna

    return optuna.load_study(study_name=name or out.name, storage=f"sqlite:///{out.resolve()}/study.db")


def states(study) -> list[str]:
    return [t.state.name for t in study.get_trials(deepcopy=False)]


# ---------------------------------------------------------------- the search space

def test_space_accepts_dotted_and_nested_keys_and_refuses_bad_ranges():
    params = sweep.parse_space({"train.lr": {"log_uniform": [1e-5, 1e-3]},
                                "peft": {"r": {"choice": [8, 16]}, "dropout": {"uniform": [0.0, 0.1]}}})
    assert [(p.key, p.kind) for p in params] == [("train.lr", "log_uniform"), ("peft.r", "choice"),
                                                ("peft.dropout", "uniform")]
    for bad in ({"train.lr": {"log_uniform": [0.0, 1e-3]}}, {"train.lr": {"uniform": [1e-3, 1e-5]}},
                {"peft.r": {"int": [4.5, 8]}}, {"peft.r": {"choice": []}}, {"train.lr": {"uniform": [0, 1], "int": [0, 1]}},
                {"train.lr": 1e-3}):
        with pytest.raises(ConfigError):
            sweep.parse_space(bad)


def test_grid_values_cover_each_range():
    assert sweep.grid_values(sweep.Param("a", "log_uniform", 1e-4, 1e-2), 3) == pytest.approx([1e-4, 1e-3, 1e-2])
    assert sweep.grid_values(sweep.Param("a", "int", 2, 8), 3) == [2, 5, 8]
    assert sweep.grid_values(sweep.Param("a", "choice", choices=("x", "y")), 3) == ["x", "y"]


def test_space_is_checked_against_the_stage_before_anything_runs(tiny_model, toy_sft, tmp_path):
    for bad in ("space.train.lrr.uniform=[0.1,0.2]", "space.peft.r.int=[0,4]"):  # unknown key; r must be >= 1
        with pytest.raises(ConfigError, match="space"):
            sweep.run(load_config(sweep.Config, REPO / "stages/tiny/sweep.yaml",
                                  sweep_args(tiny_model, toy_sft, tmp_path / "s", bad)))
        assert not (tmp_path / "s").exists()


def test_dig_finds_dotted_metric_names():
    assert sweep.dig({"metrics": {"win_rate.dpo": 0.7, "a": {"b": 1}}}, "metrics.win_rate.dpo") == 0.7
    assert sweep.dig({"metrics": {"a": {"b": 1}}}, "metrics.a.b") == 1
    assert sweep.dig({"metrics": {}}, "metrics.x") is None


# ---------------------------------------------------------------- sweeps on the tiny model

def test_random_sweep_finishes_and_the_best_recipe_reproduces_it(tiny_model, toy_sft, tmp_path, one_thread):
    out = tmp_path / "sweep"
    sweep.run(load_config(sweep.Config, REPO / "stages/tiny/sweep.yaml", sweep_args(tiny_model, toy_sft, out)))
    study = study_of(out)
    assert states(study) == ["COMPLETE"] * 6
    values = {t.number: t.value for t in study.trials}
    lrs = [t.params["train.lr"] for t in study.trials]
    assert len(set(lrs)) == 6 and all(1e-4 <= lr <= 3e-2 for lr in lrs)
    for t in study.trials:  # each trial is an ordinary run folder holding the objective it reported
        man = json.loads((out / f"trial-{t.number}" / "manifest.json").read_text())
        assert man["status"] == "completed" and man["config"]["train"]["lr"] == pytest.approx(t.params["train.lr"])
        assert man["metrics"]["eval_loss_after"] == pytest.approx(t.value)
    best = min(values, key=values.get)
    top = json.loads((out / "manifest.json").read_text())
    assert top["status"] == "completed" and top["best"]["trial"] == best
    assert len((out / "trials.csv").read_text().splitlines()) == 7
    assert (out / "plots/objective.png").stat().st_size > 1000 and "<img" in (out / "report.html").read_text()
    # the best recipe is ready to run and gives the best trial's objective again
    cfg = load_config(sft.Config, out / "best.yaml", [f"output_dir={tmp_path / 'again'}"])
    assert cfg.train.lr == pytest.approx(study.best_params["train.lr"])
    again = json.loads((sft.run(cfg) / "manifest.json").read_text())
    assert again["metrics"]["eval_loss_after"] == pytest.approx(values[best], abs=1e-5)

    # a trial whose config equals a finished one's is not trained again: its result is reused
    study.enqueue_trial({"train.lr": study.trials[2].params["train.lr"]})
    sweep.run(load_config(sweep.Config, REPO / "stages/tiny/sweep.yaml",
                          sweep_args(tiny_model, toy_sft, out, "resume=true", "trials=7")))
    last = study_of(out).trials[-1]
    assert last.state.name == "COMPLETE" and last.user_attrs["reused_from"] == 2 and last.value == values[2]
    assert not (out / f"trial-{last.number}").exists()


def start_worker(out: Path, model: Path, data: tuple[Path, Path], *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "align.cli", "sweep", str(REPO / "stages/tiny/sweep.yaml"),
           *sweep_args(model, data, out, *extra)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(condition, timeout: float = 240.0) -> None:
    t0 = time.time()
    while not condition():
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def run_status(folder: Path) -> str | None:
    try:
        return json.loads((folder / "manifest.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def test_killed_sweep_resumes_and_ends_with_the_same_trial_count(tiny_model, toy_sft, tmp_path, one_thread):
    out = tmp_path / "sweep"
    proc = start_worker(out, tiny_model, toy_sft, "trials=3")
    try:
        wait_for(lambda: run_status(out / "trial-1") == "running" or proc.poll() is not None)
        proc.send_signal(signal.SIGKILL)  # mid-trial: trial 0 done, trial 1 started
    finally:
        proc.kill()
        proc.wait()
    assert run_status(out / "trial-0") == "completed" and run_status(out / "trial-1") == "running"
    time.sleep(2.5)  # past the heartbeat grace period (2 x heartbeat_s=1): the dead worker's trial is stale
    sweep.run(load_config(sweep.Config, REPO / "stages/tiny/sweep.yaml",
                          sweep_args(tiny_model, toy_sft, out, "trials=3", "resume=true")))
    study = study_of(out)
    assert states(study).count("COMPLETE") == 3
    assert states(study)[1] == "FAIL"  # the killed trial, retried with its values in its own folder
    retried = [t for t in study.trials if t.user_attrs.get("resumed_from") == 1]
    assert len(retried) == 1 and retried[0].state.name == "COMPLETE"
    assert retried[0].params == study.trials[1].params and retried[0].user_attrs["dir"] == "trial-1"
    assert run_status(out / "trial-1") == "completed"
    folders = sorted(p.name for p in out.glob("trial-*"))  # no folder for the retry: it continued trial-1
    assert len(folders) == 3 and {"trial-0", "trial-1"} <= set(folders)


def test_two_workers_share_one_sqlite_study(tiny_model, toy_sft, tmp_path):
    out = tmp_path / "sweep"
    first = start_worker(out, tiny_model, toy_sft, "resume=true")
    try:
        wait_for(lambda: (out / "trial-0").is_dir() or first.poll() is not None)
        second = start_worker(out, tiny_model, toy_sft, "resume=true")
        try:
            assert second.wait(timeout=400) == 0, second.stderr.read()[-2000:]
        finally:
            second.kill()
        assert first.wait(timeout=400) == 0, first.stderr.read()[-2000:]
    finally:
        first.kill()
    study = study_of(out)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert 6 <= len(done) <= 7  # both workers may start a last trial at the same moment
    assert len({t.user_attrs["worker"] for t in done}) == 2  # both took part
    assert len({t.user_attrs["dir"] for t in done}) == len(done)  # distinct trials, distinct run folders
    assert len({t.params["train.lr"] for t in done}) == len(done)  # each drew its own values
    assert all(run_status(out / t.user_attrs["dir"]) == "completed" for t in done)


# ---------------------------------------------------------------- pruning, on a fake stage


@dataclass(frozen=True)
class Config:
    """A fake stage: logs eval/loss = x + 1/(step+1) for `steps` steps, one every `step_s` seconds; a hopeless run
    (x >= 1) runs 20x longer, so that finishing before the pruner stops it means the pruner failed, whatever the load."""

    output_dir: str = opt("runs/fake", "where the run goes")
    overwrite: bool = opt(False, "replace")
    resume: bool = opt(False, "continue")
    seed: int = opt(0, "unused")
    x: float = opt(0.0, "how bad the run is")
    steps: int = opt(30, "steps")
    step_s: float = opt(0.05, "seconds per step")


def run(cfg: Config) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    from align.runs import start_run

    run_ = start_run("fake", cfg, resume=cfg.resume)
    writer = SummaryWriter(log_dir=str(run_.dir / "tb"))
    loss = 0.0
    for step in range(cfg.steps * (20 if cfg.x >= 1 else 1)):
        loss = cfg.x + 1 / (step + 1)
        writer.add_scalar("eval/loss", loss, step)
        writer.flush()
        (run_.dir / "steps_done.tmp").write_text(str(step + 1))  # atomic: the pruner's stop lands anywhere in here
        (run_.dir / "steps_done.tmp").replace(run_.dir / "steps_done")
        time.sleep(cfg.step_s)
    writer.close()
    run_.metrics["eval_loss"] = loss
    return run_.finish()


def test_median_pruner_stops_a_hopeless_trial(tmp_path, monkeypatch):
    import optuna

    monkeypatch.setitem(STAGES, "fake", __name__)
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    study = optuna.create_study(study_name="fake", storage=storage)
    for x in (0.0, 0.1, 10.0, 0.01):  # two good trials, a hopeless one, one better than their median
        study.enqueue_trial({"x": x})
    recipe = tmp_path / "fake-sweep.yaml"
    recipe.write_text("stage: fake\nspace: {x: {uniform: [0.0, 20.0]}}\nobjective: {metric: metrics.eval_loss}\n"
                      "pruning: {pruner: median, metric: eval/loss, startup_trials: 2, poll_s: 0.1}\n")
    sweep.run(load_config(sweep.Config, recipe, [f"output_dir={tmp_path / 'sweep'}", f"storage={storage}",
                                                 "study_name=fake", "trials=4", "sampler=random"]))
    trials = optuna.load_study(study_name="fake", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE"]
    hopeless = tmp_path / "sweep" / trials[2].user_attrs["dir"]
    assert int((hopeless / "steps_done").read_text()) < 600  # stopped early, not run to the end
    assert run_status(hopeless) == "failed" and "pruned" in json.loads((hopeless / "manifest.json").read_text())["error"]
    assert all(int((tmp_path / "sweep" / t.user_attrs["dir"] / "steps_done").read_text()) == 30
               for t in trials if t.state.name == "COMPLETE")


class RecordingTrial:
    """Stands in for an Optuna trial: records what is reported, never prunes."""

    def __init__(self) -> None:
        self.reported: dict[int, float] = {}

    def report(self, value: float, step: int) -> None:
        self.reported[step] = value

    def should_prune(self) -> bool:
        return False


def test_a_finished_trial_reports_the_points_logged_after_the_last_poll(tmp_path):
    """The pruner compares a trial with the finished ones at the same step: a finished trial whose last points
    were never read (logged after the watcher's last poll) would leave the median at those steps to whichever
    trials a poll happened to catch."""
    from torch.utils.tensorboard import SummaryWriter

    trial = RecordingTrial()
    writer = SummaryWriter(log_dir=str(tmp_path))
    with sweep.PruneWatcher(trial, tmp_path, "eval/loss", poll_s=3600.0):  # no poll happens while it runs
        for step in range(5):
            writer.add_scalar("eval/loss", 1.0 / (step + 1), step)
        writer.flush()
    writer.close()
    assert trial.reported == {step: pytest.approx(1.0 / (step + 1)) for step in range(5)}
