"""`make quality`: tables over training seeds x sampling seeds x prompts from eval samples, the report and its
machine-readable last line (no models: hand-made eval rows)."""

from __future__ import annotations

import math
import re

import pytest

from align.errors import ConfigError, DataError
from align.quality import quality_line, quality_report, tables

# outcomes of (dpo, online) per training seed, sampling seed and prompt; SFT answers are 10 tokens, a policy's 12
OUTCOMES = {
    1: {7: (["win", "win", "loss"], ["win", "tie", "loss"]), 8: (["win", "win", "win"], ["loss", "abstain", "win"])},
    2: {7: (["win", "loss", "loss"], ["win", "win", "win"]), 8: (["tie", "win", "loss"], ["win", "win", "win"])},
}


def rows_of(seed: int) -> list[dict]:
    out = []
    for s, (dpo, online) in OUTCOMES[seed].items():
        for i in range(3):
            out.append({"policy": "sft", "sampling_seed": s, "prompt_index": i, "tokens": 10, "outcome_vs_sft": None})
            out.append({"policy": "dpo", "sampling_seed": s, "prompt_index": i, "tokens": 12, "outcome_vs_sft": dpo[i]})
            out.append({"policy": "online", "sampling_seed": s, "prompt_index": i, "tokens": 12 + i,
                        "outcome_vs_sft": online[i]})
    return out


def evals() -> dict[int, dict]:
    return {t: {"judge": {"name": "house_style"}, "kl": {"estimator": "exact"},
                "policies": [{"name": n, "kl_to_reference": 0.1 * t, "length_tokens_mean": 12.0,
                              "finished_fraction": 1.0} for n in ("sft", "dpo", "online")]} for t in (1, 2)}


def test_tables_hold_every_cell() -> None:
    y, delta, sampling, n = tables({1: rows_of(1), 2: rows_of(2)})
    assert sorted(y) == ["dpo", "online"] and sampling == [7, 8] and n == 3
    assert y["dpo"].shape == (2, 2, 3) and y["dpo"][1, 1].tolist() == [0.5, 1.0, 0.0]
    assert math.isnan(y["online"][0, 1, 1]) and delta["online"][0, 0].tolist() == [2.0, 3.0, 4.0]


def test_quality_report_and_its_last_line() -> None:
    report = quality_report({1: rows_of(1), 2: rows_of(2)}, evals(), n_boot=300)
    dpo, online = report["policies"]["dpo"]["win"], report["policies"]["online"]["win"]
    # dpo: seed 1 = (2 + 3) / 6, seed 2 = (1 + 1.5) / 6; online: seed 1 = (1.5 + 1) / 5 decided, seed 2 = 6 / 6
    assert dpo["per_seed"] == pytest.approx([5 / 6, 2.5 / 6]) and dpo["mean"] == pytest.approx(7.5 / 12)
    assert online["per_seed"] == pytest.approx([0.5, 1.0]) and online["mean"] == pytest.approx(8.5 / 11)
    assert online["n"] == 11 and report["cells_per_policy"] == 12
    assert dpo["low"] <= dpo["mean"] <= dpo["high"]
    assert report["paired"]["online-dpo"]["diff"] == pytest.approx(8.5 / 11 - 7.5 / 12)
    assert report["policies"]["dpo"]["kl_per_token"] == pytest.approx([0.1, 0.2])
    line = quality_line(report)
    assert re.fullmatch(r"quality: seeds=2 dpo_win=0\.62 online_win=0\.77 ppo_win=na dpo_lc=\d\.\d\d "
                        r"online_lc=\d\.\d\d ppo_lc=na online_minus_dpo_p=\d\.\d{3}", line), line


def test_seeds_that_evaluated_different_cells_are_refused() -> None:
    short = [r for r in rows_of(2) if r["prompt_index"] != 2]
    with pytest.raises(DataError, match="training seed 2"):
        tables({1: rows_of(1), 2: short})


def test_pipeline_seeds_each_get_their_own_folder() -> None:
    from align.config import load_config
    from align.stages import pipeline

    cfg = load_config(pipeline.Config, None, ["output_dir=runs/q", "seeds=[3, 1]"])
    subs = pipeline.seed_configs(cfg)
    assert [(c.seed, c.output_dir, c.seeds) for c in subs] == [(3, "runs/q/seed-3", []), (1, "runs/q/seed-1", [])]
    with pytest.raises(ConfigError, match="distinct"):
        pipeline.seed_configs(load_config(pipeline.Config, None, ["seeds=[1, 1]"]))


def test_online_and_ppo_start_from_the_policy_their_from_names(tmp_path) -> None:
    from pathlib import Path

    from align.config import load_config
    from align.stages import pipeline

    for start in ("sft", "dpo"):
        cfg = load_config(pipeline.Config, Path("stages/tiny/pipeline.yaml"),
                          [f"output_dir={tmp_path}", f"online_from={start}", f"ppo_from={start}"])
        steps = pipeline.plan(cfg)
        online = pipeline.step_config(steps[pipeline.ORDER.index("online")])
        assert online.policy == str(tmp_path / start)
        assert online.judge.heldout == str(tmp_path / "import")  # agreement measured on import's held-out pairs
        assert pipeline.step_config(steps[pipeline.ORDER.index("ppo")]).policy == str(tmp_path / start)
        names = [s.name for s in steps]
        assert names.index("dpo") < names.index("ppo") < names.index("online")  # a start is trained before use
    for step in ("online", "ppo"):
        with pytest.raises(ConfigError, match=f"{step}_from=dpo needs the dpo step"):
            pipeline.plan(load_config(pipeline.Config, Path("stages/tiny/pipeline.yaml"),
                                      [f"{step}_from=dpo", "steps.dpo.enabled=false"]))


@pytest.mark.slow
def test_tiny_pipeline_over_two_seeds_ends_with_the_quality_line(tiny_model, tmp_path, capsys) -> None:
    """The driver end to end on a tiny random model (~70 s on 2 cores): a pipeline per seed, quality.json, and
    the machine-readable last line."""
    import json
    from pathlib import Path

    from align.config import load_config
    from align.stages import pipeline

    cfg = load_config(pipeline.Config, Path("stages/tiny/pipeline.yaml"),
                      [f"model={tiny_model}", f"output_dir={tmp_path / 'q'}", "seeds=[0, 1]",
                       "steps.eval.overrides.sampling_seeds=[5, 6]", "steps.eval.overrides.max_prompts=4"])
    root = pipeline.run(cfg)
    report = json.loads((root / "quality.json").read_text())
    assert report["training_seeds"] == [0, 1] and report["sampling_seeds"] == [5, 6]
    assert report["cells_per_policy"] == 16 and sorted(report["policies"]) == ["dpo", "online", "ppo"]
    evaluation = json.loads((root / "seed-1" / "eval" / "eval.json").read_text())
    assert evaluation["kl"]["estimator"] == "exact"
    assert all(p["reference"].endswith("(SFT)") for p in evaluation["policies"] if p["name"] != "sft")
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("quality: seeds=2 dpo_win=") and " ppo_lc=" in last
