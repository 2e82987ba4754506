"""pipeline: SFT -> import (human labels) -> generate + judge (AI labels) -> preferences -> reward -> PPO + DPO
-> online RLAIF (the reward model judges the policy's own samples, round after round) -> eval -> report, in one process, each step in its own folder under `output_dir`. Stages come from the registry in align/stages/__init__.py;
fingerprints from align/runs.py.

Each step is `run(load_config(module.Config, recipe, overrides))` with the step's recipe (stages/<stage>.yaml,
or `recipes`/<stage>.yaml), the pipeline's wiring (output_dir under the pipeline folder, upstream run folders as
inputs) and then your `steps.<name>.overrides`. A step is skipped when its manifest says completed and its
fingerprint — sha256 of the resolved config plus the hashes of everything it reads (files, and the outputs of
upstream run folders) — equals the one recorded when it last ran. `force=true` re-runs every step. A step that
was interrupted resumes (stages with `resume`, when nothing changed) or restarts with overwrite=true.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import importlib.util
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from align.config import load_config, opt, to_dict
from align.errors import ConfigError
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
                "eval": {"reward": {"model": d["reward"], "function": ""}}},
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
    gc.collect()
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
            inputs: list[str] = ()) -> dict[str, Any]:
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
        run_steps(steps, top, previous, records, cache, force)
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
              cache: dict[Any, str], force: bool) -> None:
    """Run (or skip) each step in turn, recording it in `records` and the pipeline manifest `top`."""
    for step in steps:
        record = dict(previous.get(step.name, {}))
        fp = fingerprint(step.stage, to_dict(step.config if step.config is not None else step_config(step)), cache)
        action, extra = how_to_run(step, record, fp, force)
        record.update({"dir": step.dir.name, "recipe": str(step.recipe) if step.recipe else None, "fingerprint": fp})
        records[step.name] = record
        if action == "skip":
            record.update({"status": "skipped", "seconds": 0.0})
            log.info(f"pipeline: {step.name}: unchanged since its last run, skipped")
            continue
        record.update({"status": "running", "started_at": now(), "seconds": None})
        top.write_manifest("running")
        log.info(f"pipeline: {step.name}: {'resuming' if action == 'resume' else 'running'} "
                 f"({step.recipe or 'built-in'} -> {step.dir})")
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
        seconds = time.perf_counter() - t0
        record.pop("error", None)
        record.update({"status": "resumed" if action == "resume" else "ran", "seconds": seconds,
                       "run_seconds": seconds, "finished_at": now()})
        top.write_manifest("running")
        if stop_requested():  # a signal that came as the step finished, when nothing polled for it
            raise Interrupted(str(stop_requested()))


def print_summary(records: dict[str, dict[str, Any]], total: float) -> None:
    print(f"\n{'step':<12} {'status':<9} {'this run':>10} {'last run':>10}")
    for name, r in records.items():
        print(f"{name:<12} {r['status']:<9} {r.get('seconds') or 0.0:>9.1f}s {r.get('run_seconds') or 0.0:>9.1f}s")
    print(f"{'total':<12} {'':<9} {total:>9.1f}s "
          f"{sum(r.get('run_seconds') or 0.0 for r in records.values()):>9.1f}s", flush=True)


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
                              inputs=[*cfg.human, cfg.prompts, cfg.eval_prompts])
        finally:
            release_lock(root)
    print_summary(records, time.perf_counter() - t0)
    if "eval" in records:
        evaluation = read_eval(root / records["eval"]["dir"])
        if evaluation:
            print()
            print_table(evaluation)
    return root
