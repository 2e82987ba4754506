"""Plumbing shared by the raw baseline scripts (raw_*.py): their flags and the one JSON line each prints.

Kept apart so each baseline stays the short script a user would write from the TRL / transformers docs.
"""

from __future__ import annotations

import argparse
import json
import resource


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="a raw baseline run by `python -m align.bench` (prints one JSON line)")
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--data", required=True, help="training JSONL (SFT messages, or prompt/chosen/rejected), or prompts")
    p.add_argument("--out", required=True, help="Trainer output_dir (a scratch folder)")
    p.add_argument("--steps", type=int, default=8, help="max_steps")
    p.add_argument("--batch", type=int, default=8, help="per-device batch size (generation: prompts per call)")
    p.add_argument("--max-length", type=int, default=384, help="max tokens per example")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model dtype (bf16 also "
                   "turns on the Trainer's bf16 flag)")
    p.add_argument("--prompts", type=int, default=32, help="generation: how many prompts")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation: tokens per response")
    p.add_argument("--temperature", type=float, default=0.9, help="generation: sampling temperature")
    p.add_argument("--top-p", type=float, default=0.95, help="generation: nucleus mass")
    p.add_argument("--seed", type=int, default=0, help="generation: base seed (each batch: seed + its first index)")
    return p.parse_args(argv)


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(**fields: object) -> None:
    """The line the bench driver reads: the measured numbers plus this process's peak RSS."""
    print(json.dumps({**fields, "peak_rss_mb": round(peak_rss_mb(), 1)}), flush=True)
