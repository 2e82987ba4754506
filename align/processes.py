"""Two processes side by side on a CPU: whether this machine can, with how many threads each, and running child
processes with their output relayed, stop signals passed on and their peak memory measured.

Why: on 2 cores, two processes of one thread each get more done than one process of two threads (torch's
intra-op threads synchronise at every operator; 2026-12-06: PPO and online RLAIF side by side 416 s against
259 + 254 s one after another). User: the pipeline's side-by-side training steps.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PARENT_ENV = "ALIGN_PARENT_PID"  # set by a process that runs this one as its child (it then dies with its parent)
THREADS_ENV = "ALIGN_THREADS_ALONE"  # the threads a child takes when told it runs alone (ALONE_SIGNAL)
# SIGURG: ignored by default (a child told before its handler is set lives on), and nothing in this stack uses it
ALONE_SIGNAL = signal.SIGURG


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


def take_threads_when_alone() -> None:
    """In a child of `start_child`: on ALONE_SIGNAL (its partner finished and nothing takes the freed cores), run
    the torch operations that follow with the whole thread budget (THREADS_ENV). Same numbers: the default model's
    fp32 and bf16 forward, backward and greedy decoding are bitwise equal on 1 and 2 threads (2026-12-06)."""
    threads = os.environ.pop(THREADS_ENV, "")
    if not threads.isdigit():
        return

    def grow(signum: int, frame: Any) -> None:
        with contextlib.suppress(Exception):  # torch half-imported when the signal came: the child keeps its threads
            sys.modules["torch"].set_num_threads(int(threads))

    signal.signal(ALONE_SIGNAL, grow)


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
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0  # from start to exit, once it exited (`reap`)
    peak_mb: float = 0.0  # its peak RSS so far (polled)
    alone: bool = False  # told to take the whole thread budget (`Running.alone`)

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
           THREADS_ENV: str(thread_budget()), PROGRESS_ENV: "1" if progress_enabled() else "0"}
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


class Running:
    """Child processes running at once; `wait_next` hands back each one as it exits. A stop signal to this process
    goes on to those still running (the first one when it comes, a second one too: the children then stop at
    once); the caller starts no new child once `align.runs.stop_requested()`."""

    def __init__(self) -> None:
        self.children: list[Child] = []
        self.passed_on = False

    def start(self, name: str, command: list[str]) -> Child:
        child = start_child(name, command)
        self.children.append(child)
        return child

    def wait_next(self) -> Child:
        """Wait until a running child exits; that child, its `seconds` and `peak_mb` set, its output relayed."""
        from align.runs import Interrupted, step_boundaries, stop_requested

        with step_boundaries():  # the first signal only sets stop_requested(); this loop passes it on
            while True:
                try:
                    for child in self.children:
                        child.peak_mb = max(child.peak_mb, high_water_mb(child.proc.pid))
                        if reap(child):
                            self.children.remove(child)
                            if child.reader is not None:
                                child.reader.join()
                            return child
                    if stop_requested() and not self.passed_on:
                        self.passed_on = True
                        self.pass_on()
                    time.sleep(0.1)
                except Interrupted:  # a second signal
                    self.passed_on = True
                    self.pass_on()

    def alone(self) -> None:
        """The one child still running gets the whole thread budget (`take_threads_when_alone`), once."""
        if len(self.children) == 1 and not self.children[0].alone:
            self.children[0].alone = True
            signal_child(self.children[0], ALONE_SIGNAL)

    def pass_on(self) -> None:
        from align.runs import stop_requested

        sig = getattr(signal.Signals, str(stop_requested()).split()[0], signal.SIGTERM)
        for child in self.children:
            signal_child(child, sig)


def signal_child(child: Child, sig: int) -> None:
    """`sig` to a child not reaped yet (`Popen.send_signal` would reap one that just exited, and `reap` would not
    see its exit)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(child.proc.pid, sig)


def high_water_mb(pid: int) -> float:
    """A running process's peak RSS so far in MiB (Linux's VmHWM, of its own image since exec), 0 where unknown."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")), 0.0)


def reap(child: Child) -> bool:
    """Has `child` exited? Then its exit code (as `poll` would set it), `seconds` since it started and `peak_mb` are
    set. The peak is the largest polled high-water mark: the kernel's ru_maxrss of a child also counts the parent's
    pages it was forked with, which would be this process's size, not the child's; without /proc, that is all."""
    pid, status, usage = os.wait4(child.proc.pid, os.WNOHANG)
    if pid == 0:
        return False
    child.proc.returncode = os.waitstatus_to_exitcode(status)
    child.seconds = time.perf_counter() - child.started
    child.peak_mb = child.peak_mb or usage.ru_maxrss / (1024 if sys.platform.startswith("linux") else 2**20)
    return True
