"""pipeline: SFT -> import (human labels) -> generate + judge (AI labels) -> preferences -> reward -> PPO + DPO
-> online RLAIF (the reward model judges the policy's own samples, round after round) -> eval -> report, each step
in its own folder under `output_dir`, in this process; on a CPU machine the training steps run two at a time in
processes of their own, each as soon as a process is free and the steps it reads are done (`parallel`: reward +
dpo, then ppo + online; the one left alone takes the freed cores). Stages come from the
registry in align/stages/__init__.py; fingerprints from align/runs.py.

Each step is `run(load_config(module.Config, recipe, overrides))` with the step's recipe (stages/<stage>.yaml,
or `recipes`/<stage>.yaml), the pipeline's wiring (output_dir under the pipeline folder, upstream run folders as
inputs) and then your `steps.<name>.overrides`. A step is skipped when its manifest says completed and its
fingerprint — sha256 of the resolved config plus the hashes of everything it reads (files, and the outputs of
upstream run folders) — equals the one recorded when it last ran. `force=true` re-runs every step. A step that
was interrupted resumes (stages with `resume`, when nothing changed) or restarts with overwrite=true.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import logging
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from align.config import load_config, opt, to_dict
from align.errors import AlignError, ConfigError
from align.processes import Child, Running, threads_each, why_not_two
from align.runs import (
    Interrupted,
    Run,
    check_replaceable,
    fail_active_runs,
    fingerprint,
    now,
    read_manifest,
    release_lock,
    stop_requested,
    stop_signals_held,
    take_lock,
)

log = logging.getLogger(__name__)

ORDER = ("sft", "import", "generate", "judge", "preferences", "reward", "dpo", "ppo", "online", "eval", "report")


@dataclass(frozen=True)
class Step:
    recipe: str = opt("", "this step's recipe YAML ('' = <recipes>/<stage>.yaml, else stages/<stage>.yaml)")
    overrides: dict[str, Any] = opt({}, "keys set on top of the recipe and the wiring (nested), e.g. "
                                        "{train: {epochs: 1}}; on the command line steps.sft.overrides.train.epochs=1")
    enabled: bool = opt(True, "run this step (disabled ppo/dpo are left out of eval; others must exist already)")


@dataclass(frozen=True)
class Config:
    output_dir: str = opt("runs/pipeline", "the pipeline folder: one subfolder per step and the pipeline manifest")
    overwrite: bool = opt(False, "start from nothing: delete output_dir first (only an align pipeline folder)")
    force: bool = opt(False, "re-run every step even when its inputs and config are unchanged")
    seed: int = opt(42, "seed given to every step that has one", ge=0)
    seeds: list[int] = opt([], "train the whole pipeline once per seed (output_dir/seed-<s>/) and report every "
                               "policy's win rate over the seeds with seed-aware intervals (make quality); "
                               "[]: once, with `seed`")
    model: str = opt("default", "the base model SFT starts from")
    human: list[str] = opt(["data/human/demo_labelstudio.json"], "human annotation exports for `align import`")
    prompts: str = opt("data/prompts/train.jsonl", "training prompts (generate, PPO)")
    eval_prompts: str = opt("data/prompts/eval.jsonl", "held-out prompts (eval; PPO's before/after check)")
    recipes: str = opt("stages", "folder of stage recipes (stages/tiny for the test pipeline)")
    until: str = opt("", "stop after this step ('' = run all)")
    steps: dict[str, Step] = opt({}, f"per-step settings, keyed by step: {', '.join(ORDER)}")
    online_from: Literal["sft", "dpo"] = opt("sft", "the policy online RLAIF's first round starts from: sft, or dpo "
                                                    "(human pairs first, then AI rounds on top; needs the dpo step)")
    ppo_from: Literal["sft", "dpo"] = opt("sft", "the policy PPO starts from (and keeps near: its KL reference): "
                                                 "sft, or dpo (needs the dpo step)")
    parallel: bool = opt(True, "on a CPU machine (no GPU) with 2+ cores and 12+ GiB of free memory, run two training "
                               "steps at once, each in its own process with half the cores, starting as soon as a process is "
                               "free and the steps whose folders it reads are done (reward + dpo, ppo + online); "
                               "false: one after another here")


@dataclass
class PlannedStep:
    """One step ready to run: what to call and with which recipe and overrides."""

    name: str
    stage: str
    config_cls: type
    run: Callable[[Any], Path]
    recipe: Path | None
    overrides: list[str]
    dir: Path
    config: Any = None  # the step's resolved config, built (and so checked) when the plan is made
    always: bool = False  # the report reads everything and is cheap: it is redone on every pipeline run


# ---------------------------------------------------------------- planning

def flatten(mapping: dict[str, Any], prefix: str = "") -> list[str]:
    """{'train': {'lr': 1e-4}} -> ['train.lr=0.0001'] (values as JSON, which the override parser reads as YAML)."""
    out = []
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            out += flatten(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


def fields_of(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def wiring(cfg: Config, root: Path, enabled: set[str]) -> dict[str, dict[str, Any]]:
    """The keys the pipeline sets for each step: where it writes, and which upstream folders it reads."""
    d = {name: str(root / name) for name in ORDER}
    policies = [name for name in ("ppo", "dpo", "online") if name in enabled]
    judge_spec = judge_of(cfg) if "judge" in enabled else None
    online_judge, human_mix = online_choices(cfg) if "online" in enabled else (None, False)
    training_judges = [j for j in (judge_spec, online_judge) if j]
    # the reward-model judge labels with the pipeline's reward model; its agreement is checked, before round 1, on
    # the human pairs the reward model was validated on, not trained on (import's valid split)
    online_judge_keys = {**({"options": {"path": d["reward"]}} if online_judge == "reward_model" else {}),
                         **({"heldout": d["import"]} if "import" in enabled else {})}
    return {
        "sft": {"model": cfg.model},
        "import": {"inputs": list(cfg.human), "model": cfg.model},
        "generate": {"model": d["sft"], "prompts": cfg.prompts},
        "judge": {"samples": d["generate"], **({"human": d["import"]} if "import" in enabled else {})},
        "preferences": {"inputs": [d[n] for n in ("import", "judge") if n in enabled],
                        "validation": [d["import"]] if "import" in enabled else []},
        "reward": {"model": d["sft"], "data": {"train": f"{d['preferences']}/train.jsonl",
                                               "validation": f"{d['preferences']}/valid.jsonl"}},
        "ppo": {"policy": d[cfg.ppo_from], "reward": {"model": d["reward"], "function": ""},
                "data": {"prompts": cfg.prompts, "eval_prompts": cfg.eval_prompts}},
        "dpo": {"policy": d["sft"], "data": {"train": f"{d['preferences']}/train.jsonl",
                                             "validation": f"{d['preferences']}/valid.jsonl"},
                # the held-out check reads the reward model only when it runs (eval.size > 0); else DPO does
                # not wait for the reward step and can train beside it
                "eval": {"reward": {"model": d["reward"] if dpo_checks(cfg) else "", "function": ""}}},
        "online": {"policy": d[cfg.online_from], "prompts": cfg.prompts,
                   "eval": {"prompts": cfg.eval_prompts, "reward": {"model": d["reward"], "function": ""}},
                   # the human pairs go to the rounds only to be mixed in: re-measuring the judge each round on
                   # the pairs the reward model trained on cost ~100 s a round and tells nothing the check
                   # before round 1 (on the held-out pairs) does not
                   "human": d["import"] if "import" in enabled and human_mix else "",
                   **({"judge": online_judge_keys} if online_judge_keys else {})},
        "eval": {"sft": d["sft"], "policies": [d[p] for p in policies], "names": policies,
                 "reward_model": d["reward"], "prompts": cfg.eval_prompts, "training_judges": training_judges},
        "report": {"run_dir": str(root), "output_dir": d["report"]},
    }


def recipe_for(cfg: Config, name: str, stage: str) -> Path | None:
    step = cfg.steps.get(name, Step())
    if step.recipe:
        return Path(step.recipe)
    for folder in (Path(cfg.recipes), Path("stages")):
        if (folder / f"{stage}.yaml").is_file():
            return folder / f"{stage}.yaml"
    return None


def judge_of(cfg: Config) -> str:
    """The judge the judge step will use (recipe, then overrides), to tell eval which judge labelled data."""
    from align.stages import judge

    step = cfg.steps.get("judge", Step())
    return load_config(judge.Config, recipe_for(cfg, "judge", "judge"), flatten(step.overrides)).judge


def online_choices(cfg: Config) -> tuple[str, bool]:
    """The judge spec the online step's recipe (and overrides) name, and whether it mixes the human pairs into
    every round (human_mix)."""
    from align.stages import online

    step = cfg.steps.get("online", Step())
    overrides = [o for o in flatten(step.overrides) if o.startswith(("judge.spec=", "human_mix="))]
    wired = [f"human={Path(cfg.output_dir) / 'import'}"]  # as wiring() sets it when mixing (human_mix needs it)
    chosen = load_config(online.Config, recipe_for(cfg, "online", "online"), overrides + wired)
    return chosen.judge.spec, chosen.human_mix


def dpo_checks(cfg: Config) -> bool:
    """Does the dpo step's held-out check run (its recipe's and overrides' eval.size > 0)?"""
    from align.stages import dpo

    step = cfg.steps.get("dpo", Step())
    sizes = [o for o in flatten(step.overrides) if o.startswith("eval.size=")]
    return load_config(dpo.Config, recipe_for(cfg, "dpo", "dpo"), sizes).eval.size > 0


