"""YAML recipe -> frozen dataclass, with dotted command-line overrides.

Every stage declares `Config` as a frozen dataclass whose fields are made with `opt(default, help)`; nested
groups are dataclasses too. Unknown keys and wrong types raise ConfigError listing the valid keys.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from align.errors import ConfigError

T = TypeVar("T")
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


Dtype = Literal["auto", "float32", "bfloat16", "float16"]
DTYPE_HELP = "auto (bf16 only where this machine runs it faster) | float32 | bfloat16 | float16"
# One meaning of an empty validation path in every training stage (sft, reward, dpo).
VALIDATION_HELP = ("held-out file or run folder; '' = no file: hold out data.validation_fraction of the training "
                   "data (by prompt, drawn with seed)")
VALIDATION_FRACTION_HELP = "when validation is '': the fraction held out"
ScoreDtype = Literal["saved", "auto", "float32", "bfloat16", "float16"]  # a reward model loaded to score
SCORE_DTYPE_HELP = ("saved (the model folder's dtype: the scores it was trained to give) | auto (bf16 where a "
                    "no-grad forward runs faster here) | float32 | bfloat16 | float16")


def opt(default: Any, help: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
        lt: float | None = None) -> Any:
    """A config field with a default, help text and an optional numeric range (ge/gt/le/lt), checked on load.

    Lists/dicts/dataclasses get a default_factory.
    """
    meta = {"help": help, "range": {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        value = default
        return dataclasses.field(
            default_factory=lambda: dataclasses.replace(value) if dataclasses.is_dataclass(value) else
            type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


_RANGE_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def range_text(bounds: dict[str, float]) -> str:
    """{'ge': 0, 'le': 1} -> '>= 0, <= 1'."""
    return ", ".join(f"{_RANGE_TEXT[k]} {v:g}" for k, v in bounds.items())


def check_range(value: Any, bounds: dict[str, float], where: str) -> None:
    """A number outside `bounds` is a ConfigError naming the key and the range."""
    if not bounds or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    ok = [math.isfinite(value), value >= bounds.get("ge", value), "gt" not in bounds or value > bounds["gt"],
          value <= bounds.get("le", value), "lt" not in bounds or value < bounds["lt"]]
    if not all(ok):
        raise ConfigError(f"{where}={value!r} is out of range; it must be {range_text(bounds)}")


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str, base: Any = None) -> Any:
    """Check `value` against the annotation `tp`, converting only where lossless (int -> float, str -> Path).

    `base` is the default a nested group starts from (the stage's own default for that group), so a partly
    written group keeps the stage's values for the keys it does not name.
    """
    if isinstance(value, Override):
        value = read_override(value, tp, where)
    origin = get_origin(tp)
    if tp is Any:  # free-form data (e.g. a pipeline step's overrides): command-line values inside are read too
        if isinstance(value, dict):
            return {k: _coerce(v, Any, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [_coerce(v, Any, f"{where}[{i}]") for i, v in enumerate(value)]
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where, base if isinstance(base, arg) else None)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} is not {_type_name(tp)}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{where}: {value!r} is not {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {_keys(tp)}, got {value!r}")
        return from_dict(tp, value, where, base=base)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {_coerce(k, key_tp, where): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value):  # YAML 1.1 reads "1e-4" as a string
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{where}: expected a path, got {value!r}")
    raise ConfigError(f"{where}: unsupported config type {tp!r}")


def _keys(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def field_default(f: dataclasses.Field) -> Any:
    """The default a dataclass field declares (calling its default_factory)."""
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config", base: Any = None) -> T:
    """Build dataclass `cls` from a plain dict; unknown keys and wrong types raise ConfigError.

    Keys the dict does not give come from `base` (an instance of `cls`: the defaults the enclosing stage gives
    this group) or, without one, from the field defaults. A nested group given in part starts from the parent's
    default for it, never from the group class's own defaults: a recipe with only `train: {lr: 5e-5}` keeps the
    stage's `train.max_steps`.
    """
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {_keys(cls)}")
    kwargs = {}
    for name, f in fields.items():
        default = getattr(base, name) if base is not None else field_default(f)
        key = f"{where}.{name}" if where != "config" else name
        if name not in data:
            kwargs[name] = default
            continue
        kwargs[name] = _coerce(data[name], hints[name], key, default if dataclasses.is_dataclass(default) else None)
        check_range(kwargs[name], f.metadata.get("range") or {}, key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def to_dict(cfg: Any) -> Any:
    """Dataclass -> plain YAML/JSON-able data (paths become strings)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


class Override(str):
    """A value as typed on the command line (`key=value`), read once its field's type is known."""


def _accepts(tp: Any, kinds: tuple[Any, ...]) -> bool:
    if get_origin(tp) in (typing.Union, types.UnionType):
        return any(_accepts(a, kinds) for a in get_args(tp))
    return tp in kinds


def read_override(raw: Override, tp: Any, where: str) -> Any:
    """A command-line value for a field of type `tp`: text is taken literally, other types are read as YAML.

    A path keeps its `#`, `:` or leading `!` (`output_dir=runs/exp #1`); a quoted value is unquoted
    (`x="a b"`); `null` clears an optional field; numbers, booleans and lists are YAML (`train.lr=1e-4`,
    `seeds=[1,2]`). A `#` YAML would read as a comment in a non-text value is an error, never a silent cut.
    """
    text = str(raw)
    if text == "":
        return ""
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if text[:1] in "\"'":
        return parsed
    if parsed is None and _accepts(tp, (type(None),)):
        return None
    if isinstance(parsed, str) or (_accepts(tp, (str, Path)) and not isinstance(parsed, list)):
        return text
    if re.search(r"(^|\s)#", re.sub(r"\"[^\"]*\"|'[^']*'", "", text)):  # a YAML comment outside quotes
        raise ConfigError(f"{where}={text!r}: '#' would start a YAML comment in this value; remove it or quote the value "
                          f"(e.g. {where}='\"...\"')")
    return parsed


def parse_override(text: str) -> tuple[list[str], Override]:
    """'train.lr=1e-4' -> (['train', 'lr'], Override('1e-4')); the value is read once its type is known."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    return key.split("."), Override(raw)


def _set_dotted(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(keys)}: {k} is not a group of keys")
    node[keys[-1]] = value


def load_config(cls: type[T], path: Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Read the YAML recipe at `path` (if any), apply `key.sub=value` overrides, and build `cls`."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8-sig"))  # a BOM (Windows editors) is not a key
        except yaml.YAMLError as e:  # one line: where, and what PyYAML found (not its multi-line excerpt)
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{where}: not valid YAML ({problem}); fix the recipe at that line") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the recipe must be a mapping of keys, got {type(loaded).__name__}")
        data = loaded or {}
    for text in overrides:
        keys, value = parse_override(text)
        _set_dotted(data, keys, value)
    where = str(path) if path is not None else "config"
    cfg = from_dict(cls, data, where)
    return cfg


def describe(cls: type, prefix: str = "", defaults: Any = None) -> list[str]:
    """One line per key: dotted name, type, default and help (used by `align <stage> --help`).

    Nested groups show the defaults the parent gives them (e.g. PPO's sampling.temperature=1.0), not the
    group class's own.
    """
    lines = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        help_text = f.metadata.get("help", "")
        if defaults is not None:
            default = getattr(defaults, f.name)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{prefix}{f.name}:  {help_text}")
            lines += describe(tp, prefix=f"{prefix}{f.name}.", defaults=default)
            continue
        bounds = f.metadata.get("range") or {}
        rng = f", {range_text(bounds)}" if bounds else ""
        lines.append(f"  {prefix}{f.name} ({_type_name(tp)}{rng}, default {to_dict(default)!r}): {help_text}")
    return lines
