"""Stop signals in every stage that loops (issue 25, item 2): SIGTERM, Ctrl-C's SIGINT and SLURM's SIGUSR1 stop at
the next step or batch boundary with what was done saved, the run is marked `interrupted`, and resume=true finishes
with exactly what an uninterrupted run gives. The signal is sent by the process to itself from inside the loop (a
Trainer callback, the sampler, the judge function, a pipeline step), so it lands at a known step."""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import count_e, write_jsonl  # noqa: F401 - count_e is the GRPO/RLOO reward, imported by name
from test_resume import REPO, cli_args, trainable_weights

from align import runs, training
from align.config import load_config, opt
from align.runs import read_manifest, start_run


def signal_self(sig: signal.Signals) -> None:
    """Send `sig` to this process and wait until its handler has run (it runs between two bytecodes of the main
    thread, so the wait makes the step it lands in certain)."""
    os.kill(os.getpid(), sig)
    deadline = time.time() + 5
    while runs.stop_requested() is None:
        assert time.time() < deadline, f"{sig.name} was not handled"
        time.sleep(0.001)


def signal_at_trainer_step(monkeypatch: pytest.MonkeyPatch, step: int, sig: signal.Signals) -> None:
    """Every Trainer stage's run callback sends `sig` at the end of optimizer step `step`, before it polls."""
    real = training.run_callback

    def patched() -> Any:
        callback = real()
        polls = callback.on_step_end

        def on_step_end(args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if state.global_step == step:
                signal_self(sig)
            return polls(args, state, control, **kwargs)

        callback.on_step_end = on_step_end
        return callback

    monkeypatch.setattr(training, "run_callback", patched)


def stage_module(stage: str) -> Any:
    import importlib

    from align.stages import STAGES

    return importlib.import_module(STAGES[stage])


def stage_config(stage: str, args: list[str], out: Path, *extra: str) -> Any:
    return load_config(stage_module(stage).Config, REPO / "stages/tiny" / f"{stage}.yaml",
                       [*args, f"output_dir={out}", *extra])


def assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    """Equal to 1e-6: the resumed run replays the same batches and RNG states on one thread; what is left is the
    summation order of kernels, which the uninterrupted run shares."""
    a, b = trainable_weights(a_dir), trainable_weights(b_dir)
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name


def assert_interrupted(out: Path, sig: signal.Signals) -> None:
    manifest = read_manifest(out)
    assert manifest.status == "interrupted" and manifest["interrupted_by"] == sig.name
    assert not runs.lock_path(out).exists()


# ---------------------------------------------------------------- Trainer stages (the sft one is in test_faults.py)

@pytest.mark.parametrize(("stage", "sig"), [("reward", signal.SIGTERM), ("dpo", signal.SIGUSR1),
                                            ("grpo", signal.SIGINT), ("rloo", signal.SIGTERM)],
                         ids=lambda v: v if isinstance(v, str) else v.name)
@pytest.mark.slow  # a whole, an interrupted and a resumed run: `make test-faults`
@pytest.mark.faults
def test_trainer_stage_stops_at_the_signals_step_and_resumes_to_the_same_weights(
        stage: str, sig: signal.Signals, tiny_model: Path, tmp_path: Path, one_thread: None,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    run = stage_module(stage).run
    args = [*cli_args(stage, tmp_path, tiny_model), "train.max_steps=3", "train.save_steps=100"]
    run(stage_config(stage, args, tmp_path / "whole"))
    out = tmp_path / "cut"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with monkeypatch.context() as patch:
        signal_at_trainer_step(patch, 1, sig)
        with pytest.raises(runs.Interrupted):
            run(stage_config(stage, args, out))
    assert_interrupted(out, sig)
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-1"]
    assert not (out / "model").exists()
    err = capsys.readouterr().err
    assert "resume=true" in err
    assert ("scontrol requeue 4242" in err) == (sig == signal.SIGUSR1)  # SLURM's notice: how to requeue
    run(stage_config(stage, args, out, "resume=true"))
    assert read_manifest(out).status == "completed"
    state = json.loads((out / "checkpoints/checkpoint-3/trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert_same_weights(tmp_path / "whole", out)


# ---------------------------------------------------------------- generate and judge: batch boundaries

def test_generate_stops_after_the_chunk_in_flight_and_resumes_to_the_same_samples(
        tiny_model: Path, tmp_path: Path, one_thread: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from align.stages import generate

    args = [f"model={tiny_model}", "max_prompts=6", "chunk=2", "k=2", "sampling.max_new_tokens=6"]
    generate.run(stage_config("generate", args, tmp_path / "whole"))
    out = tmp_path / "cut"
    real = generate.sample_rows

    def signalled(*a: Any, **kw: Any) -> Any:  # the signal lands while the first chunk is being sampled
        signal_self(signal.SIGTERM)
        return real(*a, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(generate, "sample_rows", signalled)
        with pytest.raises(runs.Interrupted):
            generate.run(stage_config("generate", args, out))
    assert_interrupted(out, signal.SIGTERM)
    whole = (tmp_path / "whole/samples.jsonl").read_text().splitlines(keepends=True)
    assert (out / "samples.jsonl").read_text() == "".join(whole[:2])  # the chunk in flight was finished and kept
    generate.run(stage_config("generate", args, out, "resume=true"))
    assert read_manifest(out).status == "completed"
    assert (out / "samples.jsonl").read_text() == "".join(whole)


SIGNAL_AT: dict[str, int | None] = {"call": None}  # the judge function signals at this call (None: never)
CALLS: list[str] = []


def length_score(prompt: list, response: str) -> float:
    """A rules judge: shorter is better; sends SIGTERM to this process at call SIGNAL_AT["call"]."""
    CALLS.append(response)
    if len(CALLS) == SIGNAL_AT["call"]:
        signal_self(signal.SIGTERM)
    return -float(len(response))


def test_judge_stops_after_the_batch_in_flight_and_resumes_to_the_same_preferences(tmp_path: Path) -> None:
    from align.stages import judge

    samples = write_jsonl(tmp_path / "samples.jsonl", [
        {"id": f"p{i}", "prompt": [{"role": "user", "content": f"question {i}"}],
         "responses": [f"answer {i}", f"a longer answer {i}", f"the longest answer of all {i}"]} for i in range(4)])
    args = [f"samples={samples}", "judge=rules", "judge_options.function=test_faults_signals:length_score",
            "batch_size=4"]
    SIGNAL_AT["call"] = None
    judge.run(load_config(judge.Config, REPO / "stages/tiny/judge.yaml", [*args, f"output_dir={tmp_path / 'whole'}"]))
    out = tmp_path / "cut"
    CALLS.clear()
    SIGNAL_AT["call"] = 6  # in the second batch of 4 responses
    try:
        with pytest.raises(runs.Interrupted):
            judge.run(load_config(judge.Config, REPO / "stages/tiny/judge.yaml", [*args, f"output_dir={out}"]))
    finally:
        SIGNAL_AT["call"] = None
    assert_interrupted(out, signal.SIGTERM)
    assert len(CALLS) == 8  # the batch in flight was finished ...
    assert len((out / "judge_cache.jsonl").read_text().splitlines()) == 8  # ... and cached; nothing after it
    assert not (out / "preferences.jsonl").exists()
    CALLS.clear()
    judge.run(load_config(judge.Config, REPO / "stages/tiny/judge.yaml", [*args, f"output_dir={out}",
                                                                         "resume=true"]))
    assert len(CALLS) == 12 - 8  # only what the interrupted run had not judged
    assert read_manifest(out).status == "completed"
    for name in ("preferences.jsonl", "verdicts.jsonl", "failures.jsonl"):
        assert (out / name).read_text() == (tmp_path / "whole" / name).read_text(), name


# ---------------------------------------------------------------- the pipeline

@dataclass(frozen=True)
class LoopConfig:
    input: str = opt("", "an upstream run folder ('' for the first step)")
    steps: int = opt(3, "loop steps", ge=1)
    output_dir: str = opt("", "where")
    overwrite: bool = opt(False, "clear")
    resume: bool = opt(False, "continue")


SIGNAL_IN: dict[str, Any] = {}  # step name -> (loop step, signal) to send there, once


def loop_run(cfg: LoopConfig) -> Path:
    """A stage with a step loop like a Trainer's: each step appends a line to out.txt (its checkpoint) and polls
    for a stop signal; resume continues after the last line."""
    run_ = start_run("loop", cfg, resume=cfg.resume)
    out = run_.dir / "out.txt"
    upstream = (Path(cfg.input) / "out.txt").read_text() if cfg.input else ""
    done = out.read_text().count("\n") if cfg.resume and out.is_file() else 0
    name = run_.dir.name
    for step in runs.until_stopped(range(done, cfg.steps), lambda s: f" after step {s + 1}"):
        with open(out, "a") as f:
            f.write(f"{name}{step}:{len(upstream)}\n")
        if SIGNAL_IN.get(name, (None,))[0] == step:
            signal_self(SIGNAL_IN.pop(name)[1])
    run_.add_output("out", out)
    return run_.finish()


def loop_steps(root: Path) -> list[Any]:
    from align.stages.pipeline import PlannedStep

    inputs = {"a": "", "b": str(root / "a"), "c": str(root / "b")}
    return [PlannedStep(name=n, stage="loop", config_cls=LoopConfig, run=loop_run, recipe=None,
                        overrides=[f"input={inputs[n]}", f"output_dir={root / n}"], dir=root / n) for n in "abc"]


def run_pipeline(root: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """`pipeline.run` (lock, signal handlers, manifest) on the three loop steps; each step's status."""
    from align.stages import pipeline

    monkeypatch.setattr(pipeline, "plan", lambda cfg: loop_steps(root))
    monkeypatch.setattr(pipeline, "release_memory", lambda: None)  # no models to free (gc.collect costs seconds)
    pipeline.run(pipeline.Config(output_dir=str(root)))
    return {name: r["status"] for name, r in read_manifest(root)["steps"].items()}


def outputs(root: Path) -> dict[str, str]:
    return {n: (root / n / "out.txt").read_text() for n in "abc"}


class Escaped(Exception):
    """What the test's own SIGTERM handler raises: the signal reached a process that was not watching for it."""


@pytest.fixture
def sigterm_escapes() -> Any:
    """SIGTERM outside align's handlers raises Escaped (the default would kill the test process)."""

    def escaped(signum: int, frame: Any) -> None:
        raise Escaped(signal.Signals(signum).name)

    before = signal.signal(signal.SIGTERM, escaped)
    yield
    signal.signal(signal.SIGTERM, before)


def test_a_signal_during_a_pipeline_step_marks_both_and_the_same_command_continues(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sigterm_escapes: None) -> None:
    run_pipeline(tmp_path / "whole", monkeypatch)
    root = tmp_path / "cut"
    SIGNAL_IN["b"] = (1, signal.SIGTERM)
    with pytest.raises(runs.Interrupted):
        run_pipeline(root, monkeypatch)
    assert_interrupted(root / "b", signal.SIGTERM)
    assert (root / "b/out.txt").read_text().count("\n") == 2  # steps 0 and 1: the one in flight was finished
    assert_interrupted(root, signal.SIGTERM)
    manifest = read_manifest(root)
    assert manifest["steps"]["b"]["status"] == "interrupted" and "c" not in manifest["steps"]
    assert run_pipeline(root, monkeypatch) == {"a": "skipped", "b": "resumed", "c": "ran"}
    assert read_manifest(root).status == "completed" and outputs(root) == outputs(tmp_path / "whole")


def test_a_signal_between_pipeline_steps_marks_the_pipeline_interrupted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sigterm_escapes: None) -> None:
    from align.stages import pipeline

    run_pipeline(tmp_path / "whole", monkeypatch)
    root = tmp_path / "cut"
    real = pipeline.fingerprint

    def signalled(stage: str, config: dict[str, Any], cache: Any = None) -> str:  # a finished, b not started
        if config["output_dir"] == str(root / "b"):
            signal_self(signal.SIGTERM)
        return real(stage, config, cache)

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "fingerprint", signalled)
        with pytest.raises(runs.Interrupted):  # not Escaped: the handlers outlive step a's run
            run_pipeline(root, monkeypatch)
    assert_interrupted(root, signal.SIGTERM)
    assert read_manifest(root / "a").status == "completed" and not (root / "b").exists()
    assert run_pipeline(root, monkeypatch) == {"a": "skipped", "b": "ran", "c": "ran"}
    assert outputs(root) == outputs(tmp_path / "whole")


def test_handlers_stay_while_a_holder_runs_runs_and_go_back_after_the_last(tmp_path: Path) -> None:
    from test_trust import ToyConfig

    before = {sig: signal.getsignal(sig) for sig in runs.STOP_SIGNALS}
    assert signal.SIGUSR1 in runs.STOP_SIGNALS  # SLURM's preemption notice (sbatch --signal=USR1@90)
    with runs.stop_signals_held():
        for name in ("a", "b"):
            start_run("toy", ToyConfig(output_dir=str(tmp_path / name))).finish()
            assert all(signal.getsignal(sig) is runs._on_stop_signal for sig in runs.STOP_SIGNALS)
    assert {sig: signal.getsignal(sig) for sig in runs.STOP_SIGNALS} == before


# ---------------------------------------------------------------- online: a signal mid-round

@pytest.mark.slow  # a whole, an interrupted and a resumed run: `make test-faults`
@pytest.mark.faults
def test_online_stops_mid_round_and_resumes_to_the_same_policy(toy_policy: Path, tmp_path: Path, one_thread: None,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from align.stages import online

    def config(out: Path, *extra: str) -> Any:
        return load_config(online.Config, REPO / "stages/tiny/online.yaml", [
            f"policy={toy_policy}", f"output_dir={out}", "judge.options.function=test_online:says_target",
            "rounds=2", "eval.size=0", *extra])

    whole = online.run(config(tmp_path / "whole"))
    out = tmp_path / "cut"
    with monkeypatch.context() as patch:
        signal_at_trainer_step(patch, 1, signal.SIGTERM)  # round 1's DPO, after its first step
        with pytest.raises(runs.Interrupted):
            online.run(config(out))
    assert_interrupted(out, signal.SIGTERM)
    assert_interrupted(out / "round-1/dpo", signal.SIGTERM)
    assert not (out / "round-2").exists()
    online.run(config(out, "resume=true"))
    assert read_manifest(out).status == "completed"
    assert_same_weights(whole / "round-2/dpo", out / "round-2/dpo")

