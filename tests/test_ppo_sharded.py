"""PPO under sharded launches (FSDP, DeepSpeed ZeRO): whole parameters gathered on EVERY process for the rollout
sampler's refresh and for checkpoints, and checkpoints through accelerate's save_state / load_state.

What runs for real here: FSDP2's `fully_shard` on 2 CPU processes (gloo) with the gather and the rollout-copy
refresh, and accelerate's save_state / load_state round trip in one process. FSDP1 and ZeRO-3 need a GPU
(accelerate builds neither on a CPU; DeepSpeed is not installed): their gathers are pinned by recording the calls.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from test_ppo_scale import in_two_threads  # two threads standing in for two processes
from torch import nn

from align.rlhf import sharded

REPO = Path(__file__).resolve().parent.parent


def tiny_actor() -> nn.Module:
    """The tiny LoRA actor-critic the FSDP2 worker shards (a trained adapter: ΔW is not zero), in eval mode."""
    from ppo_fsdp2_worker import build

    return build().eval()


def test_fsdp2_on_two_cpu_processes_scores_gathers_and_refreshes_the_rollout_copy(
        tmp_path: Path) -> None:
    """torchrun, 2 processes, gloo: the model sharded with fully_shard (one unit per decoder layer + the root), as
    accelerate's FSDP2 preparation does; tests/ppo_fsdp2_worker.py reports what each process found."""
    from align.bench.gpu_check import check_fsdp2  # make gpu-check's row (nccl there), here over gloo

    assert "2 process(es) over gloo" in check_fsdp2(tmp_path, 2, "gloo", timeout=240)
    found = [json.loads((tmp_path / "fsdp2" / f"rank-{r}.json").read_text()) for r in range(2)]
    assert any(f["sharded"] for f in found)  # the shards are real: some process holds less than the whole model
    for f in found:  # every process: the same old/reference numbers, the whole state, W + ΔW in its copy
        assert (f["scores_equal"], f["same_names"], f["state_equal"], f["copy_equal"], f["adapted"]) == (
            True, True, True, True, 4), found
        assert f["resharded"] == "DTensor"  # back to shards after the block


def test_zero3_gather_enters_gathered_parameters_with_every_parameter(monkeypatch: pytest.MonkeyPatch) -> None:
    """ZeRO-3: deepspeed.zero.GatheredParameters over all parameters, read-only (modifier_rank=None: no broadcast
    back), entered by the caller's process (each process calls it: see test_sharded_checkpoint_...)."""
    calls: list[tuple[int, Any]] = []

    @contextlib.contextmanager
    def gathered(params: list, modifier_rank: Any = "unset") -> Any:
        calls.append((len(params), modifier_rank))
        yield

    actor = tiny_actor()  # before the fake module: transformers asks for deepspeed's import spec
    fake = types.ModuleType("deepspeed")
    fake.zero = types.SimpleNamespace(GatheredParameters=gathered)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    state = sharded.gathered_trainable_state(actor, actor, "zero3")
    assert calls == [(len(list(actor.parameters())), None)]
    assert set(state) == {n for n, p in actor.named_parameters() if p.requires_grad}


def test_fsdp1_gather_is_summon_full_params_without_writeback(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    calls: list[dict] = []

    @contextlib.contextmanager
    def summon(module: nn.Module, **kwargs: Any) -> Any:
        calls.append(kwargs)
        yield

    monkeypatch.setattr(FSDP, "summon_full_params", summon)
    with sharded.full_parameters(nn.Linear(2, 2), "fsdp1"):
        pass
    assert calls == [{"writeback": False}]  # every rank gets the whole parameters (no rank0_only)
    # FSDP1 inserts its wrapper into module names; the rollout copy and saved weights use the plain ones
    assert sharded.plain_name("base_model.model.model.layers.0._fsdp_wrapped_module.self_attn.q_proj") == \
        "base_model.model.model.layers.0.self_attn.q_proj"


def test_the_reference_pass_through_the_actor_critic_is_the_adapter_disabled_policy() -> None:
    """Under FSDP the reference log-probs must come through the wrapped model's forward (reference=True), not by
    calling the inner policy: the numbers equal the adapter-disabled pass."""
    from align.rlhf.policy import Rollout, response_logits

    actor = tiny_actor()
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 3, 4, 10, 11]])
    attn = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    rollout = Rollout(ids, attn, (attn.cumsum(-1) - 1).clamp(min=0), ids[:, -2:], torch.ones(2, 2))
    with actor.policy.disable_adapter():
        expected = response_logits(actor.policy, rollout)
    got, values = actor(rollout.input_ids, rollout.attention_mask, rollout.position_ids, 2, reference=True)
    assert values is None and torch.equal(got, expected)
    adapted, _ = actor(rollout.input_ids, rollout.attention_mask, rollout.position_ids, 2)
    assert not torch.allclose(adapted.float(), expected)  # the adapter does change the logits: the switch matters


