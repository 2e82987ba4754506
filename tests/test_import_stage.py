"""`align import`: run folder files, manifest, split by prompt, failures as one-line errors, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from align.cli import main
from align.config import load_config
from align.data.importers import split_by_prompt
from align.data.records import PreferenceRecord, read_jsonl, read_preferences
from align.errors import AlignError
from align.stages import import_prefs

HUMAN = Path(__file__).resolve().parent.parent / "data" / "human"


def config(tmp_path: Path, *inputs: Path | str, **over) -> import_prefs.Config:
    over.setdefault("max_length", 0)
    return import_prefs.Config(inputs=[str(p) for p in inputs], output_dir=str(tmp_path / "run"), **over)


def test_run_writes_canonical_files_manifest_and_split(tmp_path, capsys):
    from conftest import write_jsonl

    extra = write_jsonl(tmp_path / "extra.jsonl", [
        {"prompt": f"How do I prep {x}?", "chosen": f"Rinse the {x}. Tip: dry it well.", "rejected": "Great question!"}
        for x in ("leeks", "spinach", "fennel")])
    cfg = config(tmp_path, HUMAN / "labelstudio_pairwise.json", extra, validation_fraction=0.3)
    out = import_prefs.run(cfg)
    prefs = read_preferences(out / "preferences.jsonl")
    train, valid = read_preferences(out / "train.jsonl"), read_preferences(out / "valid.jsonl")
    assert len(prefs) == 5 + 3 == len(train) + len(valid) and len(valid) == 2  # round(0.3 * 8 prompts)
    key = lambda r: json.dumps(r.prompt)
    assert not {key(r) for r in train} & {key(r) for r in valid}
    assert all(r.meta["source"] == "human" and "origin" in r.meta and "annotators" in r.meta for r in prefs)
    rejects = [obj for _, obj in read_jsonl(out / "rejects.jsonl")]
    assert len(rejects) == 4 and all({"reason", "detail", "origin", "row"} <= set(r) for r in rejects)
    assert rejects[0]["row"]["id"] == 4 and rejects[0]["reason"] == "no_annotations"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    counts = manifest["counts"]
    assert counts["rows_read"] == 9 + 3 == counts["rows_accepted"] + counts["rows_rejected"]
    assert counts["rejected_by_reason"] == {"no_annotations": 1, "no_majority": 1, "empty_annotation": 1,
                                            "cancelled": 1}
    assert counts["labels_dropped_by_reason"] == {"cancelled": 3, "no_majority": 2, "empty_annotation": 1}
    assert manifest["formats"] == {str(HUMAN / "labelstudio_pairwise.json"): "labelstudio", str(extra): "pairs"}
    assert manifest["lengths"]["chosen_chars"]["max"] >= manifest["lengths"]["chosen_chars"]["mean"] > 0
    assert manifest["agreement"]["units_multi"] == 4 and manifest["agreement"]["raw_agreement"] == 0.5
    assert manifest["metrics"]["pairs"] == 8 and manifest["outputs"]["valid"] == "valid.jsonl"
    printed = capsys.readouterr().out
    assert "rows: read 12, accepted 8, rejected 4" in printed and "Krippendorff's alpha" in printed


def test_labels_of_one_pair_merge_across_files():
    from align.data.importers import ImportSettings, import_files

    result = import_files([HUMAN / "pairs_ab.jsonl", HUMAN / "pairs.jsonl"], ImportSettings())
    by_prompt = {r.prompt[-1]["content"]: r for r in result.records if len(r.prompt) == 1}
    rice = by_prompt["Why did my rice turn out mushy?"]
    assert rice.meta["votes"] == {"chosen": 3, "rejected": 0, "tie": 0} and rice.meta["margin"] == 2.5
    basil = by_prompt["How do I keep basil fresh?"]  # ana: good, ben: tie (pairs_ab) + ben: good (pairs.jsonl)
    assert basil.meta["votes"] == {"chosen": 2, "rejected": 0, "tie": 1}
    dup = next(r for r in result.rows if r.origin.endswith("pairs.jsonl:1"))
    assert dup.rejected[0] == "duplicate"  # ana's egg label is in both files


def test_demo_export_imports(tmp_path):
    """The default recipe's input (the demo Label Studio export, ~360 tasks) imports cleanly."""
    cfg = load_config(import_prefs.Config, Path("stages/import.yaml"),
                      [f"output_dir={tmp_path / 'run'}", "max_length=0"])
    out = import_prefs.run(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["rows_read"] == 360 and counts["pairs"] > 300
    assert counts["rows_rejected"] / counts["rows_read"] < 0.1
    assert manifest["agreement"]["raw_agreement"] > 0.7 and manifest["agreement"]["krippendorff_alpha"] > 0.4


def test_split_is_deterministic_and_by_prompt():
    recs = [PreferenceRecord([{"role": "user", "content": f"q{i % 7}"}], [{"role": "assistant", "content": "a"}],
                             [{"role": "assistant", "content": f"b{i}"}]) for i in range(40)]
    train, valid = split_by_prompt(recs, 0.3, seed=1)
    again = split_by_prompt(recs, 0.3, seed=1)
    assert (train, valid) == again
    assert {r.prompt[0]["content"] for r in train}.isdisjoint({r.prompt[0]["content"] for r in valid})
    assert len({r.prompt[0]["content"] for r in valid}) == 2  # round(0.3 * 7)
    assert split_by_prompt(recs, 0.0, seed=1) == (recs, [])
    assert split_by_prompt(recs[:1], 0.5, seed=1) == (recs[:1], [])  # one prompt: nothing to hold out


def test_too_many_rejects_fails_with_one_line(tmp_path):
    with pytest.raises(AlignError) as err:
        import_prefs.run(config(tmp_path, HUMAN / "pairs_bad.jsonl"))
    message = str(err.value)
    assert "\n" not in message and "rejected 9 of 11 rows" in message and "max_reject_fraction=0.5" in message
    assert (tmp_path / "run" / "rejects.jsonl").is_file()
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["status"] == "failed"
    out = import_prefs.run(config(tmp_path, HUMAN / "pairs_bad.jsonl", max_reject_fraction=0.9, overwrite=True))
    assert len(read_preferences(out / "preferences.jsonl")) == 2


def test_nothing_accepted_fails_with_one_line(tmp_path):
    from conftest import write_jsonl

    path = write_jsonl(tmp_path / "all_bad.jsonl", [{"prompt": "p", "chosen": "", "rejected": "x"},
                                                    {"prompt": "p", "chosen": "same", "rejected": "same"}])
    with pytest.raises(AlignError) as err:
        import_prefs.run(config(tmp_path, path, max_reject_fraction=1.0))
    message = str(err.value)
    assert "\n" not in message and message.startswith("nothing accepted from 2 rows")
    assert "empty_text 1" in message and "same_response 1" in message


def test_cli_bare_paths_and_error_exit(tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["import", str(HUMAN / "shp.jsonl"), str(HUMAN / "hh.jsonl"), f"output_dir={out}", "max_length=0"])
    assert code == 0
    assert len(read_preferences(out / "preferences.jsonl")) == 6
    assert yaml.safe_load((out / "config.yaml").read_text())["inputs"] == [str(HUMAN / "shp.jsonl"),
                                                                          str(HUMAN / "hh.jsonl")]
    code = main(["import", str(HUMAN / "pairs_bad.jsonl"), f"output_dir={tmp_path / 'bad'}", "max_length=0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith("align import: error: rejected 9 of 11")
    code = main(["import", "no/such/file.json", f"output_dir={tmp_path / 'x'}"])
    assert code == 2 and "no/such/file.json: file not found" in capsys.readouterr().err
    code = main(["import", str(HUMAN / "shp.jsonl"), "aggregate=most", f"output_dir={tmp_path / 'y'}"])
    assert code == 2 and "aggregate" in capsys.readouterr().err


def test_token_length_check_with_a_real_tokenizer(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    count = import_prefs.token_counter(str(tiny_model))
    convo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    ids = AutoTokenizer.from_pretrained(tiny_model).apply_chat_template(convo, tokenize=True, return_dict=False)
    assert count(convo[:1], convo[1:]) == len(ids) > 5
    out = import_prefs.run(config(tmp_path, HUMAN / "pairs_bad.jsonl", model=str(tiny_model), max_length=300,
                                  max_reject_fraction=1.0))
    reasons = {r["origin"].rsplit(":", 1)[1]: r["reason"] for _, r in read_jsonl(out / "rejects.jsonl")}
    assert reasons["10"] == "too_long"  # the 600-word answer
    manifest = json.loads((out / "manifest.json").read_text())
    assert 0 < manifest["lengths"]["chosen_tokens"]["max"] <= 300
