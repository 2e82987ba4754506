"""Run folders: the resolved config, a manifest (inputs' hashes, versions, metrics), atomic writes.

Stages hand off through files only: a later stage finds an earlier one's artifacts through its manifest.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from align.config import to_dict
from align.errors import AlignError

PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "align")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same folder and rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def sha256_path(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names and bytes, sorted), skipping checkpoints and logs."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(("checkpoint-", "tb", ".")) for part in p.relative_to(path).parts))
    for p in files:
        if path.is_dir():
            h.update(str(p.relative_to(path)).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_sha() -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], check=False, capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return res.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


@dataclasses.dataclass
class Run:
    """One stage run in `dir`. Create with `start_run`; call `finish` when every output is written."""

    dir: Path
    stage: str
    config: dict[str, Any]
    started_at: str
    inputs: dict[str, str] = dataclasses.field(default_factory=dict)
    outputs: dict[str, str] = dataclasses.field(default_factory=dict)
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def add_input(self, path: Path | str) -> None:
        self.inputs[str(path)] = sha256_path(Path(path))

    def add_output(self, name: str, path: Path | str) -> None:
        self.outputs[name] = str(Path(path).relative_to(self.dir) if Path(path).is_relative_to(self.dir) else path)

    def write_manifest(self, status: str) -> None:
        atomic_write_json(self.dir / "manifest.json", {
            "stage": self.stage,
            "status": status,
            "config": self.config,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "metrics": {k: float(v) for k, v in self.metrics.items()},
            **self.extra,
            "versions": versions(),
            "git_sha": git_sha(),
            "started_at": self.started_at,
            "finished_at": now() if status == "completed" else None,
        })

    def finish(self) -> Path:
        self.write_manifest("completed")
        return self.dir


def start_run(stage: str, cfg: Any, *, resume: bool = False) -> Run:
    """Prepare `cfg.output_dir` and write the resolved config and a `running` manifest.

    An existing, non-empty folder is an error unless `cfg.overwrite` (it is cleared) or `resume` (kept, so the
    stage can continue from what is there).
    """
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise AlignError(f"output_dir {out} exists and is not a folder; choose another output_dir")
    if out.is_dir() and any(out.iterdir()):
        if getattr(cfg, "overwrite", False):
            shutil.rmtree(out)
        elif not resume:
            raise AlignError(f"output_dir {out} already has files; pass overwrite=true to replace them, "
                             f"resume=true to continue, or choose another output_dir=...")
    out.mkdir(parents=True, exist_ok=True)
    config = to_dict(cfg)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    previous = read_manifest(out) if resume else None
    run = Run(dir=out, stage=stage, config=config,
              started_at=(previous or {}).get("started_at") or now())
    run.write_manifest("running")
    return run