class FakeAcc:
    """The accelerate.Accelerator calls PPO's checkpointing makes, for process `rank` of 2 (threads)."""

    def __init__(self, rank: int, barrier: threading.Barrier, log: list) -> None:
        self.process_index, self.num_processes, self.is_main_process = rank, 2, rank == 0
        self.barrier, self.log = barrier, log

    def wait_for_everyone(self) -> None:
        self.barrier.wait()

    def save_state(self, folder: str) -> None:
        self.log.append(("save_state", self.process_index))
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"optimizer_shard_{self.process_index}.bin").write_bytes(b"shard")

    def load_state(self, folder: str) -> None:
        self.log.append(("load_state", self.process_index, Path(folder).name))


def trainer(acc: Any, actor: nn.Module, run_dir: Path, kind: str) -> Any:
    from align.rlhf.core import KLController, RunningMoments
    from align.stages.ppo_rollout import Trainer

    optimizer = torch.optim.AdamW([p for p in actor.parameters() if p.requires_grad])
    return Trainer(acc=acc, model=actor, actor=actor, optimizer=optimizer, reference=None, fast_reference=None,
                   tokenizer=None, source=Path("."), sampler=None, reward_fn=None, prompts=[], run_dir=run_dir,
                   run_=None, tb=None, bar=None, kl_ctl=KLController(0.05, 0.3, 100), moments=RunningMoments(),
                   sharding=kind)


