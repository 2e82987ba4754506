"""PPO's rollout: which prompts a process gets at a step, the sampler that answers them (the policy, a faster copy
of it, or a vLLM engine handed every update), and the scored batch one step trains on.

Under FSDP / ZeRO-3 the sampler's refresh reads whole parameters: every process gathers them together
(`align.rlhf.sharded.full_parameters`), each refreshing its own sampler.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.data.records import PromptRecord
from align.rlhf.sharded import Sharding, full_parameters
from align.stages.ppo_config import Config


@dataclass
class Trainer:
    """Everything a PPO step uses, built once by `setup` (and `resume`)."""

    acc: Any  # accelerate.Accelerator
    model: Any  # the prepared ActorCritic (wrapped by DDP, FSDP or DeepSpeed)
    actor: Any  # the ActorCritic itself
    optimizer: Any
    reference: Any  # frozen start (full fine-tuning) or None (the adapter disabled)
    fast_reference: Any  # the reference in kl.reference_dtype, or None (the exact pass)
    tokenizer: Any
    source: Path
    sampler: Any
    reward_fn: Any
    prompts: list[PromptRecord]
    run_dir: Path
    run_: Any  # the Run on the main process, None elsewhere
    tb: Any
    bar: Any  # progress bar (disabled off the main process)
    kl_ctl: Any
    moments: Any
    start: int = 0
    sharding: Sharding = ""  # how the launch splits parameters / optimizer state (align.rlhf.sharded)
    tracker: Any = None  # MLflow / W&B (log.report_to), same metric names as metrics.jsonl; TensorBoard is `tb`

    @property
    def sum_over_processes(self) -> Any:
        """A Reduce for align.rlhf.core (None with one process: statistics stay exactly local)."""
        return None if self.acc.num_processes == 1 else lambda x: self.acc.reduce(x, "sum")

    @property
    def max_over_processes(self) -> Any:
        return None if self.acc.num_processes == 1 else lambda x: self.acc.reduce(x, "max")


@dataclass
class Batch:
    """One step's rollouts on this process. rollout: padded tensors [B, P + R]; sampler_logprobs: [B, R] or None."""

    prompts: list[Any]
    samples: list[Any]
    scores: Any  # [B] raw scores
    truncated: Any  # [B] 1.0 where cut at max_new_tokens
    shaped: Any  # [B] shaped scores
    all_scores: Any  # [world * B] every process's raw scores
    rollout: Any
    sampler_logprobs: Any
    times: dict[str, float]


def step_prompts(prompts: list[PromptRecord], step: int, rank: int, world: int, n: int, seed: int) -> list[PromptRecord]:
    """The `n` prompts of process `rank` at `step`: a fresh shuffle per pass over the data, a pure function of
    (step, rank) so a resumed run sees exactly the prompts the interrupted one would have."""
    out = []
    for i in range((step * world + rank) * n, (step * world + rank + 1) * n):
        epoch, j = divmod(i, len(prompts))
        order = list(range(len(prompts)))
        random.Random(seed * 100003 + epoch).shuffle(order)
        out.append(prompts[order[j]])
    return out


def read_step_prompts(path: str, system_prompt: str) -> list[PromptRecord]:
    """The prompts to sample rollouts from, each with `system_prompt` first when it has no system message."""
    from align.chat import with_system_prompt
    from align.data.records import read_prompts

    return [dataclasses.replace(r, prompt=with_system_prompt(r.prompt, system_prompt)) for r in read_prompts(path)]


def rollout_sampler(cfg: Config, t: Trainer) -> Any:
    """vLLM (handed every update), or hf: the policy itself, or a copy in a faster dtype (engine.dtype=auto on a
    CPU: bf16) refreshed before every rollout. Both report their log-probs of what they sampled."""
    from align.generation.hf import HFSampler
    from align.generation.select import choose_backend
    from align.models.load import pick_dtype
    from align.rlhf.policy import rollout_copy

    if choose_backend(cfg.engine.backend) == "vllm" and cfg.peft.method in ("lora", "full"):
        return rollout_engine(cfg, t.source, t.tokenizer, t.run_dir / "rollout" / f"rank-{t.acc.process_index}")
    clone = rollout_copy(t.actor.policy, cfg.peft.method, pick_dtype(cfg.engine.dtype, use="decode"))
    return HFSampler(clone if clone is not None else t.actor.policy, t.tokenizer, logprobs=True)


def rollout_engine(cfg: Config, source: Path, tokenizer: Any, folder: Path) -> Any:
    """A vLLM engine over the starting weights, told its dtype (engine.dtype; auto: bf16 on a GPU that has it). PPO
    trains a fresh adapter on the merged start, so a start that is an adapter (or a stacked chain of them) is merged
    into one plain folder first, in float32, and saved in the served dtype (`merged_model`); the policy's updates
    reach the engine through `sync_rollout_weights`."""
    from align.generation.select import merged_model, serve_dtype, vllm_sampler
    from align.models.load import is_adapter

    dtype = serve_dtype(cfg.engine.dtype, None if is_adapter(source) else source)
    base = merged_model(source, dtype, cfg.trust_remote_code) if is_adapter(source) else source
    lora_rank = cfg.peft.r if cfg.peft.method == "lora" else None
    return vllm_sampler(base, tokenizer, dataclasses.replace(cfg.engine, dtype=dtype), lora_rank=lora_rank,
                        logprobs=True)


