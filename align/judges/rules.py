"""`rules` judge: a plain Python function `fn(prompt_messages, response) -> float` given as `module:function`,
e.g. `align.judges.house_style:house_style_score`. A function that raises or returns a non-number fails for
that sample only (the stage counts it and writes it to failures.jsonl)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from align.config import opt
from align.data.records import Message
from align.errors import ConfigError
from align.plugins import import_object

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    function: str = opt("align.judges.house_style:house_style_score",
                        "`module:function` taking (prompt messages, response text) and returning a float")


class RulesJudge:
    """ScoreJudge calling a per-sample function."""

    Config = Config

    def __init__(self, cfg: Config) -> None:
        fn = import_object(cfg.function, "rules function")
        if not callable(fn):
            raise ConfigError(f"rules function {cfg.function!r} is not callable")
        self.fn: Callable[[list[Message], str], float] = fn
        self.name = cfg.function
        self.errors = 0

    def score(self, prompts: list[list[Message]], responses: list[str]) -> list[float | None]:
        out: list[float | None] = []
        for prompt, response in zip(prompts, responses):
            try:
                value = float(self.fn(prompt, response))
                out.append(value if math.isfinite(value) else None)
            except Exception as e:  # noqa: BLE001 - a user rule's bug fails one sample, not the run
                self.errors += 1
                if self.errors <= 3:
                    log.warning(f"rules judge: {self.name} raised {type(e).__name__}: {e}")
                out.append(None)
        return out
