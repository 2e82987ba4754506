"""eval: compare aligned policies with the SFT policy on held-out prompts.

Every policy (SFT first, then each aligned one) samples one response per prompt with the same sampling settings
and seed. Reported per policy: the reward model's mean score, the win rate against SFT by the configured judge
(score judges compare scores; a pairwise judge is asked once per pair and is itself responsible for position
bias — the llm and openai judges ask both orders; ties count half, abstains are left out;
95% Wilson interval, see align/stats.py), the KL to the SFT policy, mean response length and the finished fraction.

The KL is exact, not a Monte-Carlo estimate: at every position of the policy's own sampled response,
KL(π(·|prefix) ‖ π_sft(·|prefix)) = Σ_v π(v|prefix) (log π(v|prefix) − log π_sft(v|prefix)) over the whole
vocabulary (raw temperature-1 distributions), summed over the response and reported per token. It is a true KL
at each prefix whatever sampler chose the prefix (here temperature 0.7 / top-p 0.9), and never negative; the
old Σ_t (log π(y_t) − log π_ref(y_t)) over tokens drawn at temperature 0.7 was neither. Every aligned policy is
measured against the same SFT policy, whatever chain of adapters it was trained through (online RLAIF stacks one
adapter per round): the SFT model itself is the reference, not the policy's adapter-disabled base.

With `sampling_seeds`, every prompt is sampled once per seed and `interval` gives the win rate's bootstrap interval
over prompts and sampling seeds (align/stats.py). The default judge is the house-style rules judge, which is not
the judge that produced training labels: a policy can learn to please its own labeller, so the evaluation judge
should differ.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from align.chat import SYSTEM_PROMPT_HELP, with_system_prompt
from align.config import DTYPE_HELP, Dtype, opt, to_dict
from align.data.records import Message, PromptRecord, read_prompts, write_jsonl
from align.errors import AlignError, ConfigError, DataError
from align.generation import Sample, SamplingSettings
from align.log import progress
from align.runs import atomic_write_json, resolve_input, start_run
from align.stats import Outcome, WinRate, count_outcomes, length_controlled_win_rate, score_outcome

log = logging.getLogger(__name__)

DEFAULT_JUDGE = "align.judges.house_style:house_style_score"


@dataclass(frozen=True)
class Config:
    sft: str = opt("runs/pipeline/sft", "the SFT policy (run folder or model/adapter folder): the baseline")
    policies: list[str] = opt(["runs/pipeline/ppo", "runs/pipeline/dpo"],
                              "aligned policies to compare with SFT (run folders or model/adapter folders)")
    names: list[str] = opt([], "display names for `policies` (default: their folder names)")
    reward_model: str = opt("runs/pipeline/reward", "reward run folder for mean scores ('' to skip)")
    prompts: str = opt("data/prompts/eval.jsonl", "held-out prompt-only JSONL (no stage trained on these)")
    max_prompts: int = opt(0, "use only the first N prompts (0: all)", ge=0)
    system_prompt: str = opt("", SYSTEM_PROMPT_HELP)
    judge: str = opt(DEFAULT_JUDGE, "win-rate judge: a judge spec YAML (judges/*.yaml), a rules function "
                                    "`module:function`, or a judge class `module:Class`")
    training_judges: list[str] = opt([], "judge specs that produced AI training labels (the pipeline fills "
                                         "it in): the report says whether the evaluation judge is among them")
    tie_margin: float = opt(0.0, "score judges: a score difference of at most this is a tie", ge=0.0)
    reference: str = opt("", "KL reference for every policy ('': the SFT policy `sft`)")
    sampling: SamplingSettings = opt(SamplingSettings(temperature=0.7, top_p=0.9, max_new_tokens=96, seed=1234),
                                     "sampling, identical for every policy")
    sampling_seeds: list[int] = opt([], "sample every prompt once per seed, e.g. [1, 2] ([]: once, with "
                                        "sampling.seed); the interval then resamples prompts and seeds")
    side_by_side: int = opt(6, "prompts shown side by side in eval.json and the report", ge=0)
    dtype: Dtype = opt("auto", DTYPE_HELP)
    trust_remote_code: bool = opt(False, "allow model code from model folders")
    output_dir: str = opt("runs/eval", "where eval.json and samples.jsonl go")
    overwrite: bool = opt(False, "replace an existing output_dir")
    seed: int = opt(0, "torch seed before each policy (sampling has its own seed)", ge=0)

    def __post_init__(self) -> None:  # cross-field rules, checked before anything runs
        if self.names and len(self.names) != len(self.policies):
            raise ConfigError(f"names has {len(self.names)} entries but policies has {len(self.policies)}; give one "
                              f"name per policy or none")


@dataclass
class PolicyResult:
    """One policy's samples and per-sample numbers (lists aligned with the prompts)."""

    name: str
    path: Path
    reference: str
    samples: list[Sample]
    kl_tokens: list[float]  # per sample: Σ over response tokens of the exact KL(π(·|prefix) ‖ π_ref(·|prefix))
    rewards: list[float | None] = field(default_factory=list)
    judge_scores: list[float | None] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    flips: int = 0

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.samples]


