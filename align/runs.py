"""Run folders: the resolved config, a manifest (inputs' hashes, versions, metrics), atomic writes.

Stages hand off through files only: a later stage finds an earlier one's artifacts through its manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import yaml

from align.config import to_dict
from align.errors import AlignError, DataError

log = logging.getLogger(__name__)

T = TypeVar("T")
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


class Manifest(dict):
    """A run folder's manifest.json (a dict, as written) with typed access to what other stages read."""

    def __init__(self, run_dir: Path, data: dict[str, Any]) -> None:
        super().__init__(data)
        self.dir = Path(run_dir)

    @property
    def stage(self) -> str:
        return str(self.get("stage") or "")

    @property
    def status(self) -> str:
        return str(self.get("status") or "")

    @property
    def outputs(self) -> dict[str, str]:
        return dict(self.get("outputs") or {})

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self.get("metrics") or {})

    def output(self, name: str) -> Path | None:
        """The path of output `name`, when the manifest names it and it exists."""
        rel = self.outputs.get(name)
        return self.dir / rel if rel and (self.dir / rel).exists() else None


def read_manifest(run_dir: Path | str) -> Manifest | None:
    """The manifest of `run_dir`, or None when there is none (or it is not a JSON object)."""
    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return Manifest(run_dir, data) if isinstance(data, dict) else None


def resolve_input(path: Path | str, *, what: str, stages: tuple[str, ...] = (), outputs: tuple[str, ...] = (),
                  error: type[AlignError] = DataError) -> Path:
    """The one answer to "a file or a run folder": `path` itself when it is a file; for a run folder (one with
    our manifest) the first of its `outputs` that exists, provided the run is `completed` and of one of `stages`.

    `what` names the input in errors ("preference data", "samples", "policy"...).
    """
    if str(path).startswith("hf:"):  # a Hub dataset, read by align/data/hub.py
        return Path(path)
    p = Path(path)
    if not p.exists():
        raise error(f"{what} {p} not found; run the earlier stage first or give the right path")
    if p.is_file():
        return p
    manifest = read_manifest(p)
    if manifest is None:
        raise error(f"{what} {p} is a folder without an align manifest.json; give the file itself or the run "
                    f"folder of {' / '.join(stages) or 'an earlier stage'}")
    if stages and manifest.stage not in stages:
        raise error(f"{what} {p} is a {manifest.stage or 'unknown'} run; expected the run folder of "
                    f"{' or '.join(stages)}")
    if manifest.status != "completed":
        raise error(f"{what} {p}: that {manifest.stage} run has status {manifest.status!r}; finish it first "
                    f"(re-run it with resume=true) or give another run")
    for name in outputs:
        found = manifest.output(name)
        if found is not None:
            return found
    raise error(f"{what} {p}: the {manifest.stage} run has no {' or '.join(outputs)} output")


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
    previous: Path | None = None  # the run this one replaces (overwrite=true), moved aside until finish()
    is_main: bool = True  # False on the other processes of a multi-process run: only the main one writes

    def add_input(self, path: Path | str) -> None:
        if self.is_main:
            from align.hub import hub_source  # a Hub model or dataset: its commit and files' hashes

            source = hub_source(path)
            if source is not None:
                self.extra.setdefault("hub", {})[str(path)] = source
            self.inputs[str(path)] = source["sha256"] if source else sha256_path(Path(path))

    def add_output(self, name: str, path: Path | str) -> None:
        self.outputs[name] = str(Path(path).relative_to(self.dir) if Path(path).is_relative_to(self.dir) else path)

    def write_manifest(self, status: str) -> None:
        if not self.is_main:
            return
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
            "finished_at": now() if status in ("completed", "failed", "interrupted") else None,
        })

    def finish(self) -> Path:
        if not self.is_main:
            return self.dir
        self.write_manifest("completed")
        if self.previous is not None:  # the replaced run is gone only now that the new one is complete
            shutil.rmtree(self.previous, ignore_errors=True)
        _forget(self)
        return self.dir

    def fail(self, reason: str) -> None:
        """Mark the run `failed` with a one-line reason; when it was replacing an older run, put that one back
        (the failed attempt is kept next to it as <name>.failed). The old run is put back even when the manifest
        cannot be written (a full disk): renames need no space."""
        if not self.is_main:
            _forget(self)
            return
        self.extra["error"] = reason.splitlines()[0][:500] if reason else "failed"
        try:
            self.write_manifest("failed")
        finally:
            try:
                self._put_previous_back()
            finally:
                _forget(self)

    def interrupt(self, signal_name: str, detail: str = "") -> None:
        """Mark the run `interrupted` (by a signal; `resume=true` continues it) and say how to continue. A run that
        was replacing an older one keeps that one aside (.<name>.align-previous) until the resumed run finishes."""
        if not self.is_main:
            _forget(self)
            return
        self.extra["interrupted_by"] = signal_name
        try:
            self.write_manifest("interrupted")
        finally:
            _forget(self)
        log.warning(f"{self.stage}: stopped by {signal_name}{detail}; the run in {self.dir} is marked interrupted. "
                    f"To continue: {resume_command(self.stage, self.dir)}{requeue_hint(signal_name)}")

    def _put_previous_back(self) -> None:
        if self.previous is not None and self.previous.is_dir():
            failed = self.dir.with_name(self.dir.name + ".failed")
            if failed.is_dir() and read_manifest(failed) is not None:
                shutil.rmtree(failed)
            if not failed.exists():
                os.replace(self.dir, failed)
                os.replace(self.previous, self.dir)
                log.warning(f"{self.stage}: the previous run in {self.dir} was kept; the failed attempt is in {failed}")


