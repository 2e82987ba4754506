"""label: export the pairs worth a person's time as labeling tasks (Label Studio, Argilla, CSV/JSONL).

Reads samples from `align generate` (or any candidate pairs), picks `budget` tasks by `selection` (random, the
reward model's or the judge's least certain pairs, or where the two disagree), mixes in gold tasks with known
answers, and writes the files the tool imports plus tasks.jsonl: every task's id, exact prompt and responses and
gold answer. `align import EXPORT tasks=<this run>` maps the annotations back and scores annotators on gold.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from align.config import opt
from align.data.labeling import (
    Scorer,
    Task,
    Verdicts,
    argilla_records,
    argilla_settings,
    candidate_tasks,
    gold_count,
    gold_tasks,
    index_verdicts,
    is_ranking,
    labelstudio_config,
    labelstudio_tasks,
    mix_gold,
    plain_rows,
    select_tasks,
    shuffled,
)
from align.data.records import read_jsonl, read_preferences, write_jsonl
from align.errors import ConfigError, DataError
from align.runs import atomic_write_text, resolve_input, start_run

Tool = Literal["labelstudio", "argilla", "csv", "jsonl"]


@dataclass(frozen=True)
class Config:
    inputs: list[str] = opt(["runs/generate"], "samples from `align generate` (its run folder or samples.jsonl), or "
                                               "candidate pairs JSONL ({prompt, response_a, response_b} or "
                                               "{prompt, chosen, rejected}); bare CLI paths land here")
    tool: Tool = opt("labelstudio", "labelstudio (tasks JSON + labeling config XML) | argilla (2.x records + "
                                    "settings JSON) | csv | jsonl (a/b/tie or ranks to fill in)")
    compare: Literal["pairs", "all"] = opt("pairs", "pairs: one task per pair of a prompt's responses (Pairwise); "
                                                    "all: one task ranks all of a prompt's responses (Ranker "
                                                    "when k > 2)")
    selection: Literal["random", "uncertain", "disagree"] = opt(
        "random", "random | uncertain (smallest |reward margin| under reward_model=, else the judge's abstains, "
                  "ties, position flips and small score margins from judge=) | disagree (the judge's winner is "
                  "the reward model's loser; needs both)")
    budget: int = opt(100, "tasks to export, gold included (0: every candidate)", ge=0)
    reward_model: str = opt("", "reward run folder (`align reward`) for selection=uncertain|disagree")
    judge: str = opt("", "judge run folder (`align judge`) or its verdicts.jsonl, for selection=uncertain|disagree")
    gold: str = opt("", "known answers to mix in as gold tasks: an `align import` run folder or a preference JSONL")
    gold_rate: float = opt(0.1, "fraction of the exported tasks that are gold", ge=0, lt=1)
    shuffle: bool = opt(True, "show each task's responses in a seeded random order (gold tasks always are)")
    seed: int = opt(0, "seed of the random selection, tie-breaks, display order and gold draw", ge=0)
    batch_size: int = opt(8, "reward model batch size", ge=1)
    output_dir: str = opt("runs/label", "where the tasks and the manifest go")
    overwrite: bool = opt(False, "replace an existing output_dir")


def _check(cfg: Config) -> None:
    if not cfg.inputs:
        raise ConfigError("inputs is empty: give samples, e.g. align label runs/generate")
    if cfg.selection == "uncertain" and not (cfg.reward_model or cfg.judge):
        raise ConfigError("selection=uncertain needs reward_model=<reward run> (smallest margins) or "
                          "judge=<judge run> (abstains, ties, flips)")
    if cfg.selection == "disagree" and not (cfg.reward_model and cfg.judge):
        raise ConfigError("selection=disagree needs both reward_model=<reward run> and judge=<judge run>")


def read_candidates(cfg: Config) -> tuple[list[Task], int, list[Path]]:
    """(candidate tasks in a seeded display order, rows with fewer than 2 distinct responses, files read)."""
    paths = [resolve_input(p, what="samples", stages=("generate",), outputs=("samples",)) for p in cfg.inputs]
    rows = [(f"{path}:{n}", obj) for path in paths for n, obj in read_jsonl(path)]
    tasks, skipped = candidate_tasks(rows, cfg.compare)
    if not tasks:
        raise DataError(f"no prompt in {', '.join(map(str, paths))} has two different non-empty responses; "
                        f"sample more (align generate k=2 or more)")
    if cfg.shuffle:
        rng = random.Random(cfg.seed)
        tasks = [shuffled(t, rng) for t in tasks]
    return tasks, skipped, paths


def load_scorer(cfg: Config) -> Scorer | None:
    if not cfg.reward_model or cfg.selection == "random":
        return None
    from align.reward_model import RewardModel

    return RewardModel.load(cfg.reward_model, batch_size=cfg.batch_size).score


def load_verdicts(cfg: Config) -> tuple[Verdicts | None, Path | None]:
    if not cfg.judge or cfg.selection == "random":
        return None, None
    path = resolve_input(cfg.judge, what="judge verdicts", stages=("judge",), outputs=("verdicts",))
    return index_verdicts(obj for _, obj in read_jsonl(path) if isinstance(obj, dict)), path


def _csv_text(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v, ensure_ascii=False) if isinstance(v, list) else v for k, v in row.items()})
    return out.getvalue()


def write_export(tool: str, tasks: list[Task], out: Path) -> dict[str, Path]:
    """The files `tool` imports, by output name."""
    dump = lambda obj: json.dumps(obj, indent=1, ensure_ascii=False) + "\n"
    if tool == "labelstudio":
        files = {"export": out / "labelstudio_tasks.json", "config": out / "labelstudio_config.xml"}
        atomic_write_text(files["export"], dump(labelstudio_tasks(tasks)))
        atomic_write_text(files["config"], labelstudio_config(is_ranking(tasks)))
    elif tool == "argilla":
        files = {"export": out / "argilla_records.json", "config": out / "argilla_settings.json"}
        atomic_write_text(files["export"], dump(argilla_records(tasks)))
        atomic_write_text(files["config"], dump(argilla_settings(max(len(t.responses) for t in tasks))))
    elif tool == "csv":
        files = {"export": out / "to_label.csv"}
        atomic_write_text(files["export"], _csv_text(plain_rows(tasks, text_prompt=True)))
    else:
        files = {"export": out / "to_label.jsonl"}
        write_jsonl(files["export"], plain_rows(tasks, text_prompt=False))
    return files


HOW_TO = {
    "labelstudio": "Label Studio: create a project, paste {config} into Settings > Labeling Interface > Code, "
                   "import {export}; when done, export JSON, JSON_MIN, CSV or TSV",
    "argilla": "Argilla 2.x: rg.Dataset(name=..., settings=rg.Settings.from_json('{config}')).create(), then "
               "dataset.records.log(json.load(open('{export}'))); when done, save "
               "dataset.records.to_list(flatten=True) as JSON",
    "csv": "fill in preference (a, b or tie) and annotator in {export} (ranks as [1, 3, 2] when there are more "
           "than two responses)",
    "jsonl": "fill in preference (a, b or tie) and annotator in each row of {export} (ranks: 1 = best when there "
             "are more than two responses)",
}


def run(cfg: Config) -> Path:
    _check(cfg)
    candidates, skipped, paths = read_candidates(cfg)
    gold_records, gold_path = [], None
    if cfg.gold and cfg.gold_rate > 0:
        gold_path = resolve_input(cfg.gold, what="gold preferences", stages=("import",), outputs=("preferences",))
        gold_records = read_preferences(gold_path)
    verdicts, verdicts_path = load_verdicts(cfg)
    run_ = start_run("label", cfg)
    for path in [*paths, gold_path, verdicts_path]:
        if path is not None:
            run_.add_input(path)

    scorer = load_scorer(cfg)
    if scorer is not None:
        run_.add_input(cfg.reward_model)
    # the budget counts gold tasks too: select the rest
    n_select = cfg.budget - round(cfg.budget * cfg.gold_rate) if gold_records and cfg.budget else cfg.budget
    selected = select_tasks(candidates, cfg.selection, n_select, cfg.seed, scorer=scorer, verdicts=verdicts)
    if not selected:
        raise DataError(f"selection={cfg.selection} picked no task from {len(candidates)} candidates (the judge "
                        f"and the reward model agree on every pair); try selection=uncertain")
    gold = gold_tasks(gold_records, gold_count(len(selected), cfg.gold_rate), cfg.seed,
                      exclude={t.task_id for t in selected}, origin=str(gold_path)) if gold_records else []
    tasks = mix_gold(selected, gold, cfg.seed)

    write_jsonl(run_.dir / "tasks.jsonl", [t.to_json() for t in tasks])
    run_.add_output("tasks", run_.dir / "tasks.jsonl")
    files = write_export(cfg.tool, tasks, run_.dir)
    for name, path in files.items():
        run_.add_output(name, path)
    run_.metrics.update({"candidates": len(candidates), "rows_skipped": skipped, "selected": len(selected),
                         "gold": len(gold), "tasks": len(tasks)})
    unit = "rankings" if cfg.compare == "all" else "pairs"
    print(f"candidates: {len(candidates)} {unit} from {', '.join(map(str, paths))}"
          + (f" ({skipped} prompts without two different responses)" if skipped else ""), flush=True)
    print(f"tasks: {len(selected)} by selection={cfg.selection}" + (f" + {len(gold)} gold" if gold else "")
          + f" -> {files['export']}", flush=True)
    print("next: " + HOW_TO[cfg.tool].format(**{k: str(v) for k, v in files.items()}), flush=True)
    print(f"then: align import <the export> tasks={run_.dir}", flush=True)
    return run_.finish()
