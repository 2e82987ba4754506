"""`align export`: the folder loads unchanged in plain transformers / peft (no align), carries the tokenizer with its
chat template, a generation config and a model card whose YAML the Hub reads; format=gguf reads back with the
`gguf` package and loads in transformers' GGUF reader with the same logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from align.card import DEFAULT_BASE, lineage, model_card
from align.config import load_config
from align.errors import ConfigError
from align.stages import export, sft

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sft_run(tiny_model, tmp_path_factory, one_thread_module) -> Path:
    """A 2-step LoRA SFT run on the tiny model (shared by the tests of this module)."""
    tmp = tmp_path_factory.mktemp("export_sft")
    rows = [{"messages": [{"role": "user", "content": f"Colour {i}?"}, {"role": "assistant", "content": "blue."}]}
            for i in range(12)]
    for name, part in (("train.jsonl", rows[:10]), ("valid.jsonl", rows[10:])):
        (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    cfg = load_config(sft.Config, REPO / "stages/tiny/sft.yaml",
                      [f"model={tiny_model}", f"output_dir={tmp / 'sft'}", f"data.train={tmp / 'train.jsonl'}",
                       f"data.validation={tmp / 'valid.jsonl'}", "train.max_steps=2", "train.progress=false",
                       "train.lr=0.05"])
    return sft.run(cfg)


def run_export(run: Path, out: Path, *overrides: str) -> Path:
    return export.run(load_config(export.Config, REPO / "stages/export.yaml", [f"run={run}", f"output_dir={out}",
                                                                               *overrides]))


def merged_logits(run: Path, ids: list[int]) -> torch.Tensor:
    from align.models.load import load_model, resolve_model

    model = load_model(resolve_model(run), dtype="float32", merge=True).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_merged_export_loads_in_plain_transformers(sft_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = run_export(sft_run, tmp_path / "export") / "model"
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "Colour 3?"}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    assert tok.convert_ids_to_tokens(ids[0]) == "<|im_start|>"  # the chat template travelled
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits, merged_logits(sft_run, ids), atol=1e-5, rtol=1e-5)
    assert GenerationConfig.from_pretrained(out).eos_token_id == tok.eos_token_id


def test_model_card_has_hub_metadata_from_the_manifests(sft_run, tmp_path):
    out = run_export(sft_run, tmp_path / "export", "license=mit", "name=tiny-blue") / "model"
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["license"] == "mit" and meta["library_name"] == "transformers" and "sft" in meta["tags"]
    assert "# tiny-blue" in text and "peft.method=lora" in text and "train.max_steps=2" in text
    assert "eval_loss_after=" in text  # the SFT run's metrics are in the stage table


def test_lineage_follows_run_folders_to_the_base(tmp_path):
    """sft (default model, a Hub dataset) -> dpo (policy = the sft run): two stages, base and datasets in YAML."""
    sft_dir, dpo_dir, eval_dir = tmp_path / "sft", tmp_path / "dpo", tmp_path / "eval"
    manifests = {sft_dir: {"stage": "sft", "status": "completed", "metrics": {"eval_loss_after": 1.5},
                           "config": {"model": "default", "data": {"train": "hf:org/chat-data:en@train"},
                                      "peft": {"method": "lora", "r": 8}}},
                 dpo_dir: {"stage": "dpo", "status": "completed", "metrics": {"heldout_reward_gain": 0.25},
                           "config": {"policy": str(sft_dir), "data": {"train": "data/prefs.jsonl"},
                                      "dpo": {"beta": 0.1}}},
                 eval_dir: {"stage": "eval", "status": "completed", "metrics": {"dpo_win_rate": 0.75}}}
    for folder, manifest in manifests.items():
        folder.mkdir()
        (folder / "manifest.json").write_text(json.dumps(manifest))
    lin = lineage(dpo_dir)
    assert [m.stage for m in lin.runs] == ["sft", "dpo"] and lin.base == "default"
    text = model_card(lin, name="x", evals=[eval_dir])
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == DEFAULT_BASE and meta["datasets"] == ["org/chat-data"]
    assert meta["license"] == "apache-2.0" and meta["tags"] == ["align", "sft", "dpo"]
    assert meta["model-index"][0]["results"][0]["metrics"] == [{"type": "dpo_win_rate", "value": 0.75}]
    assert "dpo.beta=0.1" in text and "`data/prefs.jsonl` (local file)" in text


def test_adapter_export_names_a_hub_base_and_loads_in_plain_peft(tiny_model, tmp_path, monkeypatch, one_thread):
    """SFT from a Hub ID; the exported adapter names that ID (and commit), so AutoPeftModelForCausalLM loads it
    in a fresh process with only the user's HF cache."""
    from test_hub import COMMIT, cache_repo

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache_repo(home, "model", "tiny-org/tiny-llama", tiny_model)
    rows = [{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": "blue."}]}
            for i in range(6)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = sft.run(load_config(sft.Config, REPO / "stages/tiny/sft.yaml", [
        "model=tiny-org/tiny-llama", f"output_dir={tmp_path / 'sft'}", f"data.train={tmp_path / 'train.jsonl'}",
        f"data.validation={tmp_path / 'train.jsonl'}", "train.max_steps=1", "train.progress=false", "train.lr=0.05"]))
    out = run_export(run, tmp_path / "export", "merge=false") / "model"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-org/tiny-llama" and config["revision"] == COMMIT
    meta = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert meta["base_model"] == "tiny-org/tiny-llama" and meta["library_name"] == "peft"
    ids = [1, 2, 3, 4, 5]
    np.save(tmp_path / "expected.npy", merged_logits(run, ids).numpy())
    code = ("import sys, numpy as np, torch; from peft import AutoPeftModelForCausalLM; "
            "m = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1]).eval(); "
            "l = m(input_ids=torch.tensor([[1, 2, 3, 4, 5]])).logits[0].detach().numpy(); "
            "assert 'align' not in sys.modules; "
            "print(float(np.abs(l - np.load(sys.argv[2])).max()))")
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "expected.npy")], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) < 1e-4


