"""`llm` judge: a local model reads a Jinja prompt with both responses and names the better one.

It runs through the same Sampler backends as `align generate` (hf on CPU, vLLM on GPU) and judges every pair
in both orders. Two ways to read its verdict:

- `verdict: text` (greedy generation, parsed): a pair whose orders disagree, or whose answer cannot be read,
  is an abstain or a failure, not a preference.
- `verdict: logprob`: one forward pass per order reads P("A") vs P("B") for the next token after the answer
  prefix (`verdict_prefix`, e.g. "Verdict:"); P(a better) is averaged over both orders, so no answer is
  unparseable, position bias cancels, and every verdict has a confidence (the averaged probability of the picked
  side); picks below `min_confidence` abstain. This is how small models judge best (G-Eval-style scoring from
  token probabilities rather than sampled text: Liu et al. 2023, https://arxiv.org/abs/2303.16634).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from align.config import opt
from align.data.records import Message
from align.errors import ConfigError
from align.generation import Sampler, SamplingSettings
from align.generation.select import BackendSettings, build_sampler
from align.judges import Verdict
from align.judges.prompted import Answer, CallError, PairPrompt, find_template, judge_pairs, prompt_identity

LETTERS = ("A", "B")
VLLM_TOP = 20  # vLLM returns at most this many next-token log-probabilities by default (max_logprobs)


@dataclass(frozen=True)
class Config:
    model: str = opt("default", "judge model: 'default', a model or adapter folder, or a stage run folder")
    template: str = opt("pairwise.jinja", "Jinja prompt template (a path, or a name under judges/)")
    system: str = opt("", "optional system message for the judge")
    criteria: str = opt("", "what 'better' means, passed to the template as `criteria`")
    both_orders: bool = opt(True, "judge each pair as (a, b) and (b, a); text: abstain when the orders disagree, "
                                  "logprob: average the two probabilities")
    verdict: Literal["text", "logprob"] = opt(
        "text", "text: generate and parse the answer | logprob: read P('A') vs P('B') of the next token after "
                "verdict_prefix (no unparseable answers; every verdict gets a confidence)")
    verdict_prefix: str = opt("Verdict:", "logprob: the start of the answer the template asks for; the token "
                                          "after it is read")
    min_confidence: float = opt(0.0, "logprob: abstain when the averaged probability of the picked side (0.5..1) "
                                     "is below this", ge=0.0, le=1.0)
    max_new_tokens: int = opt(32, "text: longest judge answer in tokens", ge=1)
    temperature: float = opt(0.0, "text: judge sampling temperature (0: greedy)", ge=0.0, le=10.0)
    batch_size: int = opt(8, "judge prompts per generate call / forward pass", ge=1)
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
        if cfg.verdict == "logprob" and not (hasattr(self.sampler, "model") or hasattr(self.sampler, "llm")):
            raise ConfigError(f"llm judge: verdict=logprob needs the hf or vllm backend (a model to read "
                              f"probabilities from); {type(self.sampler).__name__} has none: use verdict=text")

    def identity(self) -> dict[str, Any]:
        """What determines the verdicts (the cache key): everything but the batch size."""
        return prompt_identity(self.cfg, ("batch_size",), self.prompt)

    def complete(self, chats: list[list[Message]]) -> list[str | Answer | CallError]:
        if self.cfg.verdict == "logprob":
            return [Answer(f"{self.cfg.verdict_prefix} {'A' if p is not None and p >= 0.5 else 'B'}", p_first=p)
                    for p in self.first_probabilities(chats)]
        return [samples[0].text for samples in self.sampler.generate(chats, self.params, n=1)]

    def first_probabilities(self, chats: list[list[Message]]) -> list[float | None]:
        """P("A") / (P("A") + P("B")) for the token after the chat's assistant turn opened with verdict_prefix."""
        from align.generation.hf import chat_prompt_ids

        tokenizer = self.sampler.tokenizer  # type: ignore[attr-defined]
        prefix = tokenizer.encode(self.cfg.verdict_prefix, add_special_tokens=False)
        ids = [chat_prompt_ids(tokenizer, chat) + prefix for chat in chats]
        letters = [letter_ids(tokenizer, letter) for letter in LETTERS]
        if hasattr(self.sampler, "model"):
            logps = hf_letter_logprobs(self.sampler.model, tokenizer.pad_token_id, ids, letters, self.cfg.batch_size)
        else:
            logps = vllm_letter_logprobs(self.sampler, ids, letters)
        return [pair_probability(la, lb) for la, lb in logps]

    def judge(self, prompts: list[list[Message]], response_pairs: list[tuple[str, str]]) -> list[Verdict]:
        return judge_pairs(self.complete, self.prompt, prompts, response_pairs, self.cfg.both_orders,
                           decide="prob" if self.cfg.verdict == "logprob" else "text",
                           min_confidence=self.cfg.min_confidence)


def letter_ids(tokenizer: Any, letter: str) -> list[int]:
    """The single-token spellings of `letter` ("A" and " A"): their probabilities are summed."""
    ids = {toks[0] for text in (letter, f" {letter}")
           if len(toks := tokenizer.encode(text, add_special_tokens=False)) == 1}
    if not ids:
        raise ConfigError(f"llm judge: the tokenizer has no single token for {letter!r}; use verdict=text")
    return sorted(ids)


def pair_probability(logp_a: float, logp_b: float) -> float | None:
    """P(A) / (P(A) + P(B)) from two log-probabilities (stable); None when neither is finite."""
    if not (math.isfinite(logp_a) or math.isfinite(logp_b)):
        return None
    if not math.isfinite(logp_b):
        return 1.0
    if not math.isfinite(logp_a):
        return 0.0
    return 1.0 / (1.0 + math.exp(max(min(logp_b - logp_a, 700.0), -700.0)))


def hf_letter_logprobs(model: Any, pad_id: int | None, prompts: list[list[int]], letters: list[list[int]],
                       batch_size: int) -> list[tuple[float, ...]]:
    """Next-token log-probability of each letter (summed over its spellings) after each prompt, batched with left
    padding (explicit position ids, so padding does not shift positions)."""
    import torch

    out: list[tuple[float, ...]] = []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = 0 if pad_id is None else pad_id
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            width = max(len(ids) for ids in batch)
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits[:, -1, :]
            logp = logits.float().log_softmax(-1)  # [batch, vocab]
            per_letter = [torch.logsumexp(logp[:, ids], dim=-1) for ids in letters]  # each [batch]
            out += [tuple(float(v[i]) for v in per_letter) for i in range(len(batch))]
    model.train(was_training)
    return out


def vllm_letter_logprobs(sampler: Any, prompts: list[list[int]], letters: list[list[int]]) -> list[tuple[float, ...]]:
    """The same from a vLLM engine: the top-VLLM_TOP next-token log-probabilities (a letter outside them counts
    as impossible; a prompt where neither letter appears becomes a failure)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=VLLM_TOP)
    outs = sampler.llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False,
                                lora_request=sampler.lora_request)
    result = []
    for out in outs:
        top = out.outputs[0].logprobs[0]  # {token_id: Logprob}
        result.append(tuple(logsumexp([top[t].logprob for t in ids if t in top]) for ids in letters))
    return result


def logsumexp(values: list[float]) -> float:
    """log(sum(exp(v))); -inf for an empty list."""
    if not values:
        return -math.inf
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values)) if math.isfinite(top) else top