def collect_rollout(cfg: Config, t: Trainer, step: int) -> Batch:
    """This process's prompts of `step`, one response each from the current policy, their scores (shaped)."""
    import torch

    from align.rlhf.core import length_residuals, shape_scores
    from align.rlhf.policy import collate, sync_rollout_copy

    acc = t.acc
    t0 = time.perf_counter()
    prompts = [r.prompt for r in step_prompts(t.prompts, step, acc.process_index, acc.num_processes,
                                              cfg.ppo.batch_size, cfg.seed)]
    # One random stream per prompt, keyed by its place in the global batch: the same rollouts however the step's
    # prompts are split over processes (1 x 8 samples what 2 x 4 do).
    first = (step * acc.num_processes + acc.process_index) * cfg.ppo.batch_size
    seeds = [cfg.seed * 1_000_003 + first + i for i in range(len(prompts))]
    with full_parameters(t.model, t.sharding):  # every process, together: each refreshes its own sampler
        if t.sampler.name == "vllm":
            sync_rollout_weights(t.sampler, t.actor.policy, cfg.peft.method,
                                 t.run_dir / "rollout" / f"rank-{acc.process_index}", step, t.sharding)
        elif t.sampler.model is not t.actor.policy:
            sync_rollout_copy(t.sampler.model, t.actor.policy, cfg.peft.method)
    samples = [group[0] for group in t.sampler.generate(prompts, cfg.sampling, n=1, seeds=seeds)]
    if t.sampler.name == "vllm" and cfg.engine.sleep:
        t.sampler.sleep()  # its memory back to the trainer until the next rollout
    t1 = time.perf_counter()
    scores = torch.tensor(t.reward_fn(prompts, [s.text for s in samples]), dtype=torch.float32)
    t2 = time.perf_counter()
    truncated = torch.tensor([0.0 if s.finished else 1.0 for s in samples])
    all_scores = acc.gather(scores.to(acc.device)).cpu()
    used, all_used = scores, all_scores
    if cfg.shaping.length_control:
        lengths = torch.tensor([float(len(s.response_ids)) for s in samples])
        all_lengths = acc.gather(lengths.to(acc.device)).cpu()
        used = length_residuals(scores, lengths, all_scores, all_lengths)
        all_used = length_residuals(all_scores, all_lengths, all_scores, all_lengths)
    # Every process updates the running moments with the same global batch, so they stay identical.
    t.moments.update(all_used - cfg.shaping.missing_eos_penalty * acc.gather(truncated.to(acc.device)).cpu())
    shaped = shape_scores(used, truncated, cfg.shaping.missing_eos_penalty, cfg.shaping.clip,
                          (t.moments.mean, t.moments.std) if cfg.shaping.normalize else None)
    rollout = collate(samples, t.tokenizer.pad_token_id).to(acc.device)
    return Batch(prompts, samples, scores, truncated, shaped, all_scores, rollout,
                 sampler_logprobs(samples, rollout.response_width, acc.device),
                 {"time/generate": t1 - t0, "time/score": t2 - t1})


def sync_rollout_weights(sampler: Any, policy: Any, method: str, folder: Path, step: int,
                         kind: Sharding = "") -> None:
    """Hand the current policy to the vLLM engine before a rollout: the LoRA adapter (without the value head) as a
    new LoRA request, or, for full fine-tuning, the weights reloaded in place. Only the newest copy is kept.
    Sharded (`kind`): called inside `full_parameters`; the weights are saved by their plain names."""
    import shutil

    from align.rlhf.sharded import plain_name

    out = folder / f"step-{step}"
    state = {plain_name(n): p.detach() for n, p in policy.named_parameters()} if kind else None
    if method == "full":
        policy.save_pretrained(out, safe_serialization=True, state_dict=state)
        sampler.load_weights(out)
    else:
        policy.save_pretrained(out, selected_adapters=["default"], safe_serialization=True, state_dict=state)
        sampler.set_adapter(out)
    for old in folder.glob("step-*"):
        if old != out:
            shutil.rmtree(old, ignore_errors=True)


def sampler_logprobs(samples: list[Any], width: int, device: Any) -> Any:
    """The sampler's log-probs of the sampled tokens as [B, width] (0 on padding), or None when it gave none."""
    import torch

    if not samples or any(s.logprobs is None for s in samples):
        return None
    return torch.tensor([s.logprobs + [0.0] * (width - len(s.logprobs)) for s in samples], device=device)
