"""PPO speed-ups that must not change the math: the first training forward reused as the old-policy pass, the
rollout copy in a faster dtype (refreshed exactly from the trained adapter), and the decode dtype probe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.config import load_config
from align.rlhf import policy as rl_policy
from align.stages import ppo

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "stages" / "tiny" / "ppo.yaml"


def count_blue(prompt: list, response: str) -> float:
    return response.count("blue") / 12


def run_ppo(policy: Path, out: Path, *overrides: str) -> tuple[list[dict], dict[str, torch.Tensor]]:
    cfg = load_config(ppo.Config, TINY, [f"policy={policy}", f"output_dir={out}", "reward.function=test_ppo_rollout:count_blue",
                                         "ppo.steps=2", "ppo.batch_size=8", "ppo.mini_batch_size=8", "data.eval_size=0",
                                         "log.save_every=2", *overrides])
    run_dir = ppo.run(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows, load_file(run_dir / "model" / "adapter_model.safetensors")


def test_reusing_the_first_training_forward_changes_nothing(toy_policy: Path, tmp_path: Path, one_thread: None,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """One minibatch per epoch: the old log-probs/values come from the first training forward. The run must equal
    one that computes them in a separate no-grad pass (the losses, KL and the trained adapter)."""
    calls = []
    real = rl_policy.reuse_first_pass
    monkeypatch.setattr(rl_policy, "reuse_first_pass", lambda *a: calls.append(real(*a)) or calls[-1])
    fast_rows, fast = run_ppo(toy_policy, tmp_path / "fast", "engine.dtype=float32")
    assert calls == [True, True]
    monkeypatch.setattr(rl_policy, "reuse_first_pass", lambda *a: False)
    slow_rows, slow = run_ppo(toy_policy, tmp_path / "slow", "engine.dtype=float32")
    for key in ("loss/policy", "loss/value", "kl/ref", "policy/clipfrac", "entropy", "reward/mean"):
        assert [r[key] for r in fast_rows] == pytest.approx([r[key] for r in slow_rows], rel=1e-4, abs=1e-6), key
    assert fast.keys() == slow.keys()
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-4, atol=1e-6)
    assert any(w.abs().sum() > 0 for k, w in fast.items() if "lora_B" in k)  # it did train


def test_reuse_only_where_exact() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.0))
    assert rl_policy.reuse_first_pass(model, rows=8, mini_batch_size=8, grad_accum=1)
    assert not rl_policy.reuse_first_pass(model, rows=16, mini_batch_size=8, grad_accum=1)  # later minibatches
    assert not rl_policy.reuse_first_pass(model, rows=8, mini_batch_size=8, grad_accum=2)
    noisy = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1)).train()
    assert not rl_policy.reuse_first_pass(noisy, rows=8, mini_batch_size=8, grad_accum=1)
    assert rl_policy.reuse_first_pass(noisy.eval(), rows=8, mini_batch_size=8, grad_accum=1)


def test_no_reuse_with_lora_dropout(tiny_model: Path) -> None:
    """LoRA dropout lives in lora_A (align/models/lean.py), not in a Dropout module: still no reuse while training."""
    from transformers import AutoModelForCausalLM

    from align.models.peft import PeftSettings, attach_peft

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    policy = attach_peft(base, PeftSettings(r=4, alpha=8, dropout=0.1))[0].train()
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in policy.modules())
    assert not rl_policy.reuse_first_pass(policy, rows=8, mini_batch_size=8, grad_accum=1)
    assert rl_policy.reuse_first_pass(policy.eval(), rows=8, mini_batch_size=8, grad_accum=1)


def lora_policy(tiny_model: Path) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return policy


def test_rollout_copy_follows_the_trained_adapter_exactly(tiny_model: Path) -> None:
    """The copy is the merged policy; after the adapter moves, `sync_rollout_copy` brings it to the new weights
    (checked in float64, where the copy's logits must equal the fp32 policy's)."""
    policy = lora_policy(tiny_model)
    assert rl_policy.rollout_copy(policy, "lora", torch.float32) is None  # same dtype: sample the policy itself
    assert rl_policy.rollout_copy(policy, "dora", torch.bfloat16) is None  # no exact refresh for DoRA
    clone = rl_policy.rollout_copy(policy, "lora", torch.float64)
    assert clone is not None and not any(p.requires_grad for p in clone.parameters())
    assert not any("lora" in n for n, _ in clone.named_parameters())
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])

    def logits(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids).logits.double()

    torch.testing.assert_close(logits(clone), logits(policy), rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # a training step moves the adapter
        for name, p in policy.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name) + 1)))
    stale = logits(clone)
    assert (stale - logits(policy)).abs().max() > 1e-2
    rl_policy.sync_rollout_copy(clone, policy, "lora")
    torch.testing.assert_close(logits(clone), logits(policy), rtol=1e-4, atol=1e-4)
    # the trained model's own base weights are untouched (no merge/unmerge in place)
    base = dict(policy.named_parameters())
    name = next(n for n in base if n.endswith("q_proj.base_layer.weight"))
    fresh = lora_policy(tiny_model)
    torch.testing.assert_close(base[name], dict(fresh.named_parameters())[name], rtol=0, atol=0)


def test_prepacked_rollout_copy_follows_the_trained_adapter(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where prepacked weights sample faster, the copy's linear layers are prepacked, and `sync_rollout_copy` loads
    each update's merged weights into them (a float64 policy, a float32 copy: equal to fp32 rounding)."""
    from align.models import prepacked

    if not prepacked.can_prepack(torch.float32):
        pytest.skip("this torch build has no oneDNN")
    monkeypatch.setattr(prepacked, "prepacking_is_faster", lambda dtype: True)
    policy = lora_policy(tiny_model).double()
    clone = rl_policy.rollout_copy(policy, "lora", torch.float32)
    assert clone is not None and not any(type(m) is torch.nn.Linear for m in clone.modules())
    full = rl_policy.rollout_copy(policy, "full", torch.float32)  # full fine-tuning: plain layers (every weight moves)
    assert full is not None and any(type(m) is torch.nn.Linear for m in full.modules())
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])

    def logits(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids).logits.double()

    torch.testing.assert_close(logits(clone), logits(policy), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name) + 1)))
    assert (logits(clone) - logits(policy)).abs().max() > 1e-2
    rl_policy.sync_rollout_copy(clone, policy, "lora")
    torch.testing.assert_close(logits(clone), logits(policy), rtol=1e-4, atol=1e-4)


