"""Trackers: one metric name everywhere; MLflow (SQLite store, read back with its client) and W&B (offline run
folder) with the real libraries, each skipped with one line when its optional package is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align.errors import ConfigError
from align.tracking import Tracker, check_trackers, metric_name

REPO = Path(__file__).resolve().parent.parent


def fake_run(folder: Path, stage: str = "ppo") -> Path:
    """A run folder as start_run leaves it: config.yaml and a running manifest."""
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"stage": stage, "status": "running"}))
    (folder / "config.yaml").write_text("seed: 3\npeft:\n  method: lora\n  r: 8\n")
    return folder


def test_metric_names_are_the_same_in_every_stage():
    assert metric_name("loss") == "train/loss"  # a Trainer's training log
    assert metric_name("eval_loss") == "eval/loss"  # a Trainer's evaluation
    assert metric_name("reward/mean") == "reward/mean"  # PPO's own names already carry their group


def test_tensorboard_is_always_written_to_the_run_folder(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = fake_run(tmp_path / "run")
    with Tracker.open(run) as tracker:
        tracker.log({"reward/mean": 0.5, "loss": 2.0, "note": "text", "nan": float("nan")}, step=1)
        tracker.log({"reward/mean": 0.75}, step=2)
    events = EventAccumulator(str(run / "tb")).Reload()
    assert set(events.Tags()["scalars"]) == {"reward/mean", "train/loss"}
    assert [(e.step, e.value) for e in events.Scalars("reward/mean")] == [(1, 0.5), (2, 0.75)]


def test_a_failed_run_closes_the_trackers_a_trainer_left_open(tmp_path, monkeypatch):
    """A Trainer has no callback for a crash, so its tracker run stays open; the failure path that marks the run
    `failed` (runs.fail_active_runs, what the CLI and the pipeline call) ends it too, marked failed."""
    from align import runs, tracking

    ended: list[bool] = []

    class Backend:
        def __init__(self, run_dir, stage, config):
            pass

        def log(self, values, step):
            pass

        def close(self, failed):
            ended.append(failed)

    monkeypatch.setitem(tracking.BACKENDS, "tensorboard", Backend)
    left_open = Tracker.open(fake_run(tmp_path / "run"))  # as a TrainerCallback opens it, never closed
    with Tracker.open(fake_run(tmp_path / "other")):  # closed by its own block: not closed twice
        pass
    assert ended == [False]
    runs.fail_active_runs("RuntimeError: boom")
    assert ended == [False, True] and left_open.backends == [] and tracking._OPEN == []


def test_missing_tracker_package_is_a_config_error(monkeypatch):
    from align import tracking

    monkeypatch.setitem(tracking.PACKAGES, "mlflow", "no_such_package_for_align_tests")
    with pytest.raises(ConfigError, match="pip install"):
        check_trackers(["mlflow"])
    from align.config import load_config
    from align.stages import sft

    with pytest.raises(ConfigError, match="report_to"):
        load_config(sft.Config, None, ["train.report_to=[mlflow]"])
    with pytest.raises(ConfigError):
        load_config(sft.Config, None, ["train.report_to=[comet]"])


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="mlflow not installed (pip install -e '.[trackers]')")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "align-tests")
    return mlflow.MlflowClient(uri)


def only_run(client):
    experiment = client.get_experiment_by_name("align-tests")
    (run,) = client.search_runs([experiment.experiment_id])
    return run


def test_mlflow_tracker_logs_params_and_metrics(mlflow_store, tmp_path):
    run_dir = fake_run(tmp_path / "ppo")
    with Tracker.open(run_dir, ["mlflow"], tensorboard=False) as tracker:
        for step, value in ((1, 0.25), (2, 0.5), (3, 1.0)):
            tracker.log({"reward/mean": value, "kl/ref": value / 10}, step)
    run = only_run(mlflow_store)
    assert run.info.status == "FINISHED" and run.data.tags["align.stage"] == "ppo"
    assert run.data.params["peft.method"] == "lora" and run.data.params["seed"] == "3"
    history = mlflow_store.get_metric_history(run.info.run_id, "reward/mean")
    assert [(m.step, m.value) for m in history] == [(1, 0.25), (2, 0.5), (3, 1.0)]


def test_sft_reports_to_mlflow_with_the_trainer_names(mlflow_store, tiny_model, toy_sft, tmp_path, one_thread):
    from align.config import load_config
    from align.stages import sft

    train, valid = toy_sft
    cfg = load_config(sft.Config, REPO / "stages/tiny/sft.yaml",
                      [f"model={tiny_model}", f"output_dir={tmp_path / 'run'}", f"data.train={train}",
                       f"data.validation={valid}", "train.max_steps=2", "train.logging_steps=1",
                       "train.eval_steps=2", "train.progress=false", "train.report_to=[mlflow]"])
    sft.run(cfg)
    run = only_run(mlflow_store)
    assert run.data.params["peft.method"] == "lora" and run.data.tags["align.stage"] == "sft"
    losses = mlflow_store.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [1, 2]
    assert {m.step for m in mlflow_store.get_metric_history(run.info.run_id, "eval/loss")} >= {0, 2}


def wandb_history(path: Path) -> list[dict[str, float]]:
    """The history rows of an offline W&B run file: W&B's record log (a 7-byte ':W&B' header, then 32 KiB blocks of
    records, each with a 7-byte header: crc, length, type full/first/middle/last) holding protobuf Records."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending, rows = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, or the last piece of a record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_offline_run_folder_has_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb not installed (pip install -e '.[trackers]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "align-tests")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = fake_run(tmp_path / "ppo")
    with Tracker.open(run_dir, ["wandb"], tensorboard=False) as tracker:
        tracker.log({"reward/mean": 0.25}, 1)
        tracker.log({"reward/mean": 0.75, "loss": 1.5}, 2)
    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    rows = wandb_history(run_file)
    assert [(r["_step"], r["reward/mean"]) for r in rows] == [(1, 0.25), (2, 0.75)]
    assert rows[1]["train/loss"] == 1.5 and "train/loss" not in rows[0]


def no_preference(prompt: list, response: str) -> float:
    """A judge that scores every response the same: every pair ties, so no round trains."""
    return 0.0


def test_online_rounds_report_round_metrics_and_close_on_failure(mlflow_store, tiny_model, tmp_path, one_thread):
    from align.config import load_config
    from align.errors import AlignError
    from align.stages import online

    cfg = load_config(online.Config, REPO / "stages/tiny/online.yaml", [
        f"policy={tiny_model}", f"output_dir={tmp_path / 'online'}", "rounds=1", "prompts_per_round=2", "k=2",
        "sampling.max_new_tokens=2", "judge.options.function=test_tracking:no_preference",
        "train.report_to=[mlflow]"])
    with pytest.raises(AlignError, match="no round produced a preference pair"):
        online.run(cfg)
    run = only_run(mlflow_store)  # the failed run's tracker run was closed, and marked failed
    assert run.info.status == "FAILED" and run.data.tags["align.stage"] == "online"
    assert run.data.params["rounds"] == "1"
    history = mlflow_store.get_metric_history(run.info.run_id, "round/ai_pairs")
    assert [(m.step, m.value) for m in history] == [(1, 0.0)]
    assert [m.value for m in mlflow_store.get_metric_history(run.info.run_id, "round/trained")] == [0.0]