# ---------------------------------------------------------------- models

def load_policy(path: Path, dtype: str, trust_remote_code: bool) -> tuple[Any, Any]:
    """(model, tokenizer) for sampling and the KL passes (forward passes only). A LoRA-family adapter is merged
    into its base, as the generate stage's sampler does (the same model up to rounding, without the adapter's
    products in every layer), and on a CPU the linear layers are prepacked where that measured faster
    (`prepack_for_sampling`). Prompt-learning and X-LoRA adapters cannot be merged: they stay live."""
    from align.models.load import is_adapter, load_model, load_tokenizer
    from align.models.policy import load_policy as load
    from align.models.prepacked import prepack_for_sampling

    if is_adapter(path) and json.loads((path / "adapter_config.json").read_text()).get("peft_type") in LIVE_ONLY:
        policy = load(path, stage="eval", dtype=dtype, trust_remote_code=trust_remote_code)
        model, tokenizer = policy.model, policy.tokenizer
    else:
        model = load_model(path, dtype=dtype, trust_remote_code=trust_remote_code, merge=True).eval()
        tokenizer = load_tokenizer(path, trust_remote_code)
    return model.to("cuda") if torch.cuda.is_available() else prepack_for_sampling(model), tokenizer


LIVE_ONLY = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "XLORA")  # adapters that are not a weight delta


@dataclass
class Reference:
    """The model every aligned policy's KL is measured against (the SFT policy unless `reference` is set)."""

    model: Any
    tokenizer: Any
    path: Path
    name: str


def load_reference(cfg: Config, sft_path: Path) -> Reference:
    from align.models.load import resolve_model

    path = resolve_model(cfg.reference) if cfg.reference else sft_path
    model, tokenizer = load_policy(path, cfg.dtype, cfg.trust_remote_code)
    return Reference(model, tokenizer, path, short(path) + ("" if cfg.reference else " (SFT)"))


def adapter_chain(path: Path) -> list[Path]:
    """The model folders a policy is built from, itself first: an adapter's base, that base's base, ... down to a
    full model (online RLAIF stacks one adapter per round on the last round's policy)."""
    from align.models.load import base_of_adapter, is_adapter

    chain = [Path(path)]
    while is_adapter(chain[-1]) and len(chain) < 64:
        chain.append(base_of_adapter(chain[-1]))
    return chain


def sample_all(model: Any, tokenizer: Any, prompts: list[list[Message]], cfg: Config, name: str = "") -> list[Sample]:
    """One response per prompt for each sampling seed: [seed 1's prompts..., seed 2's prompts..., ...]. Asked one
    batch at a time (for the progress bar) with the seed the sampler gives a batch at that offset (`seed + start`),
    so the samples are those of one call over all prompts."""
    from align.generation.hf import HFSampler

    sampler = HFSampler(model, tokenizer)
    size = cfg.sampling.batch_size
    batches = [(seed, start) for seed in seeds_of(cfg) for start in range(0, len(prompts), size)]
    out: list[Sample] = []
    for seed, start in progress(batches, total=len(batches), desc=f"eval: sampling {name}".strip(), unit="batch"):
        params = dataclasses.replace(cfg.sampling, seed=seed + start)
        out += [group[0] for group in sampler.generate(prompts[start:start + size], params, n=1)]
    return out


def seeds_of(cfg: Config) -> list[int]:
    return list(cfg.sampling_seeds) or [cfg.sampling.seed]


