"""The pipeline: fingerprints and skipping on fake stages (fast), recipes and wiring against every real stage's
Config (fast), and the whole pipeline on tiny models (slow)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import write_jsonl

from align import processes
from align.config import load_config, opt
from align.runs import fingerprint, read_manifest, start_run
from align.stages import pipeline, preferences
from align.stages.pipeline import PlannedStep, execute

CALLS: list[tuple[str, bool, bool]] = []
INTERRUPT: set[str] = set()


@dataclass(frozen=True)
class FakeConfig:
    input: str = opt("", "a file or an upstream run folder")
    value: int = opt(0, "appended to the output")
    note: str = opt("", "changes the config but not the output")
    output_dir: str = opt("", "where")
    overwrite: bool = opt(False, "clear")
    resume: bool = opt(False, "continue")
    seed: int = opt(0, "seed")


def fake_run(cfg: FakeConfig) -> Path:
    """Reads its input (a file or a run folder's out.txt) and writes out.txt = input + '+value'."""
    CALLS.append((Path(cfg.output_dir).name, cfg.resume, cfg.overwrite))
    run_ = start_run("fake", cfg, resume=cfg.resume)
    src = Path(cfg.input)
    text = (src / "out.txt" if src.is_dir() else src).read_text() if cfg.input else ""
    if Path(cfg.output_dir).name in INTERRUPT:
        INTERRUPT.discard(Path(cfg.output_dir).name)
        raise KeyboardInterrupt
    (run_.dir / "out.txt").write_text(f"{text}+{cfg.value}")
    run_.add_output("out", run_.dir / "out.txt")
    return run_.finish()


def fake_steps(root: Path, data: Path, values: dict[str, int] | None = None, note: str = "") -> list[PlannedStep]:
    """a reads the data file, b reads a's run folder, c reads b's."""
    values = values or {}
    inputs = {"a": str(data), "b": str(root / "a"), "c": str(root / "b")}
    return [PlannedStep(name=n, stage="fake", config_cls=FakeConfig, run=fake_run, recipe=None,
                        overrides=[f"input={inputs[n]}", f"output_dir={root / n}", f"value={values.get(n, 0)}",
                                   f"note={note if n == 'b' else ''}"], dir=root / n) for n in "abc"]


def run_fake(root: Path, data: Path, force: bool = False, **kw) -> dict[str, str]:
    CALLS.clear()
    records = execute(fake_steps(root, data, **kw), root, {"fake": True}, force=force)
    return {name: r["status"] for name, r in records.items()}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data.txt"
    path.write_text("x")
    return path


def test_second_run_skips_everything_and_force_reruns(tmp_path: Path, data: Path) -> None:
    root = tmp_path / "pipe"
    assert run_fake(root, data) == {"a": "ran", "b": "ran", "c": "ran"}
    assert (root / "c" / "out.txt").read_text() == "x+0+0+0"
    assert run_fake(root, data) == {"a": "skipped", "b": "skipped", "c": "skipped"} and CALLS == []
    assert run_fake(root, data, force=True) == {"a": "ran", "b": "ran", "c": "ran"}
    assert all(overwrite for _, _, overwrite in CALLS)  # a forced step starts from an empty folder
    manifest = read_manifest(root)
    assert manifest["stage"] == "pipeline" and manifest["status"] == "completed"
    assert set(manifest["steps"]) == {"a", "b", "c"} and manifest["steps"]["b"]["run_seconds"] > 0
    assert manifest["metrics"]["run_seconds_total"] >= manifest["metrics"]["run_seconds_b"] > 0


def test_changes_rerun_the_step_and_only_what_its_output_changes(tmp_path: Path, data: Path) -> None:
    root = tmp_path / "pipe"
    run_fake(root, data)
    # b's config changes and so does its output: b and c re-run, a does not
    assert run_fake(root, data, values={"b": 5}) == {"a": "skipped", "b": "ran", "c": "ran"}
    assert (root / "c" / "out.txt").read_text() == "x+0+5+0"
    # b's config changes but its output is byte-identical: c's inputs did not change, so c is skipped
    assert run_fake(root, data, values={"b": 5}, note="n") == {"a": "skipped", "b": "ran", "c": "skipped"}
    # the data file changes: everything downstream of it re-runs
    data.write_text("y")
    assert run_fake(root, data, values={"b": 5}, note="n") == {"a": "ran", "b": "ran", "c": "ran"}
    assert (root / "c" / "out.txt").read_text() == "y+0+5+0"


def test_an_incomplete_step_is_not_skipped(tmp_path: Path, data: Path) -> None:
    root = tmp_path / "pipe"
    run_fake(root, data)
    manifest = json.loads((root / "b" / "manifest.json").read_text())
    (root / "b" / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    statuses = run_fake(root, data)
    assert statuses["a"] == "skipped" and statuses["b"] in ("resumed", "ran")


def test_interrupted_pipeline_continues_where_it_stopped(tmp_path: Path, data: Path) -> None:
    root = tmp_path / "pipe"
    INTERRUPT.add("b")
    with pytest.raises(KeyboardInterrupt):
        run_fake(root, data)
    manifest = read_manifest(root)
    assert manifest["status"] == "interrupted" and manifest["steps"]["b"]["status"] == "interrupted"
    # the interrupted step's own run is marked failed (never left `running`), with the reason
    assert "c" not in manifest["steps"] and read_manifest(root / "b")["status"] == "failed"
    assert "KeyboardInterrupt" in read_manifest(root / "b")["error"]
    # the re-run skips a, resumes b (same config and inputs, the stage can resume) and runs c
    assert run_fake(root, data) == {"a": "skipped", "b": "resumed", "c": "ran"}
    assert ("b", True, False) in CALLS
    assert (root / "c" / "out.txt").read_text() == "x+0+0+0"


def test_flatten_overrides_round_trip() -> None:
    flat = pipeline.flatten({"train": {"lr": 1e-4, "epochs": 1}, "policies": ["a", "b"], "judge": "llm",
                             "names": [], "x": {}})
    assert flat == ['train.lr=0.0001', 'train.epochs=1', 'policies=["a", "b"]', 'judge="llm"', 'names=[]', 'x={}']
    assert fingerprint("s", {"a": 1, "overwrite": True}, {}) == fingerprint("s", {"a": 1}, {})
    assert fingerprint("s", {"a": 1}, {}) != fingerprint("s", {"a": 2}, {})


def test_preferences_step_concatenates_and_keeps_held_out_prompts_out(tmp_path: Path) -> None:
    def pair(q: str, source: str) -> dict:
        return {"prompt": [{"role": "user", "content": q}], "chosen": f"good {q}", "rejected": f"bad {q}",
                "meta": {"source": source}}

    human = write_jsonl(tmp_path / "human.jsonl", [pair("q1", "human"), pair("q2", "human")])
    valid = write_jsonl(tmp_path / "valid.jsonl", [pair("q3", "human")])
    ai = write_jsonl(tmp_path / "ai.jsonl", [pair("q4", "ai"), pair("q3", "ai")])
    none = write_jsonl(tmp_path / "none.jsonl", [])  # a judge that abstained on everything
    out = preferences.run(preferences.Config(
        inputs=[str(human), str(ai), str(none)], validation=[str(valid)], output_dir=str(tmp_path / "prefs")))
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert [r["prompt"][0]["content"] for r in train] == ["q1", "q2", "q4"]
    m = read_manifest(out)["metrics"]
    assert (m["train_pairs"], m["valid_pairs"], m["dropped_held_out_prompt"]) == (3, 1, 1)
    assert (m["train_source_human"], m["train_source_ai"]) == (2, 1)


@pytest.mark.parametrize("recipe", ["stages/pipeline.yaml", "stages/tiny/pipeline.yaml"])
def test_recipes_wire_every_stage(recipe: str, tmp_path: Path) -> None:
    """Every step's recipe + wiring + overrides loads against that stage's Config (no drifted keys)."""
    cfg = load_config(pipeline.Config, Path(recipe), [f"output_dir={tmp_path / 'p'}"])
    steps = pipeline.plan(cfg)
    assert [s.name for s in steps] == list(pipeline.ORDER)
    for step in steps:
        stage_cfg = pipeline.step_config(step)
        assert Path(stage_cfg.output_dir) == tmp_path / "p" / step.name
    evaluation = pipeline.step_config(steps[pipeline.ORDER.index("eval")])
    assert evaluation.policies == [str(tmp_path / "p" / n) for n in ("ppo", "dpo", "online")]
    assert evaluation.names == ["ppo", "dpo", "online"]
    assert evaluation.training_judges  # eval knows which judges labelled the AI pairs
    online = pipeline.step_config(steps[pipeline.ORDER.index("online")])
    assert online.policy == str(tmp_path / "p" / cfg.online_from)  # online_from: sft, or dpo (stages/pipeline.yaml)
    if online.judge.spec == "reward_model":  # the online judge is the pipeline's reward model
        assert online.judge.options["path"] == str(tmp_path / "p" / "reward")
    # the judge is checked on the held-out human pairs; the rounds get the human pairs only to mix them in
    assert online.judge.heldout == str(tmp_path / "p" / "import") and online.human == ""
    mixed = pipeline.plan(load_config(pipeline.Config, Path(recipe), [f"output_dir={tmp_path / 'p'}",
                                                                      "steps.online.overrides.human_mix=true"]))
    online = pipeline.step_config(mixed[pipeline.ORDER.index("online")])
    assert online.human_mix and online.human == str(tmp_path / "p" / "import")
    with pytest.raises(Exception, match="unknown step"):
        pipeline.plan(load_config(pipeline.Config, Path(recipe), ["steps.nope.enabled=false"]))


def test_the_demo_ppo_has_room_for_the_answers_eval_asks_for(tmp_path: Path) -> None:
    """PPO penalises answers cut at its token limit; a limit below the evaluation's taught the demo policy brevity
    before anything else (48 tokens: 62% of the SFT answers cut; README "PPO's token limit")."""
    steps = pipeline.plan(load_config(pipeline.Config, Path("stages/pipeline.yaml"), [f"output_dir={tmp_path}"]))
    ppo = pipeline.step_config(steps[pipeline.ORDER.index("ppo")])
    evaluation = pipeline.step_config(steps[pipeline.ORDER.index("eval")])
    assert ppo.shaping.missing_eos_penalty > 0
    assert ppo.sampling.max_new_tokens >= evaluation.sampling.max_new_tokens


def schedule(steps: list, finishing: list[str]) -> list[list[str]]:
    """The steps running after each start or finish, the running ones finishing in the order `finishing` names
    (the scheduler's choices, without running anything)."""
    pending = [s for s in steps if s.name in pipeline.SIDE_BY_SIDE]
    active: dict[str, tuple] = {}
    seen, finishing = [], list(finishing)
    while pending or active:
        step = pipeline.next_step(pending, active)
        if step is None:
            active.pop(next(n for n in finishing if n in active))
            finishing = [n for n in finishing if n in active or n in [s.name for s in pending]]
        else:
            pending.remove(step)
            active[step.name] = (step, "run")
        seen.append(sorted(active))
    return seen


def test_training_steps_start_as_soon_as_a_process_is_free_and_what_they_read_is_done(tmp_path: Path) -> None:
    """reward + dpo (DPO's held-out check off, so it does not read the reward model); a step that reads another's
    folder waits for it; one that reads none still running takes the first free process."""
    def plan(*overrides: str) -> list:
        return pipeline.plan(load_config(pipeline.Config, Path("stages/pipeline.yaml"),
                                         [f"output_dir={tmp_path}", *overrides]))

    steps = plan()  # ppo_from=dpo, online_from=dpo: both wait for dpo
    assert pipeline.step_config(steps[pipeline.ORDER.index("dpo")]).eval.reward.model == ""
    assert schedule(steps, ["reward", "dpo", "ppo", "online"]) == [
        ["reward"], ["dpo", "reward"], ["dpo"], [], ["ppo"], ["online", "ppo"], ["online"], []]
    # from sft: ppo starts when reward is done (dpo still training), online when dpo is
    from_sft = plan("ppo_from=sft", "online_from=sft")
    assert schedule(from_sft, ["reward", "dpo", "ppo", "online"]) == [
        ["reward"], ["dpo", "reward"], ["dpo"], ["dpo", "ppo"], ["ppo"], ["online", "ppo"], ["online"], []]
    # dpo done first: ppo and online read reward, so the free process waits
    assert schedule(from_sft, ["dpo", "reward", "ppo", "online"])[:5] == [["reward"], ["dpo", "reward"], ["reward"],
                                                                         [], ["ppo"]]
    # ppo_from=dpo, online from sft: online takes the process reward frees, ppo waits for dpo
    assert schedule(plan("online_from=sft"), ["reward", "dpo", "online", "ppo"]) == [
        ["reward"], ["dpo", "reward"], ["dpo"], ["dpo", "online"], ["online"], ["online", "ppo"], ["ppo"], []]
    # DPO's held-out check scores with the pipeline's reward model: dpo then waits for reward
    checked = plan("steps.dpo.overrides.eval.size=4")
    assert schedule(checked, ["reward", "dpo", "ppo", "online"])[:3] == [["reward"], [], ["dpo"]]
    # other steps keep their place: eval waits for every training step, and nothing runs beside it
    evaluation = steps[pipeline.ORDER.index("eval")]
    assert pipeline.next_step([evaluation], {}) is evaluation
    assert pipeline.next_step([evaluation], {"online": (steps[pipeline.ORDER.index("online")], "run")}) is None


CHILD = """
import json, os, signal, sys, time, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
out = os.path.join(cfg["output_dir"], "out.txt")
os.makedirs(cfg["output_dir"], exist_ok=True)
def stop(signum, frame):
    open(out, "a").write(f"stopped by {signal.Signals(signum).name}\\n")
    json.dump({"stage": "fake", "status": "interrupted"}, open(os.path.join(cfg["output_dir"], "manifest.json"), "w"))
    sys.exit(130)
signal.signal(signal.SIGTERM, stop)
import types
from align.processes import take_threads_when_alone
sys.modules["torch"] = types.SimpleNamespace(set_num_threads=lambda n: open(out, "a").write(f"threads now {n}\\n"))
take_threads_when_alone()
open(out, "a" if cfg["resume"] else "w").write(f"start {time.time()} threads {os.environ['OMP_NUM_THREADS']} "
                                               f"resume {cfg['resume']} progress {os.environ['ALIGN_PROGRESS']}\\n")
print(f"working on {cfg['input']}", flush=True)
held = b"x" * (cfg["value"] * 10 * 2**20 if cfg["note"] == "hold" else 0)  # value 15: 150 MiB touched
time.sleep(0 if cfg["resume"] else cfg["value"] / 10)
if cfg["note"] == "oom":
    json.dump({"stage": "fake", "status": "running"}, open(os.path.join(cfg["output_dir"], "manifest.json"), "w"))
    os.kill(os.getpid(), signal.SIGKILL)
if cfg["note"] == "fail":
    print("align fake: error: bad input; fix it", file=sys.stderr, flush=True)
    sys.exit(2)
open(out, "a").write(f"end {time.time()}\\n")
"""


def beside_steps(root: Path, data: Path, values: dict[str, int], notes: dict[str, str] | None = None) -> list:
    """Two fake steps named like two training steps, neither reading the other's folder."""
    notes = notes or {}
    return [PlannedStep(name=n, stage="fake", config_cls=FakeConfig, run=fake_run, recipe=None,
                        overrides=[f"input={data}", f"output_dir={root / n}", f"value={values[n]}",
                                   f"note={notes.get(n, '')}"], dir=root / n) for n in ("ppo", "online")]


@pytest.fixture
def fake_children(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "child_command", lambda step, config: [sys.executable, "-c", CHILD, str(config)])


def test_two_steps_side_by_side_run_at_once_in_their_own_processes(tmp_path: Path, data: Path, capsys,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   fake_children: None) -> None:
    root = tmp_path / "pipe"
    monkeypatch.setattr("align.log.progress_enabled", lambda: True)  # as on a terminal: the children draw bars
    steps = beside_steps(root, data, {"ppo": 15, "online": 10}, notes={"ppo": "hold", "online": "hold"})
    records = execute(steps, root, {"fake": True}, beside=True)
    assert {n: (r["status"], r["beside"]) for n, r in records.items()} == {"ppo": ("ran", ["online"]),
                                                                          "online": ("ran", ["ppo"])}
    assert CALLS == [] or all(name not in ("ppo", "online") for name, *_ in CALLS)  # not run in this process
    lines = {n: (root / n / "out.txt").read_text().splitlines() for n in ("ppo", "online")}
    times = {n: lines[n][0].split() for n in lines}
    starts = {n: float(t[1]) for n, t in times.items()}
    ends = {n: float(lines[n][-1].split()[1]) for n in lines}
    assert max(starts.values()) < min(ends.values())  # they overlapped
    assert {t[3] for t in times.values()} == {str(processes.threads_each())}
    assert {t[7] for t in times.values()} == {"1"}  # ALIGN_PROGRESS
    assert records["ppo"]["seconds"] >= 1.5 > records["online"]["seconds"] >= 1.0
    # online finished first: ppo, alone from then on, took the whole thread budget; online never did
    assert f"threads now {processes.thread_budget()}" in (root / "ppo" / "out.txt").read_text()
    assert "threads now" not in (root / "online" / "out.txt").read_text()
    # each one's own peak (100 or 150 MiB held, plus the interpreter's ~20), not this process's size
    assert 150 <= records["ppo"]["peak_rss_mb"] < 150 + 60 and 100 <= records["online"]["peak_rss_mb"] < 100 + 60
    out = capsys.readouterr().out
    assert f"    ppo | working on {data}" in out and f" online | working on {data}" in out
    assert read_manifest(root)["status"] == "completed"
    # the same steps one after another (parallel=false, or no pair): in this process
    CALLS.clear()
    execute(beside_steps(tmp_path / "one", data, {"ppo": 1, "online": 1}), tmp_path / "one", {"fake": True})
    assert [name for name, *_ in CALLS] == ["ppo", "online"]


def test_a_step_failing_beside_another_lets_it_finish_then_stops_the_pipeline(tmp_path: Path, data: Path,
                                                                             fake_children: None) -> None:
    from align.errors import AlignError

    root = tmp_path / "pipe"
    steps = beside_steps(root, data, {"ppo": 1, "online": 8}, notes={"ppo": "fail"})
    with pytest.raises(AlignError, match=r"step ppo failed: align fake: error: bad input; fix it"):
        execute(steps, root, {"fake": True}, beside=True)
    manifest = read_manifest(root)
    assert manifest["status"] == "failed"
    assert manifest["steps"]["ppo"]["status"] == "failed"
    assert manifest["steps"]["ppo"]["error"] == "align fake: error: bad input; fix it"
    assert manifest["steps"]["online"]["status"] == "ran"
    assert "end" in (root / "online" / "out.txt").read_text()
    # killed outright (as by the out-of-memory killer): its run folder is not left `running`
    root = tmp_path / "killed"
    with pytest.raises(AlignError, match=r"step online failed: align fake was killed by SIGKILL"):
        execute(beside_steps(root, data, {"ppo": 1, "online": 1}, notes={"online": "oom"}), root, {"fake": True},
                beside=True)
    assert read_manifest(root / "online")["status"] == "failed"
    assert read_manifest(root)["steps"]["online"]["error"] == "align fake was killed by SIGKILL"


def test_a_stop_signal_reaches_both_steps_side_by_side(tmp_path: Path, data: Path, fake_children: None) -> None:
    import os
    import signal
    import threading

    from align.runs import Interrupted, stop_signals_held

    root = tmp_path / "pipe"
    steps = beside_steps(root, data, {"ppo": 100, "online": 100})
    timer = threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGTERM))
    timer.start()
    with stop_signals_held(), pytest.raises(Interrupted):
        execute(steps, root, {"fake": True}, beside=True)
    timer.join()
    manifest = read_manifest(root)
    assert manifest["status"] == "interrupted"
    assert {n: s["status"] for n, s in manifest["steps"].items()} == {"ppo": "interrupted", "online": "interrupted"}
    for name in ("ppo", "online"):
        assert (root / name / "out.txt").read_text().endswith("stopped by SIGTERM\n")
    assert manifest["steps"]["ppo"]["seconds"] < 8
    # the same command continues both, side by side again, each with resume=true
    with stop_signals_held():  # as `align pipeline` runs it: a new command, no stop signal yet
        records = execute(beside_steps(root, data, {"ppo": 100, "online": 100}), root, {"fake": True}, beside=True)
    assert {n: (r["status"], r["beside"]) for n, r in records.items()} == {"ppo": ("resumed", ["online"]),
                                                                          "online": ("resumed", ["ppo"])}
    for name in ("ppo", "online"):
        assert "resume True" in (root / name / "out.txt").read_text().splitlines()[-2]


