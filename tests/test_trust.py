"""Trust: nothing the user did not create with align is deleted, no code runs from data files, everything is
checked before the run folder exists, and no run folder is left `running` by a clean error."""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from pathlib import Path

import pytest
from conftest import write_jsonl

from align.cli import main
from align.config import opt
from align.data.records import read_preferences, read_prompts
from align.errors import AlignError, DataError, ModelError
from align.runs import fail_active_runs, read_manifest, start_run

REPO = Path(__file__).resolve().parent.parent


def pair(q: str) -> dict:
    return {"prompt": [{"role": "user", "content": q}], "chosen": f"good {q}", "rejected": f"bad {q}"}


@pytest.fixture
def prefs(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "data" / "p.jsonl", [pair("q1"), pair("q2")])


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err.strip()


# ---------------------------------------------------------------- 1. nothing the user has is deleted

def test_overwrite_never_replaces_the_current_folder_an_input_folder_or_another_stages_run(
        tmp_path: Path, prefs: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    rc, err = cli(capsys, "preferences", "validation=[]", f"inputs=[{prefs}]", "output_dir=.", "overwrite=true")
    assert rc == 2 and "current folder" in err and (tmp_path / "notes.txt").read_text() == "mine"
    rc, err = cli(capsys, "preferences", "validation=[]", f"inputs=[{prefs}]", f"output_dir={prefs.parent}", "overwrite=true")
    assert rc == 2 and "contains this stage's input" in err and prefs.is_file()
    # a folder holding another stage's run is never replaced: the error names that stage
    rc, _ = cli(capsys, "preferences", "validation=[]", f"inputs=[{prefs}]", "output_dir=runs/prefs")
    assert rc == 0
    rc, err = cli(capsys, "report", "run_dir=runs/prefs", "output_dir=runs/prefs", "overwrite=true")
    assert rc == 2 and "overwrite=true would delete it" in err  # `align report output_dir=<a run>`
    assert cli(capsys, "preferences", "validation=[]", f"inputs=[{prefs}]", "output_dir=runs/other")[0] == 0
    rc, err = cli(capsys, "report", "run_dir=runs/prefs", "output_dir=runs/other", "overwrite=true")
    assert rc == 2 and "holds a preferences run" in err
    assert read_manifest(tmp_path / "runs/prefs").status == "completed"
    assert read_manifest(tmp_path / "runs/other").status == "completed"
    # ... and a folder of the user's files is not an align run folder
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "x.txt").write_text("x")
    rc, err = cli(capsys, "preferences", "validation=[]", f"inputs=[{prefs}]", "output_dir=mine", "overwrite=true")
    assert rc == 2 and "not an align run folder" in err and (tmp_path / "mine" / "x.txt").is_file()
    # the report goes next to the run by default and replaces only its own previous report
    assert cli(capsys, "report", "run_dir=runs/prefs")[0] == 0
    assert cli(capsys, "report", "run_dir=runs/prefs")[0] == 0
    assert (tmp_path / "runs/prefs-report/report.html").is_file() and (tmp_path / "runs/prefs/train.jsonl").is_file()


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    output_dir: str = opt("runs/toy", "where")
    overwrite: bool = opt(False, "replace")
    fail: bool = opt(False, "raise after the run folder exists")
    seed: int = opt(0, "seed")


def toy_run(cfg: ToyConfig) -> Path:
    run_ = start_run("toy", cfg)
    (run_.dir / "out.txt").write_text("new")
    if cfg.fail:
        raise DataError("something went wrong half way")
    run_.add_output("out", run_.dir / "out.txt")
    return run_.finish()


@pytest.fixture
def toy_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("align_toy_stage")
    module.Config, module.run, module.__doc__ = ToyConfig, toy_run, "toy stage"
    monkeypatch.setitem(sys.modules, "align_toy_stage", module)
    monkeypatch.setitem(__import__("align.stages", fromlist=["STAGES"]).STAGES, "toy", "align_toy_stage")
    monkeypatch.setattr("align.cli.available_stages", lambda: {"toy": "align_toy_stage"})