def test_full_fine_tuning_copy_is_refreshed(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    clone = rl_policy.rollout_copy(model, "full", torch.bfloat16)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    rl_policy.sync_rollout_copy(clone, model, "full")
    torch.testing.assert_close(clone.lm_head.weight, model.lm_head.weight.to(torch.bfloat16), rtol=0, atol=0)


def test_ppo_samples_from_a_bf16_copy_and_still_learns(toy_policy: Path, tmp_path: Path, one_thread: None) -> None:
    """Sampling from a bf16 copy while the trainer scores in fp32 still raises the reward (the criterion of
    test_ppo.py's fp32 run): B matrices moving off zero alone would hold for a run that learned nothing."""
    rows, _ = run_ppo(toy_policy, tmp_path / "bf16", "engine.dtype=bfloat16", "ppo.steps=8", "log.save_every=8")
    assert len(rows) == 8 and all(r["time/generate"] > 0 for r in rows)
    first, last = rows[0]["reward/mean"], sum(r["reward/mean"] for r in rows[-2:]) / 2
    assert last > 2 * first and last > first + 0.1 / 12, [r["reward/mean"] for r in rows]


def test_reference_copy_is_the_adapter_free_model_and_never_moves(tiny_model: Path) -> None:
    """lora: the copy is the base without the adapter (the adapter-disabled pass), not the policy, and stays so
    when the adapter trains; full: a copy of the frozen start; same dtype or other methods: no copy."""
    policy = lora_policy(tiny_model)
    assert rl_policy.reference_copy(policy, None, "lora", torch.float32) is None
    assert rl_policy.reference_copy(policy, None, "dora", torch.bfloat16) is None
    ref = rl_policy.reference_copy(policy, None, "lora", torch.float64)
    assert ref is not None and not any("lora" in n for n, _ in ref.named_parameters())
    assert all(p.dtype == torch.float64 and not p.requires_grad for p in ref.parameters())
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])

    def logits(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids).logits.double()

    with policy.disable_adapter():
        exact = logits(policy)
    torch.testing.assert_close(logits(ref), exact, rtol=1e-4, atol=1e-4)
    assert (logits(ref) - logits(policy)).abs().max() > 1e-2  # the policy's adapter is not in it
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_" in name:
                p.add_(0.1)
    torch.testing.assert_close(logits(ref), exact, rtol=1e-4, atol=1e-4)
    assert any("lora" in n for n, _ in policy.named_parameters())  # the policy keeps its adapter

    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    full = rl_policy.reference_copy(start, start, "full", torch.bfloat16)
    assert full is not start and start.lm_head.weight.dtype == torch.float32
    torch.testing.assert_close(full.lm_head.weight, start.lm_head.weight.to(torch.bfloat16), rtol=0, atol=0)


def test_ppo_reference_dtype_float32_is_exact_and_bf16_is_close(toy_policy: Path, tmp_path: Path,
                                                                 one_thread: None) -> None:
    """At step 1 the policy is the reference: the exact pass gives KL 0; the bf16 copy a small nonzero KL (its
    rounding), which shows the copy is what the reference log-probs came from."""
    common = ("ppo.steps=1", "log.save_every=1", "engine.dtype=float32")
    exact, _ = run_ppo(toy_policy, tmp_path / "exact", *common, "kl.reference_dtype=float32")
    assert exact[0]["kl/ref"] == 0.0
    fast, _ = run_ppo(toy_policy, tmp_path / "bf16", *common, "kl.reference_dtype=bfloat16")
    tokens = fast[0]["response/length"]
    assert fast[0]["kl/ref"] != 0.0 and abs(fast[0]["kl/ref"]) / tokens < 0.05
    assert fast[0]["reward/mean"] == exact[0]["reward/mean"]  # same rollouts (sampled from the fp32 policy)


