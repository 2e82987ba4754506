"""PPO at scale, by construction: statistics over every process (a reduce op, simulated here by two threads),
per-token losses normalised by the global token count, the sampler's log-prob gap and the truncated importance
sampling correction (hand-computed), and the refusals that keep a multi-process run from silently changing."""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_rlhf_math import t  # the tensor builder of the hand-computed RL math tests

from align.errors import ConfigError
from align.generation.hf import token_logprobs
from align.rlhf.core import (
    explained_variance,
    logprob_mismatch,
    masked_mean,
    policy_loss,
    tis_weights,
    token_mean,
    whiten,
)


def in_two_threads(work: Callable[[int], Any], barrier: threading.Barrier) -> list[Any]:
    """[work(0), work(1)], run in two threads standing in for two processes; an error in one aborts `barrier` (so
    the other stops waiting for it) and is raised here."""
    results, errors = [None, None], []

    def target(i: int) -> None:
        try:
            results[i] = work(i)
        except Exception as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=target, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return results


def on_two_processes(work: list[Callable[[Callable], torch.Tensor]]) -> list[torch.Tensor]:
    """Run work[i](reduce) for i = 0, 1 in two threads, where reduce(x) is an all-reduce sum over both (what
    torch.distributed.all_reduce does across processes): every call blocks until the other thread made its own."""
    barrier, slots = threading.Barrier(2, timeout=10), [None, None]

    def reduce_for(i: int) -> Callable:
        def reduce(x: torch.Tensor) -> torch.Tensor:
            slots[i] = x.detach().clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()  # both have read the slots before either writes the next collective's
            return total
        return reduce

    return in_two_threads(lambda i: work[i](reduce_for(i)), barrier)


X = [[1.0, 2.0], [3.0, 0.0]]
M = [[1.0, 1.0], [1.0, 0.0]]  # valid: 1, 2 (process 0's row), 3 (process 1's row); mean 2, var 2/3


def test_whiten_over_two_processes_is_whiten_over_the_whole_batch() -> None:
    s = math.sqrt(2 / 3)
    expected = [[-1 / s, 0.0], [1 / s, 0.0]]  # (x - 2) / sqrt(2/3), zero on padding
    assert torch.allclose(whiten(t(X), t(M)), t(expected), atol=1e-5)
    rows = on_two_processes([lambda r, i=i: whiten(t(X[i:i + 1]), t(M[i:i + 1]), reduce=r) for i in range(2)])
    assert torch.allclose(torch.cat(rows), t(expected), atol=1e-5)
    # per process (today's bug): row 0 alone has mean 1.5, std 0.5 -> [-1, 1]; row 1 alone is one token -> 0
    assert torch.allclose(whiten(t(X[:1]), t(M[:1])), t([[-1.0, 1.0]]), atol=1e-5)


def test_masked_mean_and_explained_variance_over_two_processes() -> None:
    means = on_two_processes([lambda r, i=i: masked_mean(t(X[i:i + 1]), t(M[i:i + 1]), reduce=r) for i in range(2)])
    assert [float(m) for m in means] == [2.0, 2.0]  # (1 + 2 + 3) / 3 on both; the mean of the local means is 2.25
    values = t([[0.0, 2.0], [3.0, 0.0]])  # residuals returns - values: 1, 0, 0 -> var 2/9; var(returns) = 2/3
    ev = on_two_processes([lambda r, i=i: explained_variance(values[i:i + 1], t(X[i:i + 1]), t(M[i:i + 1]), r)
                           for i in range(2)])
    assert all(float(e) == pytest.approx(1 - (2 / 9) / (2 / 3)) for e in ev)
    assert float(explained_variance(values, t(X), t(M))) == pytest.approx(2 / 3)


def test_token_mean_shares_average_to_the_global_mean() -> None:
    x, mask = t([[1.0, 2.0], [3.0, 4.0]]), t([[1.0, 1.0], [1.0, 0.0]])
    assert float(token_mean(x, mask)) == pytest.approx(2.0)  # (1 + 2 + 3) / 3
    assert float(token_mean(x, mask, 6.0)) == pytest.approx(1.0)
    # two processes, 3 tokens in all: each divides its sum by 3 / 2; DDP's average of the two is the global mean
    shares = [token_mean(x[i:i + 1], mask[i:i + 1], 3 / 2) for i in range(2)]  # 3 / 1.5, 3 / 1.5
    assert float(sum(shares) / 2) == pytest.approx(2.0)
    assert float((masked_mean(x[:1], mask[:1]) + masked_mean(x[1:], mask[1:])) / 2) == pytest.approx(2.25)


