"""PPO: our own RLHF loop — LoRA actor, adapter-disabled reference, value head, KL-penalised reward, GAE.

One step: sample responses -> score them (reward model or function) -> old/reference log-probs and values ->
per-token rewards (−β·KL, + the score at the last token) -> GAE advantages -> a few PPO epochs of clipped policy +
value loss over minibatches. The math is in align/rlhf/core.py; the steps in ppo_rollout.py (prompts, sampler,
scored batch), ppo_update.py (advantages, update, metrics) and ppo_checkpoint.py (logs, checkpoints, resume); the
recipe schema in ppo_config.py. Written with accelerate:
`accelerate launch --config_file stages/accelerate/cpu2.yaml -m align.cli ppo stages/ppo.yaml` runs one
process per device, each with its own prompts; advantage whitening, loss normalisation and metrics are over every
process's tokens, so N processes x B/N prompts take the same step as 1 x B (tests/test_multiprocess.py).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from align import runs
from align.data.records import read_prompts
from align.errors import TrainingError
from align.rlhf.sharded import gathered_trainable_state, shards_parameters
from align.stages.ppo_checkpoint import (
    check_resume_world,
    check_sharding,
    first_step_metrics,
    log_and_checkpoint,
    resume,
    truncate_logs,
)
from align.stages.ppo_config import Config
from align.stages.ppo_rollout import Trainer, collect_rollout, read_step_prompts, rollout_sampler
from align.stages.ppo_update import compute_advantages, ppo_update, step_metrics
from align.training import diverged

log = logging.getLogger(__name__)
__all__ = ["Config", "run"]


def load_actor(cfg: Config) -> tuple[Any, Any, Any, Path, str]:
    """(policy with a fresh adapter, reference copy or None, tokenizer, policy folder, what is trained)."""
    from align.models.policy import load_policy

    p = load_policy(cfg.policy, stage="ppo", peft=cfg.peft, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                    total_steps=cfg.ppo.steps)
    return p.model, p.reference, p.tokenizer, p.source, p.trained


def load_critic(cfg: Config) -> Any:
    """None for a value head on the policy; else a reward-model copy with its own LoRA and a trainable head."""
    if cfg.critic.kind == "value_head":
        return None
    from align.models.load import load_model, resolve_model
    from align.models.peft import attach_peft

    critic = load_model(resolve_model(cfg.critic.model or cfg.reward.model), dtype=cfg.dtype, kind="classifier",
                        trust_remote_code=cfg.trust_remote_code)
    lora = dataclasses.replace(cfg.peft, method="lora") if cfg.peft.method != "dora" else cfg.peft
    return attach_peft(critic, lora, task_type="SEQ_CLS", extra_trainable=("score",))[0]


def run(cfg: Config) -> Path:
    """setup (+ resume) -> per step: collect_rollout -> compute_advantages -> ppo_update -> step_metrics ->
    log_and_checkpoint -> finish (main process)."""
    t = setup(cfg)
    stats: dict[str, float] = {}
    for step in range(t.start, cfg.ppo.steps):
        batch = collect_rollout(cfg, t, step)
        adv = compute_advantages(cfg, t, batch)
        losses = ppo_update(cfg, t, batch, adv, step)
        stats = step_metrics(cfg, t, batch, adv, losses, step + 1)
        if what := diverged(stats, ("loss/policy", "loss/value")):  # reduced over processes: all stop here
            raise TrainingError(f"ppo diverged at step {step + 1} ({what}): lower ppo.lr (now {cfg.ppo.lr:g}) or "
                                "ppo.max_grad_norm and run again with overwrite=true; this step was not saved")
        stop = runs.stop_requested(sync=True)  # SIGTERM/Ctrl-C: every process stops after this same step
        log_and_checkpoint(cfg, t, batch, stats, step + 1, force_save=bool(stop))
        if stop:
            runs.interrupt_active_runs(f" after step {step + 1}")
    runs.at_step_boundaries(False)  # from here a signal stops at once
    t.bar.close()
    # Under FSDP / ZeRO-3 the final weights are shards: every process takes part in gathering them, once.
    final = gathered_trainable_state(t.model, t.actor, t.sharding) if shards_parameters(t.sharding) else None
    if not t.acc.is_main_process:
        # Nothing below is collective: the other processes end here instead of waiting at a barrier for the main
        # process's final save and evaluation (a failure there would leave them waiting forever).
        return t.run_dir
    return finish(cfg, t, stats, final)


def setup(cfg: Config) -> Trainer:
    """Inputs checked, the run folder started, models, optimizer, rollout sampler built, a checkpoint resumed."""
    from datetime import timedelta

    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    from align.log import progress_enabled
    from align.models.load import resolve_model
    from align.models.peft import count_parameters
    from align.rewards import check_reward, load_reward
    from align.rlhf.core import KLController, RunningMoments
    from align.rlhf.policy import ActorCritic
    from align.rlhf.sharded import fill_deepspeed_auto, sharding
    from align.runs import start_run
    from align.tracking import Tracker

    # cpu=True without CUDA: under torchrun/accelerate launch that selects gloo DDP across CPU processes. Every
    # collective wait ends after collective_timeout, so a process that died does not leave the others waiting.
    acc = Accelerator(gradient_accumulation_steps=cfg.ppo.grad_accum, cpu=not torch.cuda.is_available(),
                      kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout))])
    kind = check_sharding(cfg, str(acc.distributed_type.value), sharding(acc))
    prompts = read_step_prompts(cfg.data.prompts, cfg.system_prompt)
    resolve_model(cfg.policy)  # bad inputs fail here, before the run folder exists
    check_reward(cfg.reward)
    if cfg.data.eval_size > 0:
        read_prompts(cfg.data.eval_prompts)
    if cfg.resume:
        check_resume_world(cfg, acc.num_processes, kind)
    run_ = start_run("ppo", cfg, resume=cfg.resume) if acc.is_main_process else None
    acc.wait_for_everyone()
    run_dir = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed + acc.process_index)

    policy, reference, tokenizer, source, trained = load_actor(cfg)
    model = ActorCritic(policy, load_critic(cfg))
    model.eval()  # dropout stays off: PPO's ratio must compare the same deterministic network before and after
    reward_fn, reward_from = load_reward(cfg.reward)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.ppo.lr)
    fill_deepspeed_auto(acc, cfg.ppo.mini_batch_size, cfg.ppo.max_grad_norm)
    model, optimizer = acc.prepare(model, optimizer)
    actor = acc.unwrap_model(model)
    if reference is not None:
        reference.to(acc.device)
    n_train, n_total = count_parameters(actor)
    log.info("ppo: %s + %s; training %s of %s parameters; reward: %s; %d process(es)%s", trained, cfg.critic.kind,
             f"{n_train:,}", f"{n_total:,}", reward_from, acc.num_processes, f", {kind}" if kind else "")
    t = Trainer(acc=acc, model=model, actor=actor, optimizer=optimizer, reference=reference,
                fast_reference=None if shards_parameters(kind) else fast_reference(cfg, actor, reference),
                tokenizer=tokenizer, source=source, sampler=None, reward_fn=reward_fn, prompts=prompts,
                run_dir=run_dir, run_=run_, tb=None, bar=None, sharding=kind,
                kl_ctl=KLController(cfg.kl.coef, cfg.kl.target or None, cfg.kl.horizon), moments=RunningMoments())
    resume(cfg, t)
    if acc.is_main_process:
        truncate_logs(run_dir, t.start)
        t.tb = SummaryWriter(str(run_dir / "tb"))
        t.tracker = Tracker.open(run_dir, cfg.log.report_to, tensorboard=False)
    runs.watch_stop_signals()  # on every process (start_run ran on the main one only)
    runs.at_step_boundaries(True)
    t.bar = tqdm(total=cfg.ppo.steps, initial=t.start, desc="ppo",
                 disable=not (cfg.log.progress and acc.is_main_process and progress_enabled()))
    # A vLLM engine takes engine.gpu_memory_utilization of the WHOLE GPU (and refuses to start when less is free):
    # with the policy already in memory, the trainer keeps the rest; engine.sleep frees the engine's share during
    # the update (`collect_rollout`).
    t.sampler = rollout_sampler(cfg, t)
    return t


def fast_reference(cfg: Config, actor: Any, reference: Any) -> Any:
    """The reference pass in a faster dtype (kl.reference_dtype=auto on a CPU: bf16), or None for the exact one."""
    from align.models.load import pick_dtype
    from align.rlhf.policy import reference_copy

    return reference_copy(actor.policy, reference, cfg.peft.method, pick_dtype(cfg.kl.reference_dtype, use="forward"))


def finish(cfg: Config, t: Trainer, stats: dict[str, float], final: dict[str, Any] | None = None) -> Path:
    """Main process: save the policy (and critic), run the held-out before/after check, fill the manifest.
    `final`: the gathered trainable state of a sharded run, put into a whole copy of the model here."""
    from safetensors.torch import save_file

    from align.chat import with_system_prompt
    from align.data.records import write_jsonl
    from align.models.policy import save_policy
    from align.rlhf.evaluate import evaluate_policy

    run_ = t.run_
    actor = t.actor if final is None else whole_actor(cfg, final)
    if t.tb is not None:
        t.tb.close()
        t.tracker.close()
    release_sampler(t)
    out = save_policy(actor.policy, t.tokenizer, run_.dir / "model", method=cfg.peft.method, base=t.source)
    run_.add_output("model", out)
    save_file(trainable_state_of_critic(actor), str(run_.dir / "critic.safetensors"))
    run_.add_output("critic", run_.dir / "critic.safetensors")
    run_.add_input(cfg.data.prompts)
    run_.add_input(t.source)
    run_.metrics.update({f"final/{k}": v for k, v in stats.items()})
    run_.metrics.update(first_step_metrics(run_.dir))
    if cfg.data.eval_size > 0:
        eval_prompts = [with_system_prompt(r.prompt, cfg.system_prompt)
                        for r in read_prompts(cfg.data.eval_prompts)[: cfg.data.eval_size]]
        metrics, rows = evaluate_policy(actor.policy, t.reference, t.tokenizer, eval_prompts,
                                        dataclasses.replace(cfg.sampling, seed=cfg.seed), t.reward_fn)
        write_jsonl(run_.dir / "eval_samples.jsonl", rows)
        run_.metrics.update(metrics)
        log.info("ppo: held-out reward %.4f -> %.4f, KL to reference %.4f", metrics["eval/reward_before"],
                 metrics["eval/reward_after"], metrics["eval/kl"])
    run_.extra["ppo"] = {"critic": cfg.critic.kind, "peft": cfg.peft.method, "policy_source": str(t.source),
                         "processes": t.acc.num_processes, "tis_cap": cfg.ppo.tis_cap,
                         "sharding": t.sharding or "none", "system_prompt": cfg.system_prompt}
    return run_.finish()


def whole_actor(cfg: Config, state: dict[str, Any]) -> Any:
    """A whole (unsharded) ActorCritic on this process with the trained `state`: what a sharded run saves and
    evaluates on the main process alone."""
    from align.rlhf.policy import ActorCritic, load_trainable_state

    actor = ActorCritic(load_actor(cfg)[0], load_critic(cfg)).eval()
    load_trainable_state(actor, state, "the final gathered state")
    return actor


def release_sampler(t: Trainer) -> None:
    """Record what the rollout engine was given (memory share, sleep mode, served dtype) and shut it down."""
    describe = getattr(t.sampler, "describe", None)
    if describe is not None and t.run_ is not None:
        t.run_.extra["engine"] = describe()
    close = getattr(t.sampler, "close", None)
    if close is not None:
        close()
    t.sampler = None


def trainable_state_of_critic(actor: Any) -> dict[str, Any]:
    module = actor.value_head if actor.critic is None else actor.critic
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}