def evaluate_policy(name: str, path: Path, prompts: list[list[Message]], cfg: Config,
                    ref: Reference) -> PolicyResult:
    """Sample from one policy and measure its exact KL to the reference; frees the model afterwards (the
    reference itself is sampled with its own loaded model and gets no KL)."""
    torch.manual_seed(cfg.seed)
    itself = Path(path).resolve() == ref.path.resolve()
    model, tokenizer = (ref.model, ref.tokenizer) if itself else load_policy(path, cfg.dtype, cfg.trust_remote_code)
    log.info(f"eval: sampling {len(prompts) * len(seeds_of(cfg))} responses from {name} ({path})")
    samples = sample_all(model, tokenizer, prompts, cfg, name)
    if itself:
        kl = [math.nan] * len(samples)
    else:
        kl = exact_sequence_kl(model, ref.model, samples, tokenizer.pad_token_id)
        if ref.path.resolve() not in {p.resolve() for p in adapter_chain(path)}:
            log.info(f"eval: note: {name} was not trained from {ref.name}; its KL is still measured to it")
    del model
    gc.collect()
    return PolicyResult(name=name, path=path, reference="itself" if itself else ref.name, samples=samples,
                        kl_tokens=kl)


KL_ESTIMATOR = ("exact: Σ_v π(v|prefix)·(log π(v|prefix) − log π_ref(v|prefix)) over the vocabulary at each "
                "position of the policy's own samples (raw temperature-1 distributions), summed over the response")


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact KL(softmax(logits) ‖ softmax(ref_logits)) over the last (vocabulary) axis, in fp32.

    logits, ref_logits: [..., V] -> [...]; never negative (up to rounding, clamped at 0)."""
    logp, ref_logp = logits.float().log_softmax(-1), ref_logits.float().log_softmax(-1)
    return (logp.exp() * (logp - ref_logp)).sum(-1).clamp(min=0.0)


@torch.no_grad()
def exact_sequence_kl(policy: Any, reference: Any, samples: list[Sample], pad_id: int, chunk: int = 4) -> list[float]:
    """Per sample: Σ over its response positions of the exact per-token KL(π(·|prefix) ‖ π_ref(·|prefix)).

    `chunk` rows at a time: each holds two [chunk, R, V] fp32 logit tensors (V = 49k for the default model). Rows
    are batched in order of length (prompts left-padded, responses right-padded: similar lengths pad little)."""
    from align.rlhf.policy import collate, model_device, response_logits

    order = sorted(range(len(samples)), key=lambda i: (len(samples[i].response_ids), len(samples[i].prompt_ids)))
    out = [0.0] * len(samples)
    for start in progress(range(0, len(samples), chunk), desc="eval: KL", unit="batch"):
        rows = order[start:start + chunk]
        batch = collate([samples[i] for i in rows], pad_id).to(model_device(policy))
        kl = token_kl(response_logits(policy, batch), response_logits(reference, batch.to(model_device(reference))))
        for i, value in zip(rows, (kl * batch.response_mask).sum(-1).tolist()):
            out[i] = value
    return out


def short(path: Path) -> str:
    """A readable name for a model folder: 'runs/pipeline/sft/model' -> 'runs/pipeline/sft/model' relative if
    possible, else the last three parts."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return "/".join(path.parts[-3:])


# ---------------------------------------------------------------- scoring

def reward_scores(reward_model: str, prompts: list[list[Message]], results: list[PolicyResult]) -> None:
    """Fill `rewards` of every result with the reward model's score (empty responses are scored too)."""
    from align.reward_model import RewardModel, encode

    rm = RewardModel.load(reward_model)
    for r in results:
        ids = [encode(rm.tokenizer, p, [{"role": "assistant", "content": s.text}]) for p, s in zip(prompts, r.samples)]
        r.rewards = list(rm.score_ids(ids))
    del rm
    gc.collect()


