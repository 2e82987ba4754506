"""Hub IDs: models (`org/name[@revision]`) and datasets (`hf:org/name[:config][@split]`) resolve from a Hub cache
laid out exactly as a user's (HF_HOME/hub/<type>s--org--name/{refs/main, snapshots/<commit>/}) with
HF_HUB_OFFLINE=1, and the run manifest records the commit and the files' hashes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from align.errors import DataError, ModelError
from align.hub import hub_source, parse_model_id

REPO = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(hf_home: Path, repo_type: str, repo_id: str, files_from: Path, commit: str = COMMIT) -> Path:
    """Put `files_from`'s files into HF_HOME's Hub cache as snapshot `commit` of `repo_id`, with refs/main."""
    root = hf_home / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snap = root / "snapshots" / commit
    shutil.copytree(files_from, snap)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snap


@pytest.fixture
def offline_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def test_parse_model_id():
    assert parse_model_id("Qwen/Qwen2.5-0.5B-Instruct") == ("Qwen/Qwen2.5-0.5B-Instruct", "main")
    assert parse_model_id("org/name@v1.0") == ("org/name", "v1.0")
    for not_an_id in ("default", "./org/name", "/abs/path", "runs/sft/model", "a/b/c", "org/na me"):
        assert parse_model_id(not_an_id) is None, not_an_id


def test_model_id_resolves_offline_from_the_hub_cache(tiny_model, offline_home):
    from align.models.load import load_model, load_tokenizer, resolve_model

    snap = cache_repo(offline_home, "model", "tiny-org/tiny-llama", tiny_model)
    folder = resolve_model("tiny-org/tiny-llama")
    assert folder.resolve() == snap.resolve()
    assert resolve_model(f"tiny-org/tiny-llama@{COMMIT}").resolve() == snap.resolve()
    model, tok = load_model(folder, dtype="float32"), load_tokenizer(folder)
    assert model.config.num_hidden_layers == 2 and tok.chat_template
    source = hub_source(folder)
    assert source["id"] == "tiny-org/tiny-llama" and source["commit"] == COMMIT and source["repo_type"] == "model"
    weights = hashlib.sha256((tiny_model / "model.safetensors").read_bytes()).hexdigest()
    assert source["files"]["model.safetensors"] == weights


def test_unknown_model_id_is_one_clear_line(offline_home, toy_sft, tmp_path, capsys):
    from align.cli import main

    train, valid = toy_sft
    code = main(["sft", "model=nobody/no-such-model", f"output_dir={tmp_path / 'run'}", f"data.train={train}",
                 f"data.validation={valid}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "nobody/no-such-model" in err and "HF_HUB_OFFLINE" in err
    assert not (tmp_path / "run").exists()


def test_unknown_revision_and_pickled_only_repo_are_refused(tiny_model, offline_home, tmp_path):
    from align.models.load import resolve_model

    cache_repo(offline_home, "model", "tiny-org/tiny-llama", tiny_model)
    with pytest.raises(ModelError, match="v9"):
        resolve_model("tiny-org/tiny-llama@v9")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_model / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    cache_repo(offline_home, "model", "tiny-org/pickled", pickled)
    with pytest.raises(ModelError, match="safetensors"):
        resolve_model("tiny-org/pickled")


def test_sft_from_hub_ids_records_the_commits(tiny_model, cached_dataset, offline_home, tmp_path, one_thread):
    """Model and data by Hub ID: the manifest names both with their commit, and their inputs' hashes are the
    hashes over the files actually read."""
    from align.config import load_config
    from align.stages import sft

    cache_repo(offline_home, "model", "tiny-org/tiny-llama", tiny_model)
    train, valid = "hf:toy-org/toy-prefs:chat@train", "hf:toy-org/toy-prefs:chat@test"
    cfg = load_config(sft.Config, REPO / "stages/tiny/sft.yaml",
                      ["model=tiny-org/tiny-llama", f"output_dir={tmp_path / 'run'}", f"data.train={train}",
                       f"data.validation={valid}", "train.max_steps=1", "train.progress=false"])
    manifest = json.loads((sft.run(cfg) / "manifest.json").read_text())
    hub = manifest["hub"]
    (model_key,) = [k for k, v in hub.items() if v["repo_type"] == "model"]
    assert hub[model_key]["id"] == "tiny-org/tiny-llama" and hub[model_key]["commit"] == COMMIT
    assert {hub[train]["id"], hub[valid]["id"]} == {"toy-org/toy-prefs"} and hub[train]["commit"] == COMMIT
    for key in (model_key, train, valid):
        assert manifest["inputs"][key] == hub[key]["sha256"]
    assert manifest["metrics"]["train_examples"] == 2 and manifest["metrics"]["validation_examples"] == 2


def test_default_model_needs_no_network_and_align_does_not_force_offline(default_dir):
    """Without HF_HUB_OFFLINE and with the Hub endpoint pointing at a closed port, 'default' still resolves, and
    importing align leaves the user's Hub settings alone."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                            "TRANSFORMERS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    code = ("import os, align; from align.models.load import resolve_model; "
            "assert 'HF_HUB_OFFLINE' not in os.environ and 'HF_DATASETS_OFFLINE' not in os.environ; "
            "print(resolve_model('default'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=REPO, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip().splitlines()[-1]) == default_dir


