"""`python -m align.bench` (make bench): align next to the raw alternative a user would write, in one run.

    python -m align.bench [--steps 8] [--repeats 2] [--rows sft,reward,dpo,generate,ppo,scale] [--model default]
    python -m align.bench --tiny           a tiny random model and tiny settings: the whole bench in a minute or two

Each comparison row alternates align and raw runs (A, B, A, B, ...) so drift of the machine hits both sides, and
reports the median ratio align/raw with its min-max. Every run is its own process (peak RSS per run, from
wait4), both sides get the same model, data, LoRA (r16, all linear layers), batch, max_length, dtype, steps and
thread settings (the machine's defaults). Throughput is read from what each side measured around its training
or generation call only (the align side from its run folder: manifest.json, metrics.jsonl). The last line is
machine-readable:
    bench: sft_vs_trl=X.XX reward_vs_trl=X.XX dpo_vs_trl=X.XX generate_vs_plain=X.XX ppo_step_s=X.X [more keys]
ending with align's own medians (sft_tokens_s, reward_pairs_s, dpo_pairs_s, generate_tokens_s): a ratio also moves
with the raw side's run-to-run speed, these only with align's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.errors import AlignError

REPO = Path(__file__).resolve().parents[2]
ROWS = ("sft", "reward", "dpo", "generate", "ppo", "scale")
HOUSE_STYLE = "align.judges.house_style:house_style_score"


@dataclass(frozen=True)
class Setup:
    """What both sides of every row share (the defaults are the recipes' settings on the default model)."""

    model: str
    dtype: str = "float32"
    steps: int = 8
    sft_batch: int = 8
    sft_max_length: int = 384
    reward_batch: int = 8
    dpo_batch: int = 4
    pref_max_length: int = 384
    gen_prompts: int = 32
    gen_batch: int = 16
    gen_new_tokens: int = 64
    ppo_batch: int = 8
    ppo_new_tokens: int = 64
    scale_examples: int = 32  # the 1x of the linear-scaling row (then 2x and 4x)


def tiny_setup(model: str, steps: int) -> Setup:
    return Setup(model=model, steps=steps, sft_batch=4, sft_max_length=256, reward_batch=4, dpo_batch=4,
                 pref_max_length=256, gen_prompts=8, gen_batch=4, gen_new_tokens=16, ppo_batch=4, ppo_new_tokens=8,
                 scale_examples=8)


@dataclass
class Measure:
    """One run: its throughput, peak RSS (MiB) and wall time (s, process start to exit), plus what it reported."""

    value: float
    rss_mb: float
    wall_s: float
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Inputs:
    """Files both sides read, prepared once in the work folder."""

    work: Path
    sft_train: Path
    sft_valid: Path
    pref_train: Path
    pref_valid: Path  # one reward batch of pairs
    dpo_valid: Path  # one DPO batch of pairs
    prompts: Path


# ---- child processes ----

def run_child(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run `cmd` in the repository root with its output in `log`; (wall seconds, peak RSS MiB) of that process."""
    env = dict(os.environ, HF_DATASETS_CACHE=str(log.parent.parent / "hf_datasets"), TQDM_DISABLE="1")
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise AlignError(f"`{' '.join(cmd[1:5])} ...` failed (exit {proc.returncode}); its log {log} ends:\n"
                         f"{tail}")
    return wall, usage.ru_maxrss / 1024  # Linux: KiB


class Runner:
    """Numbers the run folders and logs of every child under one work folder."""

    def __init__(self, work: Path) -> None:
        self.work, self.count = work, 0
        (work / "logs").mkdir(parents=True, exist_ok=True)

    def name(self, what: str) -> str:
        self.count += 1
        return f"{self.count:02d}-{what}"

    def align(self, stage: str, overrides: list[str]) -> tuple[dict[str, Any], Path, float, float]:
        """`python -m align.cli <stage> stages/<stage>.yaml ...`: (manifest metrics, run folder, wall, peak RSS)."""
        name = self.name(f"align-{stage}")
        out = self.work / name
        cmd = [sys.executable, "-m", "align.cli", stage, f"stages/{stage}.yaml", f"output_dir={out}", *overrides]
        wall, rss = run_child(cmd, self.work / "logs" / f"{name}.log")
        return json.loads((out / "manifest.json").read_text())["metrics"], out, wall, rss

    def raw(self, script: str, args: list[str]) -> Measure:
        """`python -m align.bench.<script> ...`: the JSON line it prints last, as a Measure of its first number."""
        name = self.name(script)
        log = self.work / "logs" / f"{name}.log"
        wall, rss = run_child([sys.executable, "-m", f"align.bench.{script}", "--out", str(self.work / name), *args],
                              log)
        line = next(x for x in reversed(log.read_text().splitlines()) if x.startswith("{"))
        reported = json.loads(line)
        return Measure(float(next(iter(reported.values()))), rss, wall, reported)


# ---- the rows: one function per side ----

def lora(dropout: float) -> list[str]:
    return ["peft.method=lora", "peft.r=16", "peft.alpha=32", f"peft.dropout={dropout}",
            "peft.target_modules=[all-linear]"]


def trainer(s: Setup, batch: int) -> list[str]:
    # No evaluation or checkpoint before the end; align still evaluates its (one-batch) validation file once at
    # the end of training, inside the measured train_runtime, and both sides save one checkpoint at the end.
    return [f"train.max_steps={s.steps}", f"train.batch_size={batch}", "train.grad_accum=1", "train.eval_steps=100000",
            "train.save_steps=100000", "train.early_stopping_patience=0", "train.progress=false"]


def raw_args(s: Setup, data: Path, batch: int, max_length: int) -> list[str]:
    return ["--model", s.model, "--data", str(data), "--steps", str(s.steps), "--batch", str(batch),
            "--max-length", str(max_length), "--dtype", s.dtype]


def sft_align(r: Runner, s: Setup, d: Inputs, data: Path | None = None, epochs: bool = False) -> Measure:
    limit = ["train.max_steps=-1", "train.epochs=1"] if epochs else []
    m, _, wall, rss = r.align("sft", [f"model={s.model}", f"dtype={s.dtype}", f"data.train={data or d.sft_train}",
                                      f"data.validation={d.sft_valid}", f"data.max_length={s.sft_max_length}",
                                      *lora(0.05), *trainer(s, s.sft_batch), *limit])
    return Measure(m["train_tokens_per_second"], rss, wall, m)


def sft_raw(r: Runner, s: Setup, d: Inputs) -> Measure:
    return r.raw("raw_sft", raw_args(s, d.sft_train, s.sft_batch, s.sft_max_length))


def pairs_per_second(m: dict[str, Any], steps: int, batch: int) -> float:
    """The Trainer's train_runtime covers the training call only (steps x batch pairs)."""
    return steps * batch / m["train_runtime"]


def reward_align(r: Runner, s: Setup, d: Inputs) -> Measure:
    m, run_dir, wall, rss = r.align("reward", [
        f"model={s.model}", f"dtype={s.dtype}", f"data.train={d.pref_train}", f"data.validation={d.pref_valid}",
        f"data.max_length={s.pref_max_length}", *lora(0.0), *trainer(s, s.reward_batch)])
    return Measure(pairs_per_second(m, m["global_step"], s.reward_batch), rss, wall, m | {"run_dir": str(run_dir)})


def reward_raw(r: Runner, s: Setup, d: Inputs) -> Measure:
    return r.raw("raw_reward", raw_args(s, d.pref_train, s.reward_batch, s.pref_max_length))


def dpo_align(r: Runner, s: Setup, d: Inputs) -> Measure:
    m, _, wall, rss = r.align("dpo", [
        f"policy={s.model}", f"dtype={s.dtype}", f"data.train={d.pref_train}", f"data.validation={d.dpo_valid}",
        f"data.max_length={s.pref_max_length}", "dpo.beta=0.1", "dpo.loss_type=sigmoid", "dpo.sft_weight=0",
        "dpo.label_smoothing=0", "eval.size=0", *lora(0.0), *trainer(s, s.dpo_batch)])
    return Measure(pairs_per_second(m, s.steps, s.dpo_batch), rss, wall, m)


def dpo_raw(r: Runner, s: Setup, d: Inputs) -> Measure:
    return r.raw("raw_dpo", raw_args(s, d.pref_train, s.dpo_batch, s.pref_max_length))


def generate_align(r: Runner, s: Setup, d: Inputs) -> Measure:
    # The sampling settings of stages/generate.yaml; one sample per prompt, our hf backend.
    m, _, wall, rss = r.align("generate", [
        f"model={s.model}", f"prompts={d.prompts}", "k=1", f"max_prompts={s.gen_prompts}", "seed=0", "chunk=0",
        "sampling.temperature=0.9", "sampling.top_p=0.95", f"sampling.max_new_tokens={s.gen_new_tokens}",
        f"sampling.batch_size={s.gen_batch}", "engine.backend=hf", f"engine.dtype={s.dtype}"])
    return Measure(m["tokens_per_second"], rss, wall, m)


def generate_raw(r: Runner, s: Setup, d: Inputs) -> Measure:
    return r.raw("raw_generate", ["--model", s.model, "--data", str(d.prompts), "--batch", str(s.gen_batch),
                                  "--prompts", str(s.gen_prompts), "--max-new-tokens", str(s.gen_new_tokens),
                                  "--temperature", "0.9", "--top-p", "0.95", "--seed", "0", "--dtype", s.dtype])


# ---- measuring and printing ----

def ratios(a: list[Measure], b: list[Measure]) -> list[float]:
    return [x.value / y.value for x, y in zip(a, b)]


def compare(name: str, unit: str, sides: tuple[Callable[[], Measure], Callable[[], Measure]], repeats: int,
            ) -> tuple[float, list[Measure], list[Measure]]:
    """Alternate align (A) and raw (B) runs; print the row; (median ratio A/B, the align runs, the raw runs)."""
    a, b = [], []
    for _ in range(repeats):
        a.append(sides[0]())
        b.append(sides[1]())
    rs = ratios(a, b)
    med = statistics.median(rs)
    ours, theirs = statistics.median(x.value for x in a), statistics.median(x.value for x in b)
    print(f"| {name} | {unit} | {ours:.1f} | {theirs:.1f} | {med:.2f} | {min(rs):.2f}-{max(rs):.2f} | {max(x.rss_mb for x in a):.0f} | "
          f"{max(x.rss_mb for x in b):.0f} |", flush=True)
    return med, a, b


def matmul_peak_gflops(n: int = 2048, reps: int = 5) -> float:
    """Best fp32 torch.matmul rate of n x n matrices in this process (2n^3 FLOP each), after one warm-up."""
    import torch

    x, y = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(x, y)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.matmul(x, y)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def sft_mfu(tokens_per_second: float, metrics: dict[str, Any], peak_gflops: float) -> tuple[float, float]:
    """(MFU, FLOP per token). LoRA on a frozen base: forward ≈ 2N FLOP/token, backward ≈ 2N more for the
    activation gradients only (no weight gradients for the frozen N), so ≈ 4N per token, N = frozen parameters."""
    flop = 4 * (metrics["total_params"] - metrics["trainable_params"])
    return tokens_per_second * flop / (peak_gflops * 1e9), flop


def ppo_parts(rows: list[dict[str, Any]]) -> tuple[dict[str, float], float]:
    """From metrics.jsonl rows: (median seconds per step of each `time/*` key, median of their per-step sum).
    The keys must time disjoint parts of a step (ppo.py: generate, score, train)."""
    keys = sorted({k for row in rows for k in row if k.startswith("time/")})
    parts = {k.removeprefix("time/"): statistics.median(row[k] for row in rows) for k in keys}
    return parts, statistics.median(sum(row[k] for k in keys) for row in rows)


def ppo_row(r: Runner, s: Setup, reward_run: str | None, exact: bool = False) -> tuple[float, str]:
    """Run align ppo once; print seconds per step split by the run's `time/*` keys. (median s/step, summary).
    exact=False: the recipe's defaults (on a CPU with bf16 instructions, rollouts, reference log-probs and reward
    scores in bf16 where measured faster); True: all of them in fp32 (the trained policy sampled itself, the
    adapter-disabled reference, the reward model as saved)."""
    reward = [f"reward.model={reward_run}", "reward.function="] if reward_run else [f"reward.function={HOUSE_STYLE}"]
    passes = ["engine.dtype=float32", "kl.reference_dtype=float32", "reward.dtype=saved"] if exact else []
    _, run_dir, _, rss = r.align("ppo", [
        f"policy={s.model}", f"dtype={s.dtype}", *reward, "data.eval_size=0", f"ppo.steps={s.steps}",
        f"ppo.batch_size={s.ppo_batch}", f"ppo.mini_batch_size={s.ppo_batch}", "ppo.grad_accum=1",
        f"sampling.max_new_tokens={s.ppo_new_tokens}", f"log.save_every={s.steps}", "log.progress=false",
        *passes, *lora(0.0)])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    parts, step_s = ppo_parts(rows)
    new_tokens = statistics.median(row["response/length"] for row in rows) * s.ppo_batch
    print(f"\nPPO (align ppo, batch {s.ppo_batch}, {s.ppo_new_tokens} new tokens, {len(rows)} steps, "
          f"{'all passes in fp32' if exact else 'default dtypes'}, reward: "
          f"{'the bench reward model' if reward_run else 'house-style rules function'}): {step_s:.2f} s/step "
          f"(median), {new_tokens / step_s:.1f} new tokens/s overall, peak RSS {rss:.0f} MiB")
    print("| part | s/step (median) | share |\n|---|---:|---:|")
    for name, v in parts.items():
        print(f"| {name} | {v:.2f} | {100 * v / sum(parts.values()):.0f}% |")
    return step_s, f"ppo_tokens_s={new_tokens / step_s:.1f}"


def scale_row(r: Runner, s: Setup, d: Inputs) -> float:
    """align sft for one epoch on 1x, 2x, 4x the examples; seconds per example each; max deviation % from the mean."""
    lines = [x for x in d.sft_train.read_text().splitlines() if x.strip()]
    runs = []
    for k in (1, 2, 4):
        n = k * s.scale_examples
        subset = d.work / f"sft_{n}.jsonl"
        subset.write_text("\n".join(lines[:n]) + "\n")
        m = sft_align(r, s, d, data=subset, epochs=True)
        runs.append((n, m.detail["train_runtime"], m.detail["train_tokens"], m.rss_mb))
    per_example = [t / n for n, t, _, _ in runs]
    mean = statistics.mean(per_example)
    dev = max(abs(x / mean - 1) for x in per_example) * 100
    print(f"\nLinear scaling (align sft, 1 epoch, batch {s.sft_batch})\n"
          "| examples | train s | s/example | ms/token | peak RSS MiB |\n|---:|---:|---:|---:|---:|")
    for (n, t, tokens, rss), x in zip(runs, per_example):
        print(f"| {n} | {t:.2f} | {x:.3f} | {1000 * t / tokens:.2f} | {rss:.0f} |")
    print(f"max deviation of s/example from their mean: {dev:.1f}% (target: within 15%)", flush=True)
    return dev


def prepare_inputs(r: Runner, s: Setup, need_prefs: bool) -> Inputs:
    """Small validation files (validation cost is not what we compare) and, once, `align import` of the demo labels."""
    work = r.work
    sft_valid = work / "sft_valid.jsonl"
    sft_valid.write_text("".join((REPO / "data/sft/valid.jsonl").read_text().splitlines(True)[: s.sft_batch]))
    imported = work / "import"
    if need_prefs:
        run_child([sys.executable, "-m", "align.cli", "import", "stages/import.yaml", f"output_dir={imported}",
                   f"model={s.model}"], work / "logs" / "00-import.log")
        pairs = (imported / "valid.jsonl").read_text().splitlines(True)
        (work / "pref_valid.jsonl").write_text("".join(pairs[: s.reward_batch]))
        (work / "dpo_valid.jsonl").write_text("".join(pairs[: s.dpo_batch]))
    return Inputs(work=work, sft_train=REPO / "data/sft/train.jsonl", sft_valid=sft_valid,
                  pref_train=imported / "train.jsonl", pref_valid=work / "pref_valid.jsonl",
                  dpo_valid=work / "dpo_valid.jsonl",
                  prompts=REPO / "data/prompts/eval.jsonl")


def fmt_seconds(x: float) -> str:
    """One decimal from 1 s up; below, three significant figures (a tiny run's PPO step is ~0.1 s)."""
    return f"{x:.1f}" if math.isnan(x) or x >= 1 else f"{x:.3g}"


def bench(s: Setup, rows: list[str], repeats: int, work: Path) -> str:
    import torch

    r = Runner(work)
    print(f"model {s.model}, {s.dtype}, {s.steps} steps, {repeats} A/B pair(s) per row; torch threads "
          f"{torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), both sides")
    peak = matmul_peak_gflops()
    print(f"fp32 matmul peak (2048x2048, best of 5): {peak:.1f} GFLOP/s", flush=True)
    d = prepare_inputs(r, s, need_prefs=bool({"reward", "dpo"} & set(rows)))
    out = {k: float("nan") for k in ("sft_vs_trl", "reward_vs_trl", "dpo_vs_trl", "generate_vs_plain", "ppo_step_s")}
    extra: list[str] = []
    table = [("sft", "sft_vs_trl", "SFT vs TRL SFTTrainer", "tokens/s", sft_align, sft_raw, "sft_tokens_s"),
             ("reward", "reward_vs_trl", "reward vs TRL RewardTrainer", "pairs/s", reward_align, reward_raw,
              "reward_pairs_s"),
             ("dpo", "dpo_vs_trl", "DPO vs TRL DPOTrainer", "pairs/s", dpo_align, dpo_raw, "dpo_pairs_s"),
             ("generate", "generate_vs_plain", "hf Sampler vs plain generate", "new tokens/s", generate_align,
              generate_raw, "generate_tokens_s")]
    reward_run: str | None = None
    notes: list[str] = []
    # align's own medians, at the end of the line: the ratios move with the raw side's run-to-run speed too
    absolute: list[str] = []
    if any(row[0] in rows for row in table):
        print("\nratio = align / raw (> 1: align is faster), median over the A/B pairs"
              "\n| row | unit | align | raw | ratio (median) | min-max | align peak RSS MiB | raw peak RSS MiB |\n"
              "|---|---|---:|---:|---:|---|---:|---:|", flush=True)
    for row, key, label, unit, a_fn, b_fn, own_key in table:
        if row not in rows:
            continue
        out[key], a, b = compare(label, unit, (lambda f=a_fn: f(r, s, d), lambda f=b_fn: f(r, s, d)), repeats)
        own = statistics.median(x.value for x in a)
        absolute.append(f"{own_key}={own:.3g}")
        if row == "sft":
            mfu, flop = sft_mfu(own, a[0].detail, peak)
            raw_mfu = statistics.median(x.value for x in b) * flop / (peak * 1e9)
            extra.append(f"sft_mfu={mfu:.3f}")
            ours = a[0].detail["train_tokens"] / a[0].detail["train_examples"]
            notes.append(f"SFT mean tokens per training example: align {ours:.1f}, raw TRL {b[0].detail['mean_tokens']:.1f}")
            notes.append(f"SFT MFU: align {100 * mfu:.1f}%, raw TRL {100 * raw_mfu:.1f}% of the measured matmul peak "
                         f"({flop:.2e} FLOP/token = 4 x {flop / 4:,.0f} frozen parameters)")
        if row == "reward":
            reward_run = a[-1].detail["run_dir"]
        if row == "generate":
            ours, plain = a[-1].detail["generated_tokens"], b[-1].detail["new_tokens"]
            notes.append(f"generation: align {ours:.0f} vs plain {plain:.0f} new tokens in the last pair"
                         + " (align draws the same nucleus with its own random stream: equal seeds, different samples)")
    print("\n".join(notes), flush=True)
    if "ppo" in rows:
        out["ppo_step_s"], tokens = ppo_row(r, s, reward_run)
        exact, _ = ppo_row(r, s, reward_run, exact=True)  # no-grad passes in fp32 too
        extra += [tokens, f"ppo_step_exact_s={fmt_seconds(exact)}"]
    if "scale" in rows:
        extra.append(f"scale_dev_pct={scale_row(r, s, d):.1f}")
    keys = " ".join(f"{k}={fmt_seconds(v) if k == 'ppo_step_s' else f'{v:.2f}'}" for k, v in out.items())
    return f"bench: {keys} {' '.join(extra + absolute)}".rstrip()


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m align.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="training steps per run, PPO steps (default 8; --tiny 4)")
    p.add_argument("--repeats", type=int, default=2, help="A/B pairs per comparison row")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--model", default="default", help="'default' (the embedded model) or a model folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both sides")
    p.add_argument("--scale-examples", type=int, default=None, help="examples of the 1x scaling run (default 32)")
    p.add_argument("--tiny", action="store_true", help="a tiny random model and tiny settings (to test the bench)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (run folders and logs) and print it")
    a = p.parse_args(argv)
    unknown = set(a.rows.split(",")) - set(ROWS)
    if unknown or a.repeats < 1 or (a.steps is not None and a.steps < 1):
        p.error(f"--rows takes {','.join(ROWS)}; --repeats and --steps are >= 1")
    return a


def main(argv: list[str]) -> int:
    import shutil

    from align.models.load import default_model_dir, resolve_model

    a = parse(argv)
    rows = a.rows.split(",")
    try:
        s = tiny_setup("", a.steps or 4) if a.tiny else Setup(str(resolve_model(a.model).resolve()), steps=a.steps or 8)
        s = dataclasses.replace(s, dtype=a.dtype, scale_examples=a.scale_examples or s.scale_examples)
        available = len((REPO / "data/sft/train.jsonl").read_text().splitlines())
        if "scale" in rows and 4 * s.scale_examples > available:
            raise AlignError(f"--scale-examples {s.scale_examples} x 4 is more than the {available} examples of "
                             f"data/sft/train.jsonl; lower it")
    except AlignError as e:
        print(f"align bench: error: {e}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="align-bench-"))
    try:
        if a.tiny:
            from align.bench.tiny import make_tiny_model

            s = dataclasses.replace(s, model=str(make_tiny_model(work / "tiny_model", default_model_dir())))
        line = bench(s, rows, a.repeats, work)
    except AlignError as e:
        print(f"align bench: error: {e}\n(run folders and logs kept in {work})", file=sys.stderr)
        return 2
    if a.keep:
        print(f"work folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
