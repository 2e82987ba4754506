"""Hugging Face Hub IDs where a path is accepted: `org/name[@revision]` for models, `hf:org/name[:config][@split]`
for datasets (read in align/data/hub.py).

They resolve through `huggingface_hub` like every HF tool: online when the machine is online, from the local HF
cache (HF_HOME / HF_HUB_CACHE) when the user sets HF_HUB_OFFLINE=1 or the Hub cannot be reached. Every
resolution is remembered here, so the run manifest can record the commit and the files' hashes (`hub_source`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from align.errors import AlignError, ModelError

# org/name, optionally @revision (branch, tag or commit); the Hub's own rules for the two name parts
MODEL_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")
# files a causal LM, its tokenizer and its adapter need; never pickled weights (they can run code when loaded)
MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py"]


@dataclass(frozen=True)
class HubSource:
    """What a Hub ID resolved to: the repo, the revision asked for, the commit it pointed at, the files' hashes."""

    id: str
    repo_type: str  # model | dataset
    revision: str
    commit: str
    files: dict[str, str] = field(default_factory=dict)  # path in the repo -> sha256

    @property
    def sha256(self) -> str:
        """One digest over the files (names and hashes), the run manifest's input hash."""
        h = hashlib.sha256()
        for name, digest in sorted(self.files.items()):
            h.update(f"{name}={digest};".encode())
        return h.hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "sha256": self.sha256}


log = logging.getLogger(__name__)
_RESOLVED: dict[str, HubSource] = {}  # local path (model snapshot) or "hf:..." spec (dataset) -> its source


def hub_cache() -> Path:
    """The Hub cache folder, read from the environment at call time (HF_HUB_CACHE, else HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as the user set it, read at call time."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def parse_model_id(name: str) -> tuple[str, str] | None:
    """'org/name' -> ('org/name', 'main'); 'org/name@rev' -> ('org/name', 'rev'); anything else -> None."""
    m = MODEL_ID.fullmatch(str(name))
    if m is None or name.startswith((".", "/")):
        return None
    return m["repo"], m["revision"] or "main"


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (symlinks into the Hub's blob store followed), by relative path."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts):
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out[p.relative_to(folder).as_posix()] = h.hexdigest()
    return out


def snapshot(repo_id: str, revision: str, *, repo_type: str, allow: list[str] | None, what: str,
             error: type[AlignError]) -> Path:
    """`huggingface_hub.snapshot_download` (online, or the cache when offline / unreachable) -> the snapshot folder;
    every failure is one line naming the ID, the cache it looked in and the fix."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = hub_cache()
    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, cache_dir=cache,
                                      local_files_only=offline(), allow_patterns=allow))
    except GatedRepoError:
        raise error(f"{what} {repo_id!r} is gated on the Hub: accept its licence on huggingface.co and log in "
                    f"(hf auth login), then run again") from None
    except RevisionNotFoundError:
        raise error(f"{what} {repo_id!r} has no revision {revision!r} on the Hub") from None
    except RepositoryNotFoundError:
        raise error(f"{what} {repo_id!r} not found: no such local path, and no such repository on the Hub (or it is "
                    f"private: log in with hf auth login)") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        how = "HF_HUB_OFFLINE is set" if offline() else "the Hub could not be reached"
        raise error(f"{what} {repo_id!r} (revision {revision}) not found: no such local path, {how}, and the Hub cache "
                    f"{cache} has no snapshot of it ({type(e).__name__}); download it on a connected machine "
                    f"(hf download {'--repo-type dataset ' if repo_type == 'dataset' else ''}{repo_id}) or give a "
                    f"local folder") from None


def resolve_hub_model(name: str) -> Path | None:
    """A Hub model ID -> its local snapshot folder (downloaded or from the cache); None when `name` is not an ID."""
    parsed = parse_model_id(name)
    if parsed is None:
        return None
    repo_id, revision = parsed
    folder = snapshot(repo_id, revision, repo_type="model", allow=MODEL_FILES, what="model", error=ModelError)
    if not any(folder.glob("*.safetensors")) and not (folder / "adapter_config.json").is_file() \
            and not any(folder.glob("*.safetensors.index.json")):
        raise ModelError(f"model {name!r} (commit {folder.name}) has no safetensors weights; align loads "
                         f"safetensors only (pickled weights can run code when loaded)")
    if str(folder) not in _RESOLVED:  # a snapshot folder never changes: hash its files once per process
        remember(str(folder), HubSource(repo_id, "model", revision, folder.name, file_hashes(folder)))
    return folder


def current_commit(repo_id: str, revision: str, repo_type: str = "model") -> str | None:
    """The commit `revision` of a Hub repo points at now, without downloading anything: a commit hash is itself;
    online, the Hub says; offline (or unreachable), the cache's refs/<revision>. None when nobody knows."""
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    if not offline():
        from huggingface_hub import HfApi

        try:
            return HfApi().repo_info(repo_id, revision=revision, repo_type=repo_type).sha
        except Exception as e:  # noqa: BLE001 - unknown repo, no network (each client raises its own): ask the cache
            log.debug("%s %s@%s: the Hub did not answer (%s); reading the cache's refs", repo_type, repo_id, revision,
                      type(e).__name__)
    ref = hub_cache() / f"{repo_type}s--{repo_id.replace('/', '--')}" / "refs" / revision
    return ref.read_text().strip() if ref.is_file() else None


def hub_revision(value: str) -> tuple[str, str, str] | None:
    """(repo_type, repo_id, revision) of a model ID (org/name[@revision]) or a Hub dataset spec
    (hf:org/name[:config][@split], revision main) that is not a local path; None for anything else."""
    if Path(value).exists():
        return None
    if value.startswith("hf:"):
        from align.data.hub import parse_spec

        try:
            repo = parse_spec(value)[0]
        except AlignError:
            return None
        return None if Path(repo).expanduser().exists() else ("dataset", repo, "main")
    parsed = parse_model_id(value)
    return ("model", *parsed) if parsed else None


def remember(key: str, source: HubSource) -> None:
    _RESOLVED[key] = source


def hub_source(path: Path | str) -> dict[str, Any] | None:
    """The Hub provenance of a path a stage reads (a model snapshot or an `hf:` dataset spec), for the manifest;
    None for ordinary local files and folders."""
    source = _RESOLVED.get(str(path))
    return source.to_json() if source is not None else None


def model_source(path: Path | str) -> HubSource | None:
    """The Hub source of a model folder resolved from the Hub in this process (or any snapshot folder of the Hub
    cache, recognised by its path), else None: how an exported adapter names its base portably."""
    source = _RESOLVED.get(str(path)) or _RESOLVED.get(str(Path(path).resolve()))
    if source is not None:
        return source
    m = re.search(r"models--([^/]+)--([^/]+)/snapshots/([0-9a-f]{40})$", Path(path).resolve().as_posix())
    return HubSource(f"{m[1]}/{m[2]}", "model", m[3], m[3]) if m else None
