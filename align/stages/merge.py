"""merge: fold a LoRA-family adapter into its base and save a full model folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from align.config import opt
from align.errors import ModelError
from align.models.load import is_adapter, load_model, load_tokenizer, resolve_model
from align.runs import start_run


@dataclass(frozen=True)
class Config:
    adapter: str = opt("runs/sft", "adapter folder, or the run folder of a stage that saved one")
    output_dir: str = opt("runs/merged", "where the merged model goes (its model/ subfolder)")
    overwrite: bool = opt(False, "replace an existing output_dir")
    dtype: Literal["float32", "bfloat16", "float16"] = opt("float32", "dtype to merge and save in")


def run(cfg: Config) -> Path:
    adapter = resolve_model(cfg.adapter)
    if not is_adapter(adapter):
        raise ModelError(f"{adapter} is a full model, not an adapter; there is nothing to merge")
    run_ = start_run("merge", cfg)
    run_.add_input(adapter)
    model = load_model(adapter, dtype=cfg.dtype, merge=True)
    out = run_.dir / "model"
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(adapter).save_pretrained(out)
    run_.add_output("model", out)
    print(f"merged {adapter} into {out}")
    return run_.finish()
