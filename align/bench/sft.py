"""SFT throughput on the default model: tokens/s for fp32 vs bf16 (LoRA), measured in one run.

    python -m align.bench.sft [steps=6] [batch_size=8]       (make bench compares align with raw TRL instead)

Prints a table and the bf16/fp32 ratio. Numbers depend on the machine and on what else runs; compare ratios.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from align.config import load_config
from align.stages import sft


def measure(dtype: str, steps: int, batch_size: int, method: str = "lora") -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(sft.Config, Path("stages/sft.yaml"), [
            f"output_dir={tmp}/run", f"dtype={dtype}", f"peft.method={method}", f"train.max_steps={steps}",
            f"train.batch_size={batch_size}", "train.eval_steps=0", "train.save_steps=100000",
            "train.early_stopping_patience=0", "train.progress=false", "train.logging_steps=100"])
        start = time.perf_counter()
        run_dir = sft.run(cfg)
        wall = time.perf_counter() - start
        m = json.loads((run_dir / "manifest.json").read_text())["metrics"]
    return {"tokens_per_second": m["train_tokens_per_second"], "train_runtime_s": m["train_runtime"],
            "stage_wall_s": wall}


def main(argv: list[str]) -> None:
    opts = dict(a.split("=", 1) for a in argv)
    steps, batch = int(opts.get("steps", 6)), int(opts.get("batch_size", 8))
    rows = {dtype: measure(dtype, steps, batch) for dtype in ("float32", "bfloat16")}
    print(f"\nSFT + LoRA on the default model, {steps} steps x batch {batch}:")
    print("| dtype | tokens/s (training) | train runtime s | stage wall s |\n|---|---:|---:|---:|")
    for dtype, r in rows.items():
        print(f"| {dtype} | {r['tokens_per_second']:.1f} | {r['train_runtime_s']:.1f} | {r['stage_wall_s']:.1f} |")
    ratio = rows["bfloat16"]["tokens_per_second"] / rows["float32"]["tokens_per_second"]
    print(f"bf16 / fp32 training throughput: {ratio:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