def test_adapter_export_of_a_local_base_is_refused(sft_run, tmp_path):
    with pytest.raises(ConfigError, match="merge=true"):
        run_export(sft_run, tmp_path / "export", "merge=false")
    assert not (tmp_path / "export").exists()


def test_gguf_export_reads_back(sft_run, tmp_path):
    """Tensor names and shapes in llama.cpp's layout, the tokenizer and chat template; transformers' GGUF reader
    gives the merged model's logits (f32: exactly, so the Q/K permutation is the one llama.cpp expects)."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    run = run_export(sft_run, tmp_path / "export", "format=gguf", "gguf_type=f32", "name=tiny")
    path = run / "gguf" / "tiny-f32.gguf"
    config = AutoConfig.from_pretrained(run / "model")
    reader = gguf.GGUFReader(path)
    shapes = {t.name: [int(x) for x in t.shape] for t in reader.tensors}
    h, kv = config.hidden_size, config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    assert shapes["token_embd.weight"] == [h, config.vocab_size] and "output.weight" not in shapes  # tied
    for b in range(config.num_hidden_layers):
        assert shapes[f"blk.{b}.attn_q.weight"] == [h, h] and shapes[f"blk.{b}.attn_k.weight"] == [h, kv]
        assert shapes[f"blk.{b}.ffn_gate.weight"] == [h, config.intermediate_size]
    assert len(shapes) == 1 + 1 + 9 * config.num_hidden_layers  # embeddings, final norm, 9 per block
    fields = reader.fields
    tok = AutoTokenizer.from_pretrained(run / "model")
    assert fields["general.architecture"].contents() == "llama"
    assert len(fields["tokenizer.ggml.tokens"].data) == config.vocab_size
    assert fields["tokenizer.chat_template"].contents() == tok.chat_template
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tok.eos_token_id
    # what the tokenizer adds, stated, so no runtime guesses (a guessed BOS would double <|im_start|> in ChatML)
    ids = tok("a")["input_ids"]
    assert fields["tokenizer.ggml.add_bos_token"].contents() is (ids[0] == tok.bos_token_id)
    assert fields["tokenizer.ggml.add_eos_token"].contents() is (ids[-1] == tok.eos_token_id)

    g_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "Colour 3? <|im_end|> blue sky"
    assert g_tok(text)["input_ids"] == tok(text)["input_ids"]
    g_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = tok(text)["input_ids"]
    with torch.no_grad():
        logits = g_model(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits, merged_logits(sft_run, ids), atol=1e-5, rtol=1e-5)


def test_rotary_permutation_matches_llama_cpp_layout():
    """Per head, the two halves of the rotary rows interleave: rows (0, 1, 2, 3) of a 4-row head -> (0, 2, 1, 3)."""
    from align.models.to_gguf import permute_rotary

    w = np.arange(8, dtype=np.float32).reshape(8, 1)  # two heads of 4 rows
    assert permute_rotary(w, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


WALKTHROUGH = [  # README "Bring your own model and data", command by command
    ("sft model=HuggingFaceTB/SmolLM2-360M-Instruct data.train=hf:your-org/chats@train "
     "data.validation=hf:your-org/chats@test output_dir=runs/my-sft"),
    ("dpo policy=runs/my-sft data.train=hf:your-org/prefs@train data.validation=hf:your-org/prefs@test "
     "output_dir=runs/my-dpo"),
    "export run=runs/my-dpo output_dir=runs/my-export",
    "export run=runs/my-dpo output_dir=runs/my-gguf format=gguf gguf_type=q8_0",
]
TINY = {"sft": "dtype=float32 train.max_steps=1 train.batch_size=2 data.max_length=128 train.progress=false",
        "dpo": "dtype=float32 train.max_steps=1 train.batch_size=2 eval.size=0 train.progress=false", "export": ""}


def test_bring_your_own_walkthrough(tiny_model, tmp_path, monkeypatch, one_thread):
    """The README's commands, on a tiny model and tiny datasets cached under the README's names (offline)."""
    from test_hub import cache_repo

    from align.cli import main, parse_args
    from align.stages import serve

    home = tmp_path / "hf_home"
    for name, value in (("HF_HOME", home), ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_CACHE", tmp_path / "ds_cache")):
        monkeypatch.setenv(name, str(value))
    cache_repo(home, "model", "HuggingFaceTB/SmolLM2-360M-Instruct", tiny_model)
    chats = [{"messages": [{"role": "user", "content": f"Store basil {i}?"},
                           {"role": "assistant", "content": "In water, like flowers."}]} for i in range(6)]
    prefs = [{"prompt": f"Store basil {i}?", "chosen": "In water, like flowers.", "rejected": "In the freezer."}
             for i in range(6)]
    for repo, rows in (("chats", chats), ("prefs", prefs)):
        files = tmp_path / repo / "data"
        files.mkdir(parents=True)
        (files / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
        (files / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[4:]))
        cache_repo(home, "dataset", f"your-org/{repo}", files.parent)
    monkeypatch.chdir(tmp_path)
    for command in WALKTHROUGH:
        stage, *args = command.split()
        assert main([stage, *args, *TINY[stage].split()]) == 0, command
    sft_manifest = json.loads(Path("runs/my-sft/manifest.json").read_text())
    assert {s["id"] for s in sft_manifest["hub"].values()} == {"HuggingFaceTB/SmolLM2-360M-Instruct",
                                                               "your-org/chats"}
    card = yaml.safe_load(Path("runs/my-export/model/README.md").read_text().split("---\n")[1])
    assert card["base_model"] == "HuggingFaceTB/SmolLM2-360M-Instruct" and card["tags"] == ["align", "sft", "dpo"]
    assert card["datasets"] == ["your-org/chats", "your-org/prefs"]
    assert len(list(Path("runs/my-gguf/gguf").glob("*-q8_0.gguf"))) == 1
    service = serve.load_service(parse_args("serve", ["model=runs/my-export", "dtype=float32"], serve.Config))
    reply = service.chat({"messages": [{"role": "user", "content": "Store basil?"}], "max_tokens": 3})
    assert reply["choices"][0]["message"]["role"] == "assistant"
