"""Build a judge from a spec: a YAML file in judges/ (`name`, `kind`, then that kind's options), a bare spec
name (`house_style` -> judges/house_style.yaml), or a class given directly as `package.module:ClassName`.

`kind` is a built-in (reward_model, llm, openai, rules, ensemble), a `package.module:ClassName`, or a name
registered under the `align.judges` entry-point group. Whatever `kind` names must be a class implementing
the judge protocol (exactly one of `judge` / `score`), checked before anything is constructed: a spec is code
(`kind: subprocess:run` is refused, not called), so run only specs you trust.

A judge class may declare a dataclass `Config` attribute: the spec's options are loaded into it (unknown keys
are errors) and passed to the constructor. Without one, the options are passed as keyword arguments. It may
also define `identity() -> dict`: what determines its verdicts (the judge cache and id are keyed on it), so
that transport settings such as timeouts or concurrency can change without re-judging anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import yaml

from align.config import from_dict, to_dict
from align.errors import ConfigError
from align.judges import Judge, judge_kind
from align.judges.prompted import REPO_JUDGES
from align.plugins import import_object

ENTRY_POINT_GROUP = "align.judges"
BUILTINS: dict[str, str] = {
    "reward_model": "align.judges.reward_model:RewardModelJudge",
    "llm": "align.judges.llm:LLMJudge",
    "openai": "align.judges.openai:OpenAIJudge",
    "rules": "align.judges.rules:RulesJudge",
    "ensemble": "align.judges.ensemble:EnsembleJudge",
}


@dataclass(frozen=True)
class JudgeSpec:
    name: str
    kind: str
    options: dict[str, Any] = field(default_factory=dict)
    source: str = "inline"


@dataclass
class LoadedJudge:
    """A built judge. `config` (kind + resolved options) is what the manifest records; `identity` (kind + what
    determines the verdicts) keys the cache and the id."""

    name: str
    kind: str
    judge: Judge
    mode: Literal["pairwise", "score"]
    config: dict[str, Any]
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """`name@<8 hex>`: changes whenever what determines the judge's verdicts does."""
        digest = hashlib.sha256(json.dumps(self.identity or self.config, sort_keys=True, default=str).encode())
        return f"{self.name}@{digest.hexdigest()[:8]}"


def entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def spec_files() -> list[str]:
    names = {p.stem for folder in (Path("judges"), REPO_JUDGES) if folder.is_dir() for p in folder.glob("*.yaml")}
    return sorted(names)


def read_spec(ref: str | Path) -> JudgeSpec:
    """A spec from a YAML path, a name under judges/, a `module:Class`, a built-in kind or an entry-point name."""
    ref = str(ref)
    path = next((p for p in (Path(ref), Path("judges") / f"{ref}.yaml", REPO_JUDGES / f"{ref}.yaml")
                 if p.suffix in (".yaml", ".yml") and p.is_file()), None)
    if path is None:
        if ":" in ref or ref in BUILTINS or ref in entry_points():
            return JudgeSpec(name=ref.rpartition(":")[2] or ref, kind=ref)
        raise ConfigError(f"judge {ref!r} not found: give a spec file (judges/*.yaml: {', '.join(spec_files())}), "
                          f"a built-in kind ({', '.join(BUILTINS)}), package.module:ClassName, or an "
                          f"'{ENTRY_POINT_GROUP}' entry point ({', '.join(entry_points()) or 'none installed'})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("kind"), str):
        raise ConfigError(f"{path}: a judge spec is a mapping with `kind:` ({', '.join(BUILTINS)}, or "
                          f"package.module:ClassName) and that kind's options")
    options = {k: v for k, v in data.items() if k not in ("name", "kind")}
    return JudgeSpec(name=str(data.get("name") or path.stem), kind=data["kind"], options=options, source=str(path))


def judge_class(kind: str, where: str) -> type:
    """The class `kind` names (built-in, `module:Class` or entry point), checked to be a judge class."""
    if kind in BUILTINS:
        return check_judge_class(import_object(BUILTINS[kind], f"{where}: built-in judge"), kind, where)
    if ":" in kind:
        return check_judge_class(import_object(kind, f"{where}: judge class"), kind, where)
    eps = entry_points()
    if kind in eps:
        try:
            obj = eps[kind].load()
        except Exception as e:  # noqa: BLE001 - a broken plug-in should read as a config problem
            raise ConfigError(f"{where}: entry point {kind!r} ({eps[kind].value}) failed to load: {e}") from None
        return check_judge_class(obj, f"{kind} ({eps[kind].value})", where)
    raise ConfigError(f"{where}: unknown judge kind {kind!r}; use one of {', '.join(BUILTINS)}, "
                      f"package.module:ClassName, or an '{ENTRY_POINT_GROUP}' entry point "
                      f"({', '.join(eps) or 'none installed'})")


def check_judge_class(obj: Any, kind: str, where: str) -> type:
    """`obj` itself when it is a class defining exactly one of judge(prompts, response_pairs) and
    score(prompts, responses); else a ConfigError. Nothing is called: a function such as subprocess:run would
    otherwise run with the spec's options as arguments."""
    if not inspect.isclass(obj):
        what = "function" if callable(obj) else type(obj).__name__
        raise ConfigError(f"{where}: judge kind {kind!r} is a {what}, not a judge class; name a class with "
                          f"judge(prompts, response_pairs) or score(prompts, responses) (a per-sample scoring "
                          f"function goes in a `kind: rules` spec as `function:`)")
    pairwise, score = callable(getattr(obj, "judge", None)), callable(getattr(obj, "score", None))
    if pairwise == score:
        raise ConfigError(f"{where}: judge class {kind!r} must define exactly one of judge(prompts, "
                          f"response_pairs) or score(prompts, responses) ({'both' if pairwise else 'neither'} "
                          f"found)")
    return obj


def build(cls: Any, options: dict[str, Any], where: str) -> tuple[Judge, dict[str, Any]]:
    """Instantiate `cls` from options; returns (judge, resolved options)."""
    config_cls = getattr(cls, "Config", None)
    if config_cls is not None and dataclasses.is_dataclass(config_cls):
        cfg = from_dict(config_cls, options, where)
        return cls(cfg), to_dict(cfg)
    try:
        return cls(**options), dict(options)
    except TypeError as e:
        raise ConfigError(f"{where}: cannot build {getattr(cls, '__name__', cls)} with options "
                          f"{sorted(options)}: {e}") from None


def load_judge(ref: str | Path | JudgeSpec, overrides: dict[str, Any] | None = None) -> LoadedJudge:
    """Read the spec, import the class, load the options into its Config, build it, check its interface."""
    spec = ref if isinstance(ref, JudgeSpec) else read_spec(ref)
    options = {**spec.options, **(overrides or {})}
    cls = judge_class(spec.kind, spec.source)
    judge, resolved = build(cls, options, spec.source)
    try:
        mode = judge_kind(judge)
    except TypeError as e:
        raise ConfigError(f"{spec.source}: {e}") from None
    config: dict[str, Any] = {"kind": spec.kind, **resolved}
    identity_fn = getattr(judge, "identity", None)
    identity: dict[str, Any] = {"kind": spec.kind, **(identity_fn() if callable(identity_fn) else resolved)}
    members = getattr(judge, "members", None)
    if members:  # an ensemble is identified by what its members are, not just their names
        config["member_configs"] = [m.config for m in members]
        identity["member_identities"] = [m.identity for m in members]
    return LoadedJudge(name=spec.name, kind=spec.kind, judge=judge, mode=mode, config=config, identity=identity)
