"""Keep what holds (issue 25, item 6): regression tests for handled faults that had none elsewhere. YAML tags in a
recipe, output folders reached through a symlink, and template syntax inside the data a judge prompt shows. The
other handled cases are pinned in test_trust, test_resume, test_judge_safety, test_serve, test_report,
test_config, test_pipeline and test_faults (the list is in the issue 25 report)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_trust import cli, prefs  # noqa: F401 - prefs is a fixture

from align.config import load_config
from align.errors import ConfigError
from align.runs import read_manifest


@pytest.mark.parametrize("tagged", [
    "!!python/object/apply:os.system ['touch {marker}']",
    "!!python/name:os.system",
    "!custom {marker}",
])
def test_a_yaml_tag_in_a_recipe_is_an_error_and_nothing_runs(tagged: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from align.stages import sft

    marker = tmp_path / "ran"
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(f"output_dir: {tagged.format(marker=marker)}\n")
    with pytest.raises(ConfigError):
        load_config(sft.Config, recipe)
    rc, err = cli(capsys, "sft", str(recipe))
    assert rc == 2 and err.startswith(f"align sft: error: {recipe}") and "Traceback" not in err
    assert not marker.exists()


def test_a_yaml_error_in_a_recipe_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "sft.yaml"
    recipe.write_text("output_dir: !custom x\n")
    rc, err = cli(capsys, "sft", str(recipe))
    assert rc == 2 and len(err.splitlines()) == 1 and f"{recipe}:1:" in err  # one line naming file and line


def test_a_symlinked_output_folder_is_judged_by_where_it_points(prefs: Path, tmp_path: Path,  # noqa: F811
                                                                capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "notes.txt").write_text("mine")
    os.symlink(work, work / "here")  # a link to the current folder
    os.symlink(prefs.parent, work / "data-link")  # a link to the folder holding the stage's input
    args = ("preferences", "validation=[]", f"inputs=[{prefs}]", "overwrite=true")
    rc, err = cli(capsys, *args, "output_dir=here")
    assert rc == 2 and "current folder" in err
    rc, err = cli(capsys, *args, "output_dir=data-link")
    assert rc == 2 and "contains this stage's input" in err
    assert (work / "notes.txt").read_text() == "mine" and prefs.is_file() and (work / "here").is_symlink()


def test_overwrite_through_a_linked_run_folder_replaces_the_run_where_the_link_points(
        prefs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    args = ("preferences", "validation=[]", f"inputs=[{prefs}]")
    assert cli(capsys, *args, f"output_dir={tmp_path / 'real'}")[0] == 0
    os.symlink(tmp_path / "real", tmp_path / "link")  # e.g. runs/big -> /scratch/big
    first = (tmp_path / "real" / "manifest.json").read_text()
    assert cli(capsys, *args, "overwrite=true", f"output_dir={tmp_path / 'link'}")[0] == 0
    assert (tmp_path / "link").is_symlink() and read_manifest(tmp_path / "real").status == "completed"
    assert (tmp_path / "real" / "manifest.json").read_text() != first  # the new run is where the link points
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith((".align-previous", ".align-lock"))]


def test_template_syntax_in_a_prompt_or_response_is_shown_as_text() -> None:
    from align.judges.prompted import PairPrompt, find_template

    hostile = "{{ ''.__class__.__mro__[1].__subclasses__() }} {% for x in range(3) %}x{% endfor %} {{ 7 * 7 }}"
    messages = PairPrompt(find_template("pairwise.jinja")).render([{"role": "user", "content": hostile}], hostile,
                                                                  "plain")
    text = "\n".join(m["content"] for m in messages)
    assert text.count(hostile) == 2 and "49" not in text and "xxx" not in text
