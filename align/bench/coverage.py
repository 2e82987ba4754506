"""How often the quality intervals contain the truth: simulated tables of make quality's size.

    python -m align.bench.coverage [--reps 200] [--boot 1000]      (~1 min on 2 cores)

Each table is [3 training seeds, 2 sampling seeds, 128 prompts] of Bernoulli outcomes with P(win) =
σ(logit(0.7) + z_prompt + d_seed), z ~ N(0, 1) per prompt and d ~ N(0, sd) per training seed; the truth is the
mean win rate over the prompt and seed populations. For each seed spread sd it prints the coverage and mean
half-width of the crossed-bootstrap interval (align/stats.py) next to a Wilson interval over all comparisons.
"""

from __future__ import annotations

import argparse

import numpy as np

from align.stats import bootstrap_win_rate, wilson_interval


def expit(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def coverage(sd_seed: float, reps: int, n_boot: int, shape: tuple[int, int, int] = (3, 2, 128),
             seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    base = np.log(0.7 / 0.3)
    truth = float(expit(base + rng.normal(0, 1, 400_000) + rng.normal(0, sd_seed, 400_000)).mean())
    hits_b = hits_w = 0
    widths_b, widths_w = [], []
    for r in range(reps):
        n_seeds, _, n_prompts = shape
        prob = expit(base + rng.normal(0, 1, n_prompts)[None, None, :]
                     + rng.normal(0, sd_seed, n_seeds)[:, None, None])
        y = (rng.random(shape) < prob).astype(float)
        iv = bootstrap_win_rate(y, n_boot=n_boot, seed=r)
        low, high = wilson_interval(float(y.sum()), y.size)
        hits_b += iv.low <= truth <= iv.high
        hits_w += low <= truth <= high
        widths_b.append((iv.high - iv.low) / 2)
        widths_w.append((high - low) / 2)
    return {"sd_seed": sd_seed, "truth": truth, "bootstrap_coverage": hits_b / reps,
            "bootstrap_half_width": float(np.mean(widths_b)), "wilson_coverage": hits_w / reps,
            "wilson_half_width": float(np.mean(widths_w))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--boot", type=int, default=1000)
    args = parser.parse_args(argv)
    for sd in (0.0, 0.3, 0.6):
        c = coverage(sd, args.reps, args.boot)
        print(f"seed spread {sd:.1f} logit: truth {c['truth']:.3f}; crossed bootstrap covers "
              f"{c['bootstrap_coverage']:.0%} (±{100 * c['bootstrap_half_width']:.1f} pts), Wilson covers "
              f"{c['wilson_coverage']:.0%} (±{100 * c['wilson_half_width']:.1f} pts)", flush=True)


if __name__ == "__main__":
    main()