def stage_entry(stage: str) -> tuple[type, Callable[[Any], Path]]:
    """(Config class, run function) of a stage module from the registry."""
    from align.stages import STAGES

    if stage not in STAGES or importlib.util.find_spec(STAGES[stage]) is None:
        raise ConfigError(f"pipeline: stage {stage!r} is not installed (no module {STAGES.get(stage, stage)}); "
                          f"disable the step with steps.{stage}.enabled=false")
    module = importlib.import_module(STAGES[stage])
    return module.Config, module.run


def plan(cfg: Config) -> list[PlannedStep]:
    """The enabled steps in order, each with its recipe and its overrides (wiring, then the user's)."""
    on = {name: cfg.steps.get(name, Step()).enabled for name in ("dpo", "ppo", "online")}
    for step, start in (("online", cfg.online_from), ("ppo", cfg.ppo_from)):
        if start == "dpo" and on[step] and not on["dpo"]:
            raise ConfigError(f"{step}_from=dpo needs the dpo step; enable it or set {step}_from=sft")
    unknown = sorted(set(cfg.steps) - set(ORDER))
    if unknown:
        raise ConfigError(f"steps: unknown step(s) {', '.join(unknown)}; the steps are {', '.join(ORDER)}")
    if cfg.until and cfg.until not in ORDER:
        raise ConfigError(f"until={cfg.until!r} is not a step; use one of {', '.join(ORDER)}")
    root = Path(cfg.output_dir)
    enabled = {n for n in ORDER if cfg.steps.get(n, Step()).enabled}
    wired = wiring(cfg, root, enabled)
    out = []
    for name in ORDER:
        if name not in enabled:
            continue
        config_cls, run_fn = stage_entry(name)
        keys = fields_of(config_cls)
        base: dict[str, Any] = {"output_dir": str(root / name), **wired[name]}
        if "seed" in keys:
            base["seed"] = cfg.seed
        step = PlannedStep(name=name, stage=name, config_cls=config_cls, run=run_fn,
                           recipe=recipe_for(cfg, name, name),
                           overrides=flatten(base) + flatten(cfg.steps.get(name, Step()).overrides),
                           dir=root / name, always=name == "report")
        try:  # every step's config is built now: a typo in steps.dpo.overrides fails before SFT starts
            step.config = step_config(step)
        except ConfigError as e:
            raise ConfigError(f"steps.{name}: {e}") from None
        out.append(step)
        if name == cfg.until:
            break
    return out


