"""align: an RLHF/RLAIF alignment pipeline (SFT -> reward model -> PPO / DPO), with AI judges."""

from __future__ import annotations

import os
from typing import Any

from align import log as _log

# Tokenizer threads fight the trainer for the cores. Hub access is left as the user set it (HF_HUB_OFFLINE):
# Hub IDs resolve online, or from the local HF cache offline; the embedded default model needs no network.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_log.quiet_third_party()  # before bitsandbytes / transformers are imported: their import-time noise too
_log.install(_log.level_from(quiet=False, verbose=False))  # align's status lines on stderr, as the CLI shows them

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # `align.RewardModel` without importing torch at `import align` time.
    if name == "RewardModel":
        from align.reward_model import RewardModel

        return RewardModel
    raise AttributeError(name)
