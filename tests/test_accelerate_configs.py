"""The shipped accelerate configs (stages/accelerate/*.yaml), read by accelerate's own code.

What runs where (accelerate 1.15, torch CPU build): cpu2.yaml starts real processes on CPU (gloo; every stage
runs under it in test_multiprocess.py); ddp.yaml is the same launch meant for GPUs. FSDP does not run on CPU:
accelerate enables it only on an accelerator device (a CPU run becomes plain DDP), and fsdp.yaml's
sync_module_states makes the FSDP plugin refuse a machine without one.
DeepSpeed is not an align dependency; `accelerate launch` with zero2/zero3.yaml stops at once without it, and
accelerate never uses DeepSpeed for a CPU run. So here the FSDP and DeepSpeed configs are checked as far as
accelerate goes without a GPU: the launcher's arguments, the environment it hands the processes, and the plugin
objects the training processes build from that environment. The `gpu` tests launch them for real.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "stages" / "accelerate"
LAUNCH = ["-m", "align.cli", "sft", "stages/sft.yaml"]
EXPECTED = {  # file -> (distributed_type, num_machines, num_processes)
    "cpu2": ("MULTI_GPU", 1, 2), "ddp": ("MULTI_GPU", 1, 2), "fsdp": ("FSDP", 1, 2),
    "zero2": ("DEEPSPEED", 1, 2), "zero3": ("DEEPSPEED", 1, 2), "multinode": ("MULTI_GPU", 2, 16),
}


def launcher_args(name: str, *extra: str):
    """What `accelerate launch --config_file stages/accelerate/<name>.yaml [extra] -m align.cli ...` decides."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / f"{name}.yaml"), *extra, *LAUNCH])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as launch_command does before calling the DeepSpeed launcher
        args.deepspeed_fields_from_accelerate_config = ",".join(
            [*defaults.deepspeed_config, *(["mixed_precision"] if mp_from_config else [])])
    return args


def launch_env(args) -> dict[str, str]:
    """The environment variables accelerate's launcher adds for the training processes."""
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    env = prepare_deepspeed_cmd_env(args)[1] if args.use_deepspeed else prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if os.environ.get(k) != v}


@pytest.fixture
def launched_env(monkeypatch: pytest.MonkeyPatch):
    """Apply a launch environment for one test; the plugins also write os.environ, so restore all of it."""
    saved = dict(os.environ)
    yield lambda env: [monkeypatch.setenv(k, v) for k, v in env.items()]
    os.environ.clear()
    os.environ.update(saved)


def test_every_config_loads_with_accelerates_loader() -> None:
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    launch_options = {a.dest for a in launch_command_parser()._actions}
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(EXPECTED)  # a new config needs a row here
    for name, (kind, machines, processes) in EXPECTED.items():
        cfg = load_config_from_file(str(CONFIGS / f"{name}.yaml"))  # raises on unknown top-level keys
        assert isinstance(cfg, ClusterConfig)
        assert (cfg.distributed_type.value, cfg.num_machines, cfg.num_processes) == (kind, machines, processes)
        assert cfg.compute_environment.value == "LOCAL_MACHINE" and cfg.use_cpu is False
        # Nested keys are copied onto the launcher's arguments without a check: a misspelt one is ignored.
        nested = [*cfg.deepspeed_config, *(k if k.startswith("fsdp") else f"fsdp_{k}" for k in cfg.fsdp_config)]
        assert set(nested) <= launch_options, f"{name}: {sorted(set(nested) - launch_options)}"
    ports = [load_config_from_file(str(p)).main_process_port for p in CONFIGS.glob("*.yaml")]
    assert len(set(ports)) == len(ports)  # two jobs on one machine do not collide


def test_launcher_turns_each_config_into_the_intended_job() -> None:
    ddp, fsdp, zero3 = launcher_args("ddp"), launcher_args("fsdp"), launcher_args("zero3")
    assert (ddp.multi_gpu, ddp.use_fsdp, ddp.use_deepspeed, ddp.num_processes) == (True, False, False, 2)
    assert (fsdp.use_fsdp, fsdp.multi_gpu, fsdp.mixed_precision) == (True, False, "bf16")
    assert (zero3.use_deepspeed, zero3.zero_stage, zero3.zero3_init_flag) == (True, 3, False)
    assert launcher_args("zero2").zero_stage == 2
    node1 = launcher_args("multinode", "--machine_rank", "1", "--main_process_ip", "10.1.2.3")
    assert (node1.num_machines, node1.num_processes, node1.machine_rank) == (2, 16, 1)
    assert (node1.main_process_ip, node1.main_process_port) == ("10.1.2.3", 29500)  # the command line wins
    assert launcher_args("ddp", "--num_processes", "8").num_processes == 8


