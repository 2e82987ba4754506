"""A sweep's results: the trials table (trials.csv), the best trial as a ready recipe (best.yaml), parameter
importances, two plots (objective per trial, parallel coordinates) and report.md / report.html.

Everything is read back from the study (its database), so any worker can write the report of the whole study.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from align.report import fmt, png_data_uri
from align.runs import atomic_write_text, read_manifest


@dataclass
class Row:
    """One trial in the table."""

    number: int
    state: str  # complete | pruned | fail | running | waiting
    params: dict[str, Any]
    value: float | None  # the objective (pruned: the last value reported)
    seconds: float | None
    dir: str
    note: str = ""


@dataclass
class Summary:
    metrics: dict[str, float]
    best: dict[str, Any]
    outputs: dict[str, Path] = field(default_factory=dict)
    text: str = ""


def rows_of(study: Any) -> list[Row]:
    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        state = t.state.name.lower()
        value = t.value if t.value is not None else (
            t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
        seconds = t.user_attrs.get("seconds")
        if seconds is None and t.datetime_start and t.datetime_complete:
            seconds = (t.datetime_complete - t.datetime_start).total_seconds()
        a = t.user_attrs
        note = (f"same config as trial {a['reused_from']} (reused)" if "reused_from" in a
                else f"continues killed trial {a['resumed_from']}" if "resumed_from" in a else "")
        if state == "pruned" and t.intermediate_values:
            note = f"pruned at step {max(t.intermediate_values)}"
        if state == "fail":
            note = a.get("error") or "stopped (killed or interrupted); retried with the same values"
        rows.append(Row(t.number, state, dict(t.params), value, seconds, a.get("dir", ""), note))
    return rows


def best_recipe(study: Any, root: Path, stage: str, metric: str) -> tuple[str, dict[str, Any]] | None:
    """(YAML text, summary) of the best completed trial: its resolved config with a fresh output_dir."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not complete:
        return None
    best = study.best_trial
    manifest = read_manifest(root / best.user_attrs.get("dir", "")) or {}
    config = dict(manifest.get("config") or {})
    if not config:
        return None
    config.update({k: v for k, v in (("output_dir", f"runs/{stage}-best"), ("overwrite", False),
                                     ("resume", False)) if k in config})
    shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items())
    header = (f"# Best trial of the sweep in {root}: trial {best.number} ({shown}), {metric} = {best.value:.6g}.\n"
              f"# The trial's resolved config; run it with: align {stage} <this file>\n")
    info = {"trial": best.number, "value": best.value, "params": dict(best.params),
            "dir": best.user_attrs.get("dir", "")}
    return header + yaml.safe_dump(config, sort_keys=False), info


def importances(study: Any) -> dict[str, float]:
    """Optuna's parameter importances (PED-ANOVA by default) over the completed trials; {} when too few."""
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(complete) < 2 or len({t.value for t in complete}) < 2:
        return {}
    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (ValueError, RuntimeError, ZeroDivisionError):
        return {}


def objective_plot(rows: list[Row], metric: str, direction: str) -> bytes:
    """The objective of each trial (pruned ones hollow, at their last reported value) and the best so far."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 3.4), dpi=100, layout="constrained")
    ax = fig.subplots()
    done = [r for r in rows if r.state == "complete" and r.value is not None]
    pruned = [r for r in rows if r.state == "pruned" and r.value is not None]
    ax.scatter([r.number for r in done], [r.value for r in done], label="completed", zorder=3)
    if pruned:
        ax.scatter([r.number for r in pruned], [r.value for r in pruned], facecolors="none", edgecolors="gray",
                   label="pruned (last value)", zorder=3)
    best, xs, ys = None, [], []
    for r in done:
        if best is None or (r.value < best if direction == "minimize" else r.value > best):
            best = r.value
        xs.append(r.number)
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="C3", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def parallel_plot(rows: list[Row], metric: str) -> bytes:
    """Parallel coordinates: one axis per parameter (log-scaled where the values span a factor > 20) and the
    objective, one line per completed trial coloured by its objective."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    done = [r for r in rows if r.state == "complete" and r.value is not None]
    keys = sorted({k for r in done for k in r.params})
    fig = Figure(figsize=(1.8 * (len(keys) + 1) + 1.5, 3.4), dpi=100, layout="constrained")
    ax = fig.subplots()
    if not done:
        ax.text(0.5, 0.5, "no completed trials", ha="center")
        return _png(fig)
    columns = [_axis_values([r.params.get(k) for r in done]) for k in keys] + [[r.value for r in done]]
    logs = [_is_log(c) for c in columns]
    scaled = [_scale(c, log) for c, log in zip(columns, logs)]
    lo, hi = min(r.value for r in done), max(r.value for r in done)
    cmap = colormaps["viridis"]
    for i, r in enumerate(done):
        shade = (r.value - lo) / (hi - lo) if hi > lo else 0.5
        ax.plot(range(len(columns)), [c[i] for c in scaled], color=cmap(shade), alpha=0.8, linewidth=1.4)
    ax.set_xticks(range(len(columns)), [f"{k}{' (log)' if log else ''}" for k, log in zip(keys + [metric], logs)],
                  fontsize=7)
    for x, c in enumerate(columns):
        ax.axvline(x, color="black", linewidth=0.6)
        ax.text(x, 1.02, fmt(max(c), 3), ha="center", fontsize=6)
        ax.text(x, -0.06, fmt(min(c), 3), ha="center", va="top", fontsize=6)
    ax.set_yticks([])
    ax.set_ylim(-0.12, 1.08)
    return _png(fig)


