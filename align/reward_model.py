"""The one scoring API for trained reward models, and the held-out metrics computed with it.

`RewardModel.load(path).score(prompts, responses) -> list[float]` is what PPO, the reward-model judge, eval and
`align score` call. A (prompt, response) pair is chat-templated exactly as the reward stage trains on it:
`encode(tokenizer, prompt + [assistant response])`, right-padded in batches, read at the last non-pad token.
The metric functions below are plain Python over lists of rewards, so they are easy to check by hand.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from align.data.records import Message, PreferenceRecord, as_response, check_messages
from align.errors import AlignError, ModelError
from align.models.load import chat_ids

Prompt = str | list[Message]
Response = str | list[Message]


def as_prompt(prompt: Prompt, where: str = "prompt") -> list[Message]:
    """A plain string becomes one user message; a message list is validated."""
    return check_messages(prompt, where, field_name="prompt")


def _response(response: Response, where: str) -> list[Message]:
    # A policy can generate an empty string; it still gets a (presumably low) score rather than an error.
    if isinstance(response, str):
        return [{"role": "assistant", "content": response}]
    return as_response(response, where, "response")


def encode(tokenizer: Any, prompt: list[Message], response: list[Message]) -> list[int]:
    """Token ids of `prompt + response` through the chat template: the one encoding used to train and to score."""
    return chat_ids(tokenizer, list(prompt) + list(response))


def check_tokenizer_fits(tokenizer: Any, model_dir: Path, where: str) -> None:
    """A tokenizer whose ids run past the model's embedding table would index out of range mid-training (read
    from the model's config, before anything loads)."""
    from transformers import AutoConfig

    from align.models.load import base_of_adapter, is_adapter

    while is_adapter(model_dir):
        model_dir = base_of_adapter(model_dir)
    n_embed = AutoConfig.from_pretrained(model_dir).get_text_config().vocab_size
    if len(tokenizer) > n_embed:
        raise ModelError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's embedding table has "
                         f"{n_embed} rows; use the tokenizer saved with this model (or resize the embeddings)")


def saved_dtype(model_dir: Path) -> str:
    """The dtype recorded in a model folder's config.json (what plain `from_pretrained` would load)."""
    from align.models.load import base_of_adapter, is_adapter

    folder = base_of_adapter(model_dir) if is_adapter(model_dir) else Path(model_dir)
    config = json.loads((folder / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def _is_reward_folder(path: Path) -> bool:
    if (path / "adapter_config.json").is_file():
        return json.loads((path / "adapter_config.json").read_text()).get("task_type") == "SEQ_CLS"
    config = json.loads((path / "config.json").read_text())
    return any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])