def test_truncated_importance_sampling_weights_the_policy_loss() -> None:
    old = t([[math.log(0.5), math.log(0.5), math.log(0.4)]])
    sampler = t([[math.log(0.25), math.log(0.5), math.log(0.8)]])
    weights = tis_weights(old, sampler, cap=1.5)
    assert torch.allclose(weights, t([[1.5, 1.0, 0.5]]))  # min(0.5/0.25 = 2, 1.5), 1, 0.4/0.8
    advantages, mask = t([[1.0, -2.0, 4.0]]), t([[1.0, 1.0, 0.0]])
    # on policy (ratio 1): per-token loss -A = [-1, 2, -4]; the third token is padding
    loss, _ = policy_loss(old, old, advantages, mask, 0.2)
    assert float(loss) == pytest.approx(0.5)  # (-1 + 2) / 2
    weighted, _ = policy_loss(old, old, advantages, mask, 0.2, weights)
    assert float(weighted) == pytest.approx(0.25)  # (-1 * 1.5 + 2 * 1) / 2
    lp = old.clone().requires_grad_(True)
    policy_loss(lp, old, advantages, mask, 0.2, weights)[0].backward()
    assert torch.allclose(lp.grad, t([[-0.75, 1.0, 0.0]]))  # d/dlp of -A·w·r / 2 at r = 1; no gradient via w


def test_logprob_mismatch() -> None:
    sampler, trainer, mask = t([[-1.0, -2.0, 0.0]]), t([[-1.5, -1.0, -9.0]]), t([[1.0, 1.0, 0.0]])
    gap = logprob_mismatch(sampler, trainer, mask)  # Δ = 0.5, -1 (the padded -9 is ignored)
    assert {k: round(float(v), 6) for k, v in gap.items()} == {
        "logprob_diff": -0.25, "logprob_absdiff": 0.75, "logprob_maxdiff": 1.0}


def test_hf_sampler_logprob_is_of_the_distribution_drawn_from() -> None:
    scores = torch.log(t([[0.5, 0.3, 0.2]]))
    token = torch.tensor([1])
    assert float(token_logprobs(scores, token, 1.0, 1.0)) == pytest.approx(math.log(0.3), abs=1e-6)
    # top_p 0.7 keeps tokens 0 and 1 (mass above them 0 and 0.5 < 0.7; token 2 has 0.8 above): renormalised by 0.8
    assert float(token_logprobs(scores, token, 1.0, 0.7)) == pytest.approx(math.log(0.3 / 0.8), abs=1e-6)
    # temperature 2: softmax(log p / 2) ∝ sqrt(p)
    root = [math.sqrt(p) for p in (0.5, 0.3, 0.2)]
    assert float(token_logprobs(scores, token, 2.0, 1.0)) == pytest.approx(math.log(root[1] / sum(root)), abs=1e-6)


def test_resume_with_another_process_count_is_refused_with_both_numbers(tmp_path: Path) -> None:
    from align.rlhf import checkpoint as ckpt
    from align.stages import ppo
    from align.stages.ppo_checkpoint import check_resume_world

    param = torch.nn.Parameter(torch.zeros(2))
    ckpt.save_checkpoint(tmp_path, 2, trainable={"w": param.detach()}, optimizer=torch.optim.AdamW([param]),
                         state={}, rank=0, world=2, is_main=True, barrier=lambda: None, save_policy=None, keep=2)
    cfg = ppo.Config(output_dir=str(tmp_path), resume=True)
    with pytest.raises(ConfigError, match=r"written by 2 process\(es\); this run has 1"):
        check_resume_world(cfg, 1)
    check_resume_world(cfg, 2)  # the same count resumes
    with pytest.raises(ConfigError, match=r"written under DDP / one process; this run is fsdp2"):
        check_resume_world(cfg, 2, "fsdp2")  # accelerate's state of another layout does not load
    assert json.loads((tmp_path / "checkpoints" / "step-2" / "state.json").read_text())["world_size"] == 2


def test_sharded_launches_need_the_vllm_sampler_and_megatron_is_refused() -> None:
    from align.stages import ppo
    from align.stages.ppo_checkpoint import check_sharding

    hf, vllm = ppo.Config(), ppo.Config(engine=dataclasses.replace(ppo.Config().engine, backend="vllm"))
    for kind in ("fsdp1", "fsdp2", "zero3"):  # parameters sharded: generate() on shards would hang
        with pytest.raises(ConfigError, match=f"ppo under {kind} .*engine.backend=vllm"):
            check_sharding(hf, "FSDP", kind)
        assert check_sharding(vllm, "FSDP", kind) == kind
    assert check_sharding(hf, "DEEPSPEED", "zero2") == "zero2"  # whole parameters on every process
    assert check_sharding(hf, "MULTI_CPU", "") == ""
    with pytest.raises(ConfigError, match="MEGATRON_LM"):
        check_sharding(vllm, "MEGATRON_LM", "")


# ---- a failing process ends every process ----

def fails_on_eval_prompts(prompt: list, response: str) -> float:
    """A reward that breaks on the held-out prompts only: the main process's final evaluation fails."""
    if "EVAL-MARKER" in prompt[-1]["content"]:
        raise RuntimeError("reward broke on a held-out prompt")
    return response.count("e") / 10


def fails_on_rank_one(prompt: list, response: str) -> float:
    """A reward that breaks on process 1 only, in the first step (the other process waits at the next gather)."""
    import os

    if os.environ.get("RANK") == "1":
        raise RuntimeError("reward broke on rank 1")
    return response.count("e") / 10


