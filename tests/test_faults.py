"""Faults real machines have (issue 25): files saved on Windows, a scheduler's SIGTERM, two launches into one run
folder, checkpoints that rot after they were written, and a full disk. Each test injects the fault on a tiny model
(or a toy run) and checks what the run does."""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_resume import ENV, REPO, cli_args, run_cli, trainable_weights
from test_trust import ToyConfig

from align import runs
from align.cli import main
from align.config import load_config
from align.errors import AlignError
from align.runs import read_manifest, start_run


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (hidden ones too), by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- 5. files as Windows and Excel save them

def windows_file(path: Path, lines: list[str]) -> Path:
    """A UTF-8 file with a byte-order mark and CRLF line ends, as Notepad and Excel write them."""
    path.write_bytes(codecs.BOM_UTF8 + "".join(line + "\r\n" for line in lines).encode())
    return path


def test_every_reader_accepts_a_bom_and_crlf(tmp_path: Path) -> None:
    from align.data.formats.files import read_rows
    from align.data.records import read_preferences, read_prompts, read_sft
    from align.stages import sft

    pair = {"prompt": "Which colour?", "chosen": "Blue.", "rejected": "Red."}
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    assert [len(r.messages) for r in read_sft(windows_file(tmp_path / "s.jsonl", [json.dumps(chat)] * 2))] == [2, 2]
    prefs = windows_file(tmp_path / "p.jsonl", [json.dumps(pair)] * 2)
    assert [r.chosen[0]["content"] for r in read_preferences(prefs)] == ["Blue.", "Blue."]
    assert [r.prompt[0]["content"] for r in read_prompts(prefs)] == ["Which colour?"] * 2
    # import: JSONL, JSON, CSV and TSV give the same clean row (no BOM in the first key, no \r in the last value)
    files = [prefs, windows_file(tmp_path / "p.json", ["[", json.dumps(pair), "]"]),
             windows_file(tmp_path / "p.csv", ["prompt,chosen,rejected", "Which colour?,Blue.,Red."]),
             windows_file(tmp_path / "p.tsv", ["prompt\tchosen\trejected", "Which colour?\tBlue.\tRed."])]
    for path in files:
        rows = read_rows(path)
        assert [r.error for r in rows if r.error] == [], path
        assert rows[0].value == pair, path
    # a recipe saved by a Windows editor
    recipe = windows_file(tmp_path / "sft.yaml", ["output_dir: runs/win", "train:", "  max_steps: 3"])
    cfg = load_config(sft.Config, recipe)
    assert (cfg.output_dir, cfg.train.max_steps) == ("runs/win", 3)


# ---------------------------------------------------------------- 3. one owner per run folder