def test_fsdp_config_gives_full_shard_with_the_lora_settings(launched_env, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    env = launch_env(launcher_args("fsdp"))
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "1"
    launched_env(env)
    if not torch.cuda.is_available():
        # sync_module_states needs a device to broadcast from: on CPU the plugin refuses (not a silent DDP run).
        with pytest.raises((RuntimeError, ValueError)):  # the refusal itself, not its wording (it changes per release)
            FullyShardedDataParallelPlugin()
        import accelerate.utils.dataclasses as acc_dataclasses

        # Pretend a GPU, the way this accelerate release asks for one (1.15: is_cuda_available; 1.16+: the torch
        # accelerator backend), so the rest of the plugin's settings can be checked on a CPU machine.
        if hasattr(acc_dataclasses, "get_torch_accelerator_backend"):
            monkeypatch.setattr(acc_dataclasses, "get_torch_accelerator_backend", lambda *a, **k: ("cuda", torch.cuda))
        else:
            monkeypatch.setattr(acc_dataclasses, "is_cuda_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert (plugin.use_orig_params, plugin.sync_module_states, plugin.cpu_ram_efficient_loading) == (True,) * 3
    assert plugin.state_dict_type.name == "FULL_STATE_DICT" and plugin.fsdp_version == 1
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    plugin.set_auto_wrap_policy(model)  # from the model's _no_split_modules: one FSDP unit per decoder layer
    assert plugin.auto_wrap_policy.keywords["transformer_layer_cls"] == {LlamaDecoderLayer}


@pytest.mark.parametrize("name, stage", [("zero2", 2), ("zero3", 3)])
def test_deepspeed_configs_build_the_zero_plugin(name: str, stage: int, launched_env) -> None:
    from accelerate.utils import DeepSpeedPlugin

    launched_env(launch_env(launcher_args(name)))
    plugin = DeepSpeedPlugin()
    zero = plugin.deepspeed_config["zero_optimization"]
    assert (plugin.zero_stage, zero["stage"], plugin.zero3_init_flag) == (stage, stage, False)
    # Left to the recipe: DeepSpeed fills these from the stage's batch size / grad_accum / max_grad_norm.
    for key in ("gradient_accumulation_steps", "gradient_clipping", "train_micro_batch_size_per_gpu"):
        assert plugin.deepspeed_config[key] == "auto"
    assert zero.get("stage3_gather_16bit_weights_on_model_save", False) == (stage == 3)


def test_deepspeed_launch_without_deepspeed_says_how_to_install(launched_env) -> None:
    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed")
    from accelerate.commands.launch import launch_command

    with pytest.raises(ImportError) as refused:
        launch_command(launcher_args("zero2"))  # refused before any process starts
    assert "deepspeed" in str(refused.value).lower()  # names what is missing (not a release's exact wording)


def test_slurm_script_starts_one_launcher_per_node_with_its_rank(tmp_path: Path) -> None:
    """stages/accelerate/slurm.sh under stub srun/scontrol: the accelerate command each node would run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\nprintf 'gpu-a\\ngpu-b\\n'\n")
    # srun: run the task once per node, as SLURM would, with that node's SLURM_NODEID.
    (bin_dir / "srun").write_text('#!/bin/bash\nshift\nfor n in 0 1; do SLURM_NODEID=$n "$@"; done\n')
    (bin_dir / "accelerate").write_text('#!/bin/bash\necho "$@"\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-[a-b]",
           "SLURM_NNODES": "2", "ACCELERATE": str(bin_dir / "accelerate"), "GPUS_PER_NODE": "4"}
    out = subprocess.run(["bash", str(CONFIGS / "slurm.sh"), "sft", "stages/sft.yaml", "train.lr=1e-4"], env=env,
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
    common = ("launch --config_file stages/accelerate/multinode.yaml --num_machines 2 --num_processes 8 "
              "--machine_rank {} --main_process_ip gpu-a --main_process_port 29500 "
              "-m align.cli sft stages/sft.yaml train.lr=1e-4")
    assert out == [common.format(0), common.format(1)]


# ---- on GPUs: each config launches a tiny SFT run for real (make test-gpu) ----

@pytest.mark.gpu
@pytest.mark.parametrize("name", ["ddp", "fsdp", "zero2", "zero3"])
def test_tiny_sft_runs_under_each_gpu_config(name: str, tiny_model: Path, toy_sft, tmp_path: Path) -> None:
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    if name.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("needs deepspeed (pip install deepspeed)")
    train, valid = toy_sft
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{name}.yaml"),
           "-m", "align.cli", "sft", "stages/tiny/sft.yaml", f"model={tiny_model}", f"output_dir={tmp_path / 'run'}",
           f"data.train={train}", f"data.validation={valid}", "train.progress=false", "dtype=float32"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "manifest.json").is_file()
