"""PPO's logs and resumable checkpoints: metrics.jsonl / samples.jsonl / TensorBoard / trackers on the main
process, and a checkpoint every log.save_every steps that every process takes part in.

A checkpoint holds whole tensors. Under DDP (or one process) each process has them all, so align writes them
itself (align/rlhf/checkpoint.py: safetensors and JSON, nothing pickled). Under FSDP and DeepSpeed ZeRO the
parameters or optimizer state are split over processes: the trainable parameters are gathered on every process
(`align.rlhf.sharded`), and the model and optimizer state go through accelerate's `save_state` / `load_state`
(FSDP's state dict as the launch config says, DeepSpeed's engine checkpoint) into the checkpoint's accelerate/
folder, which every process writes and reads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from align.errors import ConfigError
from align.stages.ppo_config import Config
from align.stages.ppo_rollout import Batch, Trainer

log = logging.getLogger(__name__)


def log_and_checkpoint(cfg: Config, t: Trainer, batch: Batch, stats: dict[str, float], done: int,
                       force_save: bool = False) -> None:
    """metrics.jsonl / TensorBoard / trackers / samples (main process), and every save_every steps (or when
    `force_save`: a stop signal) a checkpoint (all)."""
    if t.acc.is_main_process:
        log_step(t.run_dir, t.tb, done, stats)
        t.tracker.log(stats, done)
        if done % cfg.log.sample_every == 0 or done == 1:
            log_samples(t.run_dir, t.tb, done, batch.prompts, batch.samples, batch.scores.tolist())
    t.bar.update(1)
    t.bar.set_postfix(reward=f"{stats['reward/mean']:.3f}", kl=f"{stats['kl/ref']:.3f}")
    if force_save or done % cfg.log.save_every == 0 or done == cfg.ppo.steps:
        save(cfg, t, done)


def save(cfg: Config, t: Trainer, done: int) -> Path:
    """Checkpoint `done` (every process calls this). Sharded: the trainable state gathered on every process, the
    model and optimizer state through accelerate's save_state into accelerate/ (every process writes its part)."""
    from align.rlhf import checkpoint as ckpt
    from align.rlhf.policy import trainable_state
    from align.rlhf.sharded import gathered_trainable_state

    sharded = bool(t.sharding)
    return ckpt.save_checkpoint(
        t.run_dir, done, trainable=gathered_trainable_state(t.model, t.actor, t.sharding) if sharded
        else trainable_state(t.actor), optimizer=None if sharded else t.optimizer,
        state={"kl_controller": dataclasses.asdict(t.kl_ctl), "reward_moments": dataclasses.asdict(t.moments),
               "sharding": t.sharding},
        rank=t.acc.process_index, world=t.acc.num_processes, is_main=t.acc.is_main_process,
        barrier=t.acc.wait_for_everyone, keep=cfg.log.keep_checkpoints,
        save_policy=t.actor.policy.save_pretrained if cfg.peft.method != "full" and not sharded else None,
        save_state=(lambda folder: t.acc.save_state(str(folder))) if sharded else None)


def check_sharding(cfg: Config, distributed_type: str, kind: str) -> str:
    """The launch's sharding (align.rlhf.sharded), or a ConfigError for what PPO cannot run under."""
    from align.generation.select import choose_backend
    from align.rlhf.sharded import shards_parameters

    if distributed_type == "MEGATRON_LM":
        raise ConfigError("ppo runs on one process, under DDP, FSDP or DeepSpeed ZeRO; this launch uses "
                          "MEGATRON_LM. Launch it with --config_file stages/accelerate/ddp.yaml")
    if shards_parameters(kind) and choose_backend(cfg.engine.backend) != "vllm":
        raise ConfigError(f"ppo under {kind} (sharded parameters) samples its rollouts with engine.backend=vllm: "
                          f"the hf sampler would all-gather every layer for every token on each process, and "
                          f"processes whose responses end at different lengths would wait for each other. Set "
                          f"engine.backend=vllm, or launch with stages/accelerate/ddp.yaml or zero2.yaml")
    return kind


def check_resume_world(cfg: Config, world: int, kind: str = "") -> None:
    """A checkpoint holds one RNG state per process and the prompts are split by process count: resuming with
    another count would silently change both, so it is refused, naming both numbers. A checkpoint written under
    FSDP / DeepSpeed holds accelerate's state for that layout: resuming under another one is refused too."""
    from align.rlhf import checkpoint as ckpt

    last = ckpt.latest_checkpoint(Path(cfg.output_dir))
    if last is None:
        return
    state = json.loads((last / "state.json").read_text())
    saved = state.get("world_size", 1)
    if saved != world:
        raise ConfigError(f"{last} was written by {saved} process(es); this run has {world}: resume with "
                          f"{saved} processes (e.g. accelerate launch --num_processes {saved}), or start a new run")
    layout = state.get("sharding", "")
    if layout != kind:
        raise ConfigError(f"{last} was written under {layout or 'DDP / one process'}; this run is "
                          f"{kind or 'DDP / one process'}: resume with the same accelerate config, or start a new run")


def resume(cfg: Config, t: Trainer) -> None:
    """Load the newest checkpoint into the trainer when resume=true (t.start: its step). Every process calls it."""
    from align.rlhf import checkpoint as ckpt
    from align.rlhf.core import KLController, RunningMoments
    from align.rlhf.policy import load_trainable_state

    last = ckpt.latest_checkpoint(t.run_dir) if cfg.resume else None
    if last is None:
        return
    saved = ckpt.load_checkpoint(last, t.acc.process_index)
    if (last / ckpt.ACCELERATE_STATE).is_dir():
        t.acc.load_state(str(last / ckpt.ACCELERATE_STATE))  # model and optimizer shards, as accelerate saved them
    else:
        load_trainable_state(t.actor, saved["trainable"], str(last))
        t.optimizer.load_state_dict(saved["optimizer"])
    t.kl_ctl = KLController(**saved["state"]["kl_controller"])
    t.moments = RunningMoments(**saved["state"]["reward_moments"])
    if saved["rng"] is not None:
        ckpt.set_rng_state(saved["rng"])
    t.start = saved["state"]["step"]
    log.info("ppo: resumed from %s (step %d of %d)", last, t.start, cfg.ppo.steps)


def log_step(run_dir: Path, tb: Any, step: int, stats: dict[str, float]) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(stats) + "\n")
    for k, v in stats.items():
        if k != "step":
            tb.add_scalar(k, v, step)
    tb.flush()


def log_samples(run_dir: Path, tb: Any, step: int, prompts: list, samples: list, scores: list[float]) -> None:
    rows = [{"step": step, "prompt": p[-1]["content"], "response": s.text, "score": sc, "finished": s.finished}
            for p, s, sc in zip(prompts, samples, scores)]
    with open(run_dir / "samples.jsonl", "a") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    text = "\n\n".join(f"**{r['prompt']}**  \n{r['response']}  \n*score {r['score']:.3f}*" for r in rows[:4])
    tb.add_text("samples", text, step)


def truncate_logs(run_dir: Path, step: int) -> None:
    """On resume, drop log lines of steps after the checkpoint (they will be run again)."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = run_dir / name
        if path.is_file():
            keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in keep))


def first_step_metrics(run_dir: Path) -> dict[str, float]:
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return {"first/reward/mean": rows[0]["reward/mean"], "first/kl/ref": rows[0]["kl/ref"]} if rows else {}
