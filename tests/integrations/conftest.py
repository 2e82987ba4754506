"""Integration tests: the real programs (Label Studio's server, llama.cpp's server, headless Chromium), installed
by tests/integrations/setup.sh into cached venvs outside the checkout and started on loopback by the tests
themselves; nothing is mocked. `make test-integrations` sets them up and runs them.

Every test in this folder is marked `integration` and is left out of any run whose `-m` does not name
`integration` (so `make test`, `make test-slow` and a plain `pytest` never start these servers). A test whose
program is not installed skips with one line saying how to install it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: runs a real external program (make test-integrations)")


@pytest.hookimpl(tryfirst=True)  # before -m filters the items, so `-m integration` sees the marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ours = [item for item in items if HERE in item.path.parents]
    for item in ours:
        item.add_marker(pytest.mark.integration)
    if ours and "integration" not in (config.option.markexpr or ""):
        config.hook.pytest_deselected(items=ours)
        items[:] = [item for item in items if HERE not in item.path.parents]
