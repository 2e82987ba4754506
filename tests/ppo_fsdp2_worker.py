"""One process of tests/test_ppo_sharded.py's real FSDP2 run (torchrun --nproc_per_node 2, gloo on the CPU).

A tiny Llama with a LoRA adapter and a value head (PPO's ActorCritic) is sharded with FSDP2's `fully_shard` (one
unit per decoder layer, the rest in the root unit), as accelerate's FSDP2 preparation does. Then, on every
process: the old-policy and reference pass through the sharded model (`score_rollout`: log-probs, values,
reference log-probs, entropy) must equal the unsharded model's, the gathered trainable state too, and a rollout
copy refreshed by `sync_rollout_copy` inside `full_parameters` must hold W + ΔW of every adapted layer. Writes rank-<r>.json to the
folder given as argv[1] with what it found; argv[2] (optional): the backend, gloo (CPU) or nccl (a GPU per process).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def build() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from align.rlhf.policy import ActorCritic

    torch.manual_seed(0)  # the same model on every process, as a checkpoint load gives
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1))
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a trained adapter: ΔW is not zero
    return ActorCritic(policy)


def main(out: Path, backend: str = "gloo") -> None:
    import copy

    from torch.distributed.fsdp import fully_shard

    from align.rlhf.policy import Rollout, score_rollout, sync_rollout_copy
    from align.rlhf.sharded import full_parameters, gathered_trainable_state

    dist.init_process_group(backend)
    rank = dist.get_rank()
    device = torch.device("cpu")
    if backend == "nccl":  # one GPU per process (make gpu-check)
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    model = build().to(device)
    expected = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 3, 4, 10, 11]], device=device)
    attn = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], device=device)
    rollout = Rollout(ids, attn, (attn.cumsum(-1) - 1).clamp(min=0), ids[:, -2:], torch.ones(2, 2, device=device))
    whole = score_rollout(model, None, rollout, chunk=1)
    merged = copy.deepcopy(model.policy).merge_and_unload()
    clone = copy.deepcopy(merged)
    with torch.no_grad():
        for p in clone.parameters():
            p.zero_()  # stale: every adapted weight must come from the sync
    for layer in model.policy.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    sharded = sum(p.to_local().numel() for p in model.parameters()) < sum(p.numel() for p in model.parameters())

    scored = score_rollout(model, None, rollout, chunk=1)  # through the root unit, which gathers its shards
    state = gathered_trainable_state(model, model, "fsdp2")
    with full_parameters(model, "fsdp2"):
        sync_rollout_copy(clone, model.policy, "lora")
    resharded = type(model.value_head.weight).__name__
    adapted = [n for n, _ in merged.named_modules() if n.endswith(("q_proj", "v_proj"))]
    result = {
        "sharded": sharded,
        "scores_equal": all(torch.allclose(scored[k], whole[k], atol=1e-5) for k in whole),
        "same_names": sorted(state) == sorted(expected),
        "state_equal": all(torch.equal(state[n].cpu(), expected[n]) for n in expected),
        "copy_equal": all(torch.allclose(clone.get_submodule(n).weight, merged.get_submodule(n).weight, atol=1e-6)
                          for n in adapted),
        "adapted": len(adapted),
        "resharded": resharded,
    }
    (out / f"rank-{rank}.json").write_text(json.dumps(result))
    # every process past its last collective before any tears down: a peer closing its sockets while gloo's background
    # thread still reads from them throws there ("Connection closed by peer") and aborts the process (SIGABRT)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:3])  # [backend]: gloo (CPU, the default) or nccl