def build_judge(spec: str) -> Any:
    """A judge from a `module:function` rule, or anything the judge registry loads (a spec YAML, a name under
    judges/, a `module:Class`, an entry point)."""
    from align.judges import judge_kind
    from align.judges.registry import load_judge
    from align.judges.rules import Config as RulesConfig
    from align.judges.rules import RulesJudge
    from align.plugins import import_object

    if ":" in spec and not spec.endswith((".yaml", ".yml")) and not isinstance(import_object(spec, "judge"), type):
        judge: Any = RulesJudge(RulesConfig(function=spec))
    else:
        judge = load_judge(spec).judge
    judge_kind(judge)  # exactly one of judge()/score(), or a TypeError naming the class
    return judge


def judge_identities(spec: str) -> set[str]:
    """What a judge spec really calls: a rules spec is its function, an ensemble the union of its members,
    anything else its kind and options. Used to tell whether the evaluation judge labelled the training data."""
    from align.judges.registry import read_spec
    from align.judges.rules import Config as RulesConfig

    if ":" in spec and not spec.endswith((".yaml", ".yml")):
        return {spec}
    try:
        s = read_spec(spec)
    except ConfigError:
        return {spec}
    if s.kind == "rules":
        return {str(s.options.get("function", RulesConfig().function))}
    if s.kind == "ensemble":
        return set().union(*(judge_identities(m) if isinstance(m, str) else {json.dumps(m, sort_keys=True)}
                             for m in s.options.get("members", [])))
    return {f"{s.kind}:{json.dumps(s.options, sort_keys=True, default=str)}"}


def judge_policies(judge: Any, prompts: list[list[Message]], sft: PolicyResult, others: list[PolicyResult],
                   tie_margin: float) -> str:
    """Fill judge scores (score judges) and outcomes vs SFT for every aligned policy; returns the judge kind."""
    from align.judges import judge_kind

    kind = judge_kind(judge)
    if kind == "score":
        for r in [sft, *others]:
            r.judge_scores = [None if v is None else float(v) for v in judge.score(prompts, r.texts)]
        for r in others:
            r.outcomes = [score_outcome(a, b, tie_margin) for a, b in zip(r.judge_scores, sft.judge_scores)]
        return kind
    as_policy = {"a": "win", "b": "loss", "tie": "tie", "abstain": "abstain"}
    for r in others:
        # The policy's response is "a". De-biasing for position is the judge's job (the llm and openai judges
        # ask both orders and abstain when they disagree), so each pair is asked once here.
        verdicts = judge.judge(prompts, list(zip(r.texts, sft.texts)))
        r.outcomes = [as_policy[v.winner] for v in verdicts]  # type: ignore[misc]
        r.flips = sum(1 for v in verdicts if len(v.orders) == 2 and v.orders[0] != v.orders[1])
    return kind


# ---------------------------------------------------------------- summary

def mean(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None and not math.isnan(v)]
    return sum(got) / len(got) if got else None


def seed_interval(outcomes: list[Outcome], n_seeds: int) -> dict[str, Any] | None:
    """Bootstrap interval over sampling seeds x prompts of seed-major outcomes (None when there are none)."""
    from align.stats import OUTCOME_VALUE, bootstrap_win_rate

    if all(o == "abstain" for o in outcomes):
        return None
    values = [OUTCOME_VALUE[o] for o in outcomes]
    n = len(values) // n_seeds
    return bootstrap_win_rate([[values[i * n:(i + 1) * n] for i in range(n_seeds)]]).to_json()


def summarise(r: PolicyResult, baseline: PolicyResult, n_seeds: int = 1) -> dict[str, Any]:
    """The per-policy row of eval.json. `interval`: the win rate's bootstrap interval over prompts and sampling
    seeds (align/stats.py), which the Wilson interval of `win_rate` (every sample counted as independent) is not
    when there is more than one sampling seed."""
    n_tokens = sum(len(s.response_ids) for s in r.samples)
    kl_known = [k for k in r.kl_tokens if not math.isnan(k)]
    win: WinRate | None = count_outcomes(r.outcomes) if r.outcomes else None
    return {
        "name": r.name, "path": str(r.path), "reference": r.reference,
        "reward_mean": mean(r.rewards), "judge_mean": mean(r.judge_scores),
        "win_rate": win.to_json() if win else None, "position_flips": r.flips if r.outcomes else None,
        "interval": seed_interval(r.outcomes, n_seeds),
        # what the win rate would be at the baseline's length (see align/stats.py); flag: it wins by length
        "lc_win_rate": length_controlled_win_rate(r.outcomes, [len(s.response_ids) for s in r.samples],
                                                  [len(s.response_ids) for s in baseline.samples])
        if r.outcomes else None,
        "kl_to_reference": sum(kl_known) / n_tokens if kl_known and n_tokens else None,  # per token
        "kl_per_sequence": sum(kl_known) / len(kl_known) if kl_known else None,
        "length_tokens_mean": n_tokens / max(len(r.samples), 1),
        "length_words_mean": sum(len(s.text.split()) for s in r.samples) / max(len(r.samples), 1),
        "finished_fraction": sum(s.finished for s in r.samples) / max(len(r.samples), 1),
    }


