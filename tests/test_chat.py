"""chat_template= for a model without one (a shipped name or a Jinja file) and system_prompt= in sft / dpo /
generate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from align.chat import CHATML, template_text, with_system_prompt
from align.config import load_config
from align.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def no_template_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with its chat template removed (a base model as many are shipped)."""
    out = tmp_path_factory.mktemp("no_template") / "model"
    shutil.copytree(tiny_model, out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def test_template_names_and_files(tmp_path):
    assert template_text("chatml") == CHATML
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert template_text(str(path)) == path.read_text()
    with pytest.raises(ConfigError, match="chatml"):
        template_text("no-such-template")


def test_with_system_prompt_keeps_an_existing_system_message():
    user = [{"role": "user", "content": "Hi"}]
    assert with_system_prompt(user, "Be brief.") == [{"role": "system", "content": "Be brief."}, *user]
    own = [{"role": "system", "content": "Mine."}, *user]
    assert with_system_prompt(own, "Be brief.") == own
    assert with_system_prompt(user, "") == user


def run_sft(model: Path, data: tuple[Path, Path], out: Path, *overrides: str) -> Path:
    from align.stages import sft

    train, valid = data
    return sft.run(load_config(sft.Config, REPO / "stages/tiny/sft.yaml", [
        f"model={model}", f"output_dir={out}", f"data.train={train}", f"data.validation={valid}",
        "train.max_steps=1", "train.progress=false", *overrides]))


def test_sft_without_a_template_names_the_option(no_template_model, toy_sft, tmp_path):
    with pytest.raises(DataError, match="chat_template=chatml"):
        run_sft(no_template_model, toy_sft, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_sft_with_chatml_saves_the_template_with_the_model(no_template_model, toy_sft, tmp_path, one_thread):
    from transformers import AutoTokenizer

    run = run_sft(no_template_model, toy_sft, tmp_path / "run", "chat_template=chatml", "system_prompt=Be brief.")
    tok = AutoTokenizer.from_pretrained(run / "model")
    assert tok.chat_template == CHATML
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_dpo_and_generate_put_the_system_prompt_first(tiny_model, tmp_path, one_thread):
    from align.data.records import PreferenceRecord, read_jsonl
    from align.stages import dpo, generate

    record = PreferenceRecord(prompt=[{"role": "user", "content": "Hi"}], chosen=[{"role": "assistant",
                              "content": "Hello."}], rejected=[{"role": "assistant", "content": "Go away."}])
    row = dpo.preference_dataset([record], "Be brief.")[0]
    assert row["prompt"][0] == {"role": "system", "content": "Be brief."} and row["prompt"][1]["content"] == "Hi"
    cfg = load_config(generate.Config, REPO / "stages/tiny/generate.yaml", [
        f"model={tiny_model}", f"output_dir={tmp_path / 'gen'}", "max_prompts=2", "k=1",
        "sampling.max_new_tokens=2", "system_prompt=Be brief."])
    rows = [obj for _, obj in read_jsonl(generate.run(cfg) / "samples.jsonl")]
    assert len(rows) == 2 and all(r["prompt"][0] == {"role": "system", "content": "Be brief."} for r in rows)