# ---------------------------------------------------------------- running

def step_config(step: PlannedStep, extra: list[str] = ()) -> Any:
    return load_config(step.config_cls, step.recipe, step.overrides + list(extra))


def how_to_run(step: PlannedStep, record: dict[str, Any], fp: str, force: bool) -> tuple[str, list[str]]:
    """('skip' | 'resume' | 'run', extra overrides) from the step's manifest and the last recorded fingerprint."""
    manifest = read_manifest(step.dir)
    same = record.get("fingerprint") == fp
    if manifest and manifest.get("status") == "completed" and same and not force and not step.always:
        return "skip", []
    keys = fields_of(step.config_cls)
    started = step.dir.is_dir() and any(step.dir.iterdir())
    if started and same and not force and manifest and manifest.get("status") != "completed" and "resume" in keys:
        return "resume", ["resume=true", "overwrite=false"] if "overwrite" in keys else ["resume=true"]
    extra = ["overwrite=true"] if "overwrite" in keys else []
    return "run", extra + (["resume=false"] if "resume" in keys else [])


def release_memory() -> None:
    """Between in-process stages: drop models, and accelerate's process-wide state (a stage may set it up
    differently from the last, e.g. another mixed-precision mode)."""
    from align.models.memory import release_freed_memory

    release_freed_memory()  # gc, then the heap's free pages back to the OS (align keeps them for reuse otherwise)
    try:
        from accelerate.state import AcceleratorState, PartialState

        AcceleratorState._reset_state(True)
        PartialState._reset_state()
    except (ImportError, AttributeError):
        pass
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def execute(steps: list[PlannedStep], root: Path, config: dict[str, Any], force: bool = False,
            inputs: list[str] = (), beside: bool = False) -> dict[str, Any]:
    """Run (or skip) `steps` in order, keeping the pipeline manifest in `root` up to date after each one.

    Returns the per-step records {status, seconds, run_seconds, fingerprint, dir, recipe}.
    """
    previous = (read_manifest(root) or {}).get("steps", {})
    records: dict[str, dict[str, Any]] = {}
    top = Run(dir=root, stage="pipeline", config=config, started_at=now())
    for path in inputs:
        if Path(path).exists():
            top.add_input(path)
    top.extra["steps"] = records
    cache: dict[Any, str] = {}
    t_all = time.perf_counter()
    try:
        run_steps(steps, top, previous, records, cache, force, beside)
        ordered = {s.name: records[s.name] for s in steps if s.name in records}  # as planned, however they ran
        records.clear()
        records.update(ordered)
    except KeyboardInterrupt:  # a stop signal or Ctrl-C, during a step (its run is marked) or between two steps
        top.interrupt(stop_requested() or "KeyboardInterrupt")
        raise
    top.metrics.update({f"seconds_{name}": r.get("seconds") or 0.0 for name, r in records.items()})
    top.metrics.update({f"run_seconds_{name}": r.get("run_seconds") or 0.0 for name, r in records.items()})
    top.metrics["seconds_total"] = time.perf_counter() - t_all
    top.metrics["run_seconds_total"] = sum(r.get("run_seconds") or 0.0 for r in records.values())
    top.write_manifest("completed")
    return records


