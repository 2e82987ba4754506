"""`ensemble` judge: combine other judges (given by spec name or path) on each pair.

- `mode: majority`: every member votes (a score member votes by its scores and `min_margin`); a side wins with
  more than half of the members that answered; all ties is a tie; anything else abstains.
- `mode: mean`: the weighted mean of score members' scores (every member must be a score judge) is compared
  with `min_margin`. Scores are averaged as they are, so give members on different scales suitable weights.
A pair fails only when every member failed (majority) or any member failed (mean).
"""

from __future__ import annotations

from dataclasses import dataclass

from align.config import opt
from align.data.records import Message
from align.errors import ConfigError
from align.judges import Verdict, failure, verdict_from_scores


@dataclass(frozen=True)
class Config:
    members: list[str] = opt([], "judge specs (names under judges/ or paths) to combine")
    mode: str = opt("majority", "majority (vote) | mean (weighted mean of scores; score judges only)")
    weights: list[float] = opt([], "per-member weights (empty: all 1)")
    min_margin: float = opt(0.0, "score difference below which a score member (or the mean) calls a tie")


class EnsembleJudge:
    """PairwiseJudge over member judges. `members` are LoadedJudge objects (see registry.load_judge)."""

    Config = Config

    def __init__(self, cfg: Config) -> None:
        from align.judges.registry import load_judge

        if cfg.mode not in ("majority", "mean"):
            raise ConfigError(f"ensemble mode {cfg.mode!r}: use majority or mean")
        if len(cfg.members) < 2:
            raise ConfigError("an ensemble needs at least two members (names under judges/ or spec paths)")
        if cfg.weights and len(cfg.weights) != len(cfg.members):
            raise ConfigError(f"ensemble: {len(cfg.weights)} weights for {len(cfg.members)} members")
        self.cfg = cfg
        self.members = [load_judge(m) for m in cfg.members]
        self.weights = list(cfg.weights) or [1.0] * len(self.members)
        if cfg.mode == "mean" and any(m.mode != "score" for m in self.members):
            raise ConfigError("ensemble mode mean averages scores: every member must be a score judge "
                              f"(pairwise: {', '.join(m.name for m in self.members if m.mode != 'score')})")

    def member_verdicts(self, prompts: list[list[Message]], pairs: list[tuple[str, str]]) -> list[list[Verdict]]:
        """[member][pair] verdicts."""
        out = []
        for m in self.members:
            if m.mode == "pairwise":
                out.append(m.judge.judge(prompts, pairs))
                continue
            scores = m.judge.score(prompts + prompts, [a for a, _ in pairs] + [b for _, b in pairs])
            n = len(pairs)
            out.append([failure(f"{m.name}: no score") if scores[i] is None or scores[n + i] is None
                        else verdict_from_scores(scores[i], scores[n + i], self.cfg.min_margin) for i in range(n)])
        return out

    def judge(self, prompts: list[list[Message]], response_pairs: list[tuple[str, str]]) -> list[Verdict]:
        if self.cfg.mode == "mean":
            return self._mean(prompts, response_pairs)
        votes = self.member_verdicts(prompts, response_pairs)
        return [self._majority([v[i] for v in votes]) for i in range(len(response_pairs))]

    def _majority(self, verdicts: list[Verdict]) -> Verdict:
        answered = [(m, v) for m, v in zip(self.members, verdicts) if not v.failed]
        if not answered:
            return failure("; ".join(f"{m.name}: {v.error}" for m, v in zip(self.members, verdicts)))
        reason = "; ".join(f"{m.name}: {v.winner}" for m, v in answered)
        for side in ("a", "b"):
            if sum(v.winner == side for _, v in answered) * 2 > len(answered):
                return Verdict(side, reason=reason)  # type: ignore[arg-type]
        if all(v.winner == "tie" for _, v in answered):
            return Verdict("tie", reason=reason)
        return Verdict("abstain", reason=f"no majority ({reason})")

    def _mean(self, prompts: list[list[Message]], pairs: list[tuple[str, str]]) -> list[Verdict]:
        n = len(pairs)
        per_member = [m.judge.score(prompts + prompts, [a for a, _ in pairs] + [b for _, b in pairs])
                      for m in self.members]
        total = sum(self.weights)
        out = []
        for i in range(n):
            rows = [(s[i], s[n + i]) for s in per_member]
            if any(a is None or b is None for a, b in rows):
                out.append(failure("; ".join(f"{m.name}: no score" for m, (a, b) in zip(self.members, rows)
                                             if a is None or b is None)))
                continue
            mean_a = sum(w * a for w, (a, _) in zip(self.weights, rows)) / total
            mean_b = sum(w * b for w, (_, b) in zip(self.weights, rows)) / total
            out.append(verdict_from_scores(mean_a, mean_b, self.cfg.min_margin))
        return out
