"""Training curves: read scalars from a stage's TensorBoard folder and draw them as one PNG per stage.

Uses matplotlib's object API (`Figure`, Agg canvas) rather than pyplot, so there is no global state and no
display is needed.
"""

from __future__ import annotations

import io
from pathlib import Path

# Panels of the curve figure, in order, and the substrings of a TensorBoard tag that put it in that panel.
# The first panel that matches wins, so "rewards/accuracies" (DPO) is an accuracy, not a reward.
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("accuracy", ("accurac",)),
    ("KL", ("kl",)),
    ("reward", ("reward", "score", "margin")),
    ("length", ("length", "len_", "_len")),
    ("loss", ("loss",)),
)
MAX_LINES_PER_PANEL = 6
# Tags left out even when a panel key matches ("time/score" is a timing, not a score).
EXCLUDE = ("time", "runtime", "per_second", "learning_rate", "grad_norm", "epoch", "num_tokens")

Series = list[tuple[int, float]]  # (step, value) pairs, sorted by step


def read_scalars(tb_dir: Path) -> dict[str, Series]:
    """Every scalar series under `tb_dir` (and its subfolders, whose names prefix the tags), sorted by step.

    A run that was resumed writes several event files; later points for the same step replace earlier ones.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_dir = Path(tb_dir)
    out: dict[str, dict[int, float]] = {}
    if not tb_dir.is_dir():
        return {}
    folders = sorted({p.parent for p in tb_dir.rglob("events.out.tfevents.*")})
    for folder in folders:
        prefix = "" if folder == tb_dir else str(folder.relative_to(tb_dir)) + "/"
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            series = out.setdefault(prefix + tag, {})
            for event in sorted(acc.Scalars(tag), key=lambda e: e.wall_time):
                series[int(event.step)] = float(event.value)
    return {tag: sorted(points.items()) for tag, points in sorted(out.items())}


def panel_of(tag: str) -> str | None:
    """Which panel a tag belongs to ('loss', 'accuracy', 'reward', 'KL', 'length'), or None to leave it out."""
    low = tag.lower()
    if any(x in low for x in EXCLUDE):
        return None
    for panel, keys in PANELS:
        if any(k in low for k in keys):
            return panel
    return None


def group_curves(scalars: dict[str, Series]) -> dict[str, dict[str, Series]]:
    """{panel: {tag: series}} for the tags worth plotting, panels in PANELS order, empty panels left out.

    Series with a single point are kept (an eval metric logged once still belongs in the picture).
    """
    grouped: dict[str, dict[str, Series]] = {panel: {} for panel, _ in PANELS}
    for tag, series in scalars.items():
        panel = panel_of(tag)
        if panel is not None and series and len(grouped[panel]) < MAX_LINES_PER_PANEL:
            grouped[panel][tag] = series
    return {panel: tags for panel, tags in grouped.items() if tags}


def plot_curves(title: str, grouped: dict[str, dict[str, Series]]) -> bytes:
    """One PNG (bytes) with a panel per metric group, one line per tag."""
    from matplotlib.figure import Figure

    n = max(1, len(grouped))
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), dpi=100, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (panel, tags) in zip(axes.flat, grouped.items()):
        for tag, series in tags.items():
            steps, values = zip(*series)
            ax.plot(steps, values, marker="o" if len(series) < 3 else None, markersize=3, linewidth=1.6,
                    label=tag)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    for ax in list(axes.flat)[len(grouped):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
