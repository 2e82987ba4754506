"""How a policy-optimisation stage gets its reward: a trained reward model, or any per-sample Python function.

`load_reward(settings)` returns one batch function `RewardFn(prompts, responses) -> list[float]`:
- `reward.model`: a reward-model run folder -> `align.RewardModel.load(path).score(prompts, responses)`;
- `reward.function`: `module:function` with `fn(prompt_messages, response) -> float`, called once per sample
  (e.g. `align.judges.house_style:house_style_score`). It wins over `reward.model` when set.
`trl_reward_func(fn)` adapts a RewardFn to the `reward_funcs` callables of TRL's GRPO/RLOO trainers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.config import SCORE_DTYPE_HELP, ScoreDtype, opt
from align.data.records import Message
from align.errors import ConfigError
from align.plugins import import_object

RewardFn = Callable[[list[list[Message]], list[str]], list[float]]


@dataclass(frozen=True)
class RewardSettings:
    model: str = opt("runs/reward", "reward-model run folder (or its model/ folder); used when function is ''")
    function: str = opt("", "module:function scoring one sample, fn(prompt_messages, response) -> float; "
                            "overrides model (e.g. align.judges.house_style:house_style_score)")
    batch_size: int = opt(8, "reward-model scoring batch size", ge=1)
    dtype: ScoreDtype = opt("auto", "reward-model dtype: " + SCORE_DTYPE_HELP + ". auto is ~3x faster on a CPU "
                            "with bf16 instructions; its scores differ from fp32 ones by ~4% of their spread")


def per_sample(fn: Callable[[list[Message], str], float], name: str) -> RewardFn:
    """Lift a per-sample score function to a batch RewardFn; a non-number or NaN is an error naming `name`."""

    def score(prompts: list[list[Message]], responses: list[str]) -> list[float]:
        out = []
        for prompt, response in zip(prompts, responses):
            value = fn(prompt, response)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ConfigError(f"reward function {name} returned {value!r}; it must return a number")
            out.append(float(value))
        return out

    return score


def check_reward(s: RewardSettings) -> None:
    """Fail now (not after training) when the reward cannot be had: the function imports and is callable, or the
    reward model is a completed reward run / model folder."""
    if s.function:
        if not callable(import_object(s.function, "reward.function")):
            raise ConfigError(f"reward.function {s.function!r} is not callable")
        return
    from align.runs import resolve_input

    if not (Path(s.model) / "config.json").is_file():
        resolve_input(s.model, what="reward.model", stages=("reward",), outputs=("model",))


def load_reward(s: RewardSettings) -> tuple[RewardFn, str]:
    """The stage's reward as a batch function, and a short description of where it comes from."""
    if s.function:
        return per_sample(import_object(s.function, "reward.function"), s.function), f"function {s.function}"
    from align.reward_model import RewardModel

    model = RewardModel.load(s.model, dtype=s.dtype, batch_size=s.batch_size)
    return model.score, f"reward model {s.model}"


def completion_text(completion: Any) -> str:
    """A TRL completion (plain text, or a conversational list of messages) as the assistant's text."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion if m.get("role", "assistant") == "assistant")


def as_messages(prompt: Any) -> list[Message]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def trl_reward_func(fn: RewardFn, name: str = "reward") -> Callable[..., list[float]]:
    """`fn` as a TRL reward function: `f(prompts, completions, **columns) -> list[float]`."""

    def reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        return fn([as_messages(p) for p in prompts], [completion_text(c) for c in completions])

    reward.__name__ = name  # TRL logs each reward function under its name (rewards/<name>/mean)
    return reward
