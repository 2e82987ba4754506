"""The actor-critic module PPO trains, and rollouts as padded tensors.

Layout of a rollout batch: prompts are LEFT-padded and responses RIGHT-padded, so every response starts at the
same column. The logits and hidden states that predict response token t sit one column earlier, which lets us
ask the model for only the last R+1 positions (`logits_to_keep`) instead of the whole vocabulary-wide sequence.

Critic choice (`critic.kind`):
- `value_head` (default): a linear head on the policy's last hidden state, sharing the LoRA-adapted backbone.
  One forward pass gives logits and values and no second network is held in memory, which is what makes PPO
  practical on a 2-core CPU. The value loss (scaled by `vf_coef`) also shapes the shared adapter; the head
  starts at zero so the critic does not disturb the policy before it has learned anything.
- `reward_model`: a separate critic initialised from the reward model (InstructGPT's choice), with its own LoRA
  and its score head as the value head. It starts with a sensible notion of "good", and policy and critic do
  not compete for one adapter, at the cost of a second model and a second forward/backward per minibatch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from align.generation import Sample
from align.models.lean import has_dropout
from align.rlhf.core import entropy_from_logprobs, logprobs_from_logits


@dataclass
class Rollout:
    """Padded tensors for a batch of (prompt, response) samples.

    input_ids, attention_mask, position_ids: [B, P + R]; response_ids, response_mask: [B, R]
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    response_ids: Tensor
    response_mask: Tensor

    @property
    def response_width(self) -> int:
        return self.response_ids.shape[1]

    def rows(self, idx: Tensor | slice) -> Rollout:
        return Rollout(self.input_ids[idx], self.attention_mask[idx], self.position_ids[idx],
                       self.response_ids[idx], self.response_mask[idx])

    def to(self, device: torch.device) -> Rollout:
        return Rollout(*(x.to(device) for x in (self.input_ids, self.attention_mask, self.position_ids,
                                                self.response_ids, self.response_mask)))


def collate(samples: list[Sample], pad_id: int) -> Rollout:
    """Samples -> a Rollout (left-padded prompts, right-padded responses; position ids skip the padding)."""
    P = max(len(s.prompt_ids) for s in samples)
    R = max(max(len(s.response_ids) for s in samples), 1)
    ids, attn, resp, resp_mask = [], [], [], []
    for s in samples:
        p_pad, r_pad = P - len(s.prompt_ids), R - len(s.response_ids)
        ids.append([pad_id] * p_pad + s.prompt_ids + s.response_ids + [pad_id] * r_pad)
        attn.append([0] * p_pad + [1] * (len(s.prompt_ids) + len(s.response_ids)) + [0] * r_pad)
        resp.append(s.response_ids + [pad_id] * r_pad)
        resp_mask.append([1.0] * len(s.response_ids) + [0.0] * r_pad)
    attention = torch.tensor(attn)
    # Positions as generate() counts them: left padding does not shift the prompt's positions.
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return Rollout(torch.tensor(ids), attention, positions, torch.tensor(resp), torch.tensor(resp_mask))


class ActorCritic(nn.Module):
    """The policy (a causal LM, usually a PEFT model) and its critic as ONE module, so that DDP/accelerate sees
    every trained parameter. forward(rollout) -> (logits [B, R, V], values [B, R]) at the response positions;
    with reference=True: (the reference's logits with the adapter disabled, None), through the same wrapper, so a
    sharded (FSDP) model gathers its parameters for that pass as for any other."""

    def __init__(self, policy: nn.Module, critic: nn.Module | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.critic = critic
        if critic is None:
            hidden = policy.config.get_text_config().hidden_size
            self.value_head = nn.Linear(hidden, 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        else:
            self.value_head = None

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                response_width: int, reference: bool = False) -> tuple[Tensor, Tensor | None]:
        keep = response_width + 1  # positions P-1 .. P+R-1; the last one predicts nothing we scored
        if reference:
            with self.policy.disable_adapter():
                out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  logits_to_keep=keep, use_cache=False)
            return out.logits[:, :-1].float(), None
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          logits_to_keep=keep, output_hidden_states=self.critic is None, use_cache=False)
        logits = out.logits[:, :-1]
        if self.critic is None:
            hidden = out.hidden_states[-1][:, -keep:-1]
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        else:
            c = self.critic(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            output_hidden_states=True, use_cache=False)
            hidden = c.hidden_states[-1][:, -keep:-1]
            values = score_head(self.critic)(hidden).squeeze(-1)
        return logits, values.float()


def score_head(classifier: nn.Module) -> nn.Module:
    """The `score` linear layer of a (possibly PEFT-wrapped) sequence-classification model."""
    base = classifier.get_base_model() if hasattr(classifier, "get_base_model") else classifier
    return base.score


@contextlib.contextmanager
def reference_policy(policy: nn.Module, reference: nn.Module | None) -> Iterator[nn.Module]:
    """The reference model: the same weights with the adapter disabled (no second copy), or a frozen copy when
    the whole model is trained (`reference` given)."""
    if reference is not None:
        yield reference
    else:
        with policy.disable_adapter():
            yield policy


