"""align: an RLHF/RLAIF alignment pipeline (SFT -> reward model -> PPO / DPO), with AI judges."""

from __future__ import annotations

import os
from typing import Any

# Quiet, offline-safe defaults: there is no model hub here, and tokenizer threads fight the trainer for 2 cores.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # `align.RewardModel` without importing torch at `import align` time.
    if name == "RewardModel":
        from align.reward_model import RewardModel

        return RewardModel
    raise AttributeError(name)
