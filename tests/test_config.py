"""Recipes load against their schemas; overrides and errors behave; the CLI prints one line on bad input."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest

from align.cli import STAGES, available_stages, main
from align.config import describe, load_config, parse_override
from align.errors import ConfigError
from align.stages import sft

RECIPES = sorted(Path("stages").glob("*.yaml")) + sorted(Path("stages/tiny").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=str)
def test_every_shipped_recipe_loads_against_its_schema(path):
    stage = path.stem
    assert stage in STAGES, f"{path} names no stage"
    module = importlib.import_module(STAGES[stage])
    cfg = load_config(module.Config, path)
    assert dataclasses.is_dataclass(cfg)


def test_every_stage_module_has_config_and_run():
    for stage, mod in available_stages().items():
        module = importlib.import_module(mod)
        assert dataclasses.is_dataclass(module.Config) and callable(module.run), stage
        assert Path(f"stages/{stage}.yaml").is_file(), f"stage {stage} has no default recipe"


def test_dotted_overrides_and_types():
    cfg = load_config(sft.Config, Path("stages/sft.yaml"),
                      ["train.lr=1e-4", "peft.method=dora", "peft.target_modules=[q_proj,v_proj]", "train.epochs=3"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.peft.method == "dora" and cfg.peft.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.epochs == 3.0
    assert parse_override("a.b=true") == (["a", "b"], True)


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown key(s) lrr; valid keys: epochs, max_steps, lr"),
    ("bogus=1", "unknown key(s) bogus"),
    ("train.batch_size=eight", "train.batch_size: expected an integer, got 'eight'"),
    ("peft.method=lorax", "peft.method: 'lorax' is not one of 'lora'"),
    ("overwrite=yes please", "overwrite: expected true or false"),
    ("train=3", "train: expected a mapping"),
    ("novalue", "must look like key.sub=value"),
])
def test_bad_overrides_name_the_key_and_the_valid_ones(override, message):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(sft.Config, Path("stages/sft.yaml"), [override])
    assert message in str(e.value)


def test_bad_recipe_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(sft.Config, bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(sft.Config, bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(sft.Config, tmp_path / "missing.yaml")


def test_help_describes_every_key_with_default_and_help(capsys):
    lines = describe(sft.Config)
    assert any(line.strip().startswith("train.lr (float, >= 0, default 0.0002): peak learning rate") for line in lines)
    assert main(["sft", "--help"]) == 0
    out = capsys.readouterr().out
    assert "peft.method" in out and "default recipe" in out
    assert main(["--help"]) == 0
    assert "sft" in capsys.readouterr().out


def test_cli_errors_are_one_line_with_exit_code_2(capsys):
    assert main(["sft", "stages/sft.yaml", "train.nope=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("align sft: error:") and "\n" not in err and "Traceback" not in err
    assert main(["nosuchstage"]) == 2


def test_help_shows_the_stage_defaults_of_nested_groups():
    from align.stages import ppo

    lines = describe(ppo.Config)
    assert any(line.strip().startswith("sampling.temperature (float, >= 0, <= 10, default 1.0)") for line in lines)
