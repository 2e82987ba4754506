"""Logging: one format, the main process only (ALIGN_LOG_ALL_RANKS=1 for every rank), a quiet / verbose switch,
and third-party noise a user cannot act on kept out of the default output.

Modules log with `logging.getLogger(__name__)`; the CLI calls `configure(quiet=..., verbose=...)` once (the level
also comes from ALIGN_LOG_LEVEL=debug|info|warning|error). `quiet_third_party()` runs at `import align`, before
bitsandbytes or transformers are imported, so their import-time messages are filtered too.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")
FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
DATEFMT = "%H:%M:%S"
# "1": draw progress as on a terminal; set by an align process that prints this one's output to its own terminal
# (the pipeline's side-by-side steps: each bar update then reaches the terminal as a line of its own)
PROGRESS_ENV = "ALIGN_PROGRESS"
# Loggers whose warnings name nothing a user can change: bitsandbytes' optional CPU kernel download (every command
# that imports it printed "Failed to load CPU gemm_4bit_forward from kernels-community ..."), and the Hub's kernel
# loader behind it.
NOISY_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels")
NOISY_WARNINGS = (("ignore", FutureWarning, r"(transformers|trl|peft|accelerate|datasets)(\.|$)"),
                  ("ignore", DeprecationWarning, r"(transformers|trl|peft|accelerate|datasets|torch)(\.|$)"))


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (as logging's last-resort handler does), so a
    redirected or captured stderr (pytest's capsys, a notebook) gets the lines, not the stream of the first call."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class MainProcessOnly(logging.Filter):
    """Drop records below ERROR on ranks other than 0, unless ALIGN_LOG_ALL_RANKS is set."""

    def filter(self, record: logging.LogRecord) -> bool:
        return rank() == 0 or record.levelno >= logging.ERROR or os.environ.get("ALIGN_LOG_ALL_RANKS", "") not in (
            "", "0")


def level_from(quiet: bool, verbose: bool) -> int:
    """--quiet: warnings and errors; --verbose: debug; else ALIGN_LOG_LEVEL (default info)."""
    if quiet or verbose:
        return logging.WARNING if quiet else logging.DEBUG
    name = os.environ.get("ALIGN_LOG_LEVEL", "INFO").upper()
    return getattr(logging, name) if name in ("DEBUG", "INFO", "WARNING", "ERROR") else logging.INFO


def configure(*, quiet: bool = False, verbose: bool = False) -> None:
    """The `align` loggers write to stderr in one format at the chosen level (quiet: warnings and errors; verbose:
    debug, and third-party warnings back on)."""
    install(level_from(quiet, verbose))
    quiet_third_party(verbose=verbose)
    if not progress_enabled():
        third_party_bars_off()


def third_party_bars_off() -> None:
    """No progress bars from the Hub libraries either (transformers' weight loading, datasets' map, downloads) where
    align draws none: in a log file, in CI, under --quiet, on other ranks. The Trainer's own bar follows
    `progress_enabled()` through `trainer_kwargs`."""
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # read by transformers and datasets when they are imported after this
    if "transformers" in sys.modules:  # imported already: its own switch
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def install(level: int) -> None:
    """The `align` logger at `level` with its one stderr handler (added once). `import align` installs it at the
    default level, so a stage run from Python (or a test) shows its status lines as the CLI does."""
    logger = logging.getLogger("align")
    logger.setLevel(level)
    if not any(getattr(h, "_align", False) for h in logger.handlers):
        handler = StderrHandler()
        multi = os.environ.get("WORLD_SIZE", "1") not in ("", "1")  # name the rank when several print
        handler.setFormatter(logging.Formatter(f"[rank {rank()}] {FORMAT}" if multi else FORMAT, DATEFMT))
        handler.addFilter(MainProcessOnly())
        handler._align = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False


def quiet_third_party(verbose: bool = False) -> None:
    """Keep import-time and deprecation noise of the libraries align drives out of the default output."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.ERROR)
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for action, category, module in NOISY_WARNINGS:
        warnings.filterwarnings(action, category=category, module=module)


def show_progress(*, tty: bool, ci: str, level: int, rank: int) -> bool:
    """Whether to draw progress bars: on a terminal only (none in log files), none in CI logs (CI set to anything
    but '', 0 or false), none under --quiet (align's level above INFO), and on the main process only."""
    in_ci = ci.strip().lower() not in ("", "0", "false")
    return tty and not in_ci and level <= logging.INFO and rank == 0


def progress_enabled() -> bool:
    """`show_progress` for this process: stderr (or PROGRESS_ENV), the CI variable, the level `configure` set, the
    rank."""
    return show_progress(tty=sys.stderr.isatty() or os.environ.get(PROGRESS_ENV) == "1", ci=os.environ.get("CI", ""),
                         level=logging.getLogger("align").level, rank=rank())


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it") -> Iterable[T]:
    """`iterable` with a tqdm bar on stderr when `progress_enabled()`, else unchanged (no bar, no tqdm output)."""
    if not progress_enabled():
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)