def hold_lock(out: Path) -> subprocess.Popen:
    """Another process that owns `out`'s lock until it is killed."""
    code = (f"import sys, time; from align.runs import take_lock; take_lock({str(out)!r}); print('held', flush=True); "
            f"time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_owner_is_refused_by_name_and_a_dead_owners_lock_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        for resume in (False, True):
            with pytest.raises(AlignError, match=rf"in use by another align run \(pid {holder.pid} on "):
                start_run("toy", ToyConfig(output_dir=str(out)), resume=resume)
        assert not out.exists()  # refused before anything was written
    finally:
        holder.kill()
        holder.wait()
    # the owner is gone: its lock is stale, and the next run takes it over (and releases it when done)
    run = start_run("toy", ToyConfig(output_dir=str(out)))
    assert json.loads(runs.lock_path(out).read_text())["pid"] == os.getpid()
    run.finish()
    assert not runs.lock_path(out).exists()


def test_launches_started_together_get_one_owner(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = (f"import time; from align.runs import take_lock; from align.errors import AlignError\n"
            f"time.sleep(max(0.0, {time.time() + 3.0} - time.time()))\n"
            f"try:\n    take_lock({str(out)!r}); print('owner', flush=True); time.sleep(2)\n"
            f"except AlignError as e:\n    print('refused', flush=True)")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
             for _ in range(6)]
    answers = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert answers == ["owner"] + ["refused"] * 5


def test_only_the_main_process_of_a_multi_process_run_takes_the_lock(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    monkeypatch.setenv("RANK", "1")
    start_run("toy", ToyConfig(output_dir=str(out)))
    assert not runs.lock_path(out).exists()
    monkeypatch.setenv("RANK", "0")
    run = start_run("toy", ToyConfig(output_dir=str(out)))
    assert runs.lock_path(out).is_file()
    run.finish()


# ---------------------------------------------------------------- 2. signals

def test_a_signal_outside_a_step_loop_stops_at_once_and_marks_the_run_interrupted(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    run = start_run("toy", ToyConfig(output_dir=str(tmp_path / "a")))
    try:
        with pytest.raises(runs.Interrupted):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises at the next bytecode
        runs.fail_active_runs("interrupted (Ctrl-C)")  # what the CLI does with any KeyboardInterrupt
    finally:
        runs.restore_signal_handlers()
    manifest = read_manifest(run.dir)
    assert manifest.status == "interrupted" and manifest["interrupted_by"] == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before  # handlers are put back with the last run


def test_in_a_step_loop_the_first_signal_waits_for_the_step_and_a_second_stops_at_once(tmp_path: Path) -> None:
    start_run("toy", ToyConfig(output_dir=str(tmp_path / "a")))
    try:
        runs.at_step_boundaries(True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert runs.stop_requested() == "SIGTERM"  # noted, training goes on to the step boundary
        with pytest.raises(runs.Interrupted):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        with pytest.raises(runs.Interrupted):
            runs.interrupt_active_runs()
    finally:
        runs.restore_signal_handlers()
    assert read_manifest(tmp_path / "a").status == "interrupted"


def test_sigterm_checkpoints_at_a_step_and_resume_equals_an_uninterrupted_run(tiny_model: Path, tmp_path: Path,
                                                                               one_thread: None) -> None:
    args = [*cli_args("sft", tmp_path, tiny_model), "train.save_steps=100"]  # no checkpoint but the signal's
    run_cli("sft", args, tmp_path / "whole")
    out = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "align.cli", "sft", str(REPO / "stages/tiny/sft.yaml"), *args,
                             f"output_dir={out}"], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # the Trainer prints one log line per step (logging_steps=1)
        if "'loss'" in line:
            proc.send_signal(signal.SIGTERM)
            sent = time.time()
            break
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output[-3000:]
    assert time.time() - sent < 30
    manifest = read_manifest(out)
    assert manifest.status == "interrupted" and manifest["interrupted_by"] == "SIGTERM"
    saved = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert len(saved) == 1 and saved[0] != "checkpoint-4"  # stopped early, with a checkpoint of where it was
    assert "resume=true" in output and f"output_dir={out}" in output  # how to continue
    assert not runs.lock_path(out).exists()
    run_cli("sft", [*args, "resume=true"], out)
    assert read_manifest(out).status == "completed"
    a, b = trainable_weights(tmp_path / "whole"), trainable_weights(out)
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name


@pytest.mark.slow
@pytest.mark.faults
def test_sigterm_stops_every_process_of_a_multi_process_run_at_the_same_step(tiny_model: Path,
                                                                            tmp_path: Path) -> None:
    from test_multiprocess import ACCELERATE, free_port

    out = tmp_path / "run"
    args = [*cli_args("sft", tmp_path, tiny_model), "train.save_steps=100", "train.batch_size=2"]
    proc = subprocess.Popen([str(ACCELERATE), "launch", "--config_file", str(REPO / "stages/accelerate/cpu2.yaml"),
                             "--main_process_port", str(free_port()), "--num_processes", "2", "-m", "align.cli",
                             "sft", str(REPO / "stages/tiny/sft.yaml"), *args, f"output_dir={out}"],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "'loss'" in line:
            proc.send_signal(signal.SIGTERM)  # to the launcher, which passes it on to both processes
            break
    output = proc.communicate(timeout=300)[0]
    assert read_manifest(out).status == "interrupted", output[-3000:]
    (saved,) = (out / "checkpoints").glob("checkpoint-*")  # one checkpoint, with both processes' RNG states
    assert saved.name != "checkpoint-4"
    assert sorted(p.name for p in saved.glob("rng_state*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]


# ---------------------------------------------------------------- 4. checkpoints that rot

def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_rotten_checkpoint_is_skipped_for_the_previous_one_or_named(tiny_model: Path, tmp_path: Path,
                                                                      one_thread: None,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    args = cli_args("sft", tmp_path, tiny_model)  # checkpoints at steps 2 and 4
    out = tmp_path / "run"
    run_cli("sft", args, out)
    before = trainable_weights(out)
    truncate(out / "checkpoints/checkpoint-4/adapter_model.safetensors")
    run_cli("sft", [*args, "resume=true"], out)
    err = capsys.readouterr().err
    assert "checkpoint-4/adapter_model.safetensors" in err and "checkpoint-2" in err
    after = trainable_weights(out)  # steps 3-4 again from checkpoint-2: the same weights
    assert all(torch.allclose(before[k], after[k], atol=1e-6, rtol=0) for k in before)
    # the re-saved checkpoint-4 is sound again; when every checkpoint is damaged, resume refuses naming the file
    truncate(out / "checkpoints/checkpoint-4/optimizer.pt")
    truncate(out / "checkpoints/checkpoint-2/optimizer.pt")
    assert main(["sft", str(REPO / "stages/tiny/sft.yaml"), *args, f"output_dir={out}", "resume=true"]) == 2
    err = capsys.readouterr().err
    assert "every checkpoint is damaged" in err and "checkpoint-2/optimizer.pt" in err


def test_a_rotten_ppo_checkpoint_is_skipped_for_the_previous_one(tmp_path: Path) -> None:
    from align.rlhf import checkpoint as ckpt

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight])
    for step in (1, 2):
        weight.grad = torch.ones(3)
        optimizer.step()
        ckpt.save_checkpoint(tmp_path, step, trainable={"w": weight}, optimizer=optimizer, state={}, rank=0, world=1,
                             is_main=True, barrier=lambda: None, save_policy=None, keep=2)
    assert ckpt.latest_checkpoint(tmp_path).name == "step-2"
    truncate(tmp_path / "checkpoints/step-2/trainable.safetensors")
    assert ckpt.latest_checkpoint(tmp_path).name == "step-1"
    (tmp_path / "checkpoints/step-1/state.json").write_text('{"step": 7}')  # same size would not hide it either
    with pytest.raises(AlignError, match=r"step-1/state.json"):
        ckpt.latest_checkpoint(tmp_path)


# ---------------------------------------------------------------- 1. a full disk

@pytest.fixture
def small_disk(tmp_path: Path, request: pytest.FixtureRequest):
    """A small tmpfs (10 MiB unless the test says `@pytest.mark.parametrize("small_disk", [MiB], indirect=True)`):
    room for one 2-step tiny SFT run (~7 MiB with its checkpoint), not for a second one."""
    disk = tmp_path / "disk"
    disk.mkdir()
    size = getattr(request, "param", 10)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}m", "tmpfs", str(disk)], capture_output=True,
                         check=False)
    if res.returncode != 0:
        pytest.skip("mounting a small tmpfs is not allowed here (needs root); the full-disk test did not run")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_is_one_line_and_a_failed_overwrite_puts_the_old_run_back(
        small_disk: Path, tiny_model: Path, tmp_path: Path, one_thread: None, capsys: pytest.CaptureFixture) -> None:
    from align.stages import sft

    out = small_disk / "run"
    args = [*cli_args("sft", tmp_path, tiny_model), "train.max_steps=2", f"output_dir={out}"]
    run_cli("sft", args, out)
    old = tree_digest(out)
    cfg = load_config(sft.Config, REPO / "stages/tiny/sft.yaml", [*args, "overwrite=true"])
    with pytest.raises(BaseException) as caught:  # whatever the writer raised (torch, Rust, OSError)
        sft.run(cfg)
    message = runs.disk_full_message(caught.value)
    assert message is not None and str(out) in message and "MiB free" in message and "\n" not in message
    runs.fail_active_runs(message)  # what the CLI does with it
    assert tree_digest(out) == old  # byte for byte
    assert read_manifest(out).status == "completed"
    assert not runs.lock_path(out).exists()
    # through the CLI: one line naming the path and the free space, exit code 2, no traceback; old run intact
    assert main(["sft", str(REPO / "stages/tiny/sft.yaml"), *args, "overwrite=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("align sft: error: no space left") and str(out) in err and "MiB free" in err
    assert tree_digest(out) == old


@pytest.mark.parametrize("small_disk", [16], indirect=True)
def test_a_disk_that_fills_mid_training_leaves_the_last_checkpoint_to_resume_from(
        small_disk: Path, tiny_model: Path, tmp_path: Path, one_thread: None) -> None:
    from align.stages import sft

    args = cli_args("sft", tmp_path, tiny_model)  # checkpoints at steps 2 and 4
    run_cli("sft", [*args, "train.max_steps=2"], tmp_path / "probe")  # how big one checkpoint is
    size = sum(p.stat().st_size for p in (tmp_path / "probe/checkpoints/checkpoint-2").rglob("*") if p.is_file())
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (16 * 2**20 - int(1.5 * size)))  # room for checkpoint-2, not for checkpoint-4
    out = small_disk / "run"
    with pytest.raises(BaseException) as caught:  # whatever the writer raised
        sft.run(load_config(sft.Config, REPO / "stages/tiny/sft.yaml", [*args, f"output_dir={out}"]))
    assert runs.disk_full_message(caught.value) is not None
    runs.fail_active_runs("disk full")
    filler.unlink()  # the user frees space and resumes
    run_cli("sft", [*args, "resume=true"], out)
    state = json.loads((out / "checkpoints/checkpoint-4/trainer_state.json").read_text())
    assert read_manifest(out).status == "completed" and state["global_step"] == 4