_ACTIVE: list[Run] = []
_LAST_STARTED: list[Path] = []  # the output folder of the last start_run in this process


def _forget(run: Run) -> None:
    if run in _ACTIVE:
        _ACTIVE.remove(run)
    release_lock(run.dir)
    restore_signal_handlers_when_idle()


def fail_active_runs(reason: str) -> None:
    """Mark every run started in this process and not finished as `failed` (the CLI and the pipeline call this on
    any error, so no run folder is left `running` by a clean error). After a stop signal they are `interrupted`."""
    for run in _ACTIVE.copy():  # each one leaves _ACTIVE as it is marked
        try:
            if _STOP["signal"]:
                run.interrupt(_STOP["signal"])
            else:
                run.fail(reason)
        except OSError:
            _forget(run)
    from align.tracking import close_open_trackers

    close_open_trackers(failed=True)


def _exception_chain(exc: BaseException | None) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def disk_full_message(exc: BaseException) -> str | None:
    """One line for a write that failed because the disk is full (an OSError ENOSPC, or the Rust tokenizers'
    "No space left on device (os error 28)"), naming the path and the free space left; None for other errors."""
    import errno

    for e in _exception_chain(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            path = e.filename
            break
        if "No space left on device" in str(e) or "os error 28" in str(e):
            path = None
            break
    else:
        return None
    where = Path(path) if path else (_ACTIVE[-1].dir if _ACTIVE else _LAST_STARTED[-1] if _LAST_STARTED
                                     else Path.cwd())
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f"{shutil.disk_usage(probe).free / 2**20:,.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    return (f"no space left on the device writing {where} ({free}); free some space and run again "
            f"(resume=true continues from the last checkpoint)")


def resume_command(stage: str, run_dir: Path) -> str:
    """The command that continues this run: the command line of this process with resume=true (and without
    overwrite=...) when it was `align <stage> ...`; the same command when it was a pipeline (which continues where
    it stopped); else the short form."""
    import shlex

    args = sys.argv[1:]
    if args[:1] == [stage]:
        kept = [a for a in args if not a.startswith(("resume=", "overwrite="))]
        return "align " + shlex.join([*kept, "resume=true"])
    if args[:1] == ["pipeline"]:
        return "align " + shlex.join(args)
    if stage == "pipeline":  # it has no resume key: the same command skips finished steps and resumes the rest
        return f"align pipeline <the same recipe and settings> output_dir={shlex.quote(str(run_dir))}"
    return f"align {stage} <the same recipe and settings> output_dir={shlex.quote(str(run_dir))} resume=true"


