"""The HTML report: a Jinja template rendered in a sandbox with autoescaping, and matplotlib curve plots.

`render_html(context)` returns the page; everything it shows (run outputs, model samples) is data, escaped.
"""

from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Any

TEMPLATE = Path(__file__).with_name("template.html.j2")


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a table cell: '—' for missing, integers plain, floats with `digits` significant decimals."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e12):
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 10 ** -digits else f"{value:.2e}"
    return str(value)


def pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    minutes, secs = divmod(float(seconds), 60)
    return f"{int(minutes)}m {secs:04.1f}s" if minutes else f"{secs:.1f}s"


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def render_html(context: dict[str, Any]) -> str:
    """Render the report template in Jinja's sandbox (autoescape on) with the formatting helpers."""
    from jinja2.sandbox import SandboxedEnvironment

    env = SandboxedEnvironment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(TEMPLATE.read_text())
    return template.render(**context, fmt=fmt, pct=pct, duration=duration)
