"""GPU check: the CUDA paths of the training stages on tiny random models built here (no downloads, nothing to
carry), in a few minutes on one GPU. Prints a table; exit code 1 when a check failed.

    make gpu-check                          (python -m align.bench.gpu_check [key=value ...])

Checks: sft in bf16, reward, dpo, the hf sampler's decoding loop against `generate` (bf16), ppo (dtype auto, i.e.
bf16 on a GPU that has it), sft and ppo with QLoRA when bitsandbytes imports, ppo sampling from a bf16 copy (the
logged log-prob mismatch is non-zero, ppo.tis_cap on), the vLLM sampler (generate, adapter swap, weight reload,
log-probs) and a stacked SFT -> DPO -> online adapter chain served on its merged base with sleep mode and a measured
shutdown, ppo on vLLM colocated (0.3 share, sleep) when vllm imports, and, when 2 GPUs exist, a 2-process ppo run
under accelerate (stages/accelerate/ddp.yaml) whose first update is compared with a 1-process run on the same 8
prompts, and PPO's sharded paths under real FSDP2 shards (tests/ppo_fsdp2_worker.py under torchrun, a process per
GPU over nccl; gloo with 2 CPU processes in cpu=true mode). Each stage runs through its `run(cfg)` on its tiny
recipe (stages/tiny/) in a temporary folder. A check whose packages are missing (trl, datasets, bitsandbytes, vllm,
...) is a SKIP row that names them, not a failure.
Without CUDA it prints one "no GPU" row and exits 0; `cpu=true` runs the same stage checks on the CPU instead
(float32; QLoRA, vLLM and the 2-process run are skipped), to try this script on a machine without a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.config import describe, load_config, opt

ROOT = Path(__file__).resolve().parent.parent.parent
TINY = ROOT / "stages" / "tiny"
CORPUS = ["How do I keep basil fresh?", "Salt the water before the pasta goes in.", "Roast the leeks gently.",
          "What colour is item seven? blue blue blue.", "Great question! As an AI, I think soup is lovely.",
          "Tip: salt it first. Knead the dough, then bake it until golden."]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclass(frozen=True)
class Config:
    cpu: bool = opt(False, "run the stage checks on the CPU when there is no GPU (to try this script)")
    keep: str = opt("", "keep the work folder (models, runs) here instead of a temporary one")
    timeout: int = opt(240, "seconds allowed for the 2-process run", ge=30)


@dataclass
class Row:
    check: str
    status: str  # PASS | FAIL | SKIP
    seconds: float
    detail: str


@dataclass(frozen=True)
class Ctx:
    work: Path
    model: Path  # tiny random Llama, float32 safetensors
    model2: Path  # the same shape, other weights (for the vLLM weight reload)
    sft_train: Path
    sft_valid: Path
    prefs_train: Path
    prefs_valid: Path
    cuda: bool

    def out(self, name: str) -> str:
        return str(self.work / "runs" / name)


# ---- tiny artifacts ----

def build_tokenizer(out: Path) -> Path:
    """A byte-level BPE tokenizer (vocab 512) trained on a few sentences, with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return out


def build_model(out: Path, tokenizer_dir: Path, seed: int) -> Path:
    """A 2-layer Llama with random weights (head_dim 64, which every attention kernel accepts)."""
    from align.bench.tiny import make_tiny_model

    return make_tiny_model(out, tokenizer_dir, seed=seed, hidden=128, heads=2, kv_heads=2)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prepare(work: Path, cuda: bool) -> Ctx:
    tok = build_tokenizer(work / "tokenizer")
    sft = [{"messages": [{"role": "user", "content": f"What colour is item {i}?"},
                         {"role": "assistant", "content": "blue blue blue."}]} for i in range(24)]
    prefs = [{"prompt": [{"role": "user", "content": f"How do I cook dish {i}?"}],
              "chosen": [{"role": "assistant", "content": "Roast it gently. Tip: salt it first."}],
              "rejected": [{"role": "assistant", "content": "Great question! As an AI, I think it is lovely."}]}
             for i in range(20)]
    return Ctx(work=work, model=build_model(work / "model", tok, 0), model2=build_model(work / "model2", tok, 1),
               sft_train=write_jsonl(work / "sft_train.jsonl", sft[:20]),
               sft_valid=write_jsonl(work / "sft_valid.jsonl", sft[20:]),
               prefs_train=write_jsonl(work / "prefs_train.jsonl", prefs[:16]),
               prefs_valid=write_jsonl(work / "prefs_valid.jsonl", prefs[16:]), cuda=cuda)


# ---- checks: each returns a detail string or raises ----

