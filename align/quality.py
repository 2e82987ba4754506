"""Quality over seeds: aggregate the evaluations of a pipeline trained with several seeds.

`align pipeline stages/pipeline.yaml seeds=[1,2,3]` (`make quality`) trains the whole pipeline once per training
seed (output_dir/seed-<s>/), each evaluation sampling every held-out prompt once per sampling seed
(`steps.eval.overrides.sampling_seeds`). This module reads the per-sample outcomes of those evaluations
(samples.jsonl), builds one [training seed, sampling seed, prompt] table per policy, and reports per policy the mean
win rate and LC win rate against SFT with crossed-bootstrap intervals (align/stats.py), the per-seed values, and
paired differences between policies on the same cells. Its last printed line is machine-readable:

    quality: seeds=3 dpo_win=0.xx online_win=0.xx ppo_win=0.xx dpo_lc=0.xx online_lc=0.xx ppo_lc=0.xx ...
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from align.errors import DataError
from align.stats import OUTCOME_VALUE, bootstrap_lc_win_rate, bootstrap_win_rate, paired_difference

LINE_POLICIES = ("dpo", "online", "ppo")  # the order of the machine-readable line
PAIRS = (("online", "dpo"), ("ppo", "dpo"), ("online", "ppo"))  # paired comparisons, A - B


def read_seed_evals(eval_dirs: dict[int, Path]) -> tuple[dict[int, list[dict[str, Any]]], dict[int, dict[str, Any]]]:
    """samples.jsonl rows and eval.json of each training seed's eval run folder."""
    from align.stages.eval import read_eval

    rows, evals = {}, {}
    for seed, folder in eval_dirs.items():
        report = read_eval(folder)
        if report is None:
            raise DataError(f"{folder}: no completed evaluation for training seed {seed}")
        evals[seed] = report
        rows[seed] = [json.loads(line) for line in (Path(folder) / "samples.jsonl").read_text().splitlines()]
    return rows, evals


