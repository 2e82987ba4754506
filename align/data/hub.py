"""Datasets by Hub ID where a data file is accepted: `hf:org/name[:config][@split]` (or `hf:<local folder>` for a
script-free dataset folder), read with `datasets` from a Hub snapshot (downloaded, or from the user's HF cache when
HF_HUB_OFFLINE is set). The rows then go through the same readers as a file's: record checks for sft/dpo/reward,
column mapping and format detection for `align import`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from align.errors import DataError
from align.hub import HubSource, file_hashes, remember, snapshot

PREFIX = "hf:"
_ROWS: dict[str, list[dict[str, Any]]] = {}  # spec -> rows, read once per process


def is_hub_dataset(path: Path | str) -> bool:
    return str(path).startswith(PREFIX)


def parse_spec(spec: str) -> tuple[str, str | None, str]:
    """'hf:org/name:config@split' -> ('org/name', 'config', 'split'); config defaults to None (the dataset's
    default), split to 'train'. ':' and '@' count only after the last '/', so local paths keep theirs."""
    body = spec[len(PREFIX):]
    head, sep, tail = body.rpartition("/")
    split = "train"
    if "@" in tail:
        tail, split = tail.rsplit("@", 1)
    config = None
    if ":" in tail:
        tail, config = tail.split(":", 1)
    repo = f"{head}{sep}{tail}"
    if not repo or not split or config == "":
        raise DataError(f"{spec}: expected hf:org/name[:config][@split], e.g. hf:trl-lib/ultrafeedback_binarized@test")
    return repo, config, split


def datasets_cache() -> Path:
    """Where `datasets` keeps its Arrow files, read from the environment at call time."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home).expanduser() / "datasets"


def dataset_folder(spec: str, repo: str) -> tuple[Path, HubSource | None]:
    """A local folder as it is; a Hub ID -> its snapshot folder and source (commit, revision 'main')."""
    local = Path(repo).expanduser()
    if local.is_dir():
        return local, None
    folder = snapshot(repo, "main", repo_type="dataset", allow=None, what=f"dataset {spec}:", error=DataError)
    return folder, HubSource(repo, "dataset", "main", folder.name)


def hub_rows(spec: str) -> list[dict[str, Any]]:
    """Every row of one split of a dataset, as plain dicts; errors are one DataError line naming the spec."""
    if spec in _ROWS:
        return [dict(r) for r in _ROWS[spec]]
    import datasets

    from align.log import progress_enabled

    if not progress_enabled():  # no "Generating train split" bars in CI logs
        datasets.disable_progress_bars()
    repo, config, split = parse_spec(spec)
    folder, source = dataset_folder(spec, repo)
    try:
        ds = datasets.load_dataset(str(folder), config, split=split, cache_dir=str(datasets_cache()))
    except (ValueError, FileNotFoundError, KeyError) as e:
        detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise DataError(f"{spec}: cannot read config {config or '(default)'} split {split!r} of {folder}: "
                        f"{detail}") from None
    rows = [dict(r) for r in ds]
    if not rows:
        raise DataError(f"{spec}: split {split!r} has no rows")
    files = file_hashes(folder)
    remember(spec, HubSource(source.id if source else str(folder), "dataset", source.revision if source else "",
                             source.commit if source else "", files))
    _ROWS[spec] = rows
    return [dict(r) for r in rows]