def finished(run_dir: Path) -> str:
    """Check the run completed with finite losses; a short summary of it."""
    from align.runs import read_manifest

    manifest = read_manifest(run_dir)
    if manifest is None or manifest.status != "completed":
        raise RuntimeError(f"{run_dir}: status {manifest.status if manifest else 'no manifest'}")
    losses = {k: v for k, v in manifest.metrics.items() if "loss" in k}
    bad = [k for k, v in losses.items() if not math.isfinite(v)]
    if bad:
        raise RuntimeError(f"non-finite {', '.join(bad)}")
    shown = sorted(losses.items())[:2]
    return ", ".join(f"{k} {v:.3g}" for k, v in shown) or "completed"


def run_stage(ctx: Ctx, stage: str, recipe: str, overrides: list[str]) -> str:
    """`align <stage> stages/tiny/<recipe>.yaml overrides...` in-process; on CUDA, check it used the GPU."""
    import importlib

    import torch

    module = importlib.import_module(f"align.stages.{stage}")
    cfg = load_config(module.Config, TINY / f"{recipe}.yaml", overrides)
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    summary = finished(module.run(cfg))
    if ctx.cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
        if peak <= 0:
            raise RuntimeError("nothing was allocated on the GPU: the stage ran on the CPU")
        summary += f"; peak GPU memory {peak:.0f} MiB"
    return summary


def check_sft(ctx: Ctx, method: str = "lora") -> str:
    dtype = "bfloat16" if ctx.cuda else "float32"
    return run_stage(ctx, "sft", "sft", [f"model={ctx.model}", f"output_dir={ctx.out('sft-' + method)}",
                                         f"data.train={ctx.sft_train}", f"data.validation={ctx.sft_valid}",
                                         f"dtype={dtype}", f"peft.method={method}", "train.max_steps=4",
                                         "train.progress=false"])


def check_reward(ctx: Ctx) -> str:
    return run_stage(ctx, "reward", "reward", [f"model={ctx.model}", f"output_dir={ctx.out('reward')}",
                                               f"data.train={ctx.prefs_train}", f"data.validation={ctx.prefs_valid}",
                                               "dtype=auto", "train.max_steps=4"])


def check_dpo(ctx: Ctx) -> str:
    return run_stage(ctx, "dpo", "dpo", [f"policy={ctx.model}", f"output_dir={ctx.out('dpo')}",
                                         f"data.train={ctx.prefs_train}", f"data.validation={ctx.prefs_valid}",
                                         "dtype=auto", "train.max_steps=4"])


def ppo_overrides(ctx: Ctx, name: str, method: str = "lora") -> list[str]:
    return [f"policy={ctx.model}", f"output_dir={ctx.out(name)}", "dtype=auto", f"peft.method={method}",
            "ppo.steps=2", "data.eval_size=2"]


def check_ppo(ctx: Ctx, method: str = "lora") -> str:
    return run_stage(ctx, "ppo", "ppo", ppo_overrides(ctx, "ppo-" + method, method))