def tables(rows_by_seed: dict[int, list[dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, Any], list[int], int]:
    """Per policy (not sft): outcomes y[t, s, p] (1 win, ½ tie, 0 loss, NaN abstain) and length differences
    Δ[t, s, p] = policy tokens - SFT tokens of the same cell; plus the sampling seeds and the number of prompts.
    Every training seed must have evaluated the same policies on the same cells."""
    import numpy as np

    seeds = sorted(rows_by_seed)
    cells: dict[int, dict[tuple[str, int, int], dict[str, Any]]] = {
        t: {(r["policy"], r["sampling_seed"], r["prompt_index"]): r for r in rows_by_seed[t]} for t in seeds}
    first = cells[seeds[0]]
    policies = sorted({p for p, _, _ in first if p != "sft"})
    sampling = sorted({s for _, s, _ in first})
    n_prompts = 1 + max(i for _, _, i in first)
    want = {(p, s, i) for p in [*policies, "sft"] for s in sampling for i in range(n_prompts)}
    for t in seeds:
        if set(cells[t]) != want:
            raise DataError(f"training seed {t}: its evaluation does not cover the same policies, sampling seeds "
                            f"and prompts as seed {seeds[0]} ({len(cells[t])} cells vs {len(want)}); evaluate every "
                            f"seed with the same eval settings")
    y, delta = {}, {}
    for p in policies:
        y[p] = np.array([[[OUTCOME_VALUE[cells[t][(p, s, i)]["outcome_vs_sft"] or "abstain"]
                           for i in range(n_prompts)] for s in sampling] for t in seeds])
        delta[p] = np.array([[[cells[t][(p, s, i)]["tokens"] - cells[t][("sft", s, i)]["tokens"]
                               for i in range(n_prompts)] for s in sampling] for t in seeds], dtype=float)
    return y, delta, sampling, n_prompts


def quality_report(rows_by_seed: dict[int, list[dict[str, Any]]], evals: dict[int, dict[str, Any]],
                   n_boot: int = 2000) -> dict[str, Any]:
    """Everything `make quality` reports, as plain data (written to quality.json)."""
    y, delta, sampling, n_prompts = tables(rows_by_seed)
    seeds = sorted(rows_by_seed)
    per_policy = {}
    for p in y:
        rows = [next(r for r in evals[t]["policies"] if r["name"] == p) for t in seeds]
        per_policy[p] = {"win": bootstrap_win_rate(y[p], n_boot).to_json(),
                         "lc": bootstrap_lc_win_rate(y[p], delta[p], n_boot).to_json(),
                         "kl_per_token": [r.get("kl_to_reference") for r in rows],
                         "tokens": [r.get("length_tokens_mean") for r in rows],
                         "finished": [r.get("finished_fraction") for r in rows]}
    paired = {f"{a}-{b}": paired_difference(y[a], y[b], n_boot) for a, b in PAIRS if a in y and b in y}
    first = evals[seeds[0]]
    return {"training_seeds": seeds, "sampling_seeds": sampling, "prompts": n_prompts,
            "cells_per_policy": len(seeds) * len(sampling) * n_prompts,
            "judge": first.get("judge", {}).get("name"), "kl": first.get("kl"),
            "interval": "95% percentile bootstrap resampling training seeds, sampling seeds and prompts together "
                        "(align/stats.py)", "policies": per_policy, "paired": paired}


def quality_line(report: dict[str, Any]) -> str:
    """`quality: seeds=N dpo_win=.. online_win=.. ppo_win=.. dpo_lc=.. online_lc=.. ppo_lc=..` then the others."""
    pol = report["policies"]

    def num(p: str, key: str) -> str:
        v = pol.get(p, {}).get(key, {}).get("mean")
        return "na" if v is None or math.isnan(v) else f"{v:.2f}"

    parts = [f"seeds={len(report['training_seeds'])}"]
    parts += [f"{p}_win={num(p, 'win')}" for p in LINE_POLICIES] + [f"{p}_lc={num(p, 'lc')}" for p in LINE_POLICIES]
    extra = sorted(p for p in pol if p not in LINE_POLICIES)
    parts += [f"{p}_win={num(p, 'win')} {p}_lc={num(p, 'lc')}" for p in extra]
    parts += [f"{k.replace('-', '_minus_')}_p={v['p_value']:.3f}" for k, v in report["paired"].items()]
    return "quality: " + " ".join(parts)


def print_quality(report: dict[str, Any]) -> None:
    pct = lambda v: "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"
    print(f"\nquality over {len(report['training_seeds'])} training seeds x {len(report['sampling_seeds'])} sampling "
          f"seeds x {report['prompts']} held-out prompts ({report['cells_per_policy']} comparisons per policy); "
          f"judge {report['judge']}; {report['interval']}")
    print(f"{'policy':<8} {'win vs sft [95% CI]':>22} {'per seed':>20} {'LC win [95% CI]':>22} {'per seed':>20} "
          f"{'KL/token':>16} {'tokens':>16}")
    for name, r in report["policies"].items():
        w, lc = r["win"], r["lc"]
        per = lambda iv: "/".join(pct(v) for v in iv["per_seed"])
        kl = "/".join("—" if v is None else f"{v:.3f}" for v in r["kl_per_token"])
        tok = "/".join("—" if v is None else f"{v:.0f}" for v in r["tokens"])
        print(f"{name:<8} {pct(w['mean']):>6}% [{pct(w['low'])}, {pct(w['high'])}] {per(w):>20} "
              f"{pct(lc['mean']):>6}% [{pct(lc['low'])}, {pct(lc['high'])}] {per(lc):>20} {kl:>16} {tok:>16}")
    for key, d in report["paired"].items():
        print(f"paired {key}: {100 * d['diff']:+.1f} points [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}], "
              f"p = {d['p_value']:.3f}; per seed " + "/".join(f"{100 * v:+.1f}" for v in d["per_seed"]))
    print(quality_line(report), flush=True)