class RewardModel:
    """A scalar reward model and its tokenizer. Build with `RewardModel.load(path)` or from live objects."""

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 8) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.packed: bool | None = None  # batches run as packed rows (decided on the first batch, on a CPU)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if not tokenizer.chat_template:
            raise ModelError("the reward model's tokenizer has no chat template; prompts cannot be encoded as in "
                             "training (use the tokenizer saved with the model)")

    @classmethod
    def load(cls, path: str | Path, *, dtype: str = "saved", device: str | None = None, batch_size: int = 8,
             trust_remote_code: bool = False) -> RewardModel:
        """`path`: a reward run folder, its `model/` folder, or its `adapter/` folder.

        dtype 'saved' keeps the dtype stored with the model (as plain transformers does), so scores match it;
        'auto' takes bf16 where a no-grad forward measured faster here (`pick_dtype(use="forward")`).
        """
        import torch

        from align.models.load import load_model, load_tokenizer, pick_dtype, resolve_model

        folder = resolve_model(path)
        if not _is_reward_folder(folder):
            raise ModelError(f"{folder} is not a reward model (no sequence-classification head); "
                             f"train one with `align reward` and pass its run folder")
        if dtype == "auto":
            dtype = str(pick_dtype("auto", use="forward")).removeprefix("torch.")
        model = load_model(folder, dtype=saved_dtype(folder) if dtype == "saved" else dtype, kind="classifier",
                           merge=True, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(folder, trust_remote_code)
        model.config.pad_token_id = tokenizer.pad_token_id
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
        return cls(model, tokenizer, batch_size=batch_size)

    def score(self, prompts: Sequence[Prompt], responses: Sequence[Response]) -> list[float]:
        """One scalar per (prompt, response); prompts are message lists or strings, responses strings."""
        if len(prompts) != len(responses):
            raise AlignError(f"score: got {len(prompts)} prompts but {len(responses)} responses; pass one each")
        ids = [encode(self.tokenizer, as_prompt(p, f"prompts[{i}]"), _response(r, f"responses[{i}]"))
               for i, (p, r) in enumerate(zip(prompts, responses))]
        return self.score_ids(ids)

    def score_preferences(self, records: Sequence[PreferenceRecord]) -> tuple[list[float], list[float]]:
        """(chosen rewards, rejected rewards) for preference records."""
        chosen = [encode(self.tokenizer, r.prompt, r.chosen) for r in records]
        rejected = [encode(self.tokenizer, r.prompt, r.rejected) for r in records]
        scores = self.score_ids(chosen + rejected)
        return scores[: len(records)], scores[len(records):]

    def score_ids(self, ids: Sequence[Sequence[int]]) -> list[float]:
        """Rewards for already-encoded sequences. On a CPU a batch runs as packed rows where the model scores them as
        it scores padded ones (`padding_free_classifier`, checked on the first batch): no compute on padding, and
        sequences that begin alike (one prompt's several answers, the chat template's system turn) compute their
        first tokens once, so they are batched in token order. Else batches of similar length, right-padded as in
        training."""
        import torch

        from align.models.packed import padding_free_classifier

        device = next(self.model.parameters()).device
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        if self.packed is None and len(ids) > 1:
            self.packed = device.type == "cpu" and padding_free_classifier(self.model, self._batch(ids, order[:2]))
        if self.packed:
            order = sorted(range(len(ids)), key=lambda i: list(ids[i]))
        out = [0.0] * len(ids)
        for start in range(0, len(order), self.batch_size):
            idx = order[start: start + self.batch_size]
            with torch.inference_mode():
                logits = self.model(**self._batch(ids, idx)).logits  # [b, 1]
            for i, value in zip(idx, logits[:, 0].float().tolist()):
                out[i] = value
        return out

    def _batch(self, ids: Sequence[Sequence[int]], idx: list[int]) -> dict[str, Any]:
        """input_ids and attention_mask [len(idx), width] of the sequences `idx`, right-padded, on the model's device."""
        import torch

        device = next(self.model.parameters()).device
        width = max(len(ids[i]) for i in idx)
        input_ids = torch.full((len(idx), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
            mask[row, : len(ids[i])] = 1
        return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


# ---- held-out metrics: pure functions over lists of rewards ----

def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def pairwise_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """Fraction of pairs with r_chosen > r_rejected; a tie counts half."""
    _check_pairs(chosen, rejected)
    return sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected)) / len(chosen)


def mean_margin(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """Mean of r_chosen - r_rejected."""
    _check_pairs(chosen, rejected)
    return sum(c - r for c, r in zip(chosen, rejected)) / len(chosen)


def reward_stats(rewards: Sequence[float]) -> tuple[float, float]:
    """(mean, population standard deviation)."""
    if not rewards:
        raise ValueError("no rewards")
    mean = sum(rewards) / len(rewards)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in rewards) / len(rewards))