def check_decode(ctx: Ctx) -> str:
    """The hf sampler's own decoding loop (finished rows leave the batch and the KV cache) against `generate` on the
    device, in the dtype sampling uses there: the same greedy tokens, and the same sampled tokens and log-probs with
    per-row seeds, with an EOS that ends some rows early."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.generation import SamplingSettings, hf

    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    device = "cuda" if ctx.cuda else "cpu"
    model = AutoModelForCausalLM.from_pretrained(ctx.model, dtype=dtype).to(device).eval()
    sampler = hf.HFSampler(model, AutoTokenizer.from_pretrained(ctx.model), logprobs=True)
    prompts = [[{"role": "user", "content": text}] for text in CORPUS]
    details = []
    for params, seeds in ((SamplingSettings(temperature=0.0, max_new_tokens=16, batch_size=8), None),
                          (SamplingSettings(temperature=1.0, top_p=0.9, max_new_tokens=16, batch_size=8),
                           list(range(len(prompts))))):
        sampler.eos_ids = {-1}
        first = sampler.generate(prompts[:1], params, seeds=seeds[:1] if seeds else None)[0][0].response_ids
        sampler.eos_ids = {first[3]}  # ends prompt 0 early, not necessarily the others
        decoded = [g[0] for g in sampler.generate(prompts, params, seeds=seeds)]
        original, hf.can_drop_rows = hf.can_drop_rows, lambda m: False
        try:
            generated = [g[0] for g in sampler.generate(prompts, params, seeds=seeds)]
        finally:
            hf.can_drop_rows = original
        if [s.response_ids for s in decoded] != [s.response_ids for s in generated]:
            raise RuntimeError(f"temperature {params.temperature}: decode and generate chose different tokens")
        gap = max((abs(a - b) for x, y in zip(decoded, generated) if x.logprobs and y.logprobs
                   for a, b in zip(x.logprobs, y.logprobs)), default=0.0)
        ended = sum(s.finished for s in decoded)
        details.append(f"t={params.temperature:g}: same tokens, {ended}/{len(decoded)} rows ended early"
                       + (f", max |Δ log-prob| {gap:.2g}" if seeds else ""))
    return "; ".join(details) + f" ({str(dtype).removeprefix('torch.')})"


def check_vllm(ctx: Ctx) -> str:
    """The vLLM sampler on the real engine: sample with log-probs, swap in a LoRA adapter, reload weights."""
    import torch
    from peft import LoraConfig, get_peft_model

    from align.generation import SamplingSettings
    from align.generation.select import BackendSettings, vllm_sampler
    from align.models.load import load_model, load_tokenizer

    engine = BackendSettings(backend="vllm", dtype="bfloat16", gpu_memory_utilization=0.25, max_model_len=512)
    sampler = vllm_sampler(ctx.model, load_tokenizer(ctx.model), engine, lora_rank=8, logprobs=True)
    prompts = [[{"role": "user", "content": "How do I keep basil fresh?"}]] * 4
    params = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=16)
    out = sampler.generate(prompts, params, n=2)
    lps = [lp for group in out for s in group for lp in s.logprobs]
    if len(lps) != sum(len(s.response_ids) for g in out for s in g) or max(lps) > 0:
        raise RuntimeError("sampler log-probs missing or positive")
    torch.manual_seed(0)
    adapter = get_peft_model(load_model(ctx.model, dtype="float32"),
                             LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                        init_lora_weights=False))
    for step in range(2):  # the PPO pattern: save the updated adapter, hand it over as a new request
        adapter.save_pretrained(ctx.work / "adapter")
        sampler.set_adapter(ctx.work / "adapter")
        sampler.generate(prompts, params, n=2)
    sampler.load_weights(ctx.model2)
    sampler.generate(prompts, params, n=1)
    return f"{len(lps)} sampled tokens with log-probs; 2 adapter swaps; weights reloaded"


def check_ppo_mismatch(ctx: Ctx) -> str:
    """ppo trained in float32, sampled from a bf16 copy: the logged sampler/trainer log-prob gap is non-zero, and
    the truncated importance-sampling correction (ppo.tis_cap) runs."""
    summary = run_stage(ctx, "ppo", "ppo", [*ppo_overrides(ctx, "ppo-tis"), "dtype=float32", "engine.dtype=bfloat16",
                                            "ppo.tis_cap=2.0"])
    rows = [json.loads(line) for line in (Path(ctx.out("ppo-tis")) / "metrics.jsonl").read_text().splitlines()]
    gap = [r["sampler/logprob_absdiff"] for r in rows]
    if not all(math.isfinite(g) and g > 0 for g in gap):
        raise RuntimeError(f"sampler/logprob_absdiff {gap}: expected > 0 for a bf16 sampler")
    return f"{summary}; |Δ logprob| per token {', '.join(f'{g:.2g}' for g in gap)}"


def adapter_chain(ctx: Ctx) -> list[Path]:
    """SFT -> DPO -> online LoRA adapters on the tiny model, each naming the one below as its base."""
    import torch
    from peft import LoraConfig, get_peft_model

    from align.models.load import load_model, load_tokenizer

    chain, base = [], ctx.model
    for seed, name in enumerate(("sft", "dpo", "online"), start=1):
        torch.manual_seed(seed)
        model = get_peft_model(load_model(ctx.model, dtype="float32"),
                               LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False))
        out = ctx.work / "chain" / name
        model.save_pretrained(out)
        load_tokenizer(ctx.model).save_pretrained(out)
        config = json.loads((out / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": str(base)}))
        chain.append(out)
        base = out
    return chain


def check_vllm_stacked(ctx: Ctx) -> str:
    """A stacked adapter chain on the real engine (merged base in bf16 + the top LoRA), sleep/wake, and the GPU
    memory given back by close()."""
    import torch

    from align.generation import SamplingSettings
    from align.generation.select import BackendSettings, build_sampler

    os.environ["ALIGN_CACHE"] = str(ctx.work / "cache")
    online = adapter_chain(ctx)[-1]
    free_before = torch.cuda.mem_get_info()[0]
    engine = BackendSettings(backend="vllm", gpu_memory_utilization=0.25, max_model_len=512, sleep=True)
    sampler = build_sampler(online, engine, verbose=False)
    info = sampler.describe()
    if Path(info["model"]).parent.name != "merged" or info["dtype"] != "bfloat16":
        raise RuntimeError(f"served {info['model']} in {info['dtype']}: expected a merged bf16 base")
    params = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=8)
    sampler.generate([[{"role": "user", "content": "Basil?"}]] * 2, params)
    sampler.sleep()
    asleep = torch.cuda.mem_get_info()[0]
    sampler.generate([[{"role": "user", "content": "Leeks?"}]] * 2, params)
    sampler.close()
    torch.cuda.synchronize()
    free_after = torch.cuda.mem_get_info()[0]
    gib = 2**30
    return (f"merged base + LoRA served; free GPU memory {free_before / gib:.1f} GiB before, "
            f"{asleep / gib:.1f} asleep, {free_after / gib:.1f} after close")


def check_ppo_vllm(ctx: Ctx) -> str:
    """ppo with rollouts from a colocated vLLM engine (0.3 of the GPU, sleep mode) on a stacked policy."""
    os.environ["ALIGN_CACHE"] = str(ctx.work / "cache")
    online = adapter_chain(ctx)[-1]
    summary = run_stage(ctx, "ppo", "ppo", [*ppo_overrides(ctx, "ppo-vllm"), f"policy={online}",
                                            "engine.backend=vllm", "engine.sleep=true", "engine.max_model_len=512"])
    rows = [json.loads(line) for line in (Path(ctx.out("ppo-vllm")) / "metrics.jsonl").read_text().splitlines()]
    return f"{summary}; |Δ logprob| vLLM vs trainer {rows[-1]['sampler/logprob_absdiff']:.2g}"


def launch_ppo(ctx: Ctx, name: str, processes: int, overrides: list[str], timeout: int) -> Path:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "stages/accelerate/ddp.yaml"), "--num_processes", str(processes), "-m", "align.cli", "ppo",
           str(TINY / "ppo.yaml"), *ppo_overrides(ctx, name), *overrides]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {(done.stderr or done.stdout).strip()[-400:]}")
    return Path(ctx.out(name))


def check_two_processes(ctx: Ctx, timeout: int) -> str:
    """ppo on 2 processes (one per GPU, DDP) x 4 prompts takes the first update 1 process x 8 takes."""
    from safetensors.torch import load_file

    exact = ["ppo.steps=1", "data.eval_size=0", "log.save_every=1", "dtype=float32", "engine.dtype=float32",
             "kl.reference_dtype=float32"]
    one = launch_ppo(ctx, "ppo-1x8", 1, [*exact, "ppo.batch_size=8", "ppo.mini_batch_size=8"], timeout)
    two = launch_ppo(ctx, "ppo-2x4", 2, [*exact, "ppo.batch_size=4", "ppo.mini_batch_size=4"], timeout)
    a, b = (load_file(str(d / "checkpoints" / "step-1" / "trainable.safetensors")) for d in (one, two))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    if a.keys() != b.keys() or diff > 1e-4:
        raise RuntimeError(f"2 x 4 prompts differ from 1 x 8 after one update: max |Δ| {diff:.2g}")
    return finished(two) + f"; 2 processes, max |Δ weight| vs 1 process {diff:.1g}"


def check_fsdp2(work: Path, processes: int, backend: str, timeout: int) -> str:
    """PPO's sharded paths under real FSDP2 shards (tests/ppo_fsdp2_worker.py under torchrun: nccl with a GPU per
    process, or gloo on the CPU): on every process the old/reference scores through the sharded model, the gathered
    trainable state and the refreshed rollout copy equal the unsharded model's."""
    out = work / "fsdp2"
    out.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    logs = out / "logs"  # each process's stdout/stderr: torchrun's own summary hides why a process died
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",  # a free port
                           "--nproc_per_node", str(processes), "--log-dir", str(logs), "--redirects", "3",
                           str(ROOT / "tests" / "ppo_fsdp2_worker.py"), str(out), backend],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        said = [f"{p.parent.name}: {p.read_text(errors='replace').strip()[-600:]}"
                for p in sorted(logs.rglob("stderr.log")) if p.read_text(errors="replace").strip()]
        raise RuntimeError(f"exit {done.returncode}: " + (" | ".join(said) or (done.stderr or done.stdout).strip()[-400:]))
    found = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(processes)]
    bad = sorted({k for f in found for k in ("scores_equal", "same_names", "state_equal", "copy_equal") if not f[k]})
    if processes > 1 and not any(f["sharded"] for f in found):
        bad.append("no process holds a shard")
    if bad or any(f["adapted"] != 4 or f["resharded"] != "DTensor" for f in found):
        raise RuntimeError(f"differs from the unsharded model: {', '.join(bad) or found}")
    return f"{processes} process(es) over {backend}: scores, gathered state and rollout copy equal the unsharded model"