def test_disabled_policy_is_left_out_of_eval(tmp_path: Path) -> None:
    cfg = load_config(pipeline.Config, Path("stages/tiny/pipeline.yaml"),
                      [f"output_dir={tmp_path}", "steps.dpo.enabled=false", "steps.online.enabled=false",
                       "until=eval", "ppo_from=sft"])  # the tiny recipe starts PPO from DPO, like the real one
    steps = pipeline.plan(cfg)
    assert [s.name for s in steps][-2:] == ["ppo", "eval"]
    assert pipeline.step_config(steps[-1]).policies == [str(tmp_path / "ppo")]


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tiny_model: Path, tmp_path: Path) -> None:
    """The real pipeline on a tiny random model: every step completes, a re-run skips everything, and the
    report shows the evaluation."""
    from align.stages.report import find_stage_runs

    overrides = [f"model={tiny_model}", f"output_dir={tmp_path / 'pipe'}"]
    cfg = load_config(pipeline.Config, Path("stages/tiny/pipeline.yaml"), overrides)
    root = pipeline.run(cfg)
    manifest = read_manifest(root)
    assert manifest["status"] == "completed"
    assert {s["status"] for s in manifest["steps"].values()} == {"ran"}
    # on a machine that can (CPU, 2+ cores, 12+ GiB free), reward + dpo and ppo + online ran as pairs of processes
    pairs = {n: s.get("beside") for n, s in manifest["steps"].items() if s.get("beside")}
    assert pairs == ({"reward": ["dpo"], "dpo": ["reward"], "ppo": ["online"], "online": ["ppo"]}
                     if processes.why_not_two(pipeline.SIDE_BY_SIDE_MIN_GIB) is None else {})
    for run in find_stage_runs(root):
        assert run.manifest["status"] == "completed", run.name
    evaluation = json.loads((root / "eval" / "eval.json").read_text())
    assert [p["name"] for p in evaluation["policies"]] == ["sft", "ppo", "dpo", "online"]
    # the tiny recipe labels AI pairs with house_style (and online with rules), eval uses house_style: it says so
    assert evaluation["judge"]["training_judges"] == ["house_style", "rules"]
    assert evaluation["judge"]["differs_from_training_judge"] is False
    assert all(p["win_rate"]["n"] + p["win_rate"]["abstains"] > 0 for p in evaluation["policies"][1:])
    html = (root / "report" / "report.html").read_text()
    assert html.count('<tr class="eval-row">') == 4 and 'src="data:image/png;base64,' in html

    again = pipeline.run(load_config(pipeline.Config, Path("stages/tiny/pipeline.yaml"), overrides))
    steps = read_manifest(again)["steps"]
    assert {n: s["status"] for n, s in steps.items() if n != "report"} == {n: "skipped" for n in steps if
                                                                           n != "report"}
    # a PPO change re-runs PPO and what reads it (eval), nothing upstream and not DPO
    changed = pipeline.run(load_config(pipeline.Config, Path("stages/tiny/pipeline.yaml"),
                                       overrides + ["steps.ppo.overrides.seed=7"]))
    steps = read_manifest(changed)["steps"]
    assert [n for n, s in steps.items() if s["status"] == "ran"] == ["ppo", "eval", "report"]
    ppo_cfg = yaml.safe_load((root / "ppo" / "config.yaml").read_text())
    assert ppo_cfg["policy"] == str(root / "dpo")  # ppo_from: dpo — PPO trained on the DPO run folder


