"""generate: sample k completions per prompt from a policy into samples.jsonl (resumable).

One row per prompt: {"id", "index", "prompt", "responses": [k strings], "finished": [k bools],
"response_tokens": [k ints], "generation": {model, backend, temperature, top_p, max_new_tokens, seed}, "meta"}.
Rows are appended one chunk of prompts at a time (flush + fsync), so a killed run loses at most the chunk in
flight; `resume=true` skips prompts already in the file. Chunks are seeded by their first prompt's index, so a
resumed run writes the same samples an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.chat import SYSTEM_PROMPT_HELP, with_system_prompt
from align.config import opt
from align.data.records import PromptRecord, prompt_id, read_prompts
from align.errors import ConfigError, DataError
from align.generation import Sampler, SamplingSettings
from align.generation.select import BackendSettings, build_sampler
from align.log import progress
from align.models.load import resolve_model
from align.runs import start_run, until_stopped

log = logging.getLogger(__name__)

SAMPLES = "samples.jsonl"


@dataclass(frozen=True)
class Config:
    model: str = opt("default", "policy: 'default', a model or adapter folder, or a stage run folder (e.g. runs/sft)")
    prompts: str = opt("data/prompts/train.jsonl", "prompt-only JSONL ({prompt: str | messages} per line)")
    output_dir: str = opt("runs/generate", "where samples.jsonl and the manifest go")
    overwrite: bool = opt(False, "replace an existing output_dir")
    resume: bool = opt(False, "keep output_dir and sample only the prompts not in samples.jsonl yet")
    seed: int = opt(0, "base sampling seed (replaces sampling.seed): a chunk is seeded with seed + the index of "
                       "its first prompt", ge=0)
    k: int = opt(2, "completions per prompt", ge=1)
    system_prompt: str = opt("", SYSTEM_PROMPT_HELP)
    max_prompts: int = opt(0, "use only the first N prompts (0: all)", ge=0)
    chunk: int = opt(0, "prompts per append to samples.jsonl (0: sampling.batch_size on hf, 256 on vllm)", ge=0)
    sampling: SamplingSettings = opt(SamplingSettings(), "sampling parameters")
    engine: BackendSettings = opt(BackendSettings(), "backend and model loading")


def read_done(path: Path) -> dict[int, str]:
    """Index -> prompt id of the rows already in `path`. A torn last line (killed mid-write) is cut off."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    good = data.rfind(b"\n") + 1  # everything after the last newline is a partial write
    done: dict[int, str] = {}
    for lineno, line in enumerate(data[:good].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            done[int(row["index"])] = str(row["id"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise DataError(f"{path}:{lineno}: not a samples row; delete the file or use overwrite=true") from None
    if good < len(data):
        log.warning(f"{path}: dropping a partially written last line ({len(data) - good} bytes)")
        with open(path, "r+b") as f:
            f.truncate(good)
    return done


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append whole lines and make them durable before returning."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def sample_rows(sampler: Sampler, records: list[PromptRecord], indices: list[int], params: SamplingSettings,
                k: int, generation: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """Sample one chunk; returns (rows, generated tokens)."""
    out = sampler.generate([records[i].prompt for i in indices], params, n=k)
    rows, tokens = [], 0
    for i, samples in zip(indices, out):
        tokens += sum(len(s.response_ids) for s in samples)
        rows.append({"id": prompt_id(records[i].prompt), "index": i, "prompt": records[i].prompt,
                     "responses": [s.text for s in samples], "finished": [s.finished for s in samples],
                     "response_tokens": [len(s.response_ids) for s in samples],
                     "generation": {**generation, "seed": params.seed}, "meta": records[i].meta})
    return rows, tokens


def run(cfg: Config) -> Path:
    if cfg.k < 1:
        raise ConfigError(f"k={cfg.k}: need at least one completion per prompt")
    records = [dataclasses.replace(r, prompt=with_system_prompt(r.prompt, cfg.system_prompt))
               for r in read_prompts(cfg.prompts)]
    if cfg.max_prompts > 0:
        records = records[: cfg.max_prompts]
    resolve_model(cfg.model)  # a bad model fails here, before the run folder exists
    run_ = start_run("generate", cfg, resume=cfg.resume)
    run_.add_input(cfg.prompts)
    out = run_.dir / SAMPLES
    done = read_done(out) if cfg.resume else {}
    for i, pid in done.items():
        if i >= len(records) or prompt_id(records[i].prompt) != pid:
            raise DataError(f"{out}: row for prompt {i} does not match {cfg.prompts} any more; the prompt file "
                            f"changed since the first run — use overwrite=true to start again")
    todo = [i for i in range(len(records)) if i not in done]
    log.info(f"{len(records)} prompts, {len(done)} already sampled, {len(todo)} to go (k={cfg.k})")

    tokens, seconds = 0, 0.0
    if todo:
        sampler = build_sampler(cfg.model, cfg.engine)
        chunk = cfg.chunk or (256 if sampler.name == "vllm" else cfg.sampling.batch_size)
        generation = {"model": cfg.model, "model_path": str(resolve_model(cfg.model)), "backend": sampler.name,
                      "temperature": cfg.sampling.temperature, "top_p": cfg.sampling.top_p,
                      "max_new_tokens": cfg.sampling.max_new_tokens}
        out.touch()

        def saved(start: int) -> str:  # said when a stop signal ends the run after the chunk at `start`
            return f" after {len(done) + min(start + chunk, len(todo))}/{len(records)} prompts (samples in {out})"

        # a stop signal (SIGTERM, Ctrl-C, SIGUSR1) lets the chunk in flight finish and be saved, then stops
        chunks = until_stopped(range(0, len(todo), chunk), saved)
        for start in progress(chunks, total=-(-len(todo) // chunk), desc="generate", unit="chunk"):
            indices = todo[start:start + chunk]
            params = dataclasses.replace(cfg.sampling, seed=cfg.seed + indices[0])
            t0 = time.perf_counter()
            rows, n_tokens = sample_rows(sampler, records, indices, params, cfg.k, generation)
            seconds += time.perf_counter() - t0
            tokens += n_tokens
            append_rows(out, rows)
            log.info(f"  sampled {len(done) + start + len(indices)}/{len(records)} prompts "
                     f"({tokens / max(seconds, 1e-9):.1f} tokens/s)")

    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    finished = [f for r in rows for f in r["finished"]]
    run_.add_output("samples", out)
    run_.metrics.update({"prompts": len(rows), "samples": len(finished), "sampled_this_run": len(todo),
                         "unfinished_fraction": 1 - sum(finished) / max(len(finished), 1),
                         "generated_tokens": tokens, "tokens_per_second": tokens / seconds if seconds else 0.0})
    print(f"{len(rows)} prompts x {cfg.k} samples -> {out}", flush=True)
    return run_.finish()
