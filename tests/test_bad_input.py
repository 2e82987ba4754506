"""Bad input -> one readable line naming file:line and the fix, exit code 2, no traceback; nothing overwritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_jsonl

from align.cli import main

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def run_cli(capsys, tiny_model, train: Path, out: Path, *extra: str) -> tuple[int, str]:
    rc = main(["sft", "stages/tiny/sft.yaml", f"model={tiny_model}", f"data.train={train}", f"data.validation={train}",
               f"output_dir={out}", "train.progress=false", *extra])
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize("lines, expected", [
    (None, "file not found"),
    ([], "file is empty"),
    (['{"messages": [}'], ":1: not valid JSON"),
    ([json.dumps(GOOD), "not json at all"], ":2: not valid JSON"),
    ([json.dumps({"text": "hi"})], ":1: missing field: give 'messages', or 'prompt' and 'completion'"),
    ([json.dumps({"messages": [{"role": "wizard", "content": "x"}]})], ":1: messages[0] has unknown role 'wizard'"),
    ([json.dumps({"messages": [{"role": "user", "content": 3}]})], ":1: messages[0].content must be a string"),
    ([json.dumps({"messages": [{"role": "user", "content": "only a question"}]})], ":1: no assistant message"),
    ([json.dumps({"prompt": "q", "completion": ""})], ":1: completion is empty"),
    ([json.dumps(GOOD), json.dumps({"messages": [{"role": "user", "content": "word " * 400},
                                                 {"role": "assistant", "content": "ok"}]})],
     ":2: example is"),
])
def test_bad_sft_data_is_one_line_naming_file_and_line(lines, expected, capsys, tiny_model, tmp_path):
    train = tmp_path / "train.jsonl"
    if lines is not None:
        train.write_text("".join(line + "\n" for line in lines))
    rc, err = run_cli(capsys, tiny_model, train, tmp_path / "out")
    assert rc == 2
    assert err.startswith("align sft: error: ") and str(train) in err and expected in err
    assert "\n" not in err and "Traceback" not in err


def test_too_long_names_the_fix(capsys, tiny_model, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": "word " * 400},
                                                             {"role": "assistant", "content": "ok"}]}])
    _, err = run_cli(capsys, tiny_model, train, tmp_path / "out")
    assert "longer than data.max_length=256" in err and "data.on_too_long=drop" in err


def test_existing_output_dir_is_not_overwritten(capsys, tiny_model, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [GOOD] * 8)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    rc, err = run_cli(capsys, tiny_model, train, out)
    assert rc == 2 and "already has files; pass overwrite=true" in err
    assert (out / "precious.txt").read_text() == "keep me"
    # overwrite=true replaces only an align run folder of this stage (or an empty one), never the user's files
    rc, err = run_cli(capsys, tiny_model, train, out, "overwrite=true", "train.max_steps=1")
    assert rc == 2 and "not an align run folder" in err and (out / "precious.txt").read_text() == "keep me"
    (out / "precious.txt").unlink()
    rc, _ = run_cli(capsys, tiny_model, train, out, "train.max_steps=1")
    assert rc == 0 and json.loads((out / "manifest.json").read_text())["status"] == "completed"
    rc, _ = run_cli(capsys, tiny_model, train, out, "overwrite=true", "train.max_steps=1", "seed=1")
    assert rc == 0 and json.loads((out / "manifest.json").read_text())["config"]["seed"] == 1
