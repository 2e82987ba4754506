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


def test_progress_bars_only_on_a_terminal_outside_ci_unquiet_main_process():
    from align.log import show_progress

    ok = {"tty": True, "ci": "", "level": logging.INFO, "rank": 0}
    assert show_progress(**ok) and show_progress(**ok | {"ci": "false"}) and show_progress(**ok | {"level": 0})
    assert not show_progress(**ok | {"tty": False})  # piped to a file
    assert not show_progress(**ok | {"ci": "true"}) and not show_progress(**ok | {"ci": "1"})
    assert not show_progress(**ok | {"level": logging.WARNING})  # --quiet
    assert not show_progress(**ok | {"rank": 1})


def test_progress_is_the_iterable_itself_when_disabled(monkeypatch):
    from align import log

    monkeypatch.setattr(log, "progress_enabled", lambda: False)
    items = [1, 2, 3]
    assert log.progress(items, total=3, desc="x") is items
    monkeypatch.setattr(log, "progress_enabled", lambda: True)
    assert list(log.progress(items, total=3, desc="x")) == items


def test_no_third_party_bars_where_align_draws_none(monkeypatch):
    """Where align draws no bar (a log file, CI, --quiet, other ranks), neither does the Trainer nor the Hub
    libraries (transformers' weight loading, datasets' map, downloads)."""
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    from align import log, training

    settings = training.TrainSettings()
    for shown in (True, False):
        monkeypatch.setattr(training, "progress_enabled", lambda shown=shown: shown)
        kwargs = training.trainer_kwargs(settings, Path("run"), seed=0, has_eval=False)
        assert kwargs["disable_tqdm"] is (not shown)
    try:
        log.third_party_bars_off()
        assert are_progress_bars_disabled() and not hf_logging.is_progress_bar_enabled()
    finally:
        enable_progress_bars()
        hf_logging.enable_progress_bar()
