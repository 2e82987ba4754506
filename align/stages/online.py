"""online: on-policy RLAIF — rounds of (sample k responses from the current policy -> an AI judge labels them ->
DPO on the new pairs from the current policy); the next round starts from the result.

This is iterative / online DPO with rejection-sampling pairs as in the literature we follow:
- Xu et al. 2023, "Some things are more CRINGE than others: iterative preference optimization with the pairwise
  cringe loss" (arXiv:2312.16682) and Yuan et al. 2024, "Self-Rewarding Language Models" (arXiv:2401.10020):
  each round samples from the current model, a judge picks (best, worst) pairs, DPO trains from the current model;
- Xiong et al. 2024, "Iterative Preference Learning from Human Feedback: Bridging Theory and Practice for RLHF
  under KL-Constraint" (arXiv:2312.11456) and Dong et al. 2024, "RLHF Workflow: From Reward Modeling to Online
  RLHF" (arXiv:2405.07863): a reward model trained on human labels is the judge, best-vs-worst of k samples
  makes the pair, and an NLL term on the chosen response (Pang et al. 2024, RPO, arXiv:2404.19733) keeps it likely.

Each round is a folder `round-<r>/` of ordinary stage runs (generate/, judge/, preferences/, dpo/), so every part
is inspectable and resumable: `resume=true` skips finished parts and continues the interrupted one. The online
run's manifest, metrics.jsonl and TensorBoard hold per-round pairs, judge abstain rate and agreement with the human
labels (when `human` is given), and the held-out reward and KL to the starting policy.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.config import DTYPE_HELP, Dtype, from_dict, opt, to_dict
from align.data.records import PromptRecord, read_prompts, write_jsonl
from align.errors import AlignError, ConfigError
from align.generation import SamplingSettings
from align.models.peft import PeftSettings
from align.rewards import RewardSettings
from align.runs import Run, interrupt_active_runs, read_manifest, start_run, stop_requested
from align.stages.dpo import DPOSettings
from align.tracking import Tracker
from align.training import TrainSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JudgeSettings:
    spec: str = opt("reward_model", "judge spec: a name under judges/ (reward_model: the RM trained on human labels), "
                                    "a YAML path, a built-in kind, or package.module:Class")
    options: dict[str, Any] = opt({}, "override the spec's options, e.g. {path: runs/reward}")
    min_margin: float = opt(0.0, "score judges: best and worst must differ by this much to make a pair", ge=0.0)
    max_failure_rate: float = opt(0.2, "fail the round when more judgements than this fail", ge=0.0, le=1.0)
    heldout: str = opt("", "human pairs the judge did NOT learn from (a preference JSONL, or an import run "
                           "folder: its valid split): its agreement with them is measured and printed before "
                           "round 1 ('': use `human`, if given)")
    min_agreement: float = opt(0.0, "stop, before training on its labels, when the judge agrees with the human "
                                    "pairs on less than this share of its decided pairs (abstaining on all: 0); "
                                    "checked before round 1 and after every round's judging (0: never stop)",
                               ge=0.0, le=1.0)


@dataclass(frozen=True)
class EvalSettings:
    prompts: str = opt("data/prompts/eval.jsonl", "held-out prompts for the per-round reward and KL")
    size: int = opt(16, "held-out prompts per round (0: skip)", ge=0)
    reward: RewardSettings = opt(RewardSettings(), "reward for the per-round check (the trained reward model)")
    sampling: SamplingSettings = opt(SamplingSettings(temperature=0.7, top_p=0.95, max_new_tokens=48),
                                     "sampling for the check")


@dataclass(frozen=True)
class Config:
    policy: str = opt("runs/sft", "the starting policy: an SFT run folder, a model or adapter folder")
    prompts: str = opt("data/prompts/train.jsonl", "training prompts; each round takes the next slice")
    output_dir: str = opt("runs/online", "where the rounds go")
    overwrite: bool = opt(False, "replace an existing output_dir")
    resume: bool = opt(False, "continue: finished rounds (and finished parts of a round) are kept")
    seed: int = opt(42, "random seed (round r uses seed + r)", ge=0)
    dtype: Dtype = opt("float32", DTYPE_HELP)
    rounds: int = opt(2, "rounds of sample -> judge -> DPO", ge=1)
    prompts_per_round: int = opt(64, "prompts sampled per round (the next slice of `prompts`, wrapping around)",
                                 ge=1)
    k: int = opt(4, "responses per prompt; the judge's best and worst make the pair", ge=2)
    sampling: SamplingSettings = opt(SamplingSettings(temperature=0.9, top_p=1.0, max_new_tokens=64),
                                     "sampling from the current policy")
    judge: JudgeSettings = opt(JudgeSettings(), "the AI judge that labels the samples")
    human: str = opt("", "human preference JSONL or import run folder: the judge's agreement with it is reported "
                         "per round, and with human_mix its pairs are trained on too")
    human_mix: bool = opt(False, "add the human pairs to every round's DPO data")
    dpo: DPOSettings = opt(DPOSettings(beta=0.5, sft_weight=1.0), "the DPO loss (sft_weight: RPO's NLL term)")
    peft: PeftSettings = opt(PeftSettings(dropout=0.0), "a fresh adapter per round (lora | qlora | dora | ia3 | full)")
    train: TrainSettings = opt(TrainSettings(lr=1e-4, batch_size=4, max_steps=16, lr_scheduler="constant",
                                             warmup_ratio=0.0, eval_steps=0, save_steps=8, logging_steps=2),
                               "optimisation per round")
    eval: EvalSettings = opt(EvalSettings(), "held-out reward and KL to the starting policy after each round")

    def __post_init__(self) -> None:  # cross-field rules, checked before anything runs
        from align.models.policy import check_method

        check_method("online", self.peft.method)
        if self.human_mix and not self.human:
            raise ConfigError("human_mix=true needs human=<preference file or import run folder>")


def round_prompts(prompts: list[PromptRecord], r: int, n: int) -> list[dict[str, Any]]:
    """Round r's (1-based) slice of n prompts, wrapping around the file."""
    return [prompts[(i) % len(prompts)].to_json() for i in range((r - 1) * n, r * n)]


