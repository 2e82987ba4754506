"""preferences: concatenate human and AI preference files (or import / judge run folders) into one train/valid pair.

train.jsonl holds every training input's pairs minus those whose prompt is in the validation inputs (so no
held-out prompt is trained on); valid.jsonl holds the validation inputs. The pipeline runs it between judge and
reward; on its own: `align preferences inputs=[runs/import,runs/judge] validation=[runs/import]`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from align.config import opt
from align.data.records import read_preferences, write_jsonl
from align.errors import ConfigError, DataError
from align.runs import resolve_input, start_run

SOURCES = ("import", "judge", "preferences")


@dataclass(frozen=True)
class Config:
    inputs: list[str] = opt([], "preference JSONL files or import/judge run folders (train)")
    validation: list[str] = opt([], "held-out preference files or import run folders")
    output_dir: str = opt("runs/preferences", "where train.jsonl and valid.jsonl go")
    overwrite: bool = opt(False, "replace an existing output_dir")
    seed: int = opt(0, "unused (every stage has one)", ge=0)


def preference_file(path: Path, names: tuple[str, ...]) -> Path:
    """A preference JSONL, or a completed import / judge / preferences run folder's first output among `names`."""
    return resolve_input(path, what="preference data", stages=SOURCES, outputs=names)


def run(cfg: Config) -> Path:
    """Write train.jsonl (every input, minus prompts that are held out) and valid.jsonl (the validation inputs)."""
    if not cfg.inputs:
        raise ConfigError("inputs is empty: give preference files or import / judge run folders")
    valid_paths = [preference_file(Path(src), ("valid", "validation")) for src in cfg.validation]
    train_paths = [preference_file(Path(src), ("train", "preferences")) for src in cfg.inputs]
    valid = [r for path in valid_paths for r in read_preferences(path)]
    held = {json.dumps(r.prompt, sort_keys=True) for r in valid}
    train, dropped, per_input = [], 0, {}
    for src, path in zip(cfg.inputs, train_paths):
        records = read_preferences(path) if path.stat().st_size else []  # a judge may produce no pairs
        kept = [r for r in records if json.dumps(r.prompt, sort_keys=True) not in held]
        dropped += len(records) - len(kept)
        per_input[f"train_from_{Path(src).name}"] = len(kept)
        train += kept
    if not train:
        raise DataError(f"no training preferences in {', '.join(cfg.inputs)} (after leaving out held-out prompts)")

    run_ = start_run("preferences", cfg)
    for path in [*valid_paths, *train_paths]:
        run_.add_input(path)
    write_jsonl(run_.dir / "train.jsonl", [r.to_json() for r in train])
    run_.add_output("train", run_.dir / "train.jsonl")
    if valid:
        write_jsonl(run_.dir / "valid.jsonl", [r.to_json() for r in valid])
        run_.add_output("valid", run_.dir / "valid.jsonl")
    sources = Counter(str(r.meta.get("source", "unknown")) for r in train)
    run_.metrics.update({**per_input, "train_pairs": len(train), "valid_pairs": len(valid),
                         "dropped_held_out_prompt": dropped, **{f"train_source_{k}": v for k, v in sources.items()}})
    print(f"preferences: {len(train)} train pairs ({dict(sources)}), {len(valid)} validation pairs, {dropped} dropped "
          f"(prompt held out)", flush=True)
    return run_.finish()