def score_rollout(model: ActorCritic, reference: nn.Module | None, rollout: Rollout, *, chunk: int,
                  temperature: float = 1.0, first: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
    """Old log-probs, values, reference log-probs and entropy of a rollout, `chunk` rows per forward pass.
    `model`: the ActorCritic, or the wrapper a sharded launch put around it (its forward, reference=True included).

    Logits are divided by the sampling temperature, so log-probs are those of the distribution sampled from.
    `first`: the (logits, values) of a training forward over the whole rollout under the unchanged policy
    (`reuse_first_pass`); its numbers are the old ones, so only the reference forward runs here.
    Returns tensors [B, R]: logprobs, values, ref_logprobs, entropy.
    """
    parts: dict[str, list[Tensor]] = {"logprobs": [], "values": [], "ref_logprobs": [], "entropy": []}
    R = rollout.response_width
    with torch.no_grad():
        for start in range(0, rollout.input_ids.shape[0], chunk):
            mb = rollout.rows(slice(start, start + chunk))
            if first is None:
                logits, values = model(mb.input_ids, mb.attention_mask, mb.position_ids, R)
            else:
                logits, values = (x.detach()[start:start + chunk] for x in first)
            logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # one pass for both
            parts["logprobs"].append(logp.gather(-1, mb.response_ids.unsqueeze(-1)).squeeze(-1))
            parts["entropy"].append(entropy_from_logprobs(logp))
            parts["values"].append(values)
            if reference is not None:
                ref_logits = response_logits(reference, mb)
            else:  # the adapter disabled, through the model's own forward (and a sharded model's gather)
                ref_logits = model(mb.input_ids, mb.attention_mask, mb.position_ids, R, reference=True)[0]
            parts["ref_logprobs"].append(logprobs_from_logits(ref_logits / temperature, mb.response_ids))
    return {k: torch.cat(v) for k, v in parts.items()}


def reuse_first_pass(model: nn.Module, rows: int, mini_batch_size: int, grad_accum: int) -> bool:
    """Can the first PPO minibatch's forward also give the old log-probs and values? Yes when that minibatch is the
    whole rollout and is stepped on its own (so nothing has been updated before it) and no dropout is active (so
    the training forward computes exactly what a separate no-grad pass would): one forward pass fewer per step."""
    return rows <= mini_batch_size and grad_accum == 1 and not (model.training and has_dropout(model))


def rollout_copy(policy: nn.Module, method: str, dtype: torch.dtype) -> nn.Module | None:
    """A frozen copy of `policy` in `dtype` with a LoRA adapter folded in, to sample rollouts from when sampling in
    that dtype is faster than in the training dtype (a CPU streams every weight once per new token: bf16 halves
    that). None when there is nothing to gain (same dtype) or no exact way to refresh it (methods other than
    lora and full): the policy itself is sampled. `sync_rollout_copy` refreshes it before every rollout."""
    if dtype == weights_dtype(policy) or method not in ("lora", "full"):
        return None
    import copy

    from align.models.prepacked import prepack_for_sampling

    clone = copy.deepcopy(policy)
    if method == "lora":  # only LoRA-adapted layers change (`sync_rollout_copy`): they can stay prepacked
        return prepack_for_sampling(clone.merge_and_unload().to(dtype).eval().requires_grad_(False))
    return clone.to(dtype).eval().requires_grad_(False)


def reference_copy(policy: nn.Module, reference: nn.Module | None, method: str, dtype: torch.dtype) -> nn.Module | None:
    """A frozen copy of the reference weights in `dtype` for the reference log-prob pass, when that dtype differs
    from the training one (a CPU with bf16 instructions ran a no-grad forward of the default model 3.5x faster in
    bf16). The reference never changes, so the copy is made once: the base without the adapter (lora) or the
    frozen start (full). None for other methods or the same dtype: the exact adapter-disabled pass runs."""
    if dtype == weights_dtype(policy) or method not in ("lora", "full"):
        return None
    import copy

    clone = copy.deepcopy(reference) if reference is not None else copy.deepcopy(policy).unload()
    return clone.to(dtype).eval().requires_grad_(False)


def weights_dtype(model: nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


@torch.no_grad()
def sync_rollout_copy(clone: nn.Module, policy: nn.Module, method: str) -> None:
    """Write the policy's current weights into its rollout copy: every LoRA-adapted weight as W + ΔW, computed in
    the training dtype from the untouched base (no merge/unmerge drift), or every weight for full fine-tuning.
    Under FSDP / ZeRO-3 call it inside `align.rlhf.sharded.full_parameters`, on every process."""
    if method == "full":
        for target, source in zip(clone.parameters(), policy.parameters(), strict=True):
            target.copy_(source)
        return
    from peft.tuners.lora import LoraLayer

    from align.models.prepacked import PrepackedLinear
    from align.rlhf.sharded import plain_name

    for name, module in policy.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            merged = module.get_base_layer().weight + module.get_delta_weight("default")
            target = clone.get_submodule(plain_name(name).removeprefix("base_model.model."))
            if isinstance(target, PrepackedLinear):
                target.load(merged)
            else:
                target.weight.copy_(merged)


def response_logits(model: nn.Module, rollout: Rollout) -> Tensor:
    """Logits predicting each response token: [B, R, V] in fp32 (a plain causal LM, no value head)."""
    R = rollout.response_width
    return model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                 position_ids=rollout.position_ids, logits_to_keep=R + 1, use_cache=False).logits[:, :-1].float()


def trainable_state(module: nn.Module) -> dict[str, Tensor]:
    """Every trainable parameter by name (the LoRA adapter and the value head / critic adapter)."""
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: nn.Module, state: dict[str, Tensor], where: str) -> None:
    params = dict(module.named_parameters())
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in state)
    unknown = sorted(set(state) - set(params))
    if missing or unknown:
        raise ValueError(f"{where}: checkpoint does not match this model (missing {missing[:3]}, unexpected "
                         f"{unknown[:3]}); resume with the same policy, peft and critic settings")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def describe_samples(samples: list[Sample]) -> dict[str, float]:
    """Response length statistics of a batch of samples."""
    lengths = [len(s.response_ids) for s in samples]
    return {"response_length": sum(lengths) / max(len(lengths), 1),
            "truncated_fraction": sum(not s.finished for s in samples) / max(len(samples), 1)}


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device
