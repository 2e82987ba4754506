"""Benchmarks: each prints numbers measured in one run (never asserted in tests).

`python -m align.bench` (make bench) runs align next to the raw alternative a user would write, alternating A/B
runs, each in its own process; see `align/bench/__main__.py`. The raw baselines, each a short script written the
way the TRL / transformers docs show (same model, data, LoRA r16 on all linear layers, batch, max_length, dtype
and steps as the align side; everything else at the library's defaults):

- `raw_sft.py`      TRL `SFTTrainer(model=path, train_dataset=<messages JSONL>, peft_config=LoraConfig(...))`;
                    tokens/s over `trainer.train()`. Compared with `align sft`.
- `raw_reward.py`   TRL `RewardTrainer` on the prompt/chosen/rejected JSONL that `align import` writes, LoRA with
                    task_type SEQ_CLS; pairs/s. Compared with `align reward`.
- `raw_dpo.py`      TRL `DPOTrainer` with a `peft_config` (reference = the adapter-disabled policy), sigmoid loss,
                    beta 0.1; pairs/s. Compared with `align dpo`.
- `raw_generate.py` plain `model.generate` on chat-templated, left-padded batches with the sampling settings our
                    hf Sampler passes and the same per-batch seeds; new tokens/s. Compared with `align generate`.

Each prints one JSON line (its throughput first, then details and its peak RSS); `child.py` holds their flags.
The driver also times a PPO step by part (from the run's metrics.jsonl), SFT MFU against a matmul peak measured
in the same run, and SFT cost on 1x/2x/4x the data. Other benches: `sft.py` (fp32 vs bf16), `generate.py` (hf
batch sizes, vLLM on a GPU), `peft_params.py`, `gpu_check.py`.
"""
