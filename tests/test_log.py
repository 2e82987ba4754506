"""Logging: main process only unless ALIGN_LOG_ALL_RANKS, quiet/verbose levels, third-party noise filtered."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from align.log import MainProcessOnly, configure, level_from

REPO = Path(__file__).resolve().parent.parent


def record(level: int) -> logging.LogRecord:
    return logging.LogRecord("align.x", level, __file__, 1, "message", None, None)


def test_other_ranks_log_errors_only_unless_asked(monkeypatch):
    only_main = MainProcessOnly()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("ALIGN_LOG_ALL_RANKS", raising=False)
    assert not only_main.filter(record(logging.INFO)) and only_main.filter(record(logging.ERROR))
    monkeypatch.setenv("ALIGN_LOG_ALL_RANKS", "1")
    assert only_main.filter(record(logging.INFO))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("ALIGN_LOG_ALL_RANKS")
    assert only_main.filter(record(logging.INFO))


def test_quiet_and_verbose_levels(monkeypatch):
    monkeypatch.delenv("ALIGN_LOG_LEVEL", raising=False)
    assert (level_from(True, False), level_from(False, True), level_from(False, False)) == (
        logging.WARNING, logging.DEBUG, logging.INFO)
    monkeypatch.setenv("ALIGN_LOG_LEVEL", "error")
    assert level_from(False, False) == logging.ERROR
    configure(quiet=True)
    assert logging.getLogger("align").level == logging.WARNING
    configure()


def test_import_time_noise_of_bitsandbytes_is_filtered():
    """bitsandbytes warns at import when its optional CPU kernel cannot be fetched; after `import align` that
    logger only passes errors (the warning itself appears only on CPUs with AVX512-BF16, like this project's)."""
    code = ("import logging, align, bitsandbytes; "
            "print(logging.getLogger('bitsandbytes.backends.cpu.ops').getEffectiveLevel())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip()) == logging.ERROR and "kernels-community" not in out.stderr