def bt_log_loss(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """Mean Bradley-Terry negative log-likelihood of the labels, -log σ(r_c - r_r) (the training loss)."""
    _check_pairs(chosen, rejected)
    return sum(-math.log(max(sigmoid(c - r), 1e-300)) for c, r in zip(chosen, rejected)) / len(chosen)


def calibration_table(chosen: Sequence[float], rejected: Sequence[float], bins: int = 5) -> list[dict[str, float]]:
    """Reliability table of the Bradley-Terry probability p = σ(r_c - r_r).

    Each pair is read as a prediction for the response the model prefers: confidence max(p, 1 - p) in [0.5, 1],
    correct when that response is the labelled chosen one (a tie counts half). Bins split [0.5, 1] evenly; each
    row has lo, hi, count, confidence (mean) and accuracy (mean correct), the last bin including 1.0.
    """
    _check_pairs(chosen, rejected)
    rows = [{"lo": 0.5 + 0.5 * b / bins, "hi": 0.5 + 0.5 * (b + 1) / bins, "count": 0.0, "confidence": 0.0,
             "accuracy": 0.0} for b in range(bins)]
    for c, r in zip(chosen, rejected):
        p = sigmoid(c - r)
        confidence = max(p, 1.0 - p)
        correct = 1.0 if c > r else 0.5 if c == r else 0.0
        row = rows[min(int((confidence - 0.5) / 0.5 * bins), bins - 1)]
        row["count"] += 1
        row["confidence"] += confidence
        row["accuracy"] += correct
    for row in rows:
        if row["count"]:
            row["confidence"] /= row["count"]
            row["accuracy"] /= row["count"]
    return rows


def expected_calibration_error(table: Sequence[dict[str, float]]) -> float:
    """Σ_bins (count / total) * |accuracy - confidence|."""
    total = sum(row["count"] for row in table)
    return sum(row["count"] / total * abs(row["accuracy"] - row["confidence"]) for row in table) if total else 0.0


def heldout_metrics(chosen: Sequence[float], rejected: Sequence[float], bins: int = 5) -> dict[str, float]:
    """Every summary number the reward stage reports for a held-out split."""
    mean, std = reward_stats(list(chosen) + list(rejected))
    return {"accuracy": pairwise_accuracy(chosen, rejected), "margin_mean": mean_margin(chosen, rejected),
            "reward_mean": mean, "reward_std": std, "log_loss": bt_log_loss(chosen, rejected),
            "ece": expected_calibration_error(calibration_table(chosen, rejected, bins)), "pairs": float(len(chosen))}


def _check_pairs(chosen: Sequence[float], rejected: Sequence[float]) -> None:
    if len(chosen) != len(rejected) or not chosen:
        raise ValueError(f"need equally many chosen and rejected rewards (got {len(chosen)} and {len(rejected)})")


# ---- free baselines: what a reward model must beat on the same held-out pairs ----

def response_logprobs(model: Any, tokenizer: Any, records: Sequence[PreferenceRecord],
                      batch_size: int = 8) -> tuple[list[float], list[float]]:
    """(log p(chosen | prompt), log p(rejected | prompt)) under a causal LM: the sum of the response tokens'
    log-probabilities, the response being what the chat template adds after the prompt's generation header."""
    import torch

    from align.generation import Sample
    from align.rlhf.core import logprobs_from_logits
    from align.rlhf.policy import collate, model_device, response_logits

    samples = []
    for r in records:
        for response in (r.chosen, r.rejected):
            head = chat_ids(tokenizer, list(r.prompt), add_generation_prompt=True)
            full = encode(tokenizer, r.prompt, response)
            cut = next((i for i, (a, b) in enumerate(zip(head, full)) if a != b), min(len(head), len(full)))
            samples.append(Sample("", full[:cut], full[cut:], True))
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            batch = collate(samples[start:start + batch_size], tokenizer.pad_token_id).to(model_device(model))
            lp = logprobs_from_logits(response_logits(model, batch), batch.response_ids)
            out += (lp * batch.response_mask).sum(-1).tolist()
    return out[0::2], out[1::2]


def response_lengths(tokenizer: Any, records: Sequence[PreferenceRecord]) -> tuple[list[float], list[float]]:
    """(chosen, rejected) response lengths in tokens (the assistant turns' text, without the chat template)."""
    def n(response: list[Message]) -> float:
        return float(sum(len(tokenizer(m["content"], add_special_tokens=False)["input_ids"]) for m in response))

    return [n(r.chosen) for r in records], [n(r.rejected) for r in records]


def baseline_accuracies(logp_chosen: Sequence[float], logp_rejected: Sequence[float], len_chosen: Sequence[float],
                        len_rejected: Sequence[float]) -> dict[str, float]:
    """Held-out accuracy of the two free baselines (ties count half, as for the reward model):
    `loglik_ratio`: the base model prefers what it finds likelier, log p(chosen) − log p(rejected) > 0;
    `longer_wins`: the longer answer is preferred."""
    return {"loglik_ratio": pairwise_accuracy(logp_chosen, logp_rejected),
            "longer_wins": pairwise_accuracy(len_chosen, len_rejected)}


def baseline_warning(accuracy: float, baselines: dict[str, float]) -> str | None:
    """One line when the reward model does not beat every free baseline on the same held-out pairs, else None."""
    beaten_by = {k: v for k, v in baselines.items() if accuracy <= v}
    if not beaten_by:
        return None
    return (f"warning: the reward model's held-out accuracy {accuracy:.3f} does not beat "
            + ", ".join(f"{k.replace('_', ' ')} ({v:.3f})" for k, v in beaten_by.items())
            + " on the same pairs: it adds nothing over a free baseline")
