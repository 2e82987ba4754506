"""`llm` judge: a local model reads a Jinja prompt with both responses and names the better one.

It runs through the same Sampler backends as `align generate` (hf on CPU, vLLM on GPU), greedy by default,
and judges every pair in both orders; a pair whose orders disagree is an abstain, not a preference.
"""

from __future__ import annotations

from dataclasses import dataclass

from align.config import opt
from align.data.records import Message
from align.generation import Sampler, SamplingSettings
from align.generation.select import BackendSettings, build_sampler
from align.judges import Verdict
from align.judges.prompted import CallError, PairPrompt, find_template, judge_pairs


@dataclass(frozen=True)
class Config:
    model: str = opt("default", "judge model: 'default', a model or adapter folder, or a stage run folder")
    template: str = opt("pairwise.jinja", "Jinja prompt template (a path, or a name under judges/)")
    system: str = opt("", "optional system message for the judge")
    criteria: str = opt("", "what 'better' means, passed to the template as `criteria`")
    both_orders: bool = opt(True, "judge each pair as (a, b) and (b, a); abstain when the orders disagree")
    max_new_tokens: int = opt(32, "longest judge answer in tokens")
    temperature: float = opt(0.0, "judge sampling temperature (0: greedy)")
    batch_size: int = opt(8, "judge prompts per generate call")
    engine: BackendSettings = opt(BackendSettings(), "backend and model loading")


class LLMJudge:
    """PairwiseJudge over a local model. Pass `sampler` to reuse one already loaded (tests, PPO)."""

    Config = Config

    def __init__(self, cfg: Config, sampler: Sampler | None = None) -> None:
        self.cfg = cfg
        self.prompt = PairPrompt(find_template(cfg.template), cfg.system, cfg.criteria)
        self.sampler = sampler if sampler is not None else build_sampler(cfg.model, cfg.engine)
        self.params = SamplingSettings(temperature=cfg.temperature, top_p=1.0, max_new_tokens=cfg.max_new_tokens,
                                       seed=0, batch_size=cfg.batch_size)

    def complete(self, chats: list[list[Message]]) -> list[str | CallError]:
        return [samples[0].text for samples in self.sampler.generate(chats, self.params, n=1)]

    def judge(self, prompts: list[list[Message]], response_pairs: list[tuple[str, str]]) -> list[Verdict]:
        return judge_pairs(self.complete, self.prompt, prompts, response_pairs, self.cfg.both_orders)