def substage(stage: str, out: Path, settings: dict[str, Any]) -> Path:
    """Run one stage of a round into `out`, or keep it when it already completed (a resumed online run)."""
    import importlib

    from align.stages import STAGES

    manifest = read_manifest(out)
    if manifest is not None and manifest.status == "completed":
        return out
    module = importlib.import_module(STAGES[stage])
    fields = {f.name for f in dataclasses.fields(module.Config)}
    started = manifest is not None
    how = {"resume": started} if "resume" in fields else {}
    if started and not how.get("resume"):
        how["overwrite"] = True
    cfg = from_dict(module.Config, {**settings, **how, "output_dir": str(out)}, f"online:{stage}")
    done = module.run(cfg)
    if stop_requested():  # a stop signal that came as the substage finished, when nothing polled for it
        interrupt_active_runs(f" after {out}")
    return done


def round_settings(cfg: Config, r: int, policy: str, rdir: Path) -> dict[str, dict[str, Any]]:
    """The settings of each stage of round r (policy: the folder the round starts from)."""
    generate = {"model": policy, "prompts": str(rdir / "prompts.jsonl"), "k": cfg.k, "seed": cfg.seed + 1000 * r,
                "sampling": to_dict(cfg.sampling), "engine": {"backend": "auto", "dtype": cfg.dtype}}
    judge = {"samples": str(rdir / "generate"), "judge": cfg.judge.spec, "judge_options": dict(cfg.judge.options),
             "pairing": "best_worst", "min_margin": cfg.judge.min_margin, "seed": cfg.seed + r,
             "max_failure_rate": cfg.judge.max_failure_rate, "cache_dir": str(judge_cache(rdir.parent)),
             **({"human": cfg.human} if cfg.human else {})}
    prefs = {"inputs": [str(rdir / "judge")] + ([cfg.human] if cfg.human_mix else []), "validation": []}
    dpo = {"policy": policy, "seed": cfg.seed + r, "dtype": cfg.dtype,
           "data": {"train": str(rdir / "preferences"), "validation": "", "validation_fraction": 0.0},
           "dpo": to_dict(cfg.dpo), "peft": to_dict(cfg.peft), "train": to_dict(cfg.train), "eval": {"size": 0}}
    return {"generate": generate, "judge": judge, "preferences": prefs, "dpo": dpo}


def judge_cache(run_dir: Path) -> Path:
    """One judge cache for the whole online run: the judge check and every round ask the same judge about the same
    human pairs (each round re-measures its agreement with them), and a verdict is keyed on the judge's identity and
    the exact prompt and responses, so only new samples cost a judgement (with the 135M reward model as judge the
    human pairs were ~110 s of each ~300 s round)."""
    out = run_dir / "judge-cache"
    out.mkdir(parents=True, exist_ok=True)
    return out