# ---------------------------------------------------------------- one owner per run folder (like git's index.lock)

def lock_path(out: Path) -> Path:
    """The lock file of run folder `out`: next to it, so moving a replaced run aside does not move the lock."""
    out = Path(out).absolute()
    return out.with_name(f".{out.name}.align-lock")


def _start_ticks(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc on Linux), so a reused pid is not the owner."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_alive(owner: dict[str, Any]) -> bool:
    """Is the process a lock names still running? Another host's process cannot be checked: it counts as alive."""
    if owner.get("host") != socket.gethostname():
        return True
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    started = _start_ticks(pid)
    return owner.get("started") is None or started is None or started == owner.get("started")


def _read_lock(path: Path) -> tuple[str, dict[str, Any] | None]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return "", None
    try:
        owner = json.loads(text)
    except json.JSONDecodeError:
        return text, None
    return text, owner if isinstance(owner, dict) else None


def take_lock(out: Path) -> Path:
    """Make this process the one owner of run folder `out`, atomically (a hard link of a complete lock file, so no
    one ever reads a half-written lock). A lock whose process is gone is stale and taken over; a live owner's lock
    is an AlignError naming its pid and host. Taking a lock this process already holds is a no-op."""
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_ticks(os.getpid()), "since": now(),
          "command": " ".join(sys.argv)[:300]}
    for _ in range(5):
        if _create_exclusive(path, json.dumps(me) + "\n"):
            return path
        text, owner = _read_lock(path)
        if owner is None and text == "" and not path.exists():
            continue  # released meanwhile: try again
        if owner is not None and owner.get("pid") == me["pid"] and owner.get("host") == me["host"]:
            return path
        if owner is not None and _owner_alive(owner):
            raise AlignError(f"output_dir {out} is in use by another align run (pid {owner.get('pid')} on "
                             f"{owner.get('host')}, since {owner.get('since')}: {owner.get('command', '')}); wait for "
                             f"it to finish or stop it. If that process is gone, delete {path}")
        _remove_stale(path, text)
    raise AlignError(f"output_dir {out}: could not take the lock {path}; another run keeps taking it")


def _create_exclusive(path: Path, text: str) -> bool:
    """Create `path` holding `text` unless it exists (False then)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: exclusive create (a reader may see it empty briefly)
            try:
                fd2 = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd2, "w") as f:
                f.write(text)
            return True
    finally:
        Path(tmp).unlink(missing_ok=True)


def _remove_stale(path: Path, seen: str) -> None:
    """Remove a stale lock, unless someone replaced it since we read it (then it is put back)."""
    grave = path.with_name(f"{path.name}.stale-{os.getpid()}")
    try:
        os.replace(path, grave)
    except FileNotFoundError:
        return
    try:
        if grave.read_text() != seen:
            try:
                os.link(grave, path)
            except FileExistsError:
                pass
    finally:
        grave.unlink(missing_ok=True)


def release_lock(out: Path) -> None:
    """Remove run folder `out`'s lock if this process holds it."""
    path = lock_path(out)
    _, owner = _read_lock(path)
    if owner is not None and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------- stop signals: a checkpoint, then a clean exit