def run_steps(steps: list[PlannedStep], top: Run, previous: dict[str, Any], records: dict[str, dict[str, Any]],
              cache: dict[Any, str], force: bool, beside: bool = False) -> None:
    """Run (or skip) each step in order, recording it in `records` and the pipeline manifest `top`. With `beside`,
    SIDE_BY_SIDE steps run two at a time, each in its own process: one starts as soon as a process is free and the
    steps whose folders it reads are done (the pipeline's reward and dpo together; ppo when reward is done, online
    when dpo is). A step whose inputs did not change since its last run is skipped as soon as they are done."""
    import tempfile

    import yaml

    pending, running, active = list(steps), Running(), {}  # active: name -> (step, action) of the running children
    failed: list[tuple[str, bool, str]] = []
    decided: dict[str, tuple[str, list[str], dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="align-pipeline-") as tmp:
        while pending or active:
            while skip_unchanged(pending, active, decided, records, previous, cache, force):
                pass  # again: what reads only the skipped steps may be skippable now
            step = None if failed or stop_requested() else next_step(pending, active)
            if step is None:
                if not active:
                    break
                if not failed and not stop_requested():
                    running.alone()  # one running, nothing can start beside it: it takes the freed cores
                child = running.wait_next()
                end_child(child, *active.pop(child.name), top, records, failed)
                continue
            pending.remove(step)
            action, extra, records[step.name] = decided[step.name]  # recorded as it starts, not before
            others = [o for o in pending if o.name in SIDE_BY_SIDE and inputs_done(o, pending, active, step)]
            if beside and step.name in SIDE_BY_SIDE and (active or others):
                config_file = Path(tmp) / f"{step.name}.yaml"
                config_file.write_text(yaml.safe_dump(to_dict(step_config(step, extra)), sort_keys=False))
                start_record(step, action, top, records[step.name])
                for name in active:
                    records[name].setdefault("beside", []).append(step.name)
                records[step.name]["beside"] = list(active)
                running.start(step.name, child_command(step, config_file))
                active[step.name] = (step, action)
                log.info(f"pipeline: {step.name} in a process of its own, {threads_each()} thread(s)"
                         + (f", beside {', '.join(n for n in active if n != step.name)}" if len(active) > 1 else "")
                         + " (parallel=false: one step at a time)")
            else:
                run_here(step, action, extra, top, records[step.name])
    if failed:
        stopped = all(s for _, s, _ in failed)
        top.write_manifest("interrupted" if stopped else "failed")
        if stopped:
            raise Interrupted(str(stop_requested() or "a signal"))
        name, _, error = next(f for f in failed if not f[1])
        raise AlignError(f"step {name} failed: {error}")
    if stop_requested():  # a signal that came as a step beside another finished
        top.write_manifest("interrupted")
        raise Interrupted(str(stop_requested()))


def skip_unchanged(pending: list[PlannedStep], active: dict[str, Any], decided: dict[str, Any],
                   records: dict[str, dict[str, Any]], previous: dict[str, Any], cache: dict[Any, str],
                   force: bool) -> bool:
    """Decide (`decide`) every pending step whose inputs are done and not decided yet; take the unchanged ones out
    of `pending` as skipped. True if any was skipped."""
    skipped = False
    for step in [s for s in pending if s.name not in decided and inputs_done(s, pending, active)]:
        decided[step.name] = decide(step, previous, cache, force)
        if decided[step.name][0] == "skip":
            pending.remove(step)
            records[step.name] = decided[step.name][2] | {"status": "skipped", "seconds": 0.0}
            log.info(f"pipeline: {step.name}: unchanged since its last run, skipped")
            skipped = True
    return skipped


def decide(step: PlannedStep, previous: dict[str, Any], cache: dict[Any, str],
           force: bool) -> tuple[str, list[str], dict[str, Any]]:
    """`how_to_run` for a step whose inputs are done (its fingerprint hashes them), and the step's record with
    that fingerprint, to be kept once the step is skipped or starts (not before: a pipeline stopped in between must
    not find the new fingerprint beside the last run's status)."""
    record = dict(previous.get(step.name, {}))
    fp = fingerprint(step.stage, to_dict(step.config if step.config is not None else step_config(step)), cache)
    action, extra = how_to_run(step, record, fp, force)
    record.update({"dir": step.dir.name, "recipe": str(step.recipe) if step.recipe else None, "fingerprint": fp})
    return action, extra, record


def start_record(step: PlannedStep, action: str, top: Run, record: dict[str, Any]) -> None:
    record.pop("beside", None)  # these two are set again when it runs in a process beside another step
    record.pop("peak_rss_mb", None)
    record.update({"status": "running", "started_at": now(), "seconds": None})
    top.write_manifest("running")
    log.info(f"pipeline: {step.name}: {'resuming' if action == 'resume' else 'running'} "
             f"({step.recipe or 'built-in'} -> {step.dir})")


def end_record(action: str, record: dict[str, Any], seconds: float) -> None:
    record.pop("error", None)
    record.update({"status": "resumed" if action == "resume" else "ran", "seconds": seconds,
                   "run_seconds": seconds, "finished_at": now()})


def run_here(step: PlannedStep, action: str, extra: list[str], top: Run, record: dict[str, Any]) -> None:
    """One step in this process."""
    start_record(step, action, top, record)
    t0 = time.perf_counter()
    try:
        step.run(step_config(step, extra))
    except BaseException as e:
        fail_active_runs(f"{type(e).__name__}: {e}")
        stopped = isinstance(e, KeyboardInterrupt)  # Ctrl-C or a scheduler's SIGTERM: resumable
        record.update({"status": "interrupted" if stopped else "failed",
                       "seconds": time.perf_counter() - t0, "error": f"{type(e).__name__}: {e}"[:500]})
        top.write_manifest("interrupted" if stopped else "failed")
        raise
    finally:
        release_memory()
    end_record(action, record, time.perf_counter() - t0)
    top.write_manifest("running")
    if stop_requested():  # a signal that came as the step finished, when nothing polled for it
        raise Interrupted(str(stop_requested()))


# ---------------------------------------------------------------- two steps side by side

# Training steps worth a process of their own: on 2 cores, PPO and online RLAIF with one thread each side by side
# took 416 s against 259 + 254 s one after another with two threads (2026-12-06, the pipeline's own folders).
SIDE_BY_SIDE = ("reward", "dpo", "ppo", "online")
SIDE_BY_SIDE_MIN_GIB = 12  # two training processes of the default model peak at ~5 GB each


def reads(step: PlannedStep, other: PlannedStep) -> bool:
    """Does `step`'s resolved config name `other`'s folder, or anything in it?"""
    folder = str(other.dir)

    def strings(value: Any) -> list[str]:
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return [value] if isinstance(value, str) else []

    config = to_dict(step.config if step.config is not None else step_config(step))
    return any(s == folder or s.startswith(folder + "/") for s in strings({**config, "output_dir": ""}))


def inputs_done(step: PlannedStep, pending: list[PlannedStep], active: dict[str, Any],
                also: PlannedStep | None = None) -> bool:
    """Are the steps whose folders `step` reads done: none of them pending, running (or `also`)?"""
    waiting = [o for o in pending if o is not step] + [o for o, _ in active.values()] + ([also] if also else [])
    return not any(reads(step, o) for o in waiting)


def next_step(pending: list[PlannedStep], active: dict[str, Any]) -> PlannedStep | None:
    """The first pending step that may start now: its inputs done, and either nothing running, or it is a
    SIDE_BY_SIDE step, one process is free and every pending step before it is a SIDE_BY_SIDE step too (the
    others keep their place in the order)."""
    for step in pending:
        if step.name not in SIDE_BY_SIDE:
            return step if not active and inputs_done(step, pending, active) else None
        if len(active) < 2 and inputs_done(step, pending, active):
            return step
    return None


def child_command(step: PlannedStep, config_file: Path) -> list[str]:
    """`align <stage> <its resolved config>` in a fresh interpreter (which stops when this process dies: PARENT_ENV,
    its own session: a terminal's Ctrl-C reaches this process only, which passes it on)."""
    return [sys.executable, "-m", "align.cli", step.stage, str(config_file)]


def end_child(child: Child, step: PlannedStep, action: str, top: Run, records: dict[str, dict[str, Any]],
              failed: list[tuple[str, bool, str]]) -> None:
    """Record a step that ran in its own process; a failure (or a stop) is added to `failed` (name, stopped,
    error): the steps beside it finish, no new one starts, then the pipeline stops on it."""
    record, proc = records[step.name], child.proc
    record["peak_rss_mb"] = round(child.peak_mb)
    if proc.returncode == 0:
        end_record(action, record, child.seconds)
        top.write_manifest("running")
        return
    stopped = proc.returncode == 130 or stop_requested() is not None
    error = child.last_line()
    if proc.returncode < 0:  # killed (a SIGKILL, the kernel's out-of-memory killer): it could not say so
        error = f"align {step.stage} was killed by {signal.Signals(-proc.returncode).name}"
        mark_killed(step.dir, error)
    record.update({"status": "interrupted" if stopped else "failed", "seconds": child.seconds, "error": error[:500]})
    top.write_manifest("running")
    failed.append((step.name, stopped, error))


def mark_killed(run_dir: Path, error: str) -> None:
    """A step's run folder left `running` by a killed process: marked `failed` with the reason (a later pipeline
    run resumes it from its last complete checkpoint, as it would after a failure)."""
    from align.runs import atomic_write_json

    manifest = read_manifest(run_dir)
    if manifest is not None and manifest.status == "running":
        atomic_write_json(run_dir / "manifest.json", {**manifest, "status": "failed", "error": error,
                                                      "finished_at": now()})


def print_summary(records: dict[str, dict[str, Any]], total: float) -> None:
    print(f"\n{'step':<12} {'status':<9} {'this run':>10} {'last run':>10}")
    for name, r in records.items():
        beside = (f"  beside {', '.join(r['beside'])}, peak RSS {r.get('peak_rss_mb', 0) / 1024:.1f} GiB"
                  if r.get("beside") else "")
        print(f"{name:<12} {r['status']:<9} {r.get('seconds') or 0.0:>9.1f}s {r.get('run_seconds') or 0.0:>9.1f}s"
              f"{beside}")
    print(f"{'total':<12} {'':<9} {total:>9.1f}s "
          f"{sum(r.get('run_seconds') or 0.0 for r in records.values()):>9.1f}s", flush=True)
    if any(r.get("beside") for r in records.values()):
        print("(steps beside another ran at the same time, in two processes: this run's total is its wall time, "
              "the last-run column sums the steps)")


def seed_configs(cfg: Config) -> list[Config]:
    """One pipeline config per training seed, each in its own folder under output_dir."""
    if len(set(cfg.seeds)) != len(cfg.seeds) or any(s < 0 for s in cfg.seeds):
        raise ConfigError(f"seeds={list(cfg.seeds)}: give distinct non-negative seeds, e.g. seeds=[1,2,3]")
    return [dataclasses.replace(cfg, seed=s, seeds=[], output_dir=str(Path(cfg.output_dir) / f"seed-{s}"))
            for s in cfg.seeds]


def run_seeds(cfg: Config) -> Path:
    """The pipeline once per seed, then the quality report over the seeds' evaluations (quality.json)."""
    from align.quality import print_quality, quality_report, read_seed_evals
    from align.runs import atomic_write_json

    configs = seed_configs(cfg)
    if cfg.until or not cfg.steps.get("eval", Step()).enabled:
        raise ConfigError("seeds=[...] compares the seeds' evaluations: run every step through eval (no `until`)")
    t0 = time.perf_counter()
    for sub in configs:
        log.info(f"pipeline: training seed {sub.seed} -> {sub.output_dir}")
        run(sub)
    rows, evals = read_seed_evals({sub.seed: Path(sub.output_dir) / "eval" for sub in configs})
    report = quality_report(rows, evals) | {"seconds": time.perf_counter() - t0}
    atomic_write_json(Path(cfg.output_dir) / "quality.json", report)
    print_quality(report)
    return Path(cfg.output_dir)


def beside(cfg: Config, steps: list[PlannedStep]) -> bool:
    """Whether this run puts two steps side by side (`parallel`, when the plan has such a pair and the machine
    can); says why not when it cannot."""
    candidates = [s for s in steps if s.name in SIDE_BY_SIDE]
    if not cfg.parallel or all(reads(a, b) or reads(b, a) for i, a in enumerate(candidates)
                               for b in candidates[i + 1:]):
        return False
    reason = why_not_two(SIDE_BY_SIDE_MIN_GIB)
    if reason:
        log.info(f"pipeline: steps one after another ({reason})")
    return reason is None


def run(cfg: Config) -> Path:
    from align.stages.eval import print_table, read_eval

    if cfg.seeds:
        return run_seeds(cfg)
    root = Path(cfg.output_dir)
    steps = plan(cfg)
    take_lock(root)  # one pipeline per folder: a second launch is refused, naming this one
    # SIGTERM/SIGUSR1/Ctrl-C, during a step or between two: the step checkpoints and stops, the pipeline is marked
    # interrupted, and the same command continues it
    with stop_signals_held():
        try:
            if cfg.overwrite and root.is_dir() and any(root.iterdir()):
                check_replaceable(root, "pipeline", to_dict(cfg))
                shutil.rmtree(root)
            root.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            records = execute(steps, root, to_dict(cfg), force=cfg.force,
                              inputs=[*cfg.human, cfg.prompts, cfg.eval_prompts], beside=beside(cfg, steps))
        finally:
            release_lock(root)
    print_summary(records, time.perf_counter() - t0)
    if "eval" in records:
        evaluation = read_eval(root / records["eval"]["dir"])
        if evaluation:
            print()
            print_table(evaluation)
    return root
