"""Generation throughput: tokens/s of the hf backend (per batch size) and, with a GPU and vllm, vLLM vs hf on the
same prompts.

    python -m align.bench.generate [key=value ...]      e.g.  prompts=64 max_new_tokens=128 batch_sizes=[1,32]
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass

from align.config import describe, load_config, opt
from align.data.records import Message, read_prompts
from align.generation import Sampler, SamplingSettings

FALLBACK_PROMPTS = ["How do I keep basil fresh?", "What can replace butter in cookies?",
                    "How long should I boil an egg?", "How do I caramelise onions?"]


@dataclass(frozen=True)
class Config:
    model: str = opt("default", "model to sample from")
    prompts_file: str = opt("data/prompts/eval.jsonl", "prompt-only JSONL (falls back to a few built-in prompts)")
    prompts: int = opt(0, "how many prompts (0: 16 on CPU, 256 with a GPU)")
    max_new_tokens: int = opt(64, "tokens per response")
    temperature: float = opt(0.8, "sampling temperature")
    batch_sizes: list[int] = opt([1, 16], "hf batch sizes to time (on GPU the largest is also used vs vLLM)")
    dtype: str = opt("auto", "auto | float32 | bfloat16")
    vllm: bool = opt(True, "also time vLLM when it is installed and a GPU is present")


def load_prompts(cfg: Config, count: int) -> list[list[Message]]:
    try:
        prompts = [r.prompt for r in read_prompts(cfg.prompts_file)]
    except Exception:  # noqa: BLE001 - a benchmark should still run without the demo data
        prompts = [[{"role": "user", "content": p}] for p in FALLBACK_PROMPTS]
    return [prompts[i % len(prompts)] for i in range(count)]


def time_sampler(sampler: Sampler, prompts: list[list[Message]], params: SamplingSettings) -> tuple[int, float]:
    """(generated tokens, seconds) for one generate call over all prompts, after a one-prompt warm-up."""
    sampler.generate(prompts[:1], dataclasses.replace(params, max_new_tokens=4))
    start = time.perf_counter()
    out = sampler.generate(prompts, params)
    seconds = time.perf_counter() - start
    return sum(len(s.response_ids) for samples in out for s in samples), seconds


def main(argv: list[str]) -> None:
    import torch

    from align.generation.select import BackendSettings, build_sampler
    from align.generation.vllm import vllm_available

    if any(a in ("-h", "--help") for a in argv):
        print(__doc__ + "\n" + "\n".join(describe(Config)))
        return
    cfg = load_config(Config, None, argv)
    gpu = torch.cuda.is_available()
    prompts = load_prompts(cfg, cfg.prompts or (256 if gpu else 16))
    print(f"{len(prompts)} prompts x {cfg.max_new_tokens} new tokens, temperature {cfg.temperature}, "
          f"{'GPU ' + torch.cuda.get_device_name() if gpu else f'CPU ({torch.get_num_threads()} threads)'}")
    print("| backend | batch | tokens | seconds | tokens/s |\n|---|---:|---:|---:|---:|", flush=True)
    hf = build_sampler(cfg.model, BackendSettings(backend="hf", dtype=cfg.dtype), verbose=False)
    rates: dict[str, float] = {}
    for bs in cfg.batch_sizes:
        params = SamplingSettings(temperature=cfg.temperature, top_p=0.95, max_new_tokens=cfg.max_new_tokens,
                                  seed=0, batch_size=bs)
        tokens, seconds = time_sampler(hf, prompts, params)
        rates[f"hf@{bs}"] = tokens / seconds
        print(f"| hf | {bs} | {tokens} | {seconds:.2f} | {tokens / seconds:.1f} |", flush=True)
    if cfg.vllm and vllm_available():
        del hf
        torch.cuda.empty_cache()
        vllm = build_sampler(cfg.model, BackendSettings(backend="vllm", dtype=cfg.dtype), verbose=False)
        params = SamplingSettings(temperature=cfg.temperature, top_p=0.95, max_new_tokens=cfg.max_new_tokens, seed=0)
        tokens, seconds = time_sampler(vllm, prompts, params)
        best_hf = max(rates.values())
        print(f"| vllm | all | {tokens} | {seconds:.2f} | {tokens / seconds:.1f} |")
        print(f"vLLM / best hf: {tokens / seconds / best_hf:.1f}x (target: >= 10x)", flush=True)
    elif cfg.vllm:
        print("vLLM not timed: it needs the vllm package and a CUDA GPU (pip install -e '.[vllm]')")


if __name__ == "__main__":
    main(sys.argv[1:])
