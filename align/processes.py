"""Two processes side by side on a CPU: whether this machine can, with how many threads each, and running child
processes with their output relayed, stop signals passed on and their peak memory measured.

Why: on 2 cores, two processes of one thread each get more done than one process of two threads (torch's
intra-op threads synchronise at every operator; 2026-12-06: PPO and online RLAIF side by side 416 s against
259 + 254 s one after another). Users: the pipeline's side-by-side training steps, eval's two sampling processes.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PARENT_ENV = "ALIGN_PARENT_PID"  # set by a process that runs this one as its child (it then dies with its parent)


def die_with_parent() -> None:
    """When started by another align process (PARENT_ENV names its pid), get SIGTERM when that one dies (Linux): a
    training stage then saves a checkpoint and stops, as under a scheduler's SIGTERM, instead of running on alone."""
    parent = os.environ.pop(PARENT_ENV, "")
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if str(os.getppid()) != parent:  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def cores() -> int:
    """The cores this process may run on (os.cpu_count() where the OS cannot say, as on macOS)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def thread_budget() -> int:
    """The threads this process may use: OMP_NUM_THREADS when set, else its cores."""
    wanted = os.environ.get("OMP_NUM_THREADS", "")
    return int(wanted) if wanted.isdigit() and int(wanted) > 0 else cores()


def threads_each() -> int:
    """Threads for each of two side-by-side processes: half the budget. torch's threads spin-wait for a core another
    process holds, so the two must not ask for more than exist."""
    return max(1, thread_budget() // 2)


def why_not_two(min_gib: float) -> str | None:
    """None when this machine can run two model processes at once: no GPU (two on one GPU would share its memory),
    2+ cores for this process, `min_gib` of available memory; else the reason."""
    import psutil
    import torch

    if torch.cuda.is_available() or torch.backends.mps.is_available():
        return "a GPU is present"
    if thread_budget() < 2:
        return "OMP_NUM_THREADS=1" if cores() >= 2 else "fewer than 2 cores"
    available = psutil.virtual_memory().available / 2**30
    if available < min_gib:
        return f"{available:.1f} GiB of memory available, {min_gib} needed"
    return None


@dataclass
class Child:
    """A child process whose output lines `relay` prints with `name` in front."""

    name: str
    proc: Any  # subprocess.Popen
    tail: list[str] = field(default_factory=list)  # its last 20 output lines
    reader: threading.Thread | None = None

    def last_line(self) -> str:
        return next((line for line in reversed(self.tail) if line.strip()), f"exit code {self.proc.returncode}")


def start_child(name: str, command: list[str]) -> Child:
    """`command` with half the thread budget, dying with this process (PARENT_ENV), in its own session (a
    terminal's Ctrl-C reaches this process only, which passes it on), its progress bars drawn as lines through
    this process's terminal."""
    import subprocess

    from align.log import PROGRESS_ENV, progress_enabled

    threads = str(threads_each())
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, PARENT_ENV: str(os.getpid()),
           PROGRESS_ENV: "1" if progress_enabled() else "0"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    child = Child(name, proc)
    child.reader = threading.Thread(target=relay, args=(proc, name, child.tail), daemon=True)
    child.reader.start()
    return child


def relay(proc: Any, name: str, tail: list[str]) -> None:
    """Print a child's output lines with its name in front; keep its last 20 lines in `tail`."""
    for line in proc.stdout:
        print(f"{name:>7} | {line}", end="", flush=True)
        tail.append(line.rstrip())
        del tail[:-20]


def wait_all(children: list[Child]) -> list[tuple[float, float]]:
    """Wait for every child; a stop signal to this process goes on to those still running (the first one when it
    comes, a second one too: the children then stop at once). Each child's (seconds, peak RSS in MiB)."""
    from align.runs import Interrupted, step_boundaries, stop_requested

    t0 = time.perf_counter()
    procs = [c.proc for c in children]
    done: list[tuple[float, float] | None] = [None] * len(procs)
    peaks = [0.0] * len(procs)

    def pass_on() -> None:
        sig = getattr(signal.Signals, str(stop_requested()).split()[0], signal.SIGTERM)
        for proc, finished in zip(procs, done):
            if finished is None:
                proc.send_signal(sig)

    passed_on = False
    with step_boundaries():  # the first signal only sets stop_requested(); this loop passes it on
        while any(finished is None for finished in done):
            try:
                time.sleep(0.1)
                for i, proc in enumerate(procs):
                    if done[i] is None:
                        peaks[i] = max(peaks[i], high_water_mb(proc.pid))
                        done[i] = reap(proc, t0, peaks[i])
                if stop_requested() and not passed_on:
                    passed_on = True
                    pass_on()
            except Interrupted:  # a second signal
                passed_on = True
                pass_on()
    for child in children:
        if child.reader is not None:
            child.reader.join()
    return [finished or (0.0, 0.0) for finished in done]


def high_water_mb(pid: int) -> float:
    """A running process's peak RSS so far in MiB (Linux's VmHWM, of its own image since exec), 0 where unknown."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")), 0.0)


def reap(proc: Any, t0: float, peak_mb: float) -> tuple[float, float] | None:
    """(seconds since t0, peak RSS in MiB) once `proc` has exited (its exit code set as `poll` would), else None.
    The peak is the largest polled high-water mark: the kernel's ru_maxrss of a child also counts the parent's
    pages it was forked with, which would be this process's size, not the child's; without /proc, that is all."""
    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    if pid == 0:
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t0, peak_mb or usage.ru_maxrss / (1024 if sys.platform.startswith("linux") else 2**20)
