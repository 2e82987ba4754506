"""`reward_model` judge: scores from a trained reward model (`align reward`), via `align.RewardModel`."""

from __future__ import annotations

from dataclasses import dataclass

from align.config import SCORE_DTYPE_HELP, ScoreDtype, opt
from align.data.records import Message


@dataclass(frozen=True)
class Config:
    path: str = opt("runs/reward", "reward model: the run folder of `align reward`, or its model/adapter folder")
    batch_size: int = opt(8, "sequences per forward pass")
    dtype: ScoreDtype = opt("saved", SCORE_DTYPE_HELP)


class RewardModelJudge:
    """ScoreJudge: the reward model's scalar for each (prompt, response)."""

    Config = Config

    def __init__(self, cfg: Config) -> None:
        from align import RewardModel

        self.rm = RewardModel.load(cfg.path, dtype=cfg.dtype, batch_size=cfg.batch_size)

    def score(self, prompts: list[list[Message]], responses: list[str]) -> list[float | None]:
        return [float(s) for s in self.rm.score(prompts, responses)]
