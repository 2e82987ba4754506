"""Recipes load against their schemas; overrides and errors behave; the CLI prints one line on bad input."""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
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
    keys, value = parse_override("a.b=true")
    assert keys == ["a", "b"] and value == "true"  # read once the field's type is known
    assert load_config(sft.Config, None, ["overwrite=true"]).overwrite is True


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


def _walk(cls: type, prefix: str = ""):
    """(dotted name, field, annotation) for every leaf key of a config class."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _walk(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, hints[f.name]


def _is_number(tp) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_is_number(a) for a in typing.get_args(tp))
    return tp in (int, float)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_number_of_every_stage_has_a_range(stage):
    module = importlib.import_module(STAGES[stage])
    unbounded = [name for name, f, tp in _walk(module.Config) if _is_number(tp) and not f.metadata.get("range")]
    assert not unbounded, f"{stage}: numbers without a range: {unbounded}"


GRPO_WITHOUT_TRAIN = "policy: runs/sft\noutput_dir: runs/grpo\n"


@pytest.mark.parametrize("recipe, overrides", [
    ("policy: runs/sft\ntrain: {lr: 5.0e-5}\n", []),          # a partly written group in the recipe
    (GRPO_WITHOUT_TRAIN, ["train.lr=5e-5"]),                      # a dotted override into a group the recipe lacks
    ("train:\n  lr: 5.0e-5\n", []),
])
def test_a_partial_group_keeps_the_stages_defaults(tmp_path, recipe, overrides):
    from align.stages import grpo

    stage_default = grpo.Config().train
    assert stage_default.max_steps == 20  # the stage's own default, not TrainSettings' -1
    path = tmp_path / "grpo.yaml"
    path.write_text(recipe)
    cfg = load_config(grpo.Config, path, overrides)
    assert cfg.train.lr == 5e-5
    assert dataclasses.replace(cfg.train, lr=stage_default.lr) == stage_default


def test_help_and_the_resolved_config_agree_with_what_runs(tmp_path):
    """Every default `--help` prints is the value a recipe that omits the key resolves to."""
    from align.config import to_dict
    from align.stages import grpo, ppo

    for module in (grpo, ppo, sft):
        empty = tmp_path / "empty.yaml"
        groups = [f.name for f in dataclasses.fields(module.Config) if dataclasses.is_dataclass(f.type)
                  or dataclasses.is_dataclass(typing.get_type_hints(module.Config)[f.name])]
        empty.write_text("".join(f"{g}: {{}}\n" for g in groups))  # every group named, none given a key
        resolved = to_dict(load_config(module.Config, empty))
        for line in describe(module.Config):
            if not line.startswith("  "):
                continue
            name = line.strip().split(" (", 1)[0]
            value = resolved
            for part in name.split("."):
                value = value[part]
            assert f", default {value!r}): " in line, f"{module.__name__}: --help says {line!r}, a run uses {value!r}"


@pytest.mark.parametrize("text", ["runs/my runs/exp #1", "runs/a:b", "!runs/bang", "runs/#hash", "C:/x y/z"])
def test_override_values_for_paths_are_taken_literally(text):
    cfg = load_config(sft.Config, Path("stages/sft.yaml"), [f"output_dir={text}"])
    assert str(cfg.output_dir) == text


def test_override_values_are_typed_by_their_field():
    cfg = load_config(sft.Config, Path("stages/sft.yaml"), ["train.lr=1e-4", "train.epochs=2", "data.validation=",
                                                            'output_dir="quoted dir"', "peft.target_modules=[a,b]"])
    assert cfg.train.lr == 1e-4 and cfg.train.epochs == 2.0 and cfg.data.validation == ""
    assert str(cfg.output_dir) == "quoted dir" and cfg.peft.target_modules == ["a", "b"]
    with pytest.raises(ConfigError, match="YAML comment"):  # a number would silently lose what follows '#'
        load_config(sft.Config, Path("stages/sft.yaml"), ["train.epochs=2 #3"])
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(sft.Config, Path("stages/sft.yaml"), ["train.epochs=two"])


def test_a_recipe_saved_by_windows_loads(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_bytes(b"\xef\xbb\xbfmodel: default\r\ntrain:\r\n  lr: 1.0e-4\r\n")
    cfg = load_config(sft.Config, path)
    assert cfg.model == "default" and cfg.train.lr == 1e-4


def test_an_empty_validation_path_means_the_same_in_every_training_stage(tmp_path):
    """'' = no file: hold out validation_fraction of the training data by prompt (dpo: 0 means none)."""
    import json

    from align.stages import dpo, reward

    rows = [{"prompt": [{"role": "user", "content": f"question {i}"}],
             "chosen": [{"role": "assistant", "content": f"good {i}"}],
             "rejected": [{"role": "assistant", "content": f"bad {i}"}]} for i in range(20)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for module in (sft, reward, dpo):
        assert "validation_fraction" in module.DataSettings.__dataclass_fields__
        assert module.DataSettings.__dataclass_fields__["validation"].metadata["help"].startswith("held-out file")
    data = dpo.DataSettings(train=str(train), validation="", validation_fraction=0.25)
    _, val_path, train_ds, val_ds = dpo.preference_splits(data, seed=3)
    assert val_path is None and len(val_ds) == 5 and len(train_ds) == 15
    assert not {json.dumps(r) for r in train_ds["prompt"]} & {json.dumps(r) for r in val_ds["prompt"]}
    *_, none = dpo.preference_splits(dpo.DataSettings(train=str(train), validation="", validation_fraction=0), 3)
    assert none is None
