"""On-policy RLAIF (`align online`): a toy judge that prefers a target word, rounds that build on each other, and
resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TARGET
from safetensors.torch import load_file

from align.config import load_config
from align.stages import online

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "stages" / "tiny" / "online.yaml"


def says_target(prompt: list, response: str) -> float:
    """Toy judge (and held-out reward): how often the target word appears."""
    return float(response.count(TARGET))


def args(policy: Path, out: Path, *extra: str) -> list[str]:
    return [f"policy={policy}", f"output_dir={out}", "judge.options.function=test_online:says_target",
            "eval.size=16", "eval.reward.function=test_online:says_target", "eval.reward.model=",
            "eval.sampling.max_new_tokens=12", "eval.sampling.temperature=1.0", "eval.sampling.top_p=1.0",
            "eval.sampling.batch_size=16", *extra]


SEEDS = range(5)


def target_mass(policy: Path, prompts: list) -> float:
    """Mean probability of the target word as a response's first token over `prompts`: a deterministic function
    of the weights (no sampling noise), which DPO on "more target words wins" pairs should raise."""
    from align.models.load import chat_ids
    from align.models.policy import load_policy

    loaded = load_policy(policy, stage="eval", dtype="float32")
    target = loaded.tokenizer.encode(" " + TARGET, add_special_tokens=False)[0]
    with torch.no_grad():
        probs = [torch.softmax(loaded.model(input_ids=torch.tensor([chat_ids(loaded.tokenizer, p,
                                                                             add_generation_prompt=True)])
                                            ).logits[0, -1].float(), -1)[target] for p in prompts]
    return float(torch.stack(probs).mean())


def test_two_rounds_raise_the_judges_word(toy_policy: Path, tmp_path: Path, one_thread: None) -> None:
    """Over 5 seeds (each its own sampling, judging and DPO stream), the policy's probability of the judge's word
    rises after one round and after two by a margin the seed-to-seed spread cannot explain (mean gain minus two
    standard errors > 0). One seed alone cannot tell: on this toy single seeds moved it a lot or not at all."""
    from align.data.records import read_prompts

    prompts = [r.prompt for r in read_prompts(REPO / "data/prompts/eval.jsonl")[:16]]
    start = target_mass(toy_policy, prompts)
    gains: list[tuple[float, float]] = []
    for seed in SEEDS:
        held_out = "eval.size=16" if seed == 0 else "eval.size=0"  # the sampled held-out check, once
        out = online.run(load_config(online.Config, TINY, args(toy_policy, tmp_path / f"run{seed}", "rounds=2",
                                                               f"seed={seed}", held_out)))
        manifest = json.loads((out / "manifest.json").read_text())
        rounds = manifest["rounds"]
        assert manifest["status"] == "completed" and [r["round"] for r in rounds] == [1, 2]
        assert rounds[0]["ai_pairs"] > 0 and manifest["metrics"]["ai_pairs_total"] == sum(
            r["ai_pairs"] for r in rounds)
        # a round trains exactly when its judge decided a pair (else its policy carries over)
        assert [r["trained"] for r in rounds] == [r["ai_pairs"] > 0 for r in rounds]
        if seed == 0:
            assert all(k in r for r in rounds for k in ("reward_start", "reward", "kl_to_start"))
            assert 0 < rounds[0]["kl_to_start"]
        one, two = (out / "round-1" / "dpo", out / "round-2" / "dpo" if rounds[1]["trained"] else out / "round-1" /
                    "dpo")
        gains.append((target_mass(one, prompts) - start, target_mass(two, prompts) - start))
        # round 2 started from round 1's policy, and every part of a round is an ordinary, completed stage run
        if rounds[1]["trained"]:
            dpo2 = json.loads((out / "round-2" / "dpo" / "manifest.json").read_text())
            assert dpo2["config"]["policy"] == str(out / "round-1" / "dpo")
        for part in ("generate", "judge", "preferences", "dpo"):
            assert json.loads((out / "round-1" / part / "manifest.json").read_text())["status"] == "completed"
        assert any((out / "tb").iterdir()) and len((out / "metrics.jsonl").read_text().splitlines()) == 2
    print(f"target mass {start:.4f} at the start; gains per seed (round 1, round 2):", gains)
    for r, per_seed in enumerate(zip(*gains), start=1):
        g = torch.tensor(per_seed)
        lower = g.mean() - 2 * g.std() / len(g) ** 0.5
        assert lower > 0, f"after {r} round(s): gains over seeds {per_seed} are not above their own noise"


def test_rounds_resume_exactly_after_a_kill(toy_policy: Path, tmp_path: Path, one_thread: None) -> None:
    extra = ["rounds=2", "eval.size=0"]
    whole = online.run(load_config(online.Config, TINY, args(toy_policy, tmp_path / "whole", *extra)))
    cut = tmp_path / "cut"
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "align.cli", "online", str(TINY), *args(toy_policy, cut, *extra)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = cut / "round-2" / "dpo" / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    deadline = time.time() + 240
    while not marker.is_file():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = online.run(load_config(online.Config, TINY, args(toy_policy, cut, *extra, "resume=true")))
    assert json.loads((resumed / "manifest.json").read_text())["status"] == "completed"
    a, b = (load_file(str(d / "round-2" / "dpo" / "model" / "adapter_model.safetensors")) for d in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    rows = [json.loads(line)["round"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2]


def test_online_recipes_load_and_refuse_bad_settings() -> None:
    from align.errors import ConfigError

    assert load_config(online.Config, REPO / "stages/online.yaml").judge.spec == "reward_model"
    with pytest.raises(ConfigError, match="human_mix"):
        load_config(online.Config, TINY, ["human_mix=true"])
    with pytest.raises(ConfigError, match="not supported by online"):
        load_config(online.Config, TINY, ["peft.method=prompt_tuning"])
    with pytest.raises(ConfigError, match=r"\.k=1 is out of range; it must be >= 2"):  # a pair needs 2 samples
        load_config(online.Config, TINY, ["k=1"])


# ---- the judge's agreement with held-out human pairs, before it labels anything ----

def avoids_target(prompt: list, response: str) -> float:
    """A judge that prefers the opposite of the toy humans."""
    return -says_target(prompt, response)


@pytest.fixture
def human_pairs(tmp_path: Path) -> Path:
    from conftest import write_jsonl

    rows = [{"prompt": [{"role": "user", "content": f"Name a colour for room {i}."}],
             "chosen": [{"role": "assistant", "content": f"I like {TARGET} for room {i}."}],
             "rejected": [{"role": "assistant", "content": f"Room {i} could be grey."}]} for i in range(6)]
    return write_jsonl(tmp_path / "heldout.jsonl", rows)


def test_a_judge_that_disagrees_with_the_humans_stops_before_round_one(
        toy_policy: Path, tmp_path: Path, human_pairs: Path, one_thread: None) -> None:
    from align.errors import AlignError

    cfg = load_config(online.Config, TINY, args(toy_policy, tmp_path / "run", "eval.size=0", "rounds=1",
                                                f"judge.heldout={human_pairs}", "judge.min_agreement=0.6",
                                                "judge.options.function=test_online:avoids_target"))
    with pytest.raises(AlignError, match=r"agrees with the human labels on 0\.0%.*min_agreement=0\.6"):
        online.run(cfg)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["judge_check"]["agreement"] == 0.0
    assert manifest["judge_check"]["pairs"] == 6 and not (tmp_path / "run" / "round-1").exists()


def test_judge_agreement_is_measured_on_the_heldout_pairs(tmp_path: Path, human_pairs: Path) -> None:
    cfg = load_config(online.Config, TINY, [f"judge.heldout={human_pairs}",
                                            "judge.options.function=test_online:says_target"])
    check = online.judge_agreement(cfg, tmp_path / "check" / "judge")
    assert check == {"agreement": 1.0, "decided": 6, "pairs": 6, "source": str(human_pairs)}
    assert online.judge_agreement(load_config(online.Config, TINY, []), tmp_path / "none") is None  # no humans


def test_rounds_share_one_judge_cache_so_the_human_pairs_are_judged_once(
        toy_policy: Path, tmp_path: Path, human_pairs: Path, one_thread: None) -> None:
    """The judge check and every round measure the judge on the same human pairs; only the first asks the judge."""
    out = online.run(load_config(online.Config, TINY, args(toy_policy, tmp_path / "run", "eval.size=0", "rounds=2",
                                                          f"judge.heldout={human_pairs}", f"human={human_pairs}")))
    check = json.loads((out / "judge-check" / "judge" / "manifest.json").read_text())["metrics"]
    rounds = [json.loads((out / f"round-{r}" / "judge" / "manifest.json").read_text())["metrics"] for r in (1, 2)]
    assert check["cached_judgements"] == 0 and check["human_pairs"] == 6
    for metrics in rounds:  # 6 pairs = 12 responses scored, all from the check's verdicts
        assert metrics["cached_judgements"] >= 12 and metrics["human_agreement"] == check["human_agreement"]
    assert (out / "judge-cache" / "judge_cache.jsonl").is_file()
