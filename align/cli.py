"""`align <stage> [CONFIG.yaml] [PATH ...] [key.sub=value ...]`

With no CONFIG, the stage's default recipe `stages/<stage>.yaml` is used. Bare paths (no '=') go to the stage's
`inputs` list where it has one (e.g. `align import export.json`). Errors print as one line, exit code 2.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from pathlib import Path
from typing import Any

from align.stages import STAGES

REPO_ROOT = Path(__file__).resolve().parent.parent


def available_stages() -> dict[str, str]:
    return {name: mod for name, mod in STAGES.items() if importlib.util.find_spec(mod) is not None}


def default_recipe(stage: str) -> Path | None:
    for folder in (Path.cwd() / "stages", REPO_ROOT / "stages"):
        if (folder / f"{stage}.yaml").is_file():
            return folder / f"{stage}.yaml"
    return None


def usage() -> str:
    lines = [__doc__.strip(), "", "stages:"]
    for name, mod in available_stages().items():
        doc = (importlib.import_module(mod).__doc__ or "").strip().splitlines()
        lines.append(f"  {name:<9} {doc[0] if doc else ''}")
    lines.append("\n`align <stage> --help` lists every key with its default and help text; --quiet (warnings only) "
                 "and --verbose (debug, and third-party warnings) set how much align logs.")
    return "\n".join(lines)


def parse_args(stage: str, argv: list[str], config_cls: type) -> Any:
    from align.config import load_config
    from align.errors import ConfigError

    path: Path | None = None
    overrides: list[str] = []
    positional: list[str] = []
    for arg in argv:
        if "=" in arg:
            overrides.append(arg)
        elif arg.endswith((".yaml", ".yml")) and path is None and not positional:
            path = Path(arg)
        else:
            positional.append(arg)
    if path is None:
        path = default_recipe(stage)
    if positional:
        if "inputs" not in {f.name for f in dataclasses.fields(config_cls)}:
            raise ConfigError(f"align {stage}: unexpected argument(s) {' '.join(positional)}; "
                              f"overrides look like key=value")
        overrides.append("inputs=[" + ", ".join(repr(p) for p in positional) + "]")
    return load_config(config_cls, path, overrides)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    stage, rest = argv[0], argv[1:]
    if stage not in available_stages():
        print(f"align: unknown stage {stage!r}; choose one of {', '.join(available_stages())}", file=sys.stderr)
        return 2
    module = importlib.import_module(STAGES[stage])
    if "-h" in rest or "--help" in rest:
        from align.config import describe

        print(f"align {stage} [CONFIG.yaml] [key.sub=value ...]\n\n{(module.__doc__ or '').strip()}\n")
        print(f"default recipe: {default_recipe(stage)}\nkeys:")
        print("\n".join(describe(module.Config)))
        return 0

    from align.errors import AlignError
    from align.log import configure
    from align.models.memory import keep_freed_memory
    from align.runs import disk_full_message, fail_active_runs

    configure(quiet="--quiet" in rest, verbose="--verbose" in rest)
    rest = [a for a in rest if a not in ("--quiet", "--verbose")]
    keep_freed_memory()  # see align/models/memory.py: fewer page faults per step

    try:
        cfg = parse_args(stage, rest, module.Config)
        out = module.run(cfg)
    except AlignError as e:
        fail_active_runs(str(e))
        print(f"align {stage}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        fail_active_runs("interrupted (Ctrl-C)")
        print(f"align {stage}: interrupted; re-run with resume=true to continue", file=sys.stderr)
        return 130
    except BaseException as e:  # a bug: keep the traceback, but never leave a run folder `running`
        full = disk_full_message(e)  # before fail_active_runs: it names the active run folder
        fail_active_runs(full or f"{type(e).__name__}: {e}")
        if full:  # not a bug: the machine's disk is full
            print(f"align {stage}: error: {full}", file=sys.stderr)
            return 2
        raise
    if out is not None:
        print(f"align {stage}: done -> {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from align.processes import die_with_parent, take_threads_when_alone

    die_with_parent()
    take_threads_when_alone()
    sys.exit(main())