def test_sharded_checkpoint_gathers_and_saves_accelerate_state_on_every_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes (threads) save step 2 of an FSDP2 run: each enters the gather and accelerate's save_state;
    the checkpoint holds the whole trainable state, both processes' shards, and no optimizer of align's own.
    Resume then loads accelerate's state on every process instead of align's files."""
    from safetensors.torch import load_file

    from align.stages import ppo
    from align.stages.ppo_checkpoint import resume, save

    gathers: list[int] = []
    real_full_parameters = sharded.full_parameters

    @contextlib.contextmanager
    def recording(model: nn.Module, kind: str) -> Any:
        gathers.append(threading.get_ident())
        with real_full_parameters(model, kind):
            yield

    monkeypatch.setattr(sharded, "full_parameters", recording)
    actor, barrier, log = tiny_actor(), threading.Barrier(2, timeout=20), []
    cfg = ppo.Config(output_dir=str(tmp_path), resume=True)
    in_two_threads(lambda rank: save(cfg, trainer(FakeAcc(rank, barrier, log), actor, tmp_path, "fsdp2"), 2), barrier)
    assert len(set(gathers)) == 2  # the gather ran on both processes, not on the main one alone
    assert sorted(e for e in log if e[0] == "save_state") == [("save_state", 0), ("save_state", 1)]
    step = tmp_path / "checkpoints" / "step-2"
    assert sorted(p.name for p in (step / "accelerate").iterdir()) == ["optimizer_shard_0.bin",
                                                                        "optimizer_shard_1.bin"]
    assert not (step / "optimizer.json").exists() and not (step / "policy").exists()
    saved = load_file(str(step / "trainable.safetensors"))
    whole = {n: p for n, p in actor.named_parameters() if p.requires_grad}
    assert saved.keys() == whole.keys() and all(torch.equal(saved[n], whole[n]) for n in whole)
    assert json.loads((step / "state.json").read_text())["sharding"] == "fsdp2"

    log.clear()
    for rank in range(2):
        t = trainer(FakeAcc(rank, barrier, log), actor, tmp_path, "fsdp2")
        resume(cfg, t)
        assert t.start == 2 and t.kl_ctl.value == pytest.approx(0.05)
    assert log == [("load_state", 0, "accelerate"), ("load_state", 1, "accelerate")]


def test_accelerate_state_round_trip_resumes_the_exact_model_and_optimizer(tmp_path: Path) -> None:
    """The same save / resume path with a real accelerate.Accelerator (one process): the trained parameters and
    the optimizer's moments come back exactly from accelerate's files."""
    from accelerate import Accelerator

    from align.stages import ppo
    from align.stages.ppo_checkpoint import resume, save

    acc = Accelerator(cpu=True)
    actor = tiny_actor()
    t = trainer(acc, actor, tmp_path, "zero2")  # a layout whose optimizer state is accelerate's to save
    t.model, t.optimizer = acc.prepare(actor, t.optimizer)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    logits, values = t.model(ids, torch.ones_like(ids), torch.arange(5)[None], 2)
    (logits.float().logsumexp(-1).mean() + values.mean()).backward()
    t.optimizer.step()
    save(ppo.Config(output_dir=str(tmp_path)), t, 1)
    trained = {n: p.detach().clone() for n, p in actor.named_parameters() if p.requires_grad}
    moments = {k: v["exp_avg"].clone() for k, v in t.optimizer.state_dict()["state"].items()}

    fresh = tiny_actor()  # untrained: lora_B as initialised here, value head zero
    acc2 = Accelerator(cpu=True)  # as a resumed run builds its own
    t2 = trainer(acc2, fresh, tmp_path, "zero2")
    t2.model, t2.optimizer = acc2.prepare(fresh, t2.optimizer)
    resume(ppo.Config(output_dir=str(tmp_path), resume=True), t2)
    assert t2.start == 1
    now = dict(fresh.named_parameters())
    assert all(torch.equal(now[n], trained[n]) for n in trained)
    assert any(not torch.equal(trained[n], v) for n, v in tiny_actor().named_parameters() if n in trained)
    after = t2.optimizer.state_dict()["state"]
    assert moments.keys() == after.keys() and all(torch.equal(moments[k], after[k]["exp_avg"]) for k in moments)


def test_sharding_is_read_from_the_accelerator() -> None:
    from types import SimpleNamespace as NS

    def acc(kind: str, **extra: Any) -> Any:
        return NS(distributed_type=NS(value=kind), **extra)

    assert sharded.sharding(acc("FSDP", is_fsdp2=True)) == "fsdp2"
    assert sharded.sharding(acc("FSDP", is_fsdp2=False)) == "fsdp1"
    for stage, kind in ((2, "zero2"), (3, "zero3")):
        assert sharded.sharding(acc("DEEPSPEED", state=NS(deepspeed_plugin=NS(zero_stage=stage)))) == kind
    assert sharded.sharding(acc("MULTI_CPU")) == sharded.sharding(acc("NO")) == ""


def test_deepspeed_auto_batch_and_clipping_come_from_the_recipe() -> None:
    """zero2/zero3.yaml leave the micro batch and clipping "auto"; PPO prepares no dataloader to fill them from."""
    from types import SimpleNamespace as NS

    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": 0.5}
    sharded.fill_deepspeed_auto(NS(state=NS(deepspeed_plugin=NS(deepspeed_config=config))), 4, 1.0)
    assert config == {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.5}  # an explicit value stays
    sharded.fill_deepspeed_auto(NS(state=NS(deepspeed_plugin=None)), 4, 1.0)  # not DeepSpeed: nothing to do


def test_a_run_checkpointed_through_accelerate_state_resumes_exactly(tiny_model: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   one_thread: None) -> None:
    """A whole PPO run whose checkpoints take the sharded path (the launch reported as ZeRO-2, which needs no
    gather), resumed from its step-1 checkpoint: accelerate's load_state, align's RNG and KL state give the
    uninterrupted run's second step and final adapter exactly."""
    import shutil

    from safetensors.torch import load_file

    from align.config import load_config
    from align.stages import ppo

    monkeypatch.setattr(sharded, "sharding", lambda acc: "zero2")
    out = tmp_path / "run"
    args = [f"policy={tiny_model}", f"output_dir={out}", "reward.function=conftest:count_e", "ppo.steps=2",
            "ppo.batch_size=2", "ppo.mini_batch_size=2", "sampling.max_new_tokens=4", "data.eval_size=0",
            "log.save_every=1", "kl.target=0.5"]
    whole = ppo.run(load_config(ppo.Config, REPO / "stages/tiny/ppo.yaml", args))
    step1 = whole / "checkpoints" / "step-1"
    assert (step1 / "accelerate").is_dir() and not (step1 / "optimizer.json").exists()
    final = load_file(str(whole / "model" / "adapter_model.safetensors"))
    rows = (whole / "metrics.jsonl").read_text().splitlines()
    shutil.rmtree(whole / "checkpoints" / "step-2")  # as if stopped after step 1
    resumed = ppo.run(load_config(ppo.Config, REPO / "stages/tiny/ppo.yaml", [*args, "resume=true"]))
    again = load_file(str(resumed / "model" / "adapter_model.safetensors"))
    untimed = [{k: v for k, v in json.loads(r).items() if not k.startswith("time/")}
               for r in (rows[1], (resumed / "metrics.jsonl").read_text().splitlines()[1])]
    assert untimed[0] == untimed[1]
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)