def test_two_processes_only_where_the_machine_has_room(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr(processes, "cores", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert processes.why_not_two(0) is None and processes.threads_each() == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's thread budget is halved, not the machine's cores
    assert processes.why_not_two(0) is None and processes.threads_each() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert processes.why_not_two(0) == "OMP_NUM_THREADS=1"
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(processes, "cores", lambda: 1)
    assert processes.why_not_two(0) == "fewer than 2 cores"
    monkeypatch.setattr(processes, "cores", lambda: 2)
    assert "GiB of memory available, 1000000 needed" in processes.why_not_two(10**6)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert processes.why_not_two(0) == "a GPU is present"


def test_a_child_left_alone_takes_the_whole_thread_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """`Running.alone` reaches a real torch process (torch.set_num_threads from the signal handler); a child told
    before it imported torch keeps its threads and lives on."""
    import time

    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # children get 1 thread, 2 when alone

    def started(child: processes.Child) -> None:
        deadline = time.time() + 60
        while not any(line.startswith("threads") for line in child.tail) and time.time() < deadline:
            time.sleep(0.05)

    code = ("import time, torch\n"
            "from align.processes import take_threads_when_alone\n"
            "take_threads_when_alone()\n"
            "print('threads', torch.get_num_threads(), flush=True)\n"
            "deadline = time.time() + 30\n"
            "while torch.get_num_threads() == 1 and time.time() < deadline:\n"
            "    time.sleep(0.05)\n"
            "print('threads', torch.get_num_threads(), flush=True)\n")
    running = processes.Running()
    child = running.start("t", [sys.executable, "-c", code])
    started(child)
    running.alone()
    assert running.wait_next() is child and child.proc.returncode == 0
    assert [line for line in child.tail if line.startswith("threads")] == ["threads 1", "threads 2"]
    # no torch yet when the signal comes: nothing happens, the child goes on
    quiet = ("import time\nfrom align.processes import take_threads_when_alone\ntake_threads_when_alone()\n"
             "print('threads none', flush=True)\ntime.sleep(0.5)\nprint('end', flush=True)\n")
    early = running.start("e", [sys.executable, "-c", quiet])
    started(early)
    running.alone()
    assert running.wait_next() is early and early.proc.returncode == 0 and early.tail[-1] == "end"


def test_a_child_whose_output_reaches_a_terminal_draws_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import logging

    from align.log import PROGRESS_ENV, progress_enabled

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    logger = logging.getLogger("align")
    monkeypatch.setattr(logger, "level", logging.INFO)
    monkeypatch.setenv(PROGRESS_ENV, "0")
    assert not progress_enabled()
    monkeypatch.setenv(PROGRESS_ENV, "1")
    assert progress_enabled()


def test_a_step_started_by_the_pipeline_gets_sigterm_when_the_pipeline_dies(tmp_path: Path) -> None:
    """`align.processes.die_with_parent`: the pipeline killed outright (SIGKILL) does not leave a step training alone."""
    import os
    import signal
    import subprocess
    import time

    from align.processes import PARENT_ENV

    mark = tmp_path / "child.txt"
    child = ("import signal, sys, time\n"
             "from align.processes import die_with_parent\n"
             f"signal.signal(signal.SIGTERM, lambda *a: (open({str(mark)!r}, 'w').write('SIGTERM'), sys.exit(0)))\n"
             "die_with_parent()\n"
             f"open({str(mark)!r}, 'w').write('ready')\n"
             "time.sleep(60)\n")
    parent = ("import os, subprocess, sys, time\n"
              f"env = {{**os.environ, {PARENT_ENV!r}: str(os.getpid())}}\n"
              f"subprocess.Popen([sys.executable, '-c', {child!r}], env=env)\n"
              "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", parent])
    deadline = time.time() + 30
    while not (mark.is_file() and mark.read_text() == "ready") and time.time() < deadline:
        time.sleep(0.05)
    assert mark.read_text() == "ready"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    while mark.read_text() != "SIGTERM" and time.time() < deadline:
        time.sleep(0.05)
    assert mark.read_text() == "SIGTERM"