# ---- the table ----

def missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def run_check(name: str, needs: tuple[str, ...], why_not: str, fn: Callable[[], str]) -> Row:
    if why_not:
        return Row(name, "SKIP", 0.0, why_not)
    absent = missing(*needs)
    if absent:
        return Row(name, "SKIP", 0.0, f"not installed: {', '.join(absent)}")
    start = time.perf_counter()
    print(f"--- {name}", flush=True)
    try:
        detail, status = fn(), "PASS"
    except ModuleNotFoundError as e:  # a package this check needs that the list above did not name
        detail, status = f"not installed: {e.name}", "SKIP"
    except Exception as e:  # noqa: BLE001 - a failed check is a table row, the next check still runs
        detail, status = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}", "FAIL"
    return Row(name, status, time.perf_counter() - start, detail)


def print_table(rows: list[Row]) -> None:
    width = max(len(r.check) for r in rows)
    print(f"\n| {'check':<{width}} | status | seconds | detail |")
    print(f"|{'-' * (width + 2)}|--------|---------|--------|")
    for r in rows:
        print(f"| {r.check:<{width}} | {r.status:<6} | {r.seconds:7.1f} | {r.detail} |")


def main(argv: list[str]) -> int:
    import torch

    if any(a in ("-h", "--help") for a in argv):
        print(__doc__ + "\n" + "\n".join(describe(Config)))
        return 0
    cfg = load_config(Config, None, argv)
    cuda = torch.cuda.is_available()
    if not cuda and not cfg.cpu:
        print_table([Row("gpu", "SKIP", 0.0, "no CUDA device (torch.cuda.is_available() is False): nothing to "
                                            "check; cpu=true runs the stage checks on the CPU")])
        return 0
    gpus = torch.cuda.device_count() if cuda else 0
    device = (f"{torch.cuda.get_device_name(0)} x{gpus}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}"
              if cuda else "CPU (cpu=true)")
    rows = [Row("device", "PASS", 0.0, f"{device}; torch {torch.__version__}")]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="align-gpu-check-") as tmp:
        work = Path(cfg.keep) if cfg.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        ctx = prepare(work, cuda)
        rows.append(Row("tiny models", "PASS", time.perf_counter() - start, f"2-layer Llama + BPE tokenizer in {work}"))
        no_cuda = "" if cuda else "needs CUDA"
        no_bf16 = "" if not cuda or torch.cuda.is_bf16_supported() else "this GPU has no bf16"
        checks: list[tuple[str, tuple[str, ...], str, Callable[[], str]]] = [
            ("sft lora " + ("bf16" if cuda else "fp32"), ("trl", "datasets"), no_bf16, lambda: check_sft(ctx)),
            ("reward", ("trl", "datasets"), "", lambda: check_reward(ctx)),
            ("dpo", ("trl", "datasets"), "", lambda: check_dpo(ctx)),
            ("hf decode = generate", (), no_bf16, lambda: check_decode(ctx)),
            ("ppo lora", (), "", lambda: check_ppo(ctx)),
            ("sft qlora", ("trl", "datasets", "bitsandbytes"), no_cuda or no_bf16,
             lambda: check_sft(ctx, "qlora")),
            ("ppo qlora", ("bitsandbytes",), no_cuda, lambda: check_ppo(ctx, "qlora")),
            ("ppo bf16 sampler + tis", (), no_cuda or no_bf16, lambda: check_ppo_mismatch(ctx)),
            ("vllm sampler", ("vllm",), no_cuda, lambda: check_vllm(ctx)),
            ("vllm stacked adapters + sleep", ("vllm",), no_cuda, lambda: check_vllm_stacked(ctx)),
            ("ppo on vllm colocated", ("vllm",), no_cuda, lambda: check_ppo_vllm(ctx)),
            ("ppo 2 processes = 1", (), "" if gpus >= 2 else f"needs 2 GPUs ({gpus} here)",
             lambda: check_two_processes(ctx, cfg.timeout)),
            ("ppo fsdp2 shards", (), "", lambda: check_fsdp2(work, max(gpus, 1) if cuda else 2,
                                                              "nccl" if cuda else "gloo", cfg.timeout)),
        ]
        rows += [run_check(name, needs, why_not, fn) for name, needs, why_not, fn in checks]
    print_table(rows)
    failed = [r.check for r in rows if r.status == "FAIL"]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} rows ok" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
