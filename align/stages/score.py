"""score: reward-model scores for a JSONL of prompt/response pairs (writes scores.jsonl)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.config import SCORE_DTYPE_HELP, ScoreDtype, opt
from align.data.records import Message, as_response, check_messages, read_jsonl, write_jsonl
from align.errors import DataError
from align.runs import start_run


@dataclass(frozen=True)
class Config:
    model: str = opt("runs/reward", "reward run folder, or its model/ or adapter/ folder")
    input: str = opt("data/sft/valid.jsonl", "JSONL rows {prompt, response} (also {prompt, completion} or "
                                             "{messages}: the last assistant turn is scored)")
    output_dir: str = opt("runs/score", "where scores.jsonl goes")
    overwrite: bool = opt(False, "replace an existing output_dir")
    seed: int = opt(42, "random seed (scoring is deterministic; kept for uniformity)", ge=0)
    batch_size: int = opt(8, "pairs per forward pass", ge=1)
    dtype: ScoreDtype = opt("saved", SCORE_DTYPE_HELP)
    trust_remote_code: bool = opt(False, "allow model code from the model folder")


def scoring_pair(obj: Any, where: str) -> tuple[list[Message], list[Message]]:
    """(prompt messages, response messages) from one input row."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with 'prompt' and 'response'")
    if "messages" in obj:
        msgs = check_messages(obj["messages"], where)
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=0)
        if last == 0:
            raise DataError(f"{where}: messages need an assistant turn after the prompt to score")
        return msgs[:last], [msgs[last]]
    answer = "response" if "response" in obj else "completion"
    if "prompt" not in obj or answer not in obj:
        raise DataError(f"{where}: missing field(s): give 'prompt' and 'response' (found: {', '.join(sorted(obj))})")
    return check_messages(obj["prompt"], where, field_name="prompt"), as_response(obj[answer], where, answer)


def run(cfg: Config) -> Path:
    from align.reward_model import RewardModel, reward_stats

    rows = list(read_jsonl(cfg.input))
    pairs = [scoring_pair(obj, f"{cfg.input}:{lineno}") for lineno, obj in rows]
    run_ = start_run("score", cfg)
    run_.add_input(cfg.input)
    reward_model = RewardModel.load(cfg.model, dtype=cfg.dtype, batch_size=cfg.batch_size,
                                    trust_remote_code=cfg.trust_remote_code)
    scores = reward_model.score([p for p, _ in pairs], [r for _, r in pairs])
    out = run_.dir / "scores.jsonl"
    write_jsonl(out, [{**obj, "score": s} for (_, obj), s in zip(rows, scores)])
    run_.add_output("scores", out)
    mean, std = reward_stats(scores)
    run_.metrics.update({"count": len(scores), "score_mean": mean, "score_std": std, "score_min": min(scores),
                         "score_max": max(scores)})
    print(f"scored {len(scores)} pairs (mean {mean:.3f}, std {std:.3f}) -> {out}", flush=True)
    return run_.finish()
