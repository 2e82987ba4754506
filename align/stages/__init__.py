"""The stages: one module each with a `Config` dataclass and `run(cfg) -> Path`.

STAGES is the registry the CLI and the pipeline use (stage name -> module, imported lazily so `align --help`
is instant).
"""

STAGES: dict[str, str] = {
    "sft": "align.stages.sft",
    "merge": "align.stages.merge",
    "export": "align.stages.export",
    "import": "align.stages.import_prefs",
    "label": "align.stages.label",
    "preferences": "align.stages.preferences",
    "reward": "align.stages.reward",
    "score": "align.stages.score",
    "generate": "align.stages.generate",
    "judge": "align.stages.judge",
    "serve": "align.stages.serve",
    "ppo": "align.stages.ppo",
    "dpo": "align.stages.dpo",
    "grpo": "align.stages.grpo",
    "rloo": "align.stages.rloo",
    "online": "align.stages.online",
    "eval": "align.stages.eval",
    "report": "align.stages.report",
    "pipeline": "align.stages.pipeline",
    "sweep": "align.stages.sweep",
}
