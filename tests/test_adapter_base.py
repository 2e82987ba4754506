"""Adapters name their base portably (align/models/load.py `base_reference` / `base_of_adapter`): a Hub model by
its ID and commit, a base an align run wrote by a path relative to the adapter, so a moved runs/ folder still
loads; any other folder by its absolute path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from conftest import write_jsonl
from test_hub import COMMIT, cache_repo

from align.config import load_config
from align.models.load import base_of_adapter, base_reference, load_model

REPO = Path(__file__).resolve().parent.parent


def test_base_reference_names_hub_run_and_other_bases(tiny_model, tmp_path, monkeypatch):
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    snap = cache_repo(home, "model", "tiny-org/tiny-llama", tiny_model)
    adapter = tmp_path / "runs" / "dpo" / "model"
    assert base_reference(adapter, snap) == ("tiny-org/tiny-llama", COMMIT)
    (tmp_path / "runs" / "sft" / "model").mkdir(parents=True)
    (tmp_path / "runs" / "sft" / "manifest.json").write_text("{}")
    assert base_reference(adapter, tmp_path / "runs" / "sft" / "model") == ("../../sft/model", None)
    # a folder no align run wrote (a user's model, the default model's cache) stays where it is
    assert base_reference(adapter, tiny_model) == (str(tiny_model.resolve()), None)


def test_a_hub_base_is_reloaded_at_the_commit_it_was_trained_on(tiny_model, tmp_path, monkeypatch):
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    trained_on = cache_repo(home, "model", "tiny-org/tiny-llama", tiny_model)
    newer = "f" * 40
    cache_repo(home, "model", "tiny-org/tiny-llama", tiny_model, commit=newer)  # main has moved on since
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": "tiny-org/tiny-llama", "revision": COMMIT}))
    assert base_of_adapter(adapter).resolve() == trained_on.resolve()


def test_a_moved_runs_folder_still_loads_its_adapter_chain(tiny_model, toy_sft, tmp_path, one_thread):
    """sft (a LoRA on the tiny model) -> dpo (a LoRA on the sft policy) in runs/; move runs/ elsewhere: the dpo
    policy loads to the same logits and eval finds the same chain."""
    from align.stages import dpo, sft
    from align.stages.eval import adapter_chain

    train, valid = toy_sft
    runs = tmp_path / "project" / "runs"
    sft.run(load_config(sft.Config, REPO / "stages/tiny/sft.yaml", [
        f"model={tiny_model}", f"output_dir={runs / 'sft'}", f"data.train={train}", f"data.validation={valid}",
        "train.max_steps=1", "train.progress=false"]))
    pair = {"prompt": [{"role": "user", "content": "Colour?"}], "chosen": [{"role": "assistant", "content": "blue."}],
            "rejected": [{"role": "assistant", "content": "red."}]}
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [pair] * 4)
    dpo.run(load_config(dpo.Config, REPO / "stages/tiny/dpo.yaml", [
        f"policy={runs / 'sft'}", f"output_dir={runs / 'dpo'}", f"data.train={prefs}", f"data.validation={prefs}",
        "train.max_steps=1", "train.batch_size=2", "train.lr=0.05"]))
    config = json.loads((runs / "dpo" / "model" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "../../sft/model"
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = load_model(runs / "dpo" / "model", dtype="float32", merge=True)(input_ids=ids).logits

    moved = tmp_path / "elsewhere" / "runs"
    moved.parent.mkdir()
    shutil.move(runs, moved)
    with torch.no_grad():
        after = load_model(moved / "dpo" / "model", dtype="float32", merge=True)(input_ids=ids).logits
    assert torch.equal(before, after)
    assert adapter_chain(moved / "dpo" / "model") == [moved / "dpo" / "model", (moved / "sft" / "model").resolve(),
                                                      tiny_model.resolve()]