# ---------------------------------------------------------------- datasets: hf:org/name[:config][@split]

def dataset_files(tmp_path: Path) -> Path:
    """A script-free dataset repo: two configs (README YAML `configs`), each with train/test splits in JSONL."""
    folder = tmp_path / "ds_files"
    rows = {"pairs": [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad {i}."}
                      for i in range(6)],
            "chat": [{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": "Hello."}]}
                     for i in range(4)]}
    for config, items in rows.items():
        for split, part in (("train", items[:-2]), ("test", items[-2:])):
            path = folder / config / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in part))
    (folder / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: pairs\n  default: true\n  data_files:\n  - split: train\n    path: pairs/train.jsonl\n"
        "  - split: test\n    path: pairs/test.jsonl\n"
        "- config_name: chat\n  data_files:\n  - split: train\n    path: chat/train.jsonl\n"
        "  - split: test\n    path: chat/test.jsonl\n---\n# toy\n")
    return folder


@pytest.fixture
def cached_dataset(tmp_path, offline_home, monkeypatch) -> Path:
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    return cache_repo(offline_home, "dataset", "toy-org/toy-prefs", dataset_files(tmp_path))


def test_hub_dataset_reads_config_and_split_offline(cached_dataset):
    from align.data.records import read_preferences, read_sft

    train = read_preferences("hf:toy-org/toy-prefs")
    assert [r.prompt[0]["content"] for r in train] == [f"Question {i}?" for i in range(4)]
    assert len(read_preferences("hf:toy-org/toy-prefs@test")) == 2
    chat = read_sft("hf:toy-org/toy-prefs:chat@train")
    assert len(chat) == 2 and chat[0].messages[-1]["content"] == "Hello."
    source = hub_source("hf:toy-org/toy-prefs:chat@train")
    assert source["commit"] == COMMIT and "chat/train.jsonl" in source["files"]


def test_hub_dataset_goes_through_format_detection(cached_dataset):
    from align.data.importers import ImportSettings, import_files

    result = import_files(["hf:toy-org/toy-prefs@test"], ImportSettings())
    assert result.formats == {"hf:toy-org/toy-prefs@test": "pairs"}
    assert [r.chosen[0]["content"] for r in result.records] == ["Good answer 4.", "Good answer 5."]


def test_local_script_free_dataset_folder(tmp_path, monkeypatch):
    from align.data.records import read_preferences

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    folder = dataset_files(tmp_path)
    assert len(read_preferences(f"hf:{folder}@test")) == 2


def test_unknown_dataset_split_and_id_are_one_line(cached_dataset):
    from align.data.records import read_preferences

    for spec, needle in (("hf:toy-org/toy-prefs@validation", "validation"), ("hf:toy-org/toy-prefs:nope", "nope"),
                         ("hf:nobody/nothing", "nobody/nothing")):
        with pytest.raises(DataError, match=needle) as e:
            read_preferences(spec)
        assert "\n" not in str(e.value)


def test_fingerprints_follow_the_commit_a_hub_id_points_at(tiny_model, cached_dataset, offline_home, tmp_path):
    """A pipeline step that names a Hub model or dataset is fingerprinted by the commit its revision resolves to:
    a new revision (here: refs/main moved in the user's cache) re-runs the step; a pinned commit does not move."""
    from align.runs import fingerprint

    cache_repo(offline_home, "model", "tiny-org/tiny-llama", tiny_model)
    config = {"model": "tiny-org/tiny-llama", "data": {"train": "hf:toy-org/toy-prefs:chat@train"}}
    pinned = {"model": f"tiny-org/tiny-llama@{COMMIT}"}
    before, before_pinned = fingerprint("sft", config), fingerprint("sft", pinned)
    assert fingerprint("sft", config) == before
    newer = "f" * 40
    cache_repo(offline_home, "model", "tiny-org/tiny-llama", tiny_model, commit=newer)
    after_model = fingerprint("sft", config)
    assert after_model != before and fingerprint("sft", pinned) == before_pinned
    cache_repo(offline_home, "dataset", "toy-org/toy-prefs", dataset_files(tmp_path / "v2"), commit=newer)
    assert fingerprint("sft", config) not in (before, after_model)