def _axis_values(values: list[Any]) -> list[float]:
    """Numbers as they are; other choices (strings, booleans) at their rank among the distinct values."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values]
    order = sorted({str(v) for v in values})
    return [float(order.index(str(v))) for v in values]


def _is_log(values: list[float]) -> bool:
    return min(values) > 0 and max(values) / min(values) > 20


def _scale(values: list[float], log: bool) -> list[float]:
    vs = [math.log(v) for v in values] if log else list(values)
    lo, hi = min(vs), max(vs)
    return [(v - lo) / (hi - lo) if hi > lo else 0.5 for v in vs]


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def table_cells(rows: list[Row], keys: list[str], metric: str) -> tuple[list[str], list[list[str]]]:
    """(header, cells) of the trials table, shared by report.md and report.html."""
    head = ["trial", "state", *keys, metric, "time", "folder", "note"]
    return head, [[str(r.number), r.state, *[_cell(r.params.get(k)) for k in keys], _cell(r.value),
                   fmt(r.seconds, 1) + " s" if r.seconds is not None else "—", r.dir, r.note] for r in rows]


def table_markdown(rows: list[Row], keys: list[str], metric: str) -> str:
    head, cells = table_cells(rows, keys, metric)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "—" if v is None else str(v)


HTML = """<!doctype html><html><head><meta charset="utf-8"><title>{{ title }}</title>
<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}th{background:#eee}pre{background:#f6f6f6;padding:8px}
</style></head><body><h1>{{ title }}</h1><p>{{ intro }}</p>
{% if best %}<h2>Best</h2><p>trial {{ best.trial }}: {{ metric }} = {{ best_value }}</p><pre>{{ command }}</pre>{% endif %}
<h2>Trials</h2><table><tr>{% for h in head %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in table %}<tr>{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}</table>
{% if imp %}<h2>Parameter importance</h2><table><tr><th>parameter</th><th>importance</th></tr>
{% for k, v in imp %}<tr><td>{{ k }}</td><td>{{ v }}</td></tr>{% endfor %}</table>{% endif %}
<h2>Plots</h2>{% for name, uri in plots %}<p><img alt="{{ name }}" src="{{ uri }}"></p>{% endfor %}
</body></html>"""


def write_results(study: Any, cfg: Any, root: Path, plan: Any) -> Summary:
    """Write trials.csv, best.yaml, plots/, report.md and report.html in `root`; return the summary."""
    from jinja2.sandbox import SandboxedEnvironment

    metric, keys = cfg.objective.metric, [p.key for p in plan.params]
    rows = rows_of(study)
    counts = {s: sum(r.state == s for r in rows) for s in ("complete", "pruned", "fail")}
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["trial", "state", *keys, metric, "seconds", "dir", "note"])
    for r in rows:
        writer.writerow([r.number, r.state, *[r.params.get(k, "") for k in keys], "" if r.value is None else r.value,
                         "" if r.seconds is None else round(r.seconds, 2), r.dir, r.note])
    outputs = {"trials": root / "trials.csv", "report_md": root / "report.md", "report_html": root / "report.html"}
    atomic_write_text(outputs["trials"], buf.getvalue())

    best = best_recipe(study, root, cfg.stage, metric)
    info: dict[str, Any] = {}
    command = ""
    if best is not None:
        text, info = best
        atomic_write_text(root / "best.yaml", text)
        outputs["best_recipe"] = root / "best.yaml"
        command = f"align {cfg.stage} {root / 'best.yaml'}"
    imp = importances(study)
    plots = {"objective": objective_plot(rows, metric, cfg.objective.direction), "parallel": parallel_plot(rows, metric)}
    (root / "plots").mkdir(exist_ok=True)
    for name, png in plots.items():
        (root / "plots" / f"{name}.png").write_bytes(png)

    intro = (f"{cfg.stage} sweep, {cfg.sampler} sampler, pruner {cfg.pruning.pruner}, {cfg.objective.direction} "
             f"{metric}: {counts['complete']} completed, {counts['pruned']} pruned, {counts['fail']} failed.")
    table = table_markdown(rows, keys, metric)
    best_line = (f"Best: trial {info['trial']}, {metric} = {info['value']:.6g} — `{command}`" if info
                 else "Best: none (no completed trial)")
    imp_md = "\n".join(f"- {k}: {v:.3f}" for k, v in imp.items()) or "- (needs 2+ completed trials that differ)"
    md = (f"# Sweep {root.name}\n\n{intro}\n\n{best_line}\n\n## Trials\n\n{table}\n\n## Parameter importance\n\n"
          f"{imp_md}\n\n## Plots\n\n![objective](plots/objective.png)\n\n![parallel](plots/parallel.png)\n")
    atomic_write_text(outputs["report_md"], md)
    env = SandboxedEnvironment(autoescape=True)
    head, html_rows = table_cells(rows, keys, metric)
    atomic_write_text(outputs["report_html"], env.from_string(HTML).render(
        title=f"Sweep {root.name}", intro=intro, best=info, metric=metric, command=command, head=head,
        best_value=f"{info['value']:.6g}" if info else "", table=html_rows,
        imp=[(k, f"{v:.3f}") for k, v in imp.items()],
        plots=[(name, png_data_uri(png)) for name, png in plots.items()]))

    metrics = {"trials_complete": counts["complete"], "trials_pruned": counts["pruned"], "trials_failed": counts["fail"]}
    if info:
        metrics.update({"best_value": info["value"], "best_trial": info["trial"]})
    metrics.update({f"importance/{k}": v for k, v in imp.items()})
    return Summary(metrics, info, outputs, f"\n{table}\n\n{best_line}")
