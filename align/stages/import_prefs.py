"""Import human preference labels (Label Studio, Argilla, pairs, scores, rankings, HH, SHP) into one canonical file.

Writes preferences.jsonl (every accepted pair), train.jsonl / valid.jsonl (split by prompt), rejects.jsonl
(every rejected row with its reason and origin) and a manifest with counts, lengths and annotator agreement.
With tasks= (the `align label` run the labels answer), labels map back to each task's exact prompt and responses
and gold tasks report each annotator's accuracy (min_gold_accuracy= drops the annotators below it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from align.config import opt
from align.data.importers import (
    ImportResult,
    ImportSettings,
    Measure,
    import_files,
    length_stats,
    split_by_prompt,
)
from align.data.labeling import Task, task_from_json
from align.data.records import Message, read_jsonl, write_jsonl
from align.data.validate import json_safe
from align.errors import ConfigError, DataError
from align.runs import Run, resolve_input, start_run

FormatName = Literal["auto", "pairs", "pairs_ab", "scores", "rankings", "labelstudio", "argilla", "hh", "shp"]


@dataclass(frozen=True)
class Config:
    inputs: list[str] = opt(["data/human/demo_labelstudio.json"],
                            "annotation files: .jsonl .json .csv .tsv .parquet (bare CLI paths land here)")
    format: FormatName = opt("auto", "auto (detect per file) | pairs | pairs_ab | scores | rankings | labelstudio | "
                                     "argilla | hh | shp")
    columns: dict[str, str] = opt({}, "canonical field -> your file's field, e.g. {prompt: question, "
                                      "response_a: answer_left}; preference names a Label Studio control / "
                                      "Argilla question")
    pairs: Literal["best_vs_worst", "best_vs_rest", "all"] = opt(
        "best_vs_worst", "how scored/ranked responses become pairs")
    min_margin: float = opt(0.0, "scores/ratings: drop pairs whose score difference is below this (ties always)", ge=0.0)
    aggregate: Literal["majority", "unanimous", "all"] = opt(
        "majority", "several annotators on one pair: strict plurality | all agree | keep every label")
    model: str = opt("default", "model whose tokenizer measures lengths ('default', a folder, or a run folder)")
    max_length: int = opt(1024, "reject pairs whose prompt + response exceeds this many tokens (0: no token check)",
                          ge=0)
    max_reject_fraction: float = opt(0.5, "fail when more than this fraction of rows is rejected", ge=0.0, le=1.0)
    tasks: str = opt("", "the `align label` run (or its tasks.jsonl) these labels answer: each label maps back to "
                         "its task's exact prompt and responses, and gold tasks score the annotators")
    min_gold_accuracy: float = opt(0.0, "drop every label of an annotator whose accuracy on gold tasks is below "
                                        "this (needs tasks=; annotators without gold labels are kept)", ge=0, le=1)
    validation_fraction: float = opt(0.1, "fraction of prompts held out in valid.jsonl (0: no validation file)",
                                      ge=0.0, lt=1.0)
    seed: int = opt(42, "seed of the train/validation split", ge=0)
    output_dir: str = opt("runs/import", "where the run goes")
    overwrite: bool = opt(False, "replace an existing output_dir")


def token_counter(model: str) -> Measure:
    """(prompt, response) -> number of tokens of the chat-templated conversation, with `model`'s tokenizer."""
    from jinja2 import TemplateError

    from align.models.load import chat_ids, load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(model))

    def count(prompt: list[Message], response: list[Message]) -> int:
        messages = prompt + response
        if tokenizer.chat_template:
            try:
                return len(chat_ids(tokenizer, messages))
            except (TemplateError, ValueError, TypeError):
                pass  # a template that rejects this role sequence: fall back to the plain text
        return len(tokenizer("\n".join(m["content"] for m in messages))["input_ids"])

    return count