def launch_ranks(args: list[str], tmp_path: Path, limit: float = 240) -> list[tuple[int, str, float]]:
    """2 PPO processes started one by one, as srun or a hand-written launcher does (no torchrun agent to kill the
    others when one fails): [(exit code, stderr tail, seconds)] per rank; a rank still running after `limit`
    seconds is killed and reported with exit code None."""
    import os
    import socket
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parent.parent
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = os.environ | {"PYTHONPATH": os.pathsep.join([str(repo / "tests"), str(repo)]), "OMP_NUM_THREADS": "1",
                         "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    start = time.time()
    errs = [(tmp_path / f"rank-{r}.err").open("w") for r in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "align.cli", "ppo", str(repo / "stages/tiny/ppo.yaml"), *args],
                              cwd=repo, env=base | {"RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.DEVNULL, stderr=errs[r])
             for r in range(2)]
    done: list = [None, None]
    while any(d is None for d in done) and time.time() - start < limit:
        for r, p in enumerate(procs):
            if done[r] is None and p.poll() is not None:
                done[r] = time.time() - start
        time.sleep(0.2)
    for p, err in zip(procs, errs):
        if p.poll() is None:
            p.kill()
            p.wait()
        err.close()
    return [(p.returncode if d is not None else None, (tmp_path / f"rank-{r}.err").read_text()[-3000:], d or limit)
            for r, (p, d) in enumerate(zip(procs, done))]


def test_a_failure_in_the_main_process_final_save_does_not_leave_the_others_waiting(tiny_model: Path,
                                                                                    tmp_path: Path) -> None:
    from conftest import write_jsonl

    evals = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "EVAL-MARKER soup?"}])
    ranks = launch_ranks([f"policy={tiny_model}", f"output_dir={tmp_path / 'run'}", "ppo.steps=1",
                          "ppo.batch_size=2", "ppo.mini_batch_size=2", "sampling.max_new_tokens=4",
                          "reward.function=test_ppo_scale:fails_on_eval_prompts", f"data.eval_prompts={evals}",
                          "data.eval_size=1", "log.progress=false"], tmp_path)
    (code0, err0, _), (code1, _, _) = ranks
    assert code0 not in (0, None) and "reward broke on a held-out prompt" in err0, ranks
    assert code1 == 0, ranks  # it trained to the end and left; it did not wait for process 0's evaluation


def test_a_process_that_dies_mid_step_ends_the_others_after_the_collective_timeout(tiny_model: Path,
                                                                                   tmp_path: Path) -> None:
    ranks = launch_ranks([f"policy={tiny_model}", f"output_dir={tmp_path / 'run'}", "ppo.steps=2",
                          "ppo.batch_size=2", "ppo.mini_batch_size=2", "sampling.max_new_tokens=4",
                          "reward.function=test_ppo_scale:fails_on_rank_one", "data.eval_size=0",
                          "log.progress=false", "collective_timeout=10"], tmp_path)
    (code0, _, _), (code1, err1, _) = ranks
    assert code1 not in (0, None) and "reward broke on rank 1" in err1, ranks
    assert code0 not in (0, None), ranks  # ended with an error instead of waiting for process 1 forever


# ---- the sampler's log-prob gap, hf backend ----

def test_a_bf16_sampler_shows_a_logprob_gap_and_tis_changes_the_update(tiny_model: Path, tmp_path: Path,
                                                                         one_thread: None) -> None:
    """Rollouts from a bf16 copy of a float32 policy: the logged gap is clearly non-zero (from the policy itself it
    is float noise), and ppo.tis_cap reweights the first update's loss (same rollouts, other loss)."""
    from align.config import load_config
    from align.stages import ppo

    def first_row(name: str, *extra: str) -> dict:
        out = ppo.run(load_config(ppo.Config, Path(__file__).resolve().parent.parent / "stages/tiny/ppo.yaml", [
            f"policy={tiny_model}", f"output_dir={tmp_path / name}", "reward.function=conftest:count_e",
            "ppo.steps=1", "ppo.batch_size=4", "ppo.mini_batch_size=4", "data.eval_size=0",
            "sampling.max_new_tokens=6", "kl.reference_dtype=float32", *extra]))
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])

    exact = first_row("fp32", "engine.dtype=float32")
    bf16 = first_row("bf16", "engine.dtype=bfloat16")
    capped = first_row("tis", "engine.dtype=bfloat16", "ppo.tis_cap=1.0")
    gaps = (exact["sampler/logprob_absdiff"], bf16["sampler/logprob_absdiff"])
    assert gaps[0] < 1e-5 and gaps[1] > 1e-4 and gaps[1] > 20 * gaps[0], gaps  # measured: ~7.6e-4 in bf16
    assert bf16["sampler/logprob_maxdiff"] >= gaps[1]
    assert capped["reward/mean"] == bf16["reward/mean"]  # the same rollouts ...
    assert capped["loss/policy"] != bf16["loss/policy"]  # ... weighted by min(π_old / π_bf16, 1) per token