def held_out(cfg: Config, start: Path, policy: Path) -> dict[str, float]:
    """Held-out reward of the starting policy and the current one, and KL(current || start) per token."""
    import torch

    from align.models.policy import load_policy
    from align.rewards import load_reward
    from align.rlhf.evaluate import evaluate_policy

    reward_fn, _ = load_reward(cfg.eval.reward)
    prompts = [p.prompt for p in read_prompts(cfg.eval.prompts)[: cfg.eval.size]]
    current = load_policy(policy, stage="online", dtype=cfg.dtype)
    reference = load_policy(start, stage="online", dtype=cfg.dtype).model
    if torch.cuda.is_available():
        current.model.to("cuda")
        reference.to("cuda")
    metrics, _ = evaluate_policy(current.model, reference, current.tokenizer, prompts, cfg.eval.sampling, reward_fn)
    del current, reference
    gc.collect()
    return {"reward_start": metrics["eval/reward_before"], "reward": metrics["eval/reward_after"],
            "kl_to_start": metrics["eval/kl"], "length": metrics["eval/length_after"]}


def judge_agreement(cfg: Config, out: Path) -> dict[str, float] | None:
    """Run the judge on the held-out human pairs alone (a judge stage with no samples, in `out`) and return its
    human_* metrics: agreement on decided pairs, decided, pairs. None when there are no human pairs to ask."""
    from align.runs import resolve_input

    source = cfg.judge.heldout or cfg.human
    if not source:
        return None
    human = resolve_input(source, what="held-out human pairs", stages=("import", "preferences"),
                          outputs=("valid", "validation") if cfg.judge.heldout else ("preferences", "train"))
    out.mkdir(parents=True, exist_ok=True)
    # the judge stage needs a samples file: one row with no response to compare is judged zero times
    (out.parent / "no-samples.jsonl").write_text(json.dumps(
        {"prompt": [{"role": "user", "content": "(judge check: no samples)"}], "responses": [""]}) + "\n")
    settings = {"samples": str(out.parent / "no-samples.jsonl"), "judge": cfg.judge.spec,
                "judge_options": dict(cfg.judge.options), "human": str(human), "seed": cfg.seed,
                "max_failure_rate": cfg.judge.max_failure_rate, "cache_dir": str(judge_cache(out.parent.parent))}
    metrics = (read_manifest(substage("judge", out, settings)) or {}).get("metrics", {})
    return {"agreement": metrics.get("human_agreement", 0.0), "decided": metrics.get("human_decisive", 0.0),
            "pairs": metrics.get("human_pairs", 0.0), "source": str(human)}


def require_agreement(run_: Run, agreement: float, minimum: float, what: str) -> None:
    """Stop (the run marked failed) with the number when the judge agrees with the humans less than `minimum`."""
    if agreement < minimum:
        message = (f"online: {what}: the judge agrees with the human labels on {agreement:.1%} of its decided "
                   f"pairs, below judge.min_agreement={minimum:g}; stopping before training on its labels "
                   f"(use a better judge, or lower judge.min_agreement)")
        run_.fail(message)
        raise AlignError(message)


def round_metrics(rdir: Path) -> dict[str, float]:
    """Per-round numbers from the round's judge and dpo manifests."""
    judge = read_manifest(rdir / "judge") or {}
    dpo = read_manifest(rdir / "dpo") or {}
    jm, dm = judge.get("metrics", {}), dpo.get("metrics", {})
    out = {"ai_pairs": jm.get("preferences", 0.0), "pairs_judged": jm.get("pairs_judged", 0.0),
           "abstain_rate": jm.get("abstain_rate", 0.0), "judge_failures": jm.get("failures", 0.0),
           "dpo_loss": dm.get("train_loss", dm.get("loss", float("nan"))),
           "dpo_reward_accuracy": dm.get("rewards/accuracies", float("nan"))}
    if "human_agreement" in jm:
        out["judge_agreement"] = jm["human_agreement"]
    return out