# SIGUSR1: the notice SLURM sends ahead of preemption or the time limit with `sbatch --signal=USR1@<seconds>`
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal. A KeyboardInterrupt, so every Ctrl-C path (CLI exit 130, the pipeline's
    `interrupted` step) handles it."""


# signal: the first stop signal's name; boundary: a training loop polls stop_requested() at each step;
# holders: blocks that keep the handlers across several runs (the pipeline, see `stop_signals_held`)
_STOP: dict[str, Any] = {"signal": None, "boundary": False, "previous": {}, "holders": 0}


def _on_stop_signal(signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    if _STOP["signal"] is None and _STOP["boundary"]:
        _STOP["signal"] = name
        log.warning(f"align: {name}: stopping after this step (or batch), saving where it is (send it again to stop at "
                    f"once)")
        return
    _STOP["signal"] = _STOP["signal"] or name
    raise Interrupted(name)


def watch_stop_signals() -> None:
    """SIGTERM (a scheduler's notice) and SIGINT (Ctrl-C) stop the run: at the next step boundary when a training
    loop is polling `stop_requested()`, else at once; a second signal always stops at once. Main thread only."""
    import threading

    if threading.current_thread() is not threading.main_thread() or _STOP["previous"]:
        return
    _STOP["signal"] = None
    for sig in STOP_SIGNALS:
        _STOP["previous"][sig] = signal.signal(sig, _on_stop_signal)


def restore_signal_handlers() -> None:
    """Put back the handlers `watch_stop_signals` replaced (when this process has no active run left)."""
    for sig, handler in _STOP["previous"].items():
        signal.signal(sig, handler)
    _STOP.update(previous={}, boundary=False)


def restore_signal_handlers_when_idle() -> None:
    """Put the handlers back once no run is active and no block holds them (a run ending inside a pipeline keeps
    them: a signal between two steps must still mark the pipeline interrupted)."""
    if not _ACTIVE and not _STOP["holders"]:
        restore_signal_handlers()


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """Watch stop signals for a whole block that runs several stages one after another (the pipeline), not only
    while one of its runs is active."""
    watch_stop_signals()
    _STOP["holders"] += 1
    try:
        yield
    finally:
        _STOP["holders"] -= 1
        restore_signal_handlers_when_idle()


@contextlib.contextmanager
def step_boundaries() -> Iterator[None]:
    """A loop inside polls `stop_requested()` after each step or batch (and saves what it finished): the first
    stop signal waits for that boundary instead of stopping at once."""
    before = _STOP["boundary"]
    _STOP["boundary"] = True
    try:
        yield
    finally:
        _STOP["boundary"] = before


def until_stopped(steps: Iterable[T], detail: Callable[[T], str]) -> Iterator[T]:
    """Each of `steps` (batches of a loop that saves what it finished), with a stop signal waiting for the end of
    the batch in flight; after that batch the runs are marked interrupted (`interrupt_active_runs(detail(step))`)."""
    with step_boundaries():
        for step in steps:
            yield step
            if stop_requested():
                interrupt_active_runs(detail(step))


def requeue_hint(signal_name: str) -> str:
    """After SIGUSR1 (SLURM's notice before preemption): how to put the job back in the queue so it continues."""
    if not signal_name.startswith("SIGUSR1"):
        return ""
    job = os.environ.get("SLURM_JOB_ID", "<job id>")
    return (f". On SLURM, requeue the job (scontrol requeue {job}, or sbatch --requeue) with resume=true in its "
            f"command: resume=true also starts a run whose folder is empty, so one job script serves every launch")


def at_step_boundaries(on: bool) -> None:
    """A training loop starts (True) or stops (False) polling `stop_requested()` at each step boundary."""
    _STOP["boundary"] = on


def stop_requested(sync: bool = False) -> str | None:
    """The stop signal's name once one arrived, else None. With `sync`, every process of a multi-process run must
    call it at the same step: it is then true on all of them when any got a signal, so they stop together."""
    if sync:
        import torch
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            # the signal's number, so the others name it (SIGUSR1 gets its requeue hint wherever it arrived)
            mine = _STOP["signal"] and getattr(signal.Signals, _STOP["signal"].split()[0], signal.SIGTERM).value
            flag = torch.tensor([mine or 0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and not _STOP["signal"]:
                _STOP["signal"] = f"{signal.Signals(int(flag.item())).name} (on another process)"
    return _STOP["signal"]


def interrupt_active_runs(detail: str = "") -> None:
    """Mark this process's unfinished runs `interrupted` (after the loop saved its checkpoint) and raise
    Interrupted: the one call a training loop makes when `stop_requested()`."""
    name = _STOP["signal"] or "a signal"
    for run in _ACTIVE.copy():  # each one leaves _ACTIVE as it is marked
        run.interrupt(name, detail)
    raise Interrupted(name)


# ---------------------------------------------------------------- checkpoints that rot

FILES_RECORD = "align-files.json"


def record_files(folder: Path) -> None:
    """Record the size and sha256 of every file of a complete checkpoint folder (written last, atomically), so a
    file that rots later (truncated, overwritten) is found before it is resumed from."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256_path(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != FILES_RECORD}
    atomic_write_json(folder / FILES_RECORD, files)


def damaged_file(folder: Path) -> str | None:
    """How a checkpoint differs from its record ("model.safetensors: 812 bytes, recorded 2,048"), or None when it
    matches. A checkpoint without a record (written by an older align) is not checked."""
    folder = Path(folder)
    try:
        record = json.loads((folder / FILES_RECORD).read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return f"{folder / FILES_RECORD}: unreadable"
    for name, want in record.items():
        path = folder / name
        if not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{path}: {size:,} bytes, recorded {want['size']:,}"
        if sha256_path(path) != want["sha256"]:
            return f"{path}: contents changed since it was saved (sha256 differs)"
    return None


def newest_sound_checkpoint(candidates: list[Path], step: Any) -> Path | None:
    """The newest of `candidates` (complete checkpoint folders; `step(path)` gives a folder's step) whose files
    match their record. A damaged newer one is skipped with a line saying so; when every one is damaged, an
    AlignError names the bad file."""
    damaged: list[str] = []
    for path in sorted(candidates, key=step, reverse=True):
        bad = damaged_file(path)
        if bad is None:
            if damaged:
                log.warning(f"resume: skipping damaged checkpoint(s) ({'; '.join(damaged)}); resuming from {path}")
            return path
        damaged.append(bad)
    if damaged:
        raise AlignError(f"resume=true: every checkpoint is damaged ({'; '.join(damaged)}); restore the files, or "
                         f"start again with overwrite=true")
    return None


# ---------------------------------------------------------------- fingerprints and resume

HOW_TO_RUN = {"output_dir", "overwrite", "resume", "progress", "force"}  # keys that do not change results


def result_config(config: Any) -> Any:
    """A resolved config (plain data) without the keys that only say how to run, at any depth."""
    if isinstance(config, dict):
        return {k: result_config(v) for k, v in config.items() if k not in HOW_TO_RUN}
    if isinstance(config, list):
        return [result_config(v) for v in config]
    return config


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain configs."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += changed_keys(old.get(k, "<unset>"), new.get(k, "<unset>"), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')} ({old!r} -> {new!r})"]


def run_outputs_digest(run_dir: Path, cache: dict[Any, str]) -> str:
    """sha256 over a run folder's status and outputs (name + content), memoised per manifest version."""
    manifest_path = Path(run_dir) / "manifest.json"
    key = (str(Path(run_dir).resolve()), manifest_path.stat().st_mtime_ns)
    if key not in cache:
        manifest = read_manifest(run_dir) or Manifest(run_dir, {})
        h = hashlib.sha256(json.dumps(manifest.status).encode())
        for name, rel in sorted(manifest.outputs.items()):
            path = Path(run_dir) / rel
            h.update(f"{name}={sha256_path(path) if path.exists() else 'missing'};".encode())
        cache[key] = h.hexdigest()
    return cache[key]


def path_digests(config: Any, cache: dict[Any, str]) -> dict[str, str]:
    """Hashes of every existing path a config names (run folders by their outputs, files and folders by content)."""
    found: dict[str, str] = {}

    def visit(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                visit(v, f"{key}.{k}" if key else k)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                visit(v, f"{key}[{i}]")
        elif isinstance(value, str) and value and len(value) < 4096 and "\0" not in value:
            path = Path(value)
            try:
                exists = path.exists()
            except OSError:
                return
            if not exists:
                hub = hub_digest(value, cache)
                if hub is not None:
                    found[key] = hub
                return
            if (path / "manifest.json").is_file():
                found[key] = "run:" + run_outputs_digest(path, cache)
            else:
                stat = path.stat()
                cache_key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
                if cache_key not in cache:
                    cache[cache_key] = sha256_path(path)
                found[key] = cache[cache_key]

    visit(config, "")
    return found


def hub_digest(value: str, cache: dict[Any, str]) -> str | None:
    """'hub:<type>:<repo>@<commit>' for a Hub model ID or dataset spec, by the commit its revision points at now
    (a new revision on the Hub, or in the user's cache offline, changes it); None for anything else (a name the
    Hub and the cache do not know adds nothing, as a missing path adds nothing). The local
    `hf:<folder>` dataset form is a folder, hashed by content like any other."""
    from align.hub import current_commit, hub_revision

    if value.startswith("hf:"):
        from align.data.hub import parse_spec

        try:
            folder = Path(parse_spec(value)[0]).expanduser()
        except AlignError:
            return None
        if folder.exists():
            return path_digests(str(folder), cache).get("")
    ref = hub_revision(value)
    if ref is None:
        return None
    if ref not in cache:  # one question to the Hub (or the cache) per ID and revision
        commit = current_commit(ref[1], ref[2], ref[0])
        cache[ref] = f"hub:{ref[0]}:{ref[1]}@{commit}" if commit else ""  # unknown: not a Hub ID after all
    return cache[ref] or None


def fingerprint(stage: str, config: dict[str, Any], cache: dict[Any, str] | None = None) -> str:
    """sha256 of (stage, resolved config minus how-to-run keys, hashes of every path it reads, the commits of the
    Hub models and datasets it names)."""
    what = result_config(config)
    payload = {"stage": stage, "config": what, "inputs": path_digests(what, {} if cache is None else cache)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------- starting a run

def _config_paths(config: Any) -> list[Path]:
    """Every string in a resolved config that names an existing file or folder (the stage's inputs)."""
    out: list[Path] = []
    if isinstance(config, dict):
        for k, v in config.items():
            if k != "output_dir":
                out += _config_paths(v)
    elif isinstance(config, list):
        for v in config:
            out += _config_paths(v)
    elif isinstance(config, str) and config and len(config) < 4096 and "\0" not in config:
        try:
            if Path(config).exists():
                out.append(Path(config))
        except OSError:
            pass
    return out


def check_replaceable(out: Path, stage: str, config: dict[str, Any]) -> None:
    """Refuse to replace anything align did not create for this stage (see README "Safety")."""
    res, cwd = out.resolve(), Path.cwd().resolve()
    if res == cwd or res in cwd.parents:
        raise AlignError(f"output_dir {out} is the current folder or one of its parents; overwrite=true would "
                         f"replace it. Choose a run folder such as runs/{stage}")
    if (res / ".git").exists() or res == Path(__file__).resolve().parent.parent:
        raise AlignError(f"output_dir {out} is a repository root; choose a run folder such as runs/{stage}")
    for path in _config_paths(config):
        p = path.resolve()
        if p == res or res in p.parents:
            raise AlignError(f"output_dir {out} contains this stage's input {path}; overwrite=true would delete it. "
                             f"Choose another output_dir")
    manifest = read_manifest(out)
    if manifest is None:
        if any(out.iterdir()):
            raise AlignError(f"output_dir {out} has files but is not an align run folder (no manifest.json); align "
                             f"only replaces its own runs. Choose another output_dir, or empty it yourself")
    elif manifest.stage != stage:
        raise AlignError(f"output_dir {out} holds a {manifest.stage or 'unknown'} run; align {stage} will not "
                         f"replace another stage's run. Choose another output_dir, or delete that run yourself")


def drop_keys(config: Any, dotted: tuple[str, ...]) -> Any:
    """A copy of a plain config without the given dotted keys."""
    out = json.loads(json.dumps(config, default=str))
    for key in dotted:
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def check_resumable(out: Path, stage: str, config: dict[str, Any], ignore: tuple[str, ...] = ()) -> Manifest | None:
    """The manifest to continue from, after checking it is this stage's run with the same settings (apart from
    HOW_TO_RUN keys and the stage's own `ignore`: settings that cannot change its results, e.g. a judge's timeout)."""
    manifest = read_manifest(out)
    if manifest is None:
        if any(out.iterdir()):
            raise AlignError(f"resume=true: {out} has files but no manifest.json; it is not an align run to continue")
        return None
    if manifest.stage != stage:
        raise AlignError(f"resume=true: {out} holds a {manifest.stage or 'unknown'} run, not a {stage} run; "
                         f"choose the {stage} run's folder or another output_dir")
    diff = changed_keys(result_config(drop_keys(manifest.get("config") or {}, ignore)),
                        result_config(drop_keys(config, ignore)))
    if diff:
        raise AlignError(f"resume=true: the settings changed since {out} was started, so the run cannot continue "
                         f"exactly: {'; '.join(diff[:8])}{' ...' if len(diff) > 8 else ''}. Use the same settings, "
                         f"or overwrite=true to start again")
    return manifest


def process_rank() -> int:
    """This process's rank under `accelerate launch` / torchrun (0 when it runs alone)."""
    return int(os.environ.get("RANK", "0") or 0)


def start_run(stage: str, cfg: Any, *, resume: bool = False) -> Run:
    """Prepare `cfg.output_dir` and write the resolved config and a `running` manifest.

    An existing, non-empty folder is an error unless `resume` (it must be this stage's run with the same
    settings; see `check_resumable`) or `cfg.overwrite` (only an align run of this stage, or an empty folder, is
    replaced; see `check_replaceable`). A replaced run is moved aside and deleted only when the new run finishes;
    if the new one fails, the old one is put back.
    """
    out = Path(cfg.output_dir)
    if out.is_symlink():  # e.g. runs/big -> /scratch/big: the run, its lock and a replaced run live where it points
        out = out.resolve()
    config = to_dict(cfg)
    watch_stop_signals()
    if process_rank() != 0:  # other processes of a multi-process run: the main process owns the folder
        return Run(dir=out, stage=stage, config=config, started_at=now(), is_main=False)
    _LAST_STARTED[:] = [out]  # named by disk_full_message even when the run failed before it was active
    take_lock(out)  # before anything is written: a second launch or resume into this folder is refused
    backup = out.absolute().with_name(f".{out.absolute().name}.align-previous")
    moved = False
    try:
        if out.exists() and not out.is_dir():
            raise AlignError(f"output_dir {out} exists and is not a folder; choose another output_dir")
        previous_manifest = None
        if out.is_dir() and any(out.iterdir()):
            if resume:
                previous_manifest = check_resumable(out, stage, config, getattr(type(cfg), "RESUME_IGNORES", ()))
            elif getattr(cfg, "overwrite", False):
                check_replaceable(out, stage, config)
                if backup.exists():
                    shutil.rmtree(backup)  # left by a killed earlier replace: ours
                os.replace(out, backup)
                moved = True
            else:
                raise AlignError(f"output_dir {out} already has files; pass overwrite=true to replace them, "
                                 f"resume=true to continue, or choose another output_dir=...")
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        # an interrupted overwrite kept the run it replaces aside: the resumed run deletes it when it finishes
        keep_aside = moved or (resume and backup.is_dir())
        run = Run(dir=out, stage=stage, config=config,
                  started_at=(previous_manifest or {}).get("started_at") or now(), previous=backup if keep_aside else None)
        run.extra["processes"] = int(os.environ.get("WORLD_SIZE", "1") or 1)
        run.write_manifest("running")
    except BaseException:
        if moved:  # e.g. a full disk while writing the new config: the old run goes back as it was
            shutil.rmtree(out, ignore_errors=True)
            os.replace(backup, out)
        release_lock(out)
        restore_signal_handlers_when_idle()
        raise
    _ACTIVE.append(run)
    return run