def test_decode_dtype_follows_its_own_measurement(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from align.models import load

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(load, "time_block_step", lambda dtype: {torch.float32: 0.05, torch.bfloat16: 0.12}[dtype])
    calls = []
    monkeypatch.setattr(load, "time_decode_step",
                        lambda dtype: calls.append(dtype) or {torch.float32: 0.04, torch.bfloat16: 0.01}[dtype])
    assert load.pick_dtype("auto") == torch.float32  # training: fp32 measured faster
    assert load.pick_dtype("auto", use="decode") == torch.bfloat16  # sampling: bf16 measured faster
    assert load.pick_dtype("auto", use="decode") == torch.bfloat16 and len(calls) == 2  # remembered
    assert load.pick_dtype("float32", use="decode") == torch.float32  # an explicit choice is kept
    monkeypatch.setattr(load, "time_forward_step",
                        lambda dtype: calls.append(dtype) or {torch.float32: 0.03, torch.bfloat16: 0.04}[dtype])
    assert load.pick_dtype("auto", use="forward") == torch.float32 and len(calls) == 4  # its own probe
    known = json.loads((tmp_path / "dtype_probe.json").read_text())
    assert sorted(k.rsplit("| ", 1)[1] for k in known) == ["decode v1", "forward v1", "lora block v3"]


def test_reward_model_auto_dtype_follows_the_forward_probe(tiny_model: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from align.models import load
    from align.reward_model import RewardModel
    from align.rewards import RewardSettings, load_reward

    clf = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1, dtype=torch.float32)
    clf.config.pad_token_id = clf.config.eos_token_id
    clf.save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "rm")
    uses = []
    monkeypatch.setattr(load, "pick_dtype", lambda name, use="train": uses.append((name, use)) or torch.bfloat16)
    assert RewardModel.load(tmp_path / "rm", dtype="auto").model.dtype == torch.bfloat16 and uses[0] == ("auto", "forward")
    monkeypatch.setattr(load, "pick_dtype", lambda name, use="train": {"float32": torch.float32}[name])
    assert RewardModel.load(tmp_path / "rm").model.dtype == torch.float32  # saved: the folder's own dtype
    assert RewardSettings().dtype == "auto"
    score, _ = load_reward(RewardSettings(model=str(tmp_path / "rm"), dtype="saved"))
    exact = RewardModel.load(tmp_path / "rm").score([[{"role": "user", "content": "hi"}]], ["hello"])
    assert score([[{"role": "user", "content": "hi"}]], ["hello"]) == exact


def response_chars(prompt: list, response: str) -> float:
    return len(response) / 40


def cut_to_varied_lengths(sampler, tokenizer):
    """The sampler, its i-th prompt's answer cut to 3 + i mod 9 tokens (the toy policy never ends an answer)."""
    import dataclasses

    real = sampler.generate

    def generate(prompts, params, n=1, seeds=None):
        return [[dataclasses.replace(s, response_ids=s.response_ids[:3 + i % 9],
                                     text=tokenizer.decode(s.response_ids[:3 + i % 9]),
                                     logprobs=None if s.logprobs is None else s.logprobs[:3 + i % 9]) for s in group]
                for i, group in enumerate(real(prompts, params, n, seeds))]
    sampler.generate = generate
    return sampler


def test_length_control_takes_the_length_trend_out_of_the_scores(toy_policy: Path, tmp_path: Path, one_thread: None,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A reward that is all length: with shaping.length_control the shaped scores keep the batch's mean but have
    no covariance with the response lengths left; without it they are the raw scores."""
    from align.stages import ppo_rollout

    batches = []
    real = ppo_rollout.collect_rollout
    monkeypatch.setattr(ppo, "collect_rollout", lambda *a: batches.append(real(*a)) or batches[-1])
    monkeypatch.setattr(ppo, "rollout_sampler",
                        lambda cfg, t: cut_to_varied_lengths(ppo_rollout.rollout_sampler(cfg, t), t.tokenizer))
    for control in ("true", "false"):
        batches.clear()
        run_ppo(toy_policy, tmp_path / control, "reward.function=test_ppo_rollout:response_chars",
                "shaping.missing_eos_penalty=0.0", f"shaping.length_control={control}")
        assert len(batches) == 2
        for b in batches:
            lengths = torch.tensor([float(len(s.response_ids)) for s in b.samples])
            assert lengths.std() > 0 and b.scores.std() > 0
            assert float(b.shaped.mean()) == pytest.approx(float(b.scores.mean()), abs=1e-5)
            cov = float(((lengths - lengths.mean()) * (b.shaped - b.shaped.mean())).mean())
            if control == "true":
                assert cov == pytest.approx(0.0, abs=1e-5)
            else:
                assert torch.equal(b.shaped, b.scores) and cov > 0.1