def run(cfg: Config) -> Path:
    from align.models.load import resolve_model
    from align.rewards import check_reward
    from align.runs import resolve_input

    prompts = read_prompts(cfg.prompts)
    start = resolve_model(cfg.policy)  # every input is checked before the run folder exists
    if cfg.human:
        resolve_input(cfg.human, what="human preference data", stages=("import", "preferences"),
                      outputs=("preferences", "train"))
    if cfg.eval.size > 0:
        check_reward(cfg.eval.reward)
        read_prompts(cfg.eval.prompts)
    from align.judges.registry import read_spec

    read_spec(cfg.judge.spec)
    run_ = start_run("online", cfg, resume=cfg.resume)
    run_.add_input(cfg.prompts)
    run_.add_input(start)
    check = judge_agreement(cfg, run_.dir / "judge-check" / "judge")
    if check is not None:
        run_.extra["judge_check"] = check
        log.info(f"online: before round 1, judge {cfg.judge.spec} agrees with {check['decided']:.0f} decided of "
                 f"{check['pairs']:.0f} held-out human pairs on {check['agreement']:.1%} ({check['source']})")
        require_agreement(run_, check["agreement"], cfg.judge.min_agreement, "before round 1")
    # <run>/tb, plus MLflow / W&B in train.report_to; closed whatever happens, marked failed on an error
    with Tracker.open(run_.dir, cfg.train.report_to) as tracker:
        rows, policy = run_rounds(cfg, run_, prompts, start, tracker)
        if policy == str(start):
            message = (f"online: no round produced a preference pair ({cfg.rounds} rounds); see the rounds' "
                       f"verdicts.jsonl")
            run_.fail(message)
            raise AlignError(message)
    run_.add_output("model", Path(policy) / "model")
    run_.extra["rounds"] = rows
    run_.metrics.update({f"final/{k}": v for k, v in rows[-1].items() if k != "round"})
    run_.metrics["ai_pairs_total"] = sum(row["ai_pairs"] for row in rows)
    print(f"online: {cfg.rounds} rounds, {run_.metrics['ai_pairs_total']:.0f} AI-labelled pairs; final policy "
          f"{policy}", flush=True)
    return run_.finish()


def run_rounds(cfg: Config, run_: Run, prompts: list[PromptRecord], start: Path,
               tracker: Tracker) -> tuple[list[dict[str, Any]], str]:
    """Every round in turn (finished ones kept on resume): (one metrics row per round, the final policy folder)."""
    from align.models.load import resolve_model

    rows: list[dict[str, Any]] = []
    policy = str(start)
    for r in range(1, cfg.rounds + 1):
        rdir = run_.dir / f"round-{r}"
        rdir.mkdir(exist_ok=True)
        if not (rdir / "prompts.jsonl").is_file():
            write_jsonl(rdir / "prompts.jsonl", round_prompts(prompts, r, cfg.prompts_per_round))
        log.info(f"online: round {r}/{cfg.rounds} from {policy}")
        settings = round_settings(cfg, r, policy, rdir)
        for stage in ("generate", "judge", "preferences", "dpo"):
            if stage == "preferences" and not round_metrics(rdir)["ai_pairs"] and not cfg.human_mix:
                # Every pair tied or abstained (e.g. the policy already does what the judge rewards): nothing to
                # learn from, so this round keeps its policy instead of failing on an empty preference file.
                log.info(f"online: round {r}: the judge decided no pair; the policy carries over unchanged")
                break
            substage(stage, rdir / stage, settings[stage])
            release_engines(run_, r, stage)  # the next substage gets the GPU back
            if stage == "judge" and cfg.human:
                require_agreement(run_, round_metrics(rdir).get("judge_agreement", 0.0), cfg.judge.min_agreement,
                                  f"round {r}")
        else:
            policy = str(rdir / "dpo")
        row = {"round": r, "trained": policy == str(rdir / "dpo"), **round_metrics(rdir)}
        if cfg.eval.size > 0:
            row |= held_out(cfg, start, resolve_model(policy))
        rows.append(row)
        record_round(run_, tracker, row)
    return rows, policy


def release_engines(run_: Run, r: int, stage: str) -> None:
    """After a substage: shut down the vLLM engines it left open and free memory as the pipeline does between
    stages; what each engine was given (memory share, dtype, sleep mode) goes into the manifest."""
    from align.generation.vllm import close_engines
    from align.stages.pipeline import release_memory

    engines = close_engines()
    release_memory()
    if engines:
        run_.extra.setdefault("engines", []).extend({"round": r, "stage": stage, **e} for e in engines)


def record_round(run_: Run, tracker: Tracker, row: dict[str, Any]) -> None:
    """One metrics.jsonl line per round, rewritten, so a resume that redoes a round's numbers does not duplicate
    them; and the trackers' round/<name> metrics at step = the round."""
    path = run_.dir / "metrics.jsonl"
    kept = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    kept = [k for k in kept if k["round"] < row["round"]] + [row]
    path.write_text("".join(json.dumps(k) + "\n" for k in kept))
    tracker.log({f"round/{k}": float(v) if isinstance(v, bool) else v for k, v in row.items() if k != "round"},
                step=row["round"])
    summary = ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "round" and isinstance(v, float))
    log.info(f"online: round {row['round']}: {summary}")