def side_by_side(prompts: list[PromptRecord], results: list[PolicyResult], k: int) -> list[dict[str, Any]]:
    """The first `k` prompts with every policy's response, reward, judge score and outcome vs SFT."""
    rows = []
    for i in range(min(k, len(prompts))):
        rows.append({"prompt": prompts[i].prompt[-1]["content"], "responses": {
            r.name: {"text": r.samples[i].text, "reward": r.rewards[i] if r.rewards else None,
                     "judge": r.judge_scores[i] if r.judge_scores else None,
                     "outcome": r.outcomes[i] if r.outcomes else None} for r in results}})
    return rows


def sample_rows(prompts: list[PromptRecord], results: list[PolicyResult], seeds: list[int]) -> list[dict[str, Any]]:
    """One row per policy and sample; `index` counts samples, `prompt_index` and `sampling_seed` name the cell
    (the quality driver pairs rows of the same cell across policies)."""
    every = prompts * len(seeds)
    return [{"index": i, "policy": r.name, "prompt_index": i % len(prompts),
             "sampling_seed": seeds[i // len(prompts)], "prompt": p.prompt, "response": s.text,
             "tokens": len(s.response_ids),
             "finished": s.finished, "reward": r.rewards[i] if r.rewards else None,
             "judge": r.judge_scores[i] if r.judge_scores else None,
             "kl": None if math.isnan(r.kl_tokens[i]) else r.kl_tokens[i],
             "outcome_vs_sft": r.outcomes[i] if r.outcomes else None, "meta": p.meta}
            for r in results for i, (p, s) in enumerate(zip(every, r.samples))]


def policy_names(cfg: Config) -> list[str]:
    names = list(cfg.names) or [Path(p).name if Path(p).name != "model" else Path(p).parent.name
                                for p in cfg.policies]
    seen: dict[str, int] = {"sft": 1}
    out = []
    for n in names:  # unique display names: a second "ppo" becomes "ppo-2"
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return out


def run(cfg: Config) -> Path:
    from align.models.load import resolve_model

    if not cfg.policies:
        raise ConfigError("policies is empty; list the aligned run folders to compare with sft, e.g. "
                          "policies=[runs/ppo,runs/dpo]")
    records = [dataclasses.replace(r, prompt=with_system_prompt(r.prompt, cfg.system_prompt))
               for r in read_prompts(cfg.prompts)[: cfg.max_prompts or None]]
    if not records:
        raise DataError(f"{cfg.prompts}: no prompts to evaluate on")
    names = policy_names(cfg)
    sft_path = resolve_model(cfg.sft)
    paths = [resolve_model(p) for p in cfg.policies]
    judge = build_judge(cfg.judge)  # fail on a bad judge before minutes of sampling
    run_ = start_run("eval", cfg)
    run_.add_input(cfg.prompts)
    for p in [sft_path, *paths]:
        run_.add_input(p)
    if cfg.reward_model:
        run_.add_input(resolve_model(cfg.reward_model))

    prompts = [r.prompt for r in records]
    ref = load_reference(cfg, sft_path)
    sft = evaluate_policy("sft", sft_path, prompts, cfg, ref)
    others = [evaluate_policy(n, p, prompts, cfg, ref) for n, p in zip(names, paths)]
    del ref
    gc.collect()
    results = [sft, *others]
    seeds = seeds_of(cfg)
    every = prompts * len(seeds)  # results hold one sample per (sampling seed, prompt), seed-major
    if cfg.reward_model:
        reward_scores(cfg.reward_model, every, results)
    kind = judge_policies(judge, every, sft, others, cfg.tie_margin)

    used_for_training = set().union(*(judge_identities(j) for j in cfg.training_judges))
    report = {
        "judge": {"name": cfg.judge, "kind": kind, "training_judges": list(cfg.training_judges),
                  "differs_from_training_judge": not (judge_identities(cfg.judge) & used_for_training)},
        "prompts": {"file": cfg.prompts, "n": len(records)},
        "baseline": "sft", "sampling": to_dict(cfg.sampling), "sampling_seeds": seeds,
        "kl": {"estimator": "exact", "reference": "sft" if not cfg.reference else cfg.reference,
               "definition": KL_ESTIMATOR},
        "policies": [summarise(r, sft, len(seeds)) for r in results],
        "side_by_side": side_by_side(records, results, cfg.side_by_side),
    }
    atomic_write_json(run_.dir / "eval.json", report)
    write_jsonl(run_.dir / "samples.jsonl", sample_rows(records, results, seeds))
    run_.add_output("eval", run_.dir / "eval.json")
    run_.add_output("samples", run_.dir / "samples.jsonl")
    run_.extra["judge"] = report["judge"]
    for row in report["policies"]:
        for key in ("reward_mean", "judge_mean", "kl_to_reference", "length_tokens_mean", "finished_fraction"):
            if row[key] is not None:
                run_.metrics[f"{row['name']}_{key}"] = row[key]
        if row["win_rate"]:
            for key in ("rate", "low", "high", "wins", "losses", "ties", "abstains"):
                run_.metrics[f"{row['name']}_win_{key}"] = row["win_rate"][key]
        if row["lc_win_rate"]:
            run_.metrics[f"{row['name']}_lc_win_rate"] = row["lc_win_rate"]["rate"]
    print_table(report)
    return run_.finish()


def print_table(report: dict[str, Any]) -> None:
    j = report["judge"]
    same = "the SAME judge, win rates may be inflated"
    note = (f"; AI training labels came from {', '.join(j['training_judges']) or 'no judge'}: "
            + ("a different judge" if j["differs_from_training_judge"] else same))
    print(f"eval on {report['prompts']['n']} held-out prompts; win-rate judge {j['name']} ({j['kind']}){note}")
    print(f"{'policy':<12} {'reward':>8} {'judge':>7} {'win rate vs sft [95% CI]':>26} {'LC win':>7} "
          f"{'W/L/T/A':>13} {'KL/token':>9} {'tokens':>7}")
    fmt = lambda v, d=3: "—" if v is None else f"{v:.{d}f}"
    for row in report["policies"]:
        w = row["win_rate"]
        # several sampling seeds: the bootstrap interval over prompts and seeds (Wilson counts samples as independent)
        iv = row.get("interval") if len(report.get("sampling_seeds", [])) > 1 else None
        lo, hi = (iv["low"], iv["high"]) if iv else (w["low"], w["high"]) if w else (0.0, 1.0)
        wr = "baseline" if not w else f"{100 * w['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"
        wlta = "" if not w else f"{w['wins']}/{w['losses']}/{w['ties']}/{w['abstains']}"
        lc = row.get("lc_win_rate")
        lcw = "" if not lc else f"{100 * lc['rate']:.1f}%" + ("*" if lc["flag"] else "")
        print(f"{row['name']:<12} {fmt(row['reward_mean']):>8} {fmt(row['judge_mean']):>7} {wr:>26} {lcw:>7} {wlta:>13} "
              f"{fmt(row['kl_to_reference'], 4):>9} {row['length_tokens_mean']:>7.1f}", flush=True)
    if report.get("kl"):
        print(f"KL/token: exact KL to the {report['kl']['reference']} policy over the whole vocabulary at each "
              f"position of the policy's own samples (not a sampled log-ratio)", flush=True)
    if any((row.get("lc_win_rate") or {}).get("flag") for row in report["policies"]):
        print("* length-controlled win rate differs from the raw one by more than 10 points: that policy wins "
              "(or loses) by the length of its answers", flush=True)


def read_eval(run_dir: Path) -> dict[str, Any] | None:
    """eval.json of an eval run folder (None when absent or the run did not complete)."""
    try:
        return json.loads(resolve_input(run_dir, what="evaluation", stages=("eval",), outputs=("eval",)).read_text())
    except AlignError:
        return None