def test_any_error_after_start_marks_failed_and_a_failed_overwrite_keeps_the_old_run(
        tmp_path: Path, toy_stage: None, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "toy"
    rc, err = cli(capsys, "toy", f"output_dir={out}", "fail=true")
    assert rc == 2 and "something went wrong half way" in err
    manifest = read_manifest(out)
    assert manifest.status == "failed" and "half way" in manifest["error"]  # never left `running`
    rc, _ = cli(capsys, "toy", f"output_dir={out}", "overwrite=true")
    assert rc == 0 and read_manifest(out).status == "completed"
    (out / "out.txt").write_text("old, completed")
    # a re-run that fails half way does not leave the user with neither run: the old one is put back
    rc, _ = cli(capsys, "toy", f"output_dir={out}", "overwrite=true", "fail=true")
    assert rc == 2 and read_manifest(out).status == "completed" and (out / "out.txt").read_text() == "old, completed"
    assert read_manifest(tmp_path / "toy.failed").status == "failed"
    assert not (tmp_path / ".toy.align-previous").exists()


def test_fail_active_runs_only_touches_unfinished_runs(tmp_path: Path) -> None:
    done = start_run("toy", ToyConfig(output_dir=str(tmp_path / "a")))
    done.finish()
    open_ = start_run("toy", ToyConfig(output_dir=str(tmp_path / "b")))
    fail_active_runs("boom")
    assert read_manifest(tmp_path / "a").status == "completed"
    assert read_manifest(tmp_path / "b").status == "failed" and open_.extra["error"] == "boom"


# ---------------------------------------------------------------- 2. no code runs from data files

def test_no_pickle_anywhere_in_align() -> None:
    offenders = []
    for path in (REPO / "align").rglob("*.py"):
        text = path.read_text()
        for needle in ("import pickle", "torch.load(", "torch.save(", "weights_only=False", "cloudpickle", "import dill"):
            if needle in text:
                offenders.append(f"{path.relative_to(REPO)}: {needle}")
    assert offenders == []


def test_pickled_weights_are_refused_with_the_conversion_command(tiny_model: Path, tmp_path: Path) -> None:
    import shutil

    from align.models.load import load_model

    folder = tmp_path / "bin_only"
    shutil.copytree(tiny_model, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="pickled weights.*save_pretrained"):
        load_model(folder)


# ---------------------------------------------------------------- 3. checked before anything runs

@pytest.mark.parametrize("argv", [
    ["sft", "train.batch_size=0"], ["ppo", "ppo.mini_batch_size=0"], ["generate", "sampling.batch_size=0"],
    ["generate", "sampling.max_new_tokens=-1"], ["sft", "data.validation_fraction=1.5"],
    ["reward", "calibration_bins=0"], ["generate", "chunk=-1"], ["dpo", "dpo.beta=0"], ["ppo", "ppo.gamma=1.5"],
    ["sft", "dtype=fp64"], ["sft", "data.on_too_long=truncate"], ["dpo", "dpo.loss_type=dpo"],
    ["sft", "train.lr_scheduler=cosin"], ["grpo", "online.num_generations=3"], ["sft", "train.lr=nan"],
])
def test_bad_numbers_and_choices_fail_before_any_run_folder(argv: list[str], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc, err = cli(capsys, *argv, f"output_dir={out}")
    key = argv[1].split("=")[0].split(".")[-1]
    assert rc == 2 and key in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()


def test_help_shows_choices_and_ranges(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dpo", "--help"]) == 0
    text = capsys.readouterr().out
    assert "dpo.loss_type (one of 'sigmoid', 'hinge'" in text and "dpo.beta (float, > 0" in text
    assert "dtype (one of 'auto', 'float32', 'bfloat16', 'float16'" in text


def test_pipeline_checks_every_steps_config_before_the_first_step(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pipe"
    rc, err = cli(capsys, "pipeline", str(REPO / "stages/tiny/pipeline.yaml"), f"output_dir={out}",
                  "steps.dpo.overrides.dpo.betaa=0.2")
    assert rc == 2 and "steps.dpo" in err and "betaa" in err and not out.exists()
    rc, err = cli(capsys, "pipeline", str(REPO / "stages/tiny/pipeline.yaml"), f"output_dir={out}",
                  "steps.ppo.overrides.ppo.batch_size=0")
    assert rc == 2 and "steps.ppo" in err and "batch_size" in err and not out.exists()


def test_odd_but_valid_json_is_one_clear_line(tmp_path: Path) -> None:
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(DataError, match=r"deep.jsonl:1: JSON nested too deeply"):
        read_prompts(deep)
    lone = tmp_path / "lone.jsonl"
    lone.write_text('{"prompt": "a\\ud800b"}\n')
    with pytest.raises(DataError, match=r"lone.jsonl:1: prompt has an invalid character"):
        read_prompts(lone)
    meta = write_jsonl(tmp_path / "meta.jsonl", [{**pair("q"), "meta": ["not", "an", "object"]}])
    with pytest.raises(DataError, match=r"meta.jsonl:1: meta must be a JSON object"):
        read_preferences(meta)
    margin = write_jsonl(tmp_path / "margin.jsonl", [{**pair("q"), "meta": {"margin": "big"}}])
    with pytest.raises(DataError, match=r"margin.jsonl:1: meta.margin must be a finite number"):
        read_preferences(margin)


def test_a_run_folder_given_as_input_must_be_completed_and_of_the_right_stage(
        tmp_path: Path, prefs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    failed = start_run("import", ToyConfig(output_dir=str(tmp_path / "imp")))
    failed.fail("rows rejected")
    rc, err = cli(capsys, "preferences", "validation=[]", f"inputs=[{tmp_path / 'imp'}]", f"output_dir={tmp_path / 'p'}")
    assert rc == 2 and "status 'failed'" in err and not (tmp_path / "p").exists()
    with pytest.raises(AlignError, match="is a toy run"):
        from align.runs import resolve_input

        toy = start_run("toy", ToyConfig(output_dir=str(tmp_path / "toy")))
        toy.finish()
        resolve_input(tmp_path / "toy", what="preference data", stages=("import",), outputs=("train",))
    assert json.loads((tmp_path / "imp" / "manifest.json").read_text())["status"] == "failed"


def test_a_judge_resume_may_change_how_it_runs_but_not_what_it_decides(tmp_path: Path) -> None:
    from align.stages import judge

    cfg = judge.Config(output_dir=str(tmp_path / "j"), judge_options={"timeout_s": 5})
    start_run("judge", cfg)
    start_run("judge", dataclasses.replace(cfg, judge_options={"timeout_s": 60}, batch_size=4), resume=True)
    with pytest.raises(AlignError, match=r"min_margin \(0.0 -> 0.3\)"):
        start_run("judge", dataclasses.replace(cfg, min_margin=0.3), resume=True)
    fail_active_runs("test over")
