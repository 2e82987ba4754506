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

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
DATEFMT = "%H:%M:%S"
# Loggers whose warnings name nothing a user can change: bitsandbytes' optional CPU kernel download (every command
# that imports it printed "Failed to load CPU gemm_4bit_forward from kernels-community ..."), and the Hub's kernel
# loader behind it.
NOISY_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels")
NOISY_WARNINGS = (("ignore", FutureWarning, r"(transformers|trl|peft|accelerate|datasets)(\.|$)"),
                  ("ignore", DeprecationWarning, r"(transformers|trl|peft|accelerate|datasets|torch)(\.|$)"))


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


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
    logger = logging.getLogger("align")
    logger.setLevel(level_from(quiet, verbose))
    if not any(getattr(h, "_align", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        multi = os.environ.get("WORLD_SIZE", "1") not in ("", "1")  # name the rank when several print
        handler.setFormatter(logging.Formatter(f"[rank {rank()}] {FORMAT}" if multi else FORMAT, DATEFMT))
        handler.addFilter(MainProcessOnly())
        handler._align = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False
    quiet_third_party(verbose=verbose)


def quiet_third_party(verbose: bool = False) -> None:
    """Keep import-time and deprecation noise of the libraries align drives out of the default output."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.ERROR)
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for action, category, module in NOISY_WARNINGS:
        warnings.filterwarnings(action, category=category, module=module)


def progress_enabled() -> bool:
    """Progress bars only on a terminal: none in CI logs or files (CI=true or stderr not a TTY)."""
    return sys.stderr.isatty() and os.environ.get("CI", "").lower() not in ("1", "true")