def _check(cfg: Config) -> None:
    if not cfg.inputs:
        raise ConfigError("inputs is empty: give annotation files, e.g. align import data/human/pairs.jsonl")
    if not 0.0 <= cfg.max_reject_fraction <= 1.0 or not 0.0 <= cfg.validation_fraction < 1.0:
        raise ConfigError("max_reject_fraction must be in [0, 1] and validation_fraction in [0, 1)")
    if cfg.max_length < 0:
        raise ConfigError("max_length must be >= 0 (0 skips the token check)")
    for path in cfg.inputs:
        if not str(path).startswith("hf:") and not Path(path).is_file():  # hf: datasets: align/data/hub.py
            raise DataError(f"{path}: file not found; check the path (relative paths start at the repo root)")
    if cfg.min_gold_accuracy > 0 and not cfg.tasks:
        raise ConfigError("min_gold_accuracy needs tasks=<the align label run> to know the gold answers")


def read_tasks(path: Path) -> dict[str, Task]:
    """tasks.jsonl of `align label`, by task id."""
    return {t.task_id: t for t in (task_from_json(obj, f"{path}:{n}") for n, obj in read_jsonl(path))}


def gold_line(result: ImportResult, min_accuracy: float) -> str:
    """One line: each annotator's accuracy on gold tasks, and who was dropped."""
    gold = result.gold
    parts = [f"{who or '(unknown)'} {r['accuracy']:.3f} ({r['correct']}/{r['gold_labels']})" for who, r in gold.items()]
    dropped = [who or "(unknown)" for who, r in gold.items() if r["dropped"]]
    return (f"gold: {sum(r['gold_labels'] for r in gold.values())} labels by {len(gold)} annotators: "
            + ", ".join(parts) + (f"; dropped below min_gold_accuracy={min_accuracy}: {', '.join(dropped)}"
                                  if dropped else ""))


def summary(result: ImportResult, n_train: int, n_valid: int, min_gold_accuracy: float = 0.0) -> str:
    """The few lines printed at the end of an import."""
    rejected = result.rejected_by_reason()
    reasons = ", ".join(f"{k} {n}" for k, n in rejected.most_common()) or "none"
    agreement = result.agreement()
    lines = [f"formats: {', '.join(f'{p} ({f})' for p, f in result.formats.items())}",
             (f"rows: read {len(result.rows)}, accepted {result.accepted}, rejected {sum(rejected.values())} "
              f"({reasons})"),
             f"labels: used {result.labels['used']}, dropped " + (", ".join(
                 f"{k} {n}" for k, n in result.labels.most_common() if k != "used") or "none"),
             f"pairs: {len(result.records)} -> train {n_train}, valid {n_valid}"]
    if agreement["units_multi"]:
        fmt = lambda x: "n/a" if x is None else f"{x:.3f}"
        lines.append(f"agreement over {agreement['units_multi']} pairs with 2+ labels "
                     f"({agreement['annotators']} annotators): raw {fmt(agreement['raw_agreement'])}, "
                     f"Krippendorff's alpha {fmt(agreement['krippendorff_alpha'])}"
                     + (f", Cohen's kappa {fmt(agreement['cohen_kappa'])}" if agreement["cohen_kappa"] is not None
                        else "")
                     + f"; ties dropped {agreement['ties_dropped']}, disagreements dropped "
                       f"{agreement['disagreements_dropped']}")
    if result.gold:
        lines.append(gold_line(result, min_gold_accuracy))
    return "\n".join(lines)


