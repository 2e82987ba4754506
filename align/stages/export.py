"""export: a self-contained model folder others load with no align installed (merged safetensors or an adapter on a
Hub base, tokenizer with its chat template, generation config, a model card built from the run manifests), or a
GGUF file for llama.cpp / Ollama (format=gguf)."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from align.config import opt
from align.errors import ConfigError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    run: str = opt("runs/dpo", "what to export: a policy run folder (sft, merge, dpo, ppo, grpo, rloo, online), a "
                               "model or adapter folder, or a Hub ID")
    output_dir: str = opt("runs/export", "where the export goes; its model/ folder is the self-contained model")
    overwrite: bool = opt(False, "replace an existing output_dir")
    format: Literal["safetensors", "gguf"] = opt("safetensors", "safetensors (transformers / peft / vLLM) | gguf "
                                                                "(llama.cpp / Ollama; also writes the safetensors)")
    merge: bool = opt(True, "fold adapters into the weights (false: ship the adapter alone; its base must be on "
                            "the Hub, or named with base=)")
    base: str = opt("", "merge=false: the base the adapter names ('' = the Hub ID it was trained from)")
    dtype: Literal["float32", "bfloat16", "float16"] = opt("float32", "dtype of the merged safetensors weights")
    gguf_type: Literal["f32", "f16", "q8_0"] = opt("f16", "format=gguf: tensor type of the 2-D weights")
    name: str = opt("", "the model's name in the card and the GGUF file ('' = the run folder's name)")
    license: str = opt("", "the card's licence ('' = apache-2.0 for the default model, else 'other')")
    evals: list[str] = opt([], "eval run folders whose results go into the card's eval table")

    def __post_init__(self) -> None:
        if self.format == "gguf" and not self.merge:
            raise ConfigError("format=gguf writes full weights: set merge=true (llama.cpp adapters: export the "
                              "adapter with format=safetensors merge=false)")


def portable_base(adapter: Path, given: str) -> tuple[str, str | None]:
    """(base_model_name_or_path, revision) an exported adapter names: `given`, else the Hub ID (and commit) of the
    base it was trained on. A base that is only a local folder is refused: others could not load it."""
    from align.hub import model_source
    from align.models.load import base_of_adapter

    if given:
        return given, None
    recorded = base_of_adapter(adapter)
    source = model_source(recorded)
    if source is None:
        raise ConfigError(f"{adapter} was trained on {recorded}, which is not a Hub model, so the adapter alone "
                          f"cannot be loaded elsewhere: export merged (merge=true) or name its base with "
                          f"base=<Hub ID or path>")
    return source.id, source.commit


def write_adapter(adapter: Path, out: Path, base: str, revision: str | None) -> None:
    """Copy the adapter's weights and config, naming its base portably."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        shutil.copy2(adapter / name, out / name)
    config = json.loads((out / "adapter_config.json").read_text())
    config.update(base_model_name_or_path=base, revision=revision)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))


def write_generation_config(model_config: Any, folder: Path, tokenizer: Any, out: Path) -> None:
    """The base's generation_config.json when it has one, with eos/pad/bos from the tokenizer when unset."""
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(folder)
    except OSError:
        gen = GenerationConfig.from_model_config(model_config)
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if getattr(gen, key, None) is None and getattr(tokenizer, key, None) is not None:
            setattr(gen, key, getattr(tokenizer, key))
    gen.save_pretrained(out)


def source_run(name: str) -> Path | None:
    """The run folder `name` refers to, for the card's lineage."""
    from align.card import run_folder_of

    return run_folder_of(name)


def run(cfg: Config) -> Path:
    from transformers import AutoConfig

    from align.card import Lineage, lineage, model_card
    from align.models.load import base_of_adapter, is_adapter, load_model, load_tokenizer, resolve_model
    from align.runs import start_run

    source = resolve_model(cfg.run)
    adapter = is_adapter(source)
    base_name = portable_base(source, cfg.base) if adapter and not cfg.merge else None
    tokenizer = load_tokenizer(source)
    if not tokenizer.chat_template:
        log.warning("%s has no chat template; the export will have none either (give one with sft's "
                    "chat_template=)", source)
    origin = source_run(cfg.run)
    lin = lineage(origin) if origin else Lineage([], cfg.run)

    run_ = start_run("export", cfg)
    run_.add_input(source)
    out = run_.dir / "model"
    name = cfg.name or (origin.name if origin else Path(cfg.run).name)
    if base_name is not None:
        write_adapter(source, out, *base_name)
        base_dir = base_of_adapter(source)
        model_config = AutoConfig.from_pretrained(base_dir)
    else:
        model = load_model(source, dtype=cfg.dtype, merge=True)
        model.save_pretrained(out, safe_serialization=True)
        base_dir, model_config = (base_of_adapter(source) if adapter else source), model.config
    tokenizer.save_pretrained(out)
    write_generation_config(model_config, base_dir, tokenizer, out)
    card = model_card(lin, name=name, license_=cfg.license, evals=[Path(e) for e in cfg.evals],
                      adapter=base_name is not None)
    (out / "README.md").write_text(card)
    run_.add_output("model", out)
    if cfg.format == "gguf":
        from align.models.to_gguf import export_gguf

        folder = run_.dir / "gguf"
        folder.mkdir()
        gguf = export_gguf(out, folder / f"{name}-{cfg.gguf_type}.gguf", qtype=cfg.gguf_type, name=name)
        (folder / "README.md").write_text(card)
        run_.add_output("gguf", gguf)
        run_.metrics["gguf_bytes"] = gguf.stat().st_size
    run_.extra["export"] = {"base_model_name_or_path": base_name[0] if base_name else None,
                            "stages": [m.stage for m in lin.runs]}
    log.info("exported %s (%s)%s", out, "adapter on " + base_name[0] if base_name else "merged weights",
             f" and {run_.dir / run_.outputs['gguf']}" if cfg.format == "gguf" else "")
    return run_.finish()