def _record_manifest(run_: Run, result: ImportResult, n_train: int, n_valid: int) -> None:
    rejected = result.rejected_by_reason()
    agreement = result.agreement()
    run_.extra["formats"] = result.formats
    run_.extra["counts"] = {
        "rows_read": len(result.rows), "rows_accepted": result.accepted, "rows_rejected": sum(rejected.values()),
        "rejected_by_reason": dict(rejected.most_common()),
        "labels_used": result.labels["used"],
        "labels_dropped_by_reason": {k: n for k, n in result.labels.most_common() if k != "used"},
        "pairs": len(result.records), "train": n_train, "valid": n_valid}
    run_.extra["lengths"] = length_stats(result.lengths)
    run_.extra["agreement"] = agreement
    if result.gold:
        run_.extra["gold"] = result.gold
        run_.metrics["gold_labels"] = sum(r["gold_labels"] for r in result.gold.values())
        run_.metrics["annotators_dropped"] = sum(r["dropped"] for r in result.gold.values())
    run_.metrics.update({"rows_read": len(result.rows), "rows_accepted": result.accepted,
                         "rows_rejected": sum(rejected.values()), "pairs": len(result.records),
                         "train_pairs": n_train, "valid_pairs": n_valid,
                         "reject_fraction": sum(rejected.values()) / max(1, len(result.rows))})
    for name in ("raw_agreement", "krippendorff_alpha", "cohen_kappa"):
        if agreement[name] is not None:
            run_.metrics[name] = agreement[name]


def run(cfg: Config) -> Path:
    _check(cfg)
    tasks_path = resolve_input(cfg.tasks, what="labeling tasks", stages=("label",),
                               outputs=("tasks",)) if cfg.tasks else None
    settings = ImportSettings(format=cfg.format, columns=dict(cfg.columns), pairs=cfg.pairs,
                              min_margin=cfg.min_margin, aggregate=cfg.aggregate, max_length=cfg.max_length,
                              tasks=read_tasks(tasks_path) if tasks_path else {},
                              min_gold_accuracy=cfg.min_gold_accuracy)
    settings.check()
    measure = token_counter(cfg.model) if cfg.max_length > 0 else None
    result = import_files(cfg.inputs, settings, measure)

    run_ = start_run("import", cfg)
    for path in cfg.inputs:
        run_.add_input(path)
    if tasks_path is not None:
        run_.add_input(tasks_path)
    rows: list[dict[str, Any]] = [json_safe(r.to_json()) for r in result.records]
    write_jsonl(run_.dir / "rejects.jsonl", result.rejects())
    run_.add_output("rejects", run_.dir / "rejects.jsonl")
    train, valid = split_by_prompt(result.records, cfg.validation_fraction, cfg.seed)
    _record_manifest(run_, result, len(train), len(valid))
    print(summary(result, len(train), len(valid), cfg.min_gold_accuracy), flush=True)

    n_rejected = len(result.rows) - result.accepted
    where = run_.dir / "rejects.jsonl"
    if not result.records:
        run_.write_manifest("failed")
        reasons = ", ".join(f"{k} {n}" for k, n in result.rejected_by_reason().most_common()) or "none"
        raise DataError(f"nothing accepted from {len(result.rows)} rows (rejected: {reasons}); see {where}; "
                        f"check format= and columns.* or fix the file")
    if n_rejected > cfg.max_reject_fraction * len(result.rows):
        run_.write_manifest("failed")
        top = ", ".join(f"{k} {n}" for k, n in result.rejected_by_reason().most_common(3))
        raise DataError(f"rejected {n_rejected} of {len(result.rows)} rows ({n_rejected / len(result.rows):.0%}) > "
                        f"max_reject_fraction={cfg.max_reject_fraction} (top reasons: {top}); see {where}; "
                        f"fix the file or raise max_reject_fraction")

    write_jsonl(run_.dir / "preferences.jsonl", rows)
    run_.add_output("preferences", run_.dir / "preferences.jsonl")
    write_jsonl(run_.dir / "train.jsonl", [json_safe(r.to_json()) for r in train])
    run_.add_output("train", run_.dir / "train.jsonl")
    if valid:
        write_jsonl(run_.dir / "valid.jsonl", [json_safe(r.to_json()) for r in valid])
        run_.add_output("valid", run_.dir / "valid.jsonl")
    return run_.finish()
